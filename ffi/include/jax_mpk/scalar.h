// What the generated scalar ops (jax_mpk/scalar_ops.h, from jax_mpk/scalar_ops.py) are written with: value
// traits and the few helpers too long for a table entry. Host and device: the CPU evaluator calls the ops
// on double (float dtypes), the CUDA megakernel on float; both on int32_t (i32, i8), uint32_t (u32, u8), bool.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
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

// |x| of a signed integer, wrapping: |INT32_MIN| is INT32_MIN, as in XLA. On the device the negation goes through
// an opaque PTX step: nvcc turns `x < 0 ? -x : x` into abs.s32, whose result ptxas (CUDA 13.0) may take to be
// non-negative, and it then compiled a following `rem` without the dividend's sign (GPU fuzz 2026:318).
template <class T> JAX_MPK_HD T wrapping_abs(T x) {
#ifdef __CUDA_ARCH__
  uint32_t negated;
  asm("sub.u32 %0, 0, %1;" : "=r"(negated) : "r"(u32(x)));
#else
  const uint32_t negated = 0u - u32(x);
#endif
  return x < 0 ? T(negated) : x;
}

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

// The value whose bits are those of `from` (same width). On the CPU, float values arrive as double and
// are first narrowed to float, which is exact for a value of a 32-bit float dtype.
template <class To, class From> JAX_MPK_HD To bit_cast(From from) {
  if constexpr (std::is_same_v<From, double>) {
    return bit_cast<To>(static_cast<float>(from));
  } else {
    static_assert(sizeof(To) == sizeof(From), "bit_cast needs one width");
    To to;
    memcpy(&to, &from, sizeof(To));
    return to;
  }
}

// erf^-1(x) for x in [-1, 1] (+-inf at +-1, NaN outside): M. Giles' single-precision approximation ("Approximating
// the erfinv function", 2010), refined by two Newton steps on erf, which makes it accurate to double precision
// for the CPU reference. The GPU uses CUDA's erfinvf instead.
template <class T> JAX_MPK_HD T erf_inverse(T x) {
  if (!(x >= T(-1) && x <= T(1))) return T(NAN);
  if (x == T(1) || x == T(-1)) return x * T(INFINITY);
  T w = -std::log((T(1) - x) * (T(1) + x)), p;
  if (w < T(5)) {
    w -= T(2.5);
    p = T(2.81022636e-08);
    p = T(3.43273939e-07) + p * w;
    p = T(-3.5233877e-06) + p * w;
    p = T(-4.39150654e-06) + p * w;
    p = T(0.00021858087) + p * w;
    p = T(-0.00125372503) + p * w;
    p = T(-0.00417768164) + p * w;
    p = T(0.246640727) + p * w;
    p = T(1.50140941) + p * w;
  } else {
    w = std::sqrt(w) - T(3);
    p = T(-0.000200214257);
    p = T(0.000100950558) + p * w;
    p = T(0.00134934322) + p * w;
    p = T(-0.00367342844) + p * w;
    p = T(0.00573950773) + p * w;
    p = T(-0.0076224613) + p * w;
    p = T(0.00943887047) + p * w;
    p = T(1.00167406) + p * w;
    p = T(2.83297682) + p * w;
  }
  T y = p * x;
  for (int step = 0; step < 2; ++step) {  // Newton on erf(y) = x: erf'(y) = 2 / sqrt(pi) * exp(-y^2)
    const T slope = T(1.1283791670955126) * std::exp(-y * y);
    if (slope > T(0)) y -= (std::erf(y) - x) / slope;
  }
  return y;
}

}  // namespace jax_mpk::ops
