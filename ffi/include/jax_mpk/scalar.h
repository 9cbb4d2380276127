// What the generated scalar ops (jax_mpk/scalar_ops.h, from jax_mpk/scalar_ops.py) are written with: value
// traits and the few helpers too long for a table entry. Host and device: the CPU evaluator calls the ops
// on double (float dtypes), the CUDA megakernel on float; both on int32_t (i32, i8), uint32_t (u32, u8), bool.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#ifdef __CUDACC__
#define JAX_MPK_HD __host__ __device__ __forceinline__
#else
#define JAX_MPK_HD inline
#endif

namespace jax_mpk::ops {

template <class T> inline constexpr bool kIsFloat = std::is_floating_point_v<T>;
template <class T> inline constexpr bool kIsSigned = std::is_signed_v<T> && !kIsFloat<T>;

// The 32-bit pattern of an integer value, for arithmetic modulo 2^32.
template <class T> JAX_MPK_HD uint32_t u32(T x) { return static_cast<uint32_t>(x); }

// a ** b for integers, by squaring, wrapping at every product; negative exponents give 1 / a ** -b
// truncated (only 1 and -1 have integer reciprocals, 0 ** -n is 0).
template <class T> JAX_MPK_HD T integer_power(T base, T exponent) {
  if (exponent < 0) {
    if (base == 1) return T(1);
    if (kIsSigned<T> && base == T(-1)) return (u32(exponent) & 1u) ? base : T(1);
    return T(0);
  }
  uint32_t result = 1u, factor = u32(base);
  for (uint32_t e = u32(exponent); e != 0; e >>= 1) {
    if (e & 1u) result *= factor;
    factor *= factor;
  }
  return T(result);
}

}  // namespace jax_mpk::ops
