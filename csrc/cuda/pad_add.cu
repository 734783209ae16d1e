// pad_add_ on CUDA: every (big, small) pair of one dtype in one launch.
//
// Pairs are normalised to 5-D (missing spatial dims have size 1), and each
// thread handles one element of a small kernel: it finds the element's
// (o, i, j0, j1, j2) from its flat index and adds it to the big kernel's tap
// at offset + j * dilation, both addressed through their own strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rounding.h"
#include "batch_table.h"

namespace fusedconv {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

constexpr int kDims = 5;
enum PadAddField : int {
  kBig,
  kSmall,
  kScale,
  kNumel,
  kSizes,                          // small kernel's sizes, kDims of them
  kSmallStrides = kSizes + kDims,  // kDims
  kBigStrides = kSmallStrides + kDims,
  kOffsets = kBigStrides + kDims,  // kDims - 2 spatial offsets
  kDilations = kOffsets + kDims - 2,
  kFields = kDilations + kDims - 2,
};

template <typename scalar_t>
__global__ void pad_add_kernel(const int64_t* __restrict__ table, int64_t num_records) {
  const int64_t* chunk = table + num_records * kFields + 2 * static_cast<int64_t>(blockIdx.x);
  const int64_t* record = table + chunk[0] * kFields;
  const int64_t start = chunk[1];
  scalar_t* big = reinterpret_cast<scalar_t*>(record[kBig]);
  const scalar_t* small = reinterpret_cast<const scalar_t*>(record[kSmall]);
  const double* scale = reinterpret_cast<const double*>(record[kScale]);
  const int64_t end = min(start + kChunkElements, record[kNumel]);

  for (int64_t index = start + threadIdx.x; index < end; index += blockDim.x) {
    int64_t rest = index, small_at = 0, big_at = 0, out_channel = 0;
    for (int d = kDims - 1; d >= 0; --d) {
      const int64_t j = rest % record[kSizes + d];
      rest /= record[kSizes + d];
      small_at += j * record[kSmallStrides + d];
      const int64_t tap = d >= 2 ? record[kOffsets + d - 2] + j * record[kDilations + d - 2] : j;
      big_at += tap * record[kBigStrides + d];
      if (d == 0) {
        out_channel = j;
      }
    }
    const double factor = scale != nullptr ? scale[out_channel] : 1.0;
    // Explicitly rounded multiply and add: nvcc would otherwise contract them
    // into one fma, which rounds once where every other backend rounds twice.
    const double added = __dmul_rn(static_cast<double>(small[small_at]), factor);
    big[big_at] = round_from_double<scalar_t>(__dadd_rn(static_cast<double>(big[big_at]), added));
  }
}

void pad_add_cuda(at::TensorList bigs, at::TensorList smalls, const OptionalTensors& scales, at::IntArrayRef offsets,
                  at::IntArrayRef dilations) {
  TORCH_CHECK(smalls.size() == bigs.size() && scales.size() == bigs.size(),
              "pad_add_: one small kernel and scale per big kernel");
  if (bigs.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(bigs[0].device());
  std::vector<const void*> targets;
  for (const at::Tensor& big : bigs) {
    targets.push_back(big.data_ptr());
  }
  int num_waves = 0;
  const std::vector<int> wave = waves_by_target(targets, &num_waves);
  for (int current = 0; current < num_waves; ++current) {
    for (const at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
      BatchTable table;
      size_t at = 0;
      for (size_t i = 0; i < bigs.size(); ++i) {
        const at::Tensor &big = bigs[i], &small = smalls[i];
        const int64_t spatial = big.dim() - 2;
        TORCH_CHECK(spatial >= 1 && spatial <= kDims - 2, "pad_add_: kernels have 1 to 3 spatial dims");
        TORCH_CHECK(at + spatial <= offsets.size() && at + spatial <= dilations.size(),
                    "pad_add_: too few offsets or dilations");
        const size_t first = at;
        at += spatial;
        if (wave[i] != current || big.scalar_type() != dtype || small.numel() == 0) {
          continue;
        }
        TORCH_CHECK(big.is_cuda() && small.is_cuda(), "pad_add_: kernels must be CUDA tensors");
        const std::optional<at::Tensor> scale = scales.get(i);
        int64_t* r = table.add_record(kFields, small.numel());
        r[kBig] = reinterpret_cast<int64_t>(big.data_ptr());
        r[kSmall] = reinterpret_cast<int64_t>(small.data_ptr());
        r[kScale] = scale.has_value() ? reinterpret_cast<int64_t>(scale->data_ptr()) : 0;
        r[kNumel] = small.numel();
        for (int d = 0; d < kDims; ++d) {
          const bool present = d < small.dim();
          r[kSizes + d] = present ? small.size(d) : 1;
          r[kSmallStrides + d] = present ? small.stride(d) : 0;
          r[kBigStrides + d] = present ? big.stride(d) : 0;
        }
        for (int d = 0; d < kDims - 2; ++d) {
          r[kOffsets + d] = d < spatial ? offsets[first + d] : 0;
          r[kDilations + d] = d < spatial ? dilations[first + d] : 1;
        }
      }
      if (table.num_chunks() == 0) {
        continue;
      }
      const at::Tensor device_table = table.to_device(bigs[0].device());
      const int64_t num_records = static_cast<int64_t>(table.records.size()) / kFields;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedconv_pad_add_cuda", [&] {
        pad_add_kernel<scalar_t><<<table.num_chunks(), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            device_table.data_ptr<int64_t>(), num_records);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
}

}  // namespace
}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CUDA, m) {
  m.impl("pad_add_", &fusedconv::pad_add_cuda);
}
