// rescale_ on the CPU: W[r, c, ...] = round(W * (row_scale[r] * col_scale[g(r) * cols + c])).
//
// The common case, a BN after a Conv or Linear, scales each row by one factor;
// a row of a contiguous or channels_last weight is one contiguous block, so a
// plain loop that the compiler vectorizes does it at close to memory speed.
// Anything else (a BN before the layer, a ConvTranspose) takes one
// TensorIterator pass, which walks the weight in memory order and reads the
// float64 factors through broadcast views. Neither allocates.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include <algorithm>

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

bool has_dense_rows(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// Elements per task: large enough to amortise scheduling, small enough to split
// a single big weight across threads.
constexpr int64_t kGrain = 1 << 16;

template <typename scalar_t>
void scale_rows(scalar_t* data, const double* row_scale, int64_t numel, int64_t row_length) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t row = start / row_length;
      const int64_t stop = std::min(end, (row + 1) * row_length);
      const double factor = row_scale[row];
      for (int64_t i = start; i < stop; ++i) {
        data[i] = round_from_double<scalar_t>(static_cast<double>(data[i]) * factor);
      }
      start = stop;
    }
  });
}

void rescale_one(const at::Tensor& weight, const std::optional<at::Tensor>& row_scale,
                 const std::optional<at::Tensor>& col_scale, int64_t groups) {
  if ((!row_scale.has_value() && !col_scale.has_value()) || weight.numel() == 0) {
    return;
  }
  if (!col_scale.has_value() && has_dense_rows(weight) && row_scale->is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fusedconv_scale_rows", [&] {
      scale_rows(weight.data_ptr<scalar_t>(), row_scale->const_data_ptr<double>(), weight.numel(),
                 weight.numel() / weight.size(0));
    });
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
