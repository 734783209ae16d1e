// Schemas of the extension's ops. The CPU kernels (cpu/) and CUDA kernels
// (cuda/) register under the same names; fusedconv/kernels/extension.py loads
// the library and fusedconv/kernels/__init__.py checks the arguments first.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#ifdef FUSEDCONV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define FUSEDCONV_STRING_(x) #x
#define FUSEDCONV_STRING(x) FUSEDCONV_STRING_(x)

namespace fusedconv {

// The torch the library was compiled against, as text in the file itself:
// where the library does not load (built for another torch), Python reads it
// from the file to say which torch that was (fusedconv/kernels/extension.py).
#define FUSEDCONV_BUILT_FOR "fusedconv built for "
extern const char kBuiltFor[];
const char kBuiltFor[] = FUSEDCONV_BUILT_FOR "torch " FUSEDCONV_STRING(TORCH_VERSION_MAJOR) "." FUSEDCONV_STRING(
    TORCH_VERSION_MINOR) "." FUSEDCONV_STRING(TORCH_VERSION_PATCH);

// Which torch (and CUDA) the library was compiled against, so that Python can
// say "built for torch X, running Y" instead of failing obscurely.
std::string build_info() {
  std::string info = kBuiltFor + sizeof(FUSEDCONV_BUILT_FOR) - 1;  // "torch X.Y.Z"
#ifdef FUSEDCONV_WITH_CUDA
  info += ", cuda " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#endif
  return info;
}

}  // namespace fusedconv

TORCH_LIBRARY(fusedconv_ext, m) {
  m.def(
      "rescale_(Tensor(a!)[] weights, Tensor?[] row_scales, Tensor?[] col_scales, int[] groups, Tensor[] sources) "
      "-> ()");
  m.def("pad_add_(Tensor(a!)[] bigs, Tensor[] smalls, Tensor?[] scales, int[] offsets, int[] dilations) -> ()");
  m.def("build_info() -> str", &fusedconv::build_info);
}
