// Skinny matrix products for decode: one output row (a few hundred columns at most) per call, weights
// streamed once with 16-byte loads and float accumulation; the activation row is staged in shared memory
// by the caller. Two weight layouts:
//   columns: acc[n] = sum_k x[k] * w[k * k_stride + n]   (x @ W with W[K, N] row-major)
//   rows:    acc[n] = sum_k x[k] * w[n * n_stride + k]   (x @ W.T, e.g. a tied LM head)
// Vector paths need 16-byte alignment (checked by codegen); the scalar paths take any layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/elementwise.cuh"

namespace jax_mpk::dot {

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
template <class W> __device__ __forceinline__ float load1(const W* p) { return ops::to_value(__ldg(p)); }

// sum[j] += xk * w[j] for the 8 weights at w (one 16-byte load).
template <class W> __device__ __forceinline__ void add_scaled8(float sum[8], const W* w, float xk) {
  float wv[8];
  load8(w, wv);
#pragma unroll
  for (int j = 0; j < 8; ++j) sum[j] += xk * wv[j];
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Stage the activation row x[k] = base[offset + k * stride], k < K, in shared memory as float. Each thread
// issues all its loads (up to 16 at a time) before its first shared store: `xs` is a generic pointer that
// the compiler cannot tell from global memory, so interleaved loads and stores would serialize on it and
// cost one memory round trip per element a thread stages instead of one per row.
template <int K, class T, bool kReadOnly>
__device__ __forceinline__ void stage_row(float* xs, const char* base, int64_t offset, int64_t stride) {
  constexpr int kChunk = 16 * kBlockThreads;
#pragma unroll 1
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    constexpr int kPerThread = ((K < kChunk ? K : kChunk) + kBlockThreads - 1) / kBlockThreads;
    float staged[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int k = k0 + u * kBlockThreads + threadIdx.x;
      if (k < K && k < k0 + kChunk) {
        staged[u] = kReadOnly ? ops::load_readonly<T>(base, offset + k * stride) : ops::load<T>(base, offset + k * stride);
      }
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int k = k0 + u * kBlockThreads + threadIdx.x;
      if (k < K && k < k0 + kChunk) xs[k] = staged[u];
    }
  }
}

// Vector path of the columns layout: n_len % 8 == 0, w and k_stride 16-byte aligned.
// scratch: kBlockThreads * 8 floats.
template <class W>
__device__ void columns_vec(const float* x, const W* w, int64_t k_stride, int K, int n_len, float* acc, float* scratch) {
  const int vectors = n_len / 8;
  constexpr int threads = kBlockThreads;
  if (vectors >= threads) {
    for (int v = threadIdx.x; v < vectors; v += threads) {
      float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < K; ++k) add_scaled8(sum, w + k * k_stride + v * 8, x[k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[v * 8 + j] = sum[j];
    }
    return;
  }
  const int groups = threads / vectors;  // threads split K into this many interleaved groups
  const int v = threadIdx.x % vectors, group = threadIdx.x / vectors;
  float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (group < groups) {
    constexpr int kInFlight = 8;  // independent 16-byte loads per thread: one CTA per SM must cover latency
    int k = group;
    for (; k + (kInFlight - 1) * groups < K; k += kInFlight * groups) {
      float loaded[kInFlight][8];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) load8(w + (k + u * groups) * k_stride + v * 8, loaded[u]);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const float xk = x[k + u * groups];
#pragma unroll
        for (int j = 0; j < 8; ++j) sum[j] += xk * loaded[u][j];
      }
    }
    for (; k < K; k += groups) add_scaled8(sum, w + k * k_stride + v * 8, x[k]);
#pragma unroll
    for (int j = 0; j < 8; ++j) scratch[group * n_len + v * 8 + j] = sum[j];
  }
  __syncthreads();
  // one warp per output column folds the groups' partial sums
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = threads / 32;
  for (int n = warp; n < n_len; n += warps) {
    float total = 0.0f;
    for (int g = lane; g < groups; g += 32) total += scratch[g * n_len + n];
    total = warp_sum(total);
    if (lane == 0) acc[n] = total;
  }
}

// Scalar path of the columns layout: any strides.
template <class W>
__device__ void columns_scalar(const float* x, const W* w, int64_t k_stride, int64_t n_stride, int K, int n_len, float* acc) {
  for (int n = threadIdx.x; n < n_len; n += kBlockThreads) {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += x[k] * load1(w + k * k_stride + n * n_stride);
    acc[n] = sum;
  }
}

// Rows layout: a group of lanes per output (a whole warp for long rows; for short ones, such as attention
// scores over a 64-wide head, K/8 lanes, so that a warp works on several outputs at once); vector loads when
// K % 8 == 0 and rows are 16-byte aligned.
template <class W>
__device__ void rows(const float* x, const W* w, int64_t n_stride, int64_t k_stride, int K, int n_len, bool vectorized,
                     float* acc) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  if (vectorized && K < 256) {
    int group = 1;  // lanes per output: a power of two covering K / 8 vectors
    while (group * 8 < K && group < 32) group *= 2;
    const int per_warp = 32 / group, member = lane % group, slot = lane / group;
    const int rounds = (n_len + warps * per_warp - 1) / (warps * per_warp);
    for (int r = 0; r < rounds; ++r) {
      const int n = (r * warps + warp) * per_warp + slot;
      float sum = 0.0f;
      if (n < n_len) {
        for (int k = member * 8; k < K; k += group * 8) {
          float wv[8];
          load8(w + n * n_stride + k, wv);
#pragma unroll
          for (int j = 0; j < 8; ++j) sum += x[k + j] * wv[j];
        }
      }
      for (int offset = group / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (n < n_len && member == 0) acc[n] = sum;
    }
    return;
  }
  for (int n = warp; n < n_len; n += warps) {
    const W* row = w + n * n_stride;
    float sum = 0.0f;
    if (vectorized) {
#pragma unroll 4
      for (int k = lane * 8; k < K; k += 32 * 8) {
        float wv[8];
        load8(row + k, wv);
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += x[k + j] * wv[j];
      }
    } else {
      for (int k = lane; k < K; k += 32) sum += x[k] * load1(row + k * k_stride);
    }
    sum = warp_sum(sum);
    if (lane == 0) acc[n] = sum;
  }
}

// Ask L2 for [p, p + bytes) ahead of use; every thread of the block takes a share of the lines.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int64_t rows, int64_t row_stride_bytes) {
  const int64_t lines_per_row = (bytes + 127) / 128;
  // Not unrolled: this runs inlined in the task loop, and registers it holds there are taken from the
  // task bodies (an unrolled loop here broke the GEMV variants' load schedule).
#pragma unroll 1
  for (int64_t i = threadIdx.x; i < rows * lines_per_row; i += kBlockThreads) {
    const char* line = static_cast<const char*>(p) + (i / lines_per_row) * row_stride_bytes + (i % lines_per_row) * 128;
    asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
  }
}

}  // namespace jax_mpk::dot
