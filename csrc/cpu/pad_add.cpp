// pad_add_ on the CPU: big[o, i, off + j * dil] = round(big + small[o, i, j] * scale[o]).
//
// The window of the big kernel that the small one lands on is a strided view,
// so one TensorIterator pass per pair adds in place without temporaries.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include "../rounding.h"

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

void pad_add_cpu(at::TensorList bigs, at::TensorList smalls, const OptionalTensors& scales, at::IntArrayRef offsets,
                 at::IntArrayRef dilations) {
  TORCH_CHECK(smalls.size() == bigs.size() && scales.size() == bigs.size(),
              "pad_add_: one small kernel and scale per big kernel");
  size_t at = 0;
  for (size_t i = 0; i < bigs.size(); ++i) {
    const size_t spatial = bigs[i].dim() - 2;
    TORCH_CHECK(at + spatial <= offsets.size() && at + spatial <= dilations.size(),
                "pad_add_: too few offsets or dilations");
    pad_add_one(bigs[i], smalls[i], scales.get(i), offsets.data() + at, dilations.data() + at);
    at += spatial;
  }
}

}  // namespace
}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CPU, m) {
  m.impl("pad_add_", &fusedconv::pad_add_cpu);
}
