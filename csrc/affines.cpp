// The per-channel float64 math of a fold on the CPU, each in one call, exactly
// as fusedconv's torch code computes it (the same operations in the same
// order, torch's own sqrt, so the same bits):
// * bn_affines: the affine maps of many eval-mode BatchNorms (fusedconv/affine.py),
//     scale = gamma / sqrt(running_var + eps),   shift = beta - running_mean * scale;
// * folded_biases: the new biases of many layers followed by a BN
//   (fusedconv/fold.py, plan_layer_folds), round(bias * scale + shift [+ extra]).
//
// Why: a fold reads every BN's statistics once, and with torch ops that is a
// dozen small operations (a concatenation, a conversion, the checks, the
// arithmetic, a split). Each is cheap when warm, but a fold usually runs right
// after a model is loaded or copied, when torch's code paths have left the
// caches, and then each distinct op costs far more than its arithmetic. A
// function of the Python module, not a torch op: the dispatcher's parsing of
// a hundred tensors in lists would cost more than the arithmetic too.
//
// Tensors either does not read directly (not exactly a Tensor or Parameter,
// another dtype, device or layout, channel counts that disagree) give None:
// the caller then takes the torch path, which handles (or reports) anything.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include "module.h"
#include "rounding.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fusedconv {
namespace {

struct Affines {
  std::vector<at::Tensor> scales, shifts;  // empty: not read
  bool all_fit = false;
};

// The statistics of one BN; gamma and beta may be absent (affine=False).
struct Statistics {
  const at::Tensor* mean;
  const at::Tensor* var;
  const at::Tensor* gamma;
  const at::Tensor* beta;
  double eps;
};

template <typename T>
void widen(const T* values, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(static_cast<float>(values[i]));
}

template <>
void widen<double>(const double* values, int64_t n, double* out) {
  std::copy(values, values + n, out);
}

// ``n`` values of a statistic as float64 (widening is exact); false where the
// tensor is not one this file reads.
bool read_as_double(const at::Tensor& tensor, int64_t n, double* out) {
  if (tensor.device().type() != c10::DeviceType::CPU || tensor.layout() != at::kStrided || tensor.numel() != n ||
      !tensor.has_storage() || !tensor.is_contiguous() || tensor.is_conj() || tensor.is_neg())
    return false;
  switch (tensor.scalar_type()) {
    case at::kFloat:
      widen(tensor.const_data_ptr<float>(), n, out);
      return true;
    case at::kDouble:
      widen(tensor.const_data_ptr<double>(), n, out);
      return true;
    case at::kHalf:
      widen(tensor.const_data_ptr<at::Half>(), n, out);
      return true;
    case at::kBFloat16:
      widen(tensor.const_data_ptr<at::BFloat16>(), n, out);
      return true;
    default:
      return false;
  }
}

// Whether every statistic is finite and every running_var + eps positive.
bool statistics_fit(const double* mean, const double* var, const double* gamma, const double* beta,
                    const double* var_eps, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(std::isfinite(mean[i]) && std::isfinite(var[i]) && std::isfinite(gamma[i]) && std::isfinite(beta[i]) &&
          var_eps[i] > 0))
      return false;
  }
  return true;
}

// scale = gamma / root, shift = beta - mean * scale: one rounding per
// operation, as torch's element-wise ops round (GCC would otherwise contract
// the product and the difference into one fused multiply-add where the target
// has one, and round once).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void affine_maps(const double* mean, const double* gamma, const double* beta, const double* root, int64_t n,
                 double* scale, double* shift) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = gamma[i] / root[i];
    const double product = mean[i] * scale[i];
    shift[i] = beta[i] - product;
  }
}

// value = bias * scale + shift (+ extra): one rounding per operation, as the
// torch path's three ops round.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void new_biases(const double* bias, const double* scale, const double* shift, const double* extra, int64_t n,
                double* value) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const double product = bias[i] * scale[i];
    value[i] = product + shift[i];
    if (extra) value[i] = value[i] + extra[i];
  }
}

// ``n`` elements of ``base``'s storage from ``offset``, as a vector of its
// own that shares the storage (made directly: a narrow goes through the
// dispatcher, which for a hundred BNs costs more than all the arithmetic).
at::Tensor slice_of(const at::Tensor& base, int64_t offset, int64_t n) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(), base.dtype());
  impl->set_storage_offset(offset);
  impl->set_sizes_contiguous({n});
  return at::Tensor(std::move(impl));
}

Affines affines_of(const std::vector<Statistics>& bns) {
  const size_t count = bns.size();
  Affines not_read;
  std::vector<int64_t> sizes(count);
  int64_t total = 0;
  for (size_t b = 0; b < count; ++b) {
    sizes[b] = bns[b].mean->numel();
    total += sizes[b];
  }
  // The statistics as rows of one float64 table: mean, var, gamma, beta, and
  // var + eps, whose square root torch's own sqrt takes (on some builds it
  // is not the correctly rounded one, and the maps must be torch's bit for bit).
  at::Tensor table = at::detail::empty_cpu({5, total}, at::kDouble);
  double* mean = table.mutable_data_ptr<double>();
  double *var = mean + total, *gamma = var + total, *beta = gamma + total, *root = beta + total;
  int64_t at = 0;
  for (size_t b = 0; b < count; ++b) {
    const int64_t n = sizes[b];
    const Statistics& bn = bns[b];
    if (!read_as_double(*bn.mean, n, mean + at) || !read_as_double(*bn.var, n, var + at)) return not_read;
    if (bn.gamma) {
      if (!read_as_double(*bn.gamma, n, gamma + at)) return not_read;
    } else {
      std::fill(gamma + at, gamma + at + n, 1.0);  // affine=False
    }
    if (bn.beta) {
      if (!read_as_double(*bn.beta, n, beta + at)) return not_read;
    } else {
      std::fill(beta + at, beta + at + n, 0.0);
    }
    for (int64_t i = at; i < at + n; ++i) root[i] = var[i] + bn.eps;
    at += n;
  }
  const bool all_fit = statistics_fit(mean, var, gamma, beta, root, total);
  slice_of(table, 4 * total, total).sqrt_();
  at::Tensor maps = at::detail::empty_cpu({2, total}, at::kDouble);
  double* scale = maps.mutable_data_ptr<double>();
  affine_maps(mean, gamma, beta, root, total, scale, scale + total);
  Affines affines;
  affines.scales.reserve(count);
  affines.shifts.reserve(count);
  at = 0;
  for (size_t b = 0; b < count; ++b) {  // each BN's maps: slices of the two vectors
    affines.scales.push_back(slice_of(maps, at, sizes[b]));
    affines.shifts.push_back(slice_of(maps, total + at, sizes[b]));
    at += sizes[b];
  }
  affines.all_fit = all_fit;
  return affines;
}

// A plain tensor (exactly a Tensor or a Parameter: a subclass has its own way
// with ops), or None where ``optional``; false for anything else.
bool unpack(PyObject* object, bool optional, const at::Tensor** tensor) {
  if (optional && object == Py_None) {
    *tensor = nullptr;
    return true;
  }
  if (!THPVariable_CheckExact(object)) return false;
  *tensor = &THPVariable_Unpack(object);
  return true;
}

// A new list of the tensors, wrapped for Python.
PyObject* tensor_list(const std::vector<at::Tensor>& tensors) {
  Ref list(PyList_New(static_cast<Py_ssize_t>(tensors.size())));
  if (!list) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyObject* wrapped = THPVariable_Wrap(tensors[i]);
    if (!wrapped) return nullptr;
    PyList_SET_ITEM(list.get(), static_cast<Py_ssize_t>(i), wrapped);
  }
  Py_INCREF(list.get());
  return list.get();
}

// The new biases of layers followed by a BN, each a vector of its own in the
// layers' dtype: round(bias * scale + shift), plus the extra term where one
// is given (to every layer when any has one: 0 where none, which turns a -0 to
// +0 as the torch path's added zeros do). Empty where a tensor is not read.
std::vector<at::Tensor> folded_biases_of(const std::vector<const at::Tensor*>& scales,
                                         const std::vector<const at::Tensor*>& shifts,
                                         const std::vector<const at::Tensor*>& biases,
                                         const std::vector<const at::Tensor*>& extras, at::ScalarType dtype) {
  bool any_extra = false;
  int64_t widest = 0;
  for (size_t l = 0; l < scales.size(); ++l) {
    any_extra = any_extra || extras[l];
    widest = std::max(widest, scales[l]->numel());
  }
  std::vector<double> row(static_cast<size_t>(5 * widest));
  double *scale = row.data(), *shift = scale + widest, *bias = shift + widest, *extra = bias + widest,
         *value = extra + widest;
  std::vector<at::Tensor> made;
  made.reserve(scales.size());
  for (size_t l = 0; l < scales.size(); ++l) {
    const int64_t n = scales[l]->numel();
    if (scales[l]->scalar_type() != at::kDouble || !read_as_double(*scales[l], n, scale) ||
        shifts[l]->scalar_type() != at::kDouble || !read_as_double(*shifts[l], n, shift) ||
        (extras[l] && (extras[l]->scalar_type() != at::kDouble || !read_as_double(*extras[l], n, extra))) ||
        (biases[l] && !read_as_double(*biases[l], n, bias)))
      return {};
    if (!biases[l]) std::fill(bias, bias + n, 0.0);
    if (!extras[l]) std::fill(extra, extra + n, 0.0);
    new_biases(bias, scale, shift, any_extra ? extra : nullptr, n, value);
    at::Tensor out = at::detail::empty_cpu({n}, dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedconv_folded_biases", [&] {
      scalar_t* written = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) written[i] = round_from_double<scalar_t>(value[i]);
    });
    made.push_back(std::move(out));
  }
  return made;
}

}  // namespace

// bn_affines(means, variances, gammas, betas, eps) -> (scales, shifts, all_fit)
// or None: a slice of two float64 vectors per BN; all_fit says whether every
// value is finite and every running_var + eps positive, the test the torch
// path makes before it looks for the BN to blame.
PyObject* bn_affines(PyObject* /*self*/, PyObject* args) {
  PyObject *means, *variances, *gammas, *betas, *eps;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!", &PyList_Type, &means, &PyList_Type, &variances, &PyList_Type, &gammas,
                        &PyList_Type, &betas, &PyList_Type, &eps))
    return nullptr;
  const Py_ssize_t count = PyList_GET_SIZE(means);
  if (PyList_GET_SIZE(variances) != count || PyList_GET_SIZE(gammas) != count || PyList_GET_SIZE(betas) != count ||
      PyList_GET_SIZE(eps) != count) {
    PyErr_SetString(PyExc_ValueError, "bn_affines: one variance, gamma, beta and eps per mean");
    return nullptr;
  }
  std::vector<Statistics> bns(static_cast<size_t>(count));
  for (Py_ssize_t b = 0; b < count; ++b) {
    Statistics& bn = bns[static_cast<size_t>(b)];
    PyObject* epsilon = PyList_GET_ITEM(eps, b);
    if (!unpack(PyList_GET_ITEM(means, b), false, &bn.mean) || !unpack(PyList_GET_ITEM(variances, b), false, &bn.var) ||
        !unpack(PyList_GET_ITEM(gammas, b), true, &bn.gamma) || !unpack(PyList_GET_ITEM(betas, b), true, &bn.beta) ||
        !PyFloat_CheckExact(epsilon))
      Py_RETURN_NONE;
    bn.eps = PyFloat_AS_DOUBLE(epsilon);
  }
  Affines affines;
  try {
    affines = affines_of(bns);
  } catch (const std::exception&) {  // a tensor whose data cannot be read here (a wrapper without storage...)
    Py_RETURN_NONE;
  }
  if (affines.scales.size() != static_cast<size_t>(count)) Py_RETURN_NONE;  // not read
  Ref scales(tensor_list(affines.scales));
  if (!scales) return nullptr;
  Ref shifts(tensor_list(affines.shifts));
  if (!shifts) return nullptr;
  return Py_BuildValue("(OOO)", scales.get(), shifts.get(), affines.all_fit ? Py_True : Py_False);
}

// folded_biases(scales, shifts, biases, extras, dtype) -> [new bias, ...] or
// None: scales, shifts and extras float64, a bias or extra None where the
// layer has none; each new bias its own vector in ``dtype``.
PyObject* folded_biases(PyObject* /*self*/, PyObject* args) {
  PyObject *scale_list, *shift_list, *bias_list, *extra_list, *dtype_object;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O", &PyList_Type, &scale_list, &PyList_Type, &shift_list, &PyList_Type,
                        &bias_list, &PyList_Type, &extra_list, &dtype_object))
    return nullptr;
  if (!THPDtype_Check(dtype_object)) {
    PyErr_SetString(PyExc_TypeError, "folded_biases: dtype must be a torch.dtype");
    return nullptr;
  }
  const at::ScalarType dtype = reinterpret_cast<THPDtype*>(dtype_object)->scalar_type;
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) Py_RETURN_NONE;
  const Py_ssize_t count = PyList_GET_SIZE(scale_list);
  if (PyList_GET_SIZE(shift_list) != count || PyList_GET_SIZE(bias_list) != count ||
      PyList_GET_SIZE(extra_list) != count) {
    PyErr_SetString(PyExc_ValueError, "folded_biases: one shift, bias and extra per scale");
    return nullptr;
  }
  std::vector<const at::Tensor*> scales(count), shifts(count), biases(count), extras(count);
  for (Py_ssize_t l = 0; l < count; ++l) {
    if (!unpack(PyList_GET_ITEM(scale_list, l), false, &scales[l]) ||
        !unpack(PyList_GET_ITEM(shift_list, l), false, &shifts[l]) ||
        !unpack(PyList_GET_ITEM(bias_list, l), true, &biases[l]) ||
        !unpack(PyList_GET_ITEM(extra_list, l), true, &extras[l]))
      Py_RETURN_NONE;
  }
  std::vector<at::Tensor> made;
  try {
    made = folded_biases_of(scales, shifts, biases, extras, dtype);
  } catch (const std::exception&) {  // as in bn_affines: the torch path reads it
    Py_RETURN_NONE;
  }
  if (made.size() != static_cast<size_t>(count)) Py_RETURN_NONE;
  return tensor_list(made);
}

}  // namespace fusedconv
