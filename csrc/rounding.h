// Rounding from the float64 in which every fold is computed to a weight's dtype.
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

namespace fusedconv {

// Half types go through float32, exactly as torch's own casts do, so that every
// backend (torch, cpp, cuda, triton) writes the same bits.
template <typename T>
C10_HOST_DEVICE inline T round_from_double(double x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<T>(static_cast<float>(x));
  }
}

}  // namespace fusedconv
