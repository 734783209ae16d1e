// rescale_ on the CPU: W[r, c, ...] = round(W * (row_scale[r] * col_scale[g(r) * cols + c])).
//
// One TensorIterator pass per weight: it walks contiguous and channels_last
// weights in memory order, splits the work across threads, and reads the
// float64 factors through broadcast views, so nothing is allocated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include "../rounding.h"

namespace fusedconv {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// A per-row (dims 0, 1 of the grouped view) or per-(group, column) (dims 0, 2)
// float64 factor that broadcasts against the grouped weight; 1 when absent.
at::Tensor factor_view(const std::optional<at::Tensor>& scale, const at::Tensor& grouped, bool per_row) {
  if (!scale.has_value()) {
    return at::ones({}, grouped.options().dtype(at::kDouble));
  }
  std::vector<int64_t> shape(grouped.dim(), 1);
  shape[0] = grouped.size(0);
  shape[per_row ? 1 : 2] = grouped.size(per_row ? 1 : 2);
  return scale->view(shape);
}

void rescale_one(const at::Tensor& weight, const std::optional<at::Tensor>& row_scale,
                 const std::optional<at::Tensor>& col_scale, int64_t groups) {
  if ((!row_scale.has_value() && !col_scale.has_value()) || weight.numel() == 0) {
    return;
  }
  // (groups, rows/groups, cols, *k): a view for contiguous and channels_last alike.
  at::Tensor grouped = weight.unflatten(0, {groups, weight.size(0) / groups});
  at::Tensor rows = factor_view(row_scale, grouped, true);
  at::Tensor cols = factor_view(col_scale, grouped, false);
  auto iter = at::TensorIteratorConfig()
                  .add_output(grouped)
                  .add_const_input(grouped)
                  .add_const_input(rows)
                  .add_const_input(cols)
                  .check_all_same_dtype(false)
                  .resize_outputs(false)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fusedconv_rescale_cpu", [&] {
    at::native::cpu_kernel(iter, [](scalar_t w, double row, double col) -> scalar_t {
      return round_from_double<scalar_t>(static_cast<double>(w) * (row * col));
    });
  });
}

void rescale_cpu(at::TensorList weights, const OptionalTensors& row_scales, const OptionalTensors& col_scales,
                 at::IntArrayRef groups) {
  TORCH_CHECK(row_scales.size() == weights.size() && col_scales.size() == weights.size() &&
                  groups.size() == weights.size(),
              "rescale_: one row scale, column scale and group count per weight");
  for (size_t i = 0; i < weights.size(); ++i) {
    rescale_one(weights[i], row_scales.get(i), col_scales.get(i), groups[i]);
  }
}

}  // namespace
}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CPU, m) {
  m.impl("rescale_", &fusedconv::rescale_cpu);
}
