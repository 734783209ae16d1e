// The metadata that lets one kernel launch fold many layers: a table of
// per-tensor records (addresses, sizes, strides as int64) followed by a table
// of chunks (record index, first element), one chunk per thread block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace fusedconv {

constexpr int kThreadsPerBlock = 256;
// Elements per thread block: enough work to hide the launch of each block,
// small enough that a model of a few layers still fills every SM.
constexpr int64_t kChunkElements = 1 << 14;

struct BatchTable {
  std::vector<int64_t> records;
  std::vector<int64_t> chunks;  // (record index, first element) pairs

  // Start a record of `fields` int64s, covering `numel` elements.
  int64_t* add_record(int fields, int64_t numel) {
    const int64_t index = static_cast<int64_t>(records.size()) / fields;
    for (int64_t start = 0; start < numel; start += kChunkElements) {
      chunks.push_back(index);
      chunks.push_back(start);
    }
    records.resize(records.size() + fields, 0);
    return records.data() + records.size() - fields;
  }

  int64_t num_chunks() const { return static_cast<int64_t>(chunks.size()) / 2; }

  // Both tables in one device tensor (records first), copied from pinned memory
  // without blocking the host; the caching host allocator keeps the pinned
  // buffer alive until the copy on the current stream is done.
  at::Tensor to_device(const at::Device& device) const {
    const int64_t n = static_cast<int64_t>(records.size() + chunks.size());
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* out = host.data_ptr<int64_t>();
    std::copy(records.begin(), records.end(), out);
    std::copy(chunks.begin(), chunks.end(), out + records.size());
    return host.to(device, /*non_blocking=*/true);
  }
};

// Entries that write the same tensor (several branches added into one kernel)
// must run in list order, while one launch runs its entries in parallel. Entry
// i goes to wave k when it is the k-th entry writing its address; waves are
// launched one after another. Returns each entry's wave.
inline std::vector<int> waves_by_target(const std::vector<const void*>& targets, int* num_waves) {
  std::unordered_map<const void*, int> seen;
  std::vector<int> wave(targets.size());
  *num_waves = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    wave[i] = seen[targets[i]]++;
    *num_waves = std::max(*num_waves, wave[i] + 1);
  }
  return wave;
}

}  // namespace fusedconv
