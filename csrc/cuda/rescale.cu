// rescale_ on CUDA: every weight of one dtype in one launch. Each element is
// read from the weight itself (in place) or from its separate source.
//
// Each thread block takes a chunk of one weight's flat memory. Contiguous and
// channels_last weights both keep dim 0 outermost, so an element's row is its
// flat index divided by stride(0) and its column is (index within the row /
// stride(1)) mod cols. Offsets are int64; only offsets inside one row (checked
// below 2^31) use 32-bit arithmetic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../rounding.h"
#include "batch_table.h"

namespace fusedconv {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

enum RescaleField : int { kData, kSource, kNumel, kRowLength, kColStride, kCols, kRowsPerGroup, kRowScale, kColScale, kFields };

template <typename scalar_t>
__global__ void rescale_kernel(const int64_t* __restrict__ table, int64_t num_records) {
  const int64_t* chunk = table + num_records * kFields + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* record = table + chunk[0] * kFields;
  const int64_t start = chunk[1];
  scalar_t* data = reinterpret_cast<scalar_t*>(record[kData]);
  const scalar_t* source = reinterpret_cast<const scalar_t*>(record[kSource]);
  const double* row_scale = reinterpret_cast<const double*>(record[kRowScale]);
  const double* col_scale = reinterpret_cast<const double*>(record[kColScale]);
  const int64_t row_length = record[kRowLength];
  const uint32_t row_length32 = static_cast<uint32_t>(row_length);
  const uint32_t col_stride = static_cast<uint32_t>(record[kColStride]);
  const uint32_t cols = static_cast<uint32_t>(record[kCols]);
  const int64_t rows_per_group = record[kRowsPerGroup];
  const int64_t first_row = start / row_length;
  const uint32_t first_offset = static_cast<uint32_t>(start - first_row * row_length);
  const uint32_t length = static_cast<uint32_t>(min(kChunkElements, record[kNumel] - start));

  for (uint32_t k = threadIdx.x; k < length; k += blockDim.x) {
    const uint32_t within = first_offset + k;  // < row_length + kChunkElements < 2^32
    const int64_t row = first_row + within / row_length32;
    double factor = row_scale != nullptr ? row_scale[row] : 1.0;
    if (col_scale != nullptr) {
      const uint32_t col = (within % row_length32) / col_stride % cols;
      factor *= col_scale[(row / rows_per_group) * cols + col];
    }
    data[start + k] = round_from_double<scalar_t>(static_cast<double>(source[start + k]) * factor);
  }
}

void rescale_cuda(at::TensorList weights, const OptionalTensors& row_scales, const OptionalTensors& col_scales,
                  at::IntArrayRef groups, at::TensorList sources) {
  TORCH_CHECK(row_scales.size() == weights.size() && col_scales.size() == weights.size() &&
                  groups.size() == weights.size() && sources.size() == weights.size(),
              "rescale_: one row scale, column scale, group count and source per weight");
  if (weights.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<const void*> targets;
  for (const at::Tensor& w : weights) {
    targets.push_back(w.data_ptr());
  }
  int num_waves = 0;
  const std::vector<int> wave = waves_by_target(targets, &num_waves);
  for (int current = 0; current < num_waves; ++current) {
    for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
      BatchTable table;
      for (size_t i = 0; i < weights.size(); ++i) {
        const at::Tensor& w = weights[i];
        const std::optional<at::Tensor> row = row_scales.get(i), col = col_scales.get(i);
        if (wave[i] != current || w.scalar_type() != dtype || w.numel() == 0 ||
            (!row.has_value() && !col.has_value())) {
          continue;
        }
        TORCH_CHECK(w.is_cuda(), "rescale_: weights must be CUDA tensors");
        // Dense with dim 0 outermost (contiguous or channels_last): a row is numel / rows
        // elements. stride(0) itself is not used: it is arbitrary when there is one row.
        const int64_t row_length = w.numel() / w.size(0);
        TORCH_CHECK(row_length < std::numeric_limits<int32_t>::max() - kChunkElements,
                    "rescale_: a row of more than 2^31 elements is not supported");
        int64_t* r = table.add_record(kFields, w.numel());
        r[kData] = reinterpret_cast<int64_t>(w.data_ptr());
        r[kSource] = reinterpret_cast<int64_t>(sources[i].const_data_ptr());
        r[kNumel] = w.numel();
        r[kRowLength] = row_length;
        r[kColStride] = w.size(1) > 1 ? w.stride(1) : 1;  // any stride is legal for a size-1 dim
        r[kCols] = w.size(1);
        r[kRowsPerGroup] = w.size(0) / groups[i];
        r[kRowScale] = row.has_value() ? reinterpret_cast<int64_t>(row->data_ptr()) : 0;
        r[kColScale] = col.has_value() ? reinterpret_cast<int64_t>(col->data_ptr()) : 0;
      }
      if (table.num_chunks() == 0) {
        continue;
      }
      const at::Tensor device_table = table.to_device(weights[0].device());
      const int64_t num_records = static_cast<int64_t>(table.records.size()) / kFields;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedconv_rescale_cuda", [&] {
        rescale_kernel<scalar_t><<<table.num_chunks(), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            device_table.data_ptr<int64_t>(), num_records);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
}

}  // namespace
}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CUDA, m) {
  m.impl("rescale_", &fusedconv::rescale_cuda);
}
