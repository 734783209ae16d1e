// What the direct entries to the CPU kernels (rescale_in_place in rescale.cpp,
// pad_add_in_place in pad_add.cpp) check before they run a kernel without the
// op's dispatch: anything these do not accept is left to the op, which handles
// or reports it (fusedconv/kernels/__init__.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>

#include <Python.h>

#include <optional>

namespace fusedconv {

// Whether the op would reach its CPU kernel with nothing else seeing the call:
// the thread's dispatch state is torch's default (no dispatch mode, functorch
// transform, inference mode or autocast), grad mode is off (the wrappers call
// under no_grad), and no record-function callback (the profiler, an
// observer) would record the op. Torch function modes and torch.compile live
// in Python, which checks them (fusedconv/kernels/__init__.py).
inline bool unobserved_default_state() {
  const c10::impl::LocalDispatchKeySet state = c10::impl::tls_local_dispatch_key_set();
  return state.included_ == c10::default_included_set && state.excluded_ == c10::default_excluded_set &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !c10::GradMode::is_enabled() &&
         !at::hasCallbacks();
}

// The dispatch keys of a plain dense CPU tensor made outside inference mode.
// Any other set (a conjugate or negative view, a functorch wrapper, a tensor
// made in inference mode, another device or layout) is left to the op.
inline c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = at::empty({0}, at::TensorOptions().dtype(at::kFloat)).key_set();
  return keys;
}

// ``object`` as a tensor a direct call takes (exactly a Tensor or a Parameter,
// with plain CPU keys), else null.
inline const at::Tensor* plain_cpu_tensor(PyObject* object) {
  if (!THPVariable_CheckExact(object)) return nullptr;
  const at::Tensor& tensor = THPVariable_Unpack(object);
  return tensor.key_set() == plain_cpu_keys() ? &tensor : nullptr;
}

// A weight or kernel the checks accept: a float dtype, at least 2 dims.
inline bool is_float_kernel(const at::Tensor& tensor) {
  const at::ScalarType dtype = tensor.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16) &&
         tensor.dim() >= 2;
}

// Contiguous or channels_last: the kernels walk such a tensor as one flat block.
inline bool has_dense_rows(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// Whether ``object`` is exactly a Python int that fits, stored to ``value``.
inline bool read_int(PyObject* object, int64_t* value) {
  if (!PyLong_CheckExact(object)) return false;
  int overflow = 0;
  *value = PyLong_AsLongLongAndOverflow(object, &overflow);
  return overflow == 0;
}

// A scale the checks accept, contiguous (the op path makes a strided one
// contiguous first): None, or a float64 vector of ``length``.
inline bool read_scale(PyObject* object, int64_t length, std::optional<at::Tensor>* scale) {
  if (object == Py_None) return true;
  const at::Tensor* tensor = plain_cpu_tensor(object);
  if (tensor == nullptr || tensor->scalar_type() != at::kDouble || tensor->dim() != 1 ||
      tensor->size(0) != length || !tensor->is_contiguous())
    return false;
  *scale = *tensor;
  return true;
}

// Runs ``kernel`` without the GIL, below autograd (the views it makes are its
// own and never escape), with torch's translation of C++ errors and warnings
// into Python ones, as torch's own bindings do. Returns True, or null with the
// Python error set.
template <typename Kernel>
PyObject* run_kernel(Kernel&& kernel) {
  HANDLE_TH_ERRORS
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    kernel();
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// a + b * c <= limit for non-negative values, without overflow.
inline bool fits(int64_t a, int64_t b, int64_t c, int64_t limit) {
  int64_t product = 0, sum = 0;
  return !__builtin_mul_overflow(b, c, &product) && !__builtin_add_overflow(a, product, &sum) && sum <= limit;
}

}  // namespace fusedconv
