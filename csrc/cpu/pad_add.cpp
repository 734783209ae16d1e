// pad_add_ on the CPU: big[o, i, off + j * dil] = round(big + small[o, i, j] * scale[o]).
//
// The window of the big kernel that the small one lands on is a strided view,
// so one TensorIterator pass per pair adds in place without temporaries.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include "../module.h"
#include "../rounding.h"
#include "direct_call.h"

namespace fusedconv {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

void pad_add_one(const at::Tensor& big, const at::Tensor& small, const std::optional<at::Tensor>& scale,
                 const int64_t* offsets, const int64_t* dilations) {
  if (small.numel() == 0) {
    return;
  }
  at::Tensor window = big;
  for (int64_t d = 2; d < big.dim(); ++d) {
    const int64_t start = offsets[d - 2], step = dilations[d - 2];
    window = window.slice(d, start, start + step * (small.size(d) - 1) + 1, step);
  }
  std::vector<int64_t> per_row(big.dim(), 1);
  per_row[0] = big.size(0);
  at::Tensor factor = scale.has_value() ? scale->view(per_row) : at::ones({}, big.options().dtype(at::kDouble));
  auto iter = at::TensorIteratorConfig()
                  .add_output(window)
                  .add_const_input(window)
                  .add_const_input(small)
                  .add_const_input(factor)
                  .check_all_same_dtype(false)
                  .resize_outputs(false)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, big.scalar_type(), "fusedconv_pad_add_cpu", [&] {
    at::native::cpu_kernel(iter, [](scalar_t b, scalar_t s, double f) -> scalar_t {
      return round_from_double<scalar_t>(static_cast<double>(b) + static_cast<double>(s) * f);
    });
  });
}

// Each pair in turn, its spatial dims' offsets and dilations read in order.
void pad_add_all(at::TensorList bigs, at::TensorList smalls, const std::vector<std::optional<at::Tensor>>& scales,
                 at::IntArrayRef offsets, at::IntArrayRef dilations) {
  size_t at = 0;
  for (size_t i = 0; i < bigs.size(); ++i) {
    const size_t spatial = bigs[i].dim() - 2;
    TORCH_CHECK(at + spatial <= offsets.size() && at + spatial <= dilations.size(),
                "pad_add_: too few offsets or dilations");
    pad_add_one(bigs[i], smalls[i], scales[i], offsets.data() + at, dilations.data() + at);
    at += spatial;
  }
}

void pad_add_cpu(at::TensorList bigs, at::TensorList smalls, const OptionalTensors& scales, at::IntArrayRef offsets,
                 at::IntArrayRef dilations) {
  TORCH_CHECK(smalls.size() == bigs.size() && scales.size() == bigs.size(),
              "pad_add_: one small kernel and scale per big kernel");
  pad_add_all(bigs, smalls, std::vector<std::optional<at::Tensor>>(scales.begin(), scales.end()), offsets, dilations);
}

}  // namespace

// pad_add_in_place(bigs, smalls, scales, offsets, dilations) -> True, or None:
// the CPU kernel of fusedconv::pad_add_ called directly, as rescale_in_place
// (cpu/rescale.cpp) is, where the arguments pass the checks of
// fusedconv/kernels/__init__.py (check_pad_add_args) on plain dense CPU
// tensors (small kernels contiguous, as the op path makes them) in torch's
// default dispatch state; None leaves the call to the op.
PyObject* pad_add_in_place(PyObject* /*self*/, PyObject* args) {
  PyObject *big_list, *small_list, *scale_list, *offset_list, *dilation_list;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!", &PyList_Type, &big_list, &PyList_Type, &small_list, &PyList_Type,
                        &scale_list, &PyList_Type, &offset_list, &PyList_Type, &dilation_list))
    return nullptr;
  const Py_ssize_t count = PyList_GET_SIZE(big_list);
  if (count == 0 || PyList_GET_SIZE(small_list) != count || PyList_GET_SIZE(scale_list) != count ||
      !unobserved_default_state())
    Py_RETURN_NONE;
  std::vector<at::Tensor> bigs, smalls;
  std::vector<std::optional<at::Tensor>> scales(static_cast<size_t>(count));
  std::vector<int64_t> offsets, dilations;
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor* big = plain_cpu_tensor(PyList_GET_ITEM(big_list, i));
    const at::Tensor* small = plain_cpu_tensor(PyList_GET_ITEM(small_list, i));
    if (big == nullptr || small == nullptr || !is_float_kernel(*big) || small->scalar_type() != big->scalar_type() ||
        small->dim() != big->dim() || small->size(0) != big->size(0) || small->size(1) != big->size(1) ||
        !has_dense_rows(*big) || !small->is_contiguous() ||
        !read_scale(PyList_GET_ITEM(scale_list, i), big->size(0), &scales[static_cast<size_t>(i)]))
      Py_RETURN_NONE;
    for (int64_t d = 2; d < big->dim(); ++d) {
      const Py_ssize_t at = static_cast<Py_ssize_t>(offsets.size());
      int64_t offset = 0, dilation = 0;
      if (at >= PyList_GET_SIZE(offset_list) || at >= PyList_GET_SIZE(dilation_list) ||
          !read_int(PyList_GET_ITEM(offset_list, at), &offset) ||
          !read_int(PyList_GET_ITEM(dilation_list, at), &dilation) || dilation < 1 || offset < 0 ||
          small->size(d) < 1 || !fits(offset, dilation, small->size(d) - 1, big->size(d) - 1))
        Py_RETURN_NONE;
      offsets.push_back(offset);
      dilations.push_back(dilation);
    }
    bigs.push_back(*big);
    smalls.push_back(*small);
  }
  if (static_cast<Py_ssize_t>(offsets.size()) != PyList_GET_SIZE(offset_list) ||
      static_cast<Py_ssize_t>(dilations.size()) != PyList_GET_SIZE(dilation_list))
    Py_RETURN_NONE;
  return run_kernel([&] { pad_add_all(bigs, smalls, scales, offsets, dilations); });
}

}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CPU, m) {
  m.impl("pad_add_", &fusedconv::pad_add_cpu);
}
