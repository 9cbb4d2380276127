// Storage access, rounding and conversion of generated task bodies. Values of float dtypes (f32, bf16, f16) are
// computed in float and rounded to their dtype after every node (round_to), integers in int/unsigned,
// bool as bool: the same per-node semantics as the CPU executor (docs/plan_format.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "jax_mpk/runtime/comm.cuh"
#include "jax_mpk/scalar_ops.h"

namespace jax_mpk::ops {

// ----------------------------------------------------------------------------------------- storage
template <class T> struct Storage;
template <> struct Storage<float> { using value = float; };
template <> struct Storage<__nv_bfloat16> { using value = float; };
template <> struct Storage<__half> { using value = float; };
template <> struct Storage<int32_t> { using value = int32_t; };
template <> struct Storage<int8_t> { using value = int32_t; };
template <> struct Storage<uint32_t> { using value = uint32_t; };
template <> struct Storage<uint8_t> { using value = uint32_t; };
template <> struct Storage<bool> { using value = bool; };

__device__ __forceinline__ float to_value(float x) { return x; }
__device__ __forceinline__ float to_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_value(__half x) { return __half2float(x); }
__device__ __forceinline__ int32_t to_value(int32_t x) { return x; }
__device__ __forceinline__ int32_t to_value(int8_t x) { return x; }
__device__ __forceinline__ uint32_t to_value(uint32_t x) { return x; }
__device__ __forceinline__ uint32_t to_value(uint8_t x) { return x; }
__device__ __forceinline__ bool to_value(bool x) { return x; }

// Loads of buffers that some task writes bypass L1 (ld.global.cg): another SM may have rewritten the line
// since this SM last cached it. They are ordinary (weak) loads, so the compiler may batch them; the
// acquire of the task's wait, followed by the block barrier, orders them after the producers' stores.
// Read-only buffers (weights) may use the non-coherent read-only cache.
template <class T>
__device__ __forceinline__ typename Storage<T>::value load(const char* base, int64_t index) {
  return to_value(__ldcg(reinterpret_cast<const T*>(base) + index));
}
template <>
__device__ __forceinline__ bool load<bool>(const char* base, int64_t index) {
  return __ldcg(reinterpret_cast<const uint8_t*>(base) + index) != 0;
}
template <class T>
__device__ __forceinline__ typename Storage<T>::value load_readonly(const char* base, int64_t index) {
  return to_value(__ldg(reinterpret_cast<const T*>(base) + index));
}
template <>
__device__ __forceinline__ bool load_readonly<bool>(const char* base, int64_t index) {
  return __ldg(reinterpret_cast<const uint8_t*>(base) + index) != 0;
}

template <class T, class V>
__device__ __forceinline__ void store(char* base, int64_t index, V value);
template <> __device__ __forceinline__ void store<float>(char* b, int64_t i, float v) { reinterpret_cast<float*>(b)[i] = v; }
template <> __device__ __forceinline__ void store<__nv_bfloat16>(char* b, int64_t i, float v) {
  reinterpret_cast<__nv_bfloat16*>(b)[i] = __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ void store<__half>(char* b, int64_t i, float v) {
  reinterpret_cast<__half*>(b)[i] = __float2half_rn(v);
}
template <> __device__ __forceinline__ void store<int32_t>(char* b, int64_t i, int32_t v) { reinterpret_cast<int32_t*>(b)[i] = v; }
template <> __device__ __forceinline__ void store<int8_t>(char* b, int64_t i, int32_t v) { reinterpret_cast<int8_t*>(b)[i] = static_cast<int8_t>(v); }
template <> __device__ __forceinline__ void store<uint32_t>(char* b, int64_t i, uint32_t v) { reinterpret_cast<uint32_t*>(b)[i] = v; }
template <> __device__ __forceinline__ void store<uint8_t>(char* b, int64_t i, uint32_t v) { reinterpret_cast<uint8_t*>(b)[i] = static_cast<uint8_t>(v); }
template <> __device__ __forceinline__ void store<bool>(char* b, int64_t i, bool v) { reinterpret_cast<bool*>(b)[i] = v; }
}  // namespace jax_mpk::ops

namespace jax_mpk::comm {
// A store into this rank's slot of a COMM tensor (`base` in this rank's buffer): into every rank's copy.
template <class T, class V>
__device__ __forceinline__ void store_everywhere(const MegakernelParams& p, char* base, int64_t index, V value) {
  for (int r = 0; r < p.comm.num_ranks; ++r) ops::store<T>(on_rank(p, base, r), index, value);
}
}  // namespace jax_mpk::comm

namespace jax_mpk::ops {

// --------------------------------------------------------------------------------------- rounding
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ int32_t wrap_i8(int32_t x) { return static_cast<int8_t>(x); }
__device__ __forceinline__ uint32_t wrap_u8(uint32_t x) { return static_cast<uint8_t>(x); }

// ------------------------------------------------------------------------------------- conversion
template <class To> __device__ __forceinline__ To convert(float x);
template <> __device__ __forceinline__ float convert<float>(float x) { return x; }
template <> __device__ __forceinline__ bool convert<bool>(float x) { return x != 0.0f; }
template <> __device__ __forceinline__ int32_t convert<int32_t>(float x) {
  if (x != x) return 0;
  return x >= 2147483647.0f ? INT32_MAX : (x <= -2147483648.0f ? INT32_MIN : static_cast<int32_t>(x));
}
template <> __device__ __forceinline__ uint32_t convert<uint32_t>(float x) {
  if (!(x > 0.0f)) return 0;
  return x >= 4294967295.0f ? UINT32_MAX : static_cast<uint32_t>(x);
}
template <class To> __device__ __forceinline__ To convert(int32_t x) { return static_cast<To>(x); }
template <class To> __device__ __forceinline__ To convert(uint32_t x) { return static_cast<To>(x); }
template <class To> __device__ __forceinline__ To convert(bool x) { return static_cast<To>(x); }

// ------------------------------------------------------------------------------------------- ops
// The scalar ops (neg, add, exp, lt ...) are generated from jax_mpk/scalar_ops.py into scalar_ops.h; here are
// the ones with their own node kinds (ROUND, CLAMP, INTEGER_POW) and dynamic offsets.
__device__ __forceinline__ float round_half_away(float x) { return roundf(x); }
__device__ __forceinline__ float round_half_even(float x) { return rintf(x); }

template <class T> __device__ __forceinline__ T clamp(T lo, T x, T hi) { return min_(max_(x, lo), hi); }
template <class T> __device__ __forceinline__ T integer_pow(T x, int n) {
  T result = static_cast<T>(1);
  T base = x;
  bool negative = n < 0;
  unsigned e = negative ? -n : n;
  while (e) {
    if (e & 1) result = mul(result, base);
    base = mul(base, base);
    e >>= 1;
  }
  return negative ? div(static_cast<T>(1), result) : result;
}

// An index computed from a value: NaN counts as 0, then clamp to [0, hi].
__device__ __forceinline__ int64_t dynamic_offset(float v, int64_t hi) {
  if (!(v == v)) return 0;
  const int64_t i = static_cast<int64_t>(v);
  return i < 0 ? 0 : (i > hi ? hi : i);
}
__device__ __forceinline__ int64_t dynamic_offset(int32_t v, int64_t hi) { return v < 0 ? 0 : (v > hi ? hi : v); }
__device__ __forceinline__ int64_t dynamic_offset(uint32_t v, int64_t hi) { return v > hi ? hi : v; }
__device__ __forceinline__ int64_t dynamic_offset(bool v, int64_t hi) { return v && hi > 0 ? 1 : 0; }

}  // namespace jax_mpk::ops
