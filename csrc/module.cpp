// The library is also a Python module (fusedconv._C, or the name of a build on
// first use); fusedconv/kernels/extension.py imports it for these functions.
#include "module.h"

#define FUSEDCONV_CONCAT_(a, b) a##b
#define FUSEDCONV_CONCAT(a, b) FUSEDCONV_CONCAT_(a, b)
#define FUSEDCONV_QUOTE_(x) #x
#define FUSEDCONV_QUOTE(x) FUSEDCONV_QUOTE_(x)

namespace {

PyMethodDef methods[] = {
    {"walk_modules", fusedconv::walk_modules, METH_VARARGS,
     "The walk of fusedconv.model_index._Walk, filling the walk's fields (csrc/walk.cpp)."},
    {"bn_affines", fusedconv::bn_affines, METH_VARARGS,
     "The float64 affine maps of eval-mode BatchNorms, as fusedconv.affine computes them (csrc/affines.cpp)."},
    {"folded_biases", fusedconv::folded_biases, METH_VARARGS,
     "The new biases of layers followed by a BN, as fusedconv.fold computes them (csrc/affines.cpp)."},
    {"rescale_in_place", fusedconv::rescale_in_place, METH_VARARGS,
     "The CPU kernel of fusedconv::rescale_, called directly on plain tensors (csrc/cpu/rescale.cpp)."},
    {"pad_add_in_place", fusedconv::pad_add_in_place, METH_VARARGS,
     "The CPU kernel of fusedconv::pad_add_, called directly on plain tensors (csrc/cpu/pad_add.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, FUSEDCONV_QUOTE(TORCH_EXTENSION_NAME), "fusedconv's helpers in C (csrc/module.h)", -1,
    methods,
};

}  // namespace

PyMODINIT_FUNC FUSEDCONV_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&module_definition);
}
