// rescale_ on the CPU: W[r, c, ...] = round(S[r, c, ...] * (row_scale[r] * col_scale[g(r) * cols + c])),
// where S is the weight itself (in place) or a separate source of the same layout.
//
// The common case, a BN after a Conv or Linear, scales each row by one factor;
// a row of a contiguous or channels_last weight is one contiguous block, so a
// plain loop that the compiler vectorizes does it (float32 at memory speed
// where the processor has AVX2, see scale_float_rows).
// All such weights of one call are laid end to end and split into equal tasks
// across threads: most of a network's weights are far smaller than a task, so
// a parallel loop per weight would leave the other threads idle.
// Anything else (a BN before the layer, a ConvTranspose) takes one
// TensorIterator pass per weight, which walks the weight in memory order and
// reads the float64 factors through broadcast views. Neither allocates.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "../module.h"
#include "../rounding.h"
#include "direct_call.h"

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

// Elements per task: large enough to amortise scheduling, small enough to
// split a network's weights evenly across threads.
constexpr int64_t kGrain = 1 << 16;

// One weight scaled row by row.
struct RowScaling {
  at::ScalarType dtype;
  void* weight;
  const void* source;
  const double* row_scale;
  int64_t numel;
  int64_t row_length;
};

// Rows [begin, end) of one weight, by elements. The in-place case, the usual
// one, uses a single pointer: with two that may alias, the compiler's runtime
// overlap check sends it down a scalar loop.
template <typename scalar_t>
inline void scale_row_range(scalar_t* out, const scalar_t* in, const double* row_scale, int64_t row_length,
                            int64_t begin, int64_t end) {
  int64_t row = begin / row_length;
  for (int64_t start = begin; start < end; ++row) {
    const int64_t stop = std::min(end, (row + 1) * row_length);
    const double factor = row_scale[row];
    if (in == out) {
      for (int64_t i = start; i < stop; ++i) {
        out[i] = round_from_double<scalar_t>(static_cast<double>(out[i]) * factor);
      }
    } else {
      for (int64_t i = start; i < stop; ++i) {
        out[i] = round_from_double<scalar_t>(static_cast<double>(in[i]) * factor);
      }
    }
    start = stop;
  }
}

// float32, most weights: the float64 products are compute-bound at the 128-bit
// vectors of the baseline x86-64 build (twice the time of a float32 mul_ over
// the same weights), so the loop is also compiled for AVX2 and AVX-512, and the
// loader picks the widest the processor has. Every clone rounds the same float64
// product once: the same bits.
// (Clones need the GNU ifunc loader: Linux with glibc.)
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
void scale_float_rows(float* out, const float* in, const double* row_scale, int64_t row_length, int64_t begin,
                      int64_t end) {
  scale_row_range(out, in, row_scale, row_length, begin, end);
}

// Elements [begin, end) of one weight.
template <typename scalar_t>
void scale_rows(const RowScaling& job, int64_t begin, int64_t end) {
  scalar_t* out = static_cast<scalar_t*>(job.weight);
  const scalar_t* in = static_cast<const scalar_t*>(job.source);
  if constexpr (std::is_same_v<scalar_t, float>) {
    scale_float_rows(out, in, job.row_scale, job.row_length, begin, end);
  } else {
    scale_row_range(out, in, job.row_scale, job.row_length, begin, end);
  }
}

// Every job's elements as one range split across threads.
void scale_rows_batched(const std::vector<RowScaling>& jobs) {
  std::vector<int64_t> first{0};  // first[j]: where job j starts in the joint range
  for (const RowScaling& job : jobs) {
    first.push_back(first.back() + job.numel);
  }
  at::parallel_for(0, first.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t j = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (; j < jobs.size() && first[j] < end; ++j) {
      const int64_t lo = std::max(begin, first[j]) - first[j];
      const int64_t hi = std::min(end, first[j + 1]) - first[j];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, jobs[j].dtype, "fusedconv_scale_rows",
                                      [&] { scale_rows<scalar_t>(jobs[j], lo, hi); });
    }
  });
}

void rescale_grid(const at::Tensor& weight, const at::Tensor& source, const std::optional<at::Tensor>& row_scale,
                  const std::optional<at::Tensor>& col_scale, int64_t groups) {
  // (groups, rows/groups, cols, *k): a view for contiguous and channels_last alike.
  at::Tensor grouped = weight.unflatten(0, {groups, weight.size(0) / groups});
  at::Tensor grouped_source = source.unflatten(0, {groups, weight.size(0) / groups});
  at::Tensor rows = factor_view(row_scale, grouped, true);
  at::Tensor cols = factor_view(col_scale, grouped, false);
  auto iter = at::TensorIteratorConfig()
                  .add_output(grouped)
                  .add_const_input(grouped_source)
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

using Scales = std::vector<std::optional<at::Tensor>>;

// The kernel of both entries: the op's CPU implementation (rescale_cpu) and
// the Python module's direct call (rescale_in_place).
void rescale_all(at::TensorList weights, const Scales& row_scales, const Scales& col_scales, at::IntArrayRef groups,
                 at::TensorList sources) {
  // Row scalings are collected and run together. A weight listed twice (two
  // folds of one tensor) must be scaled in list order, so the collected batch
  // runs before any entry that writes a weight already in it.
  std::vector<RowScaling> batch;
  std::unordered_set<const void*> in_batch;
  const auto run_batch = [&] {
    scale_rows_batched(batch);
    batch.clear();
    in_batch.clear();
  };
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const std::optional<at::Tensor>& row = row_scales[i];
    const std::optional<at::Tensor>& col = col_scales[i];
    if ((!row.has_value() && !col.has_value()) || w.numel() == 0) {
      continue;
    }
    if (in_batch.count(w.data_ptr()) != 0) {
      run_batch();
    }
    if (!col.has_value() && has_dense_rows(w) && row->is_contiguous()) {
      batch.push_back({w.scalar_type(), w.data_ptr(), sources[i].const_data_ptr(), row->const_data_ptr<double>(),
                       w.numel(), w.numel() / w.size(0)});
      in_batch.insert(w.data_ptr());
    } else {
      rescale_grid(w, sources[i], row, col, groups[i]);
    }
  }
  run_batch();
}

void rescale_cpu(at::TensorList weights, const OptionalTensors& row_scales, const OptionalTensors& col_scales,
                 at::IntArrayRef groups, at::TensorList sources) {
  TORCH_CHECK(row_scales.size() == weights.size() && col_scales.size() == weights.size() &&
                  groups.size() == weights.size() && sources.size() == weights.size(),
              "rescale_: one row scale, column scale, group count and source per weight");
  Scales rows(row_scales.begin(), row_scales.end()), cols(col_scales.begin(), col_scales.end());
  rescale_all(weights, rows, cols, groups, sources);
}

}  // namespace

// rescale_in_place(weights, row_scales, col_scales, groups) -> True, or None:
// what fusedconv::rescale_ does on the CPU with the cpp backend and no
// sources, without what surrounds the kernel there: two dispatches that each
// parse the lists (about a hundred tensors in a fold) and the Python checks
// between them, about 1 ms of a fold of a small network. It runs where the
// arguments pass the checks of fusedconv/kernels/__init__.py (weights of a
// float dtype with at least 2 dims, contiguous or channels_last, not
// overlapping one another; well-formed groups and scales) on plain tensors in
// torch's default dispatch state (direct_call.h); None leaves the call to the op.
PyObject* rescale_in_place(PyObject* /*self*/, PyObject* args) {
  PyObject *weight_list, *row_list, *col_list, *group_list;
  if (!PyArg_ParseTuple(args, "O!O!O!O!", &PyList_Type, &weight_list, &PyList_Type, &row_list, &PyList_Type,
                        &col_list, &PyList_Type, &group_list))
    return nullptr;
  const Py_ssize_t count = PyList_GET_SIZE(weight_list);
  if (count == 0 || PyList_GET_SIZE(row_list) != count || PyList_GET_SIZE(col_list) != count ||
      PyList_GET_SIZE(group_list) != count || !unobserved_default_state())
    Py_RETURN_NONE;
  std::vector<at::Tensor> weights;
  Scales rows(static_cast<size_t>(count)), cols(static_cast<size_t>(count));
  std::vector<int64_t> groups;
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  weights.reserve(static_cast<size_t>(count));
  groups.reserve(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor* weight = plain_cpu_tensor(PyList_GET_ITEM(weight_list, i));
    if (weight == nullptr || !is_float_kernel(*weight) || !has_dense_rows(*weight)) Py_RETURN_NONE;
    int64_t group_count = 0;
    if (!read_int(PyList_GET_ITEM(group_list, i), &group_count) || group_count < 1 ||
        weight->size(0) % group_count != 0)
      Py_RETURN_NONE;
    const size_t at = static_cast<size_t>(i);
    if (!read_scale(PyList_GET_ITEM(row_list, i), weight->size(0), &rows[at]) ||
        !fits(0, group_count, weight->size(1), INT64_MAX) ||
        !read_scale(PyList_GET_ITEM(col_list, i), group_count * weight->size(1), &cols[at]))
      Py_RETURN_NONE;
    if (weight->numel() > 0) {
      const auto start = reinterpret_cast<uintptr_t>(weight->const_data_ptr());
      spans.emplace_back(start, start + static_cast<uintptr_t>(weight->numel() * weight->element_size()));
    }
    weights.push_back(*weight);
    groups.push_back(group_count);
  }
  // A weight may be listed twice (scaled twice, in order); distinct weights may not overlap.
  std::sort(spans.begin(), spans.end());
  spans.erase(std::unique(spans.begin(), spans.end()), spans.end());
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].first < spans[k - 1].second) Py_RETURN_NONE;
  }
  return run_kernel([&] { rescale_all(weights, rows, cols, groups, weights); });
}

}  // namespace fusedconv

TORCH_LIBRARY_IMPL(fusedconv_ext, CPU, m) {
  m.impl("rescale_", &fusedconv::rescale_cpu);
}
