// Split attention (flash-decoding): one chunk of keys for the R query rows that share them (the query heads of
// one key/value head). Per row: scores against the chunk's keys, their largest value m, l = sum exp(score - m)
// and o = sum exp(score - m) * value; the consumers merge the chunks (jax_mpk/attention.py). One task does in
// one pass what the unsplit form does in two dependency levels, and at batch 1 every SM has a chunk.
//
// Threads: a key's D values are read by kLanes = D / 8 lanes, 16 bytes each, so a pass of the block covers
// kBlockThreads / kLanes keys. The chunk's values are copied to shared memory with cp.async while the scores
// are computed (they do not depend on them), so a chunk costs one memory round trip for its keys and values.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/dot.cuh"

namespace jax_mpk::attention {

template <int D> struct Geometry {
  static_assert(D % 8 == 0 && D / 8 <= 32 && (32 % (D / 8)) == 0, "a key's 16-byte vectors fill whole lane groups of a warp");
  static constexpr int kLanes = D / 8;                      // lanes per key
  static constexpr int kKeysPerPass = kBlockThreads / kLanes;  // keys the block reads at once
  static constexpr int kWarps = kBlockThreads / 32;
};

// Shared memory (bytes) of one call: the values' tile, then the warps' partial sums of o.
template <class T, int R, int D>
constexpr int scratch_bytes(int chunk) {
  return chunk * D * static_cast<int>(sizeof(T)) + Geometry<D>::kWarps * R * D * 4;
}

// q: R rows of D floats (row stride q_stride) in shared memory. keys/values: key s of the chunk at
// keys + s * key_stride, values + s * value_stride (D contiguous two-byte elements, 16-byte aligned).
// scores: R rows of `chunk` floats (row stride scores_stride); scratch: scratch_bytes<T, R, D>(chunk), 16-byte
// aligned. score(r, s, dot) is the softmax's input for row r and key s given q . k (the user's scaling and
// masking). Writes out[r * D + d] = o, out[R * D + r] = m, out[R * D + R + r] = l. Ends with a barrier.
template <class T, int R, int D, class Score>
__device__ void chunk(const float* q, int q_stride, const T* keys, int64_t key_stride, const T* values,
                      int64_t value_stride, int chunk, float* scores, int scores_stride, char* scratch, float* out,
                      Score score) {
  using G = Geometry<D>;
  static_assert(R >= 1 && R <= 8, "query rows per task");
  const int lane = threadIdx.x % G::kLanes, slot = threadIdx.x / G::kLanes;
  const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
  T* value_tile = reinterpret_cast<T*>(scratch);
  float* warp_sums = reinterpret_cast<float*>(scratch + chunk * D * sizeof(T));

  // 1. the values' tile, asynchronously
  const uint32_t tile = dot::shared_address(value_tile);
#pragma unroll 1
  for (int s = slot; s < chunk; s += G::kKeysPerPass) {
    const char* src = reinterpret_cast<const char*>(values + s * value_stride + lane * 8);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(tile + (s * D + lane * 8) * static_cast<int>(sizeof(T))), "l"(src) : "memory");
  }
  asm volatile("cp.async.commit_group;" ::: "memory");

  // 2. scores: a lane group per key, four keys per lane group in flight
  constexpr int kInFlight = 4;
#pragma unroll 1
  for (int base = 0; base < chunk; base += kInFlight * G::kKeysPerPass) {  // warp-uniform: the lanes shuffle
    float k[kInFlight][8];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int s = base + u * G::kKeysPerPass + slot;
      if (s < chunk) {
        dot::load8(keys + s * key_stride + lane * 8, k[u]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) k[u][j] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int s = base + u * G::kKeysPerPass + slot;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 a = *reinterpret_cast<const float4*>(q + r * q_stride + lane * 8);
        const float4 b = *reinterpret_cast<const float4*>(q + r * q_stride + lane * 8 + 4);
        float sum = a.x * k[u][0] + a.y * k[u][1] + a.z * k[u][2] + a.w * k[u][3] + b.x * k[u][4] + b.y * k[u][5] +
                    b.z * k[u][6] + b.w * k[u][7];
#pragma unroll
        for (int offset = G::kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0 && s < chunk) scores[r * scores_stride + s] = score(r, s, sum);
      }
    }
  }
  __syncthreads();

  // 3. per row (a warp each): m, p = exp(score - m) in place, l
  for (int r = warp; r < R; r += G::kWarps) {
    float m = -INFINITY;
    for (int s = warp_lane; s < chunk; s += 32) m = fmaxf(m, scores[r * scores_stride + s]);
    for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    // a chunk whose scores are all -inf (masked) contributes nothing, not exp(-inf - -inf) = NaN
    const float reference = m == -INFINITY ? 0.0f : m;
    float l = 0.0f;
    for (int s = warp_lane; s < chunk; s += 32) {
      const float p = expf(scores[r * scores_stride + s] - reference);
      scores[r * scores_stride + s] = p;
      l += p;
    }
    l = dot::warp_sum(l);
    if (warp_lane == 0) {
      out[R * D + r] = m;
      out[R * D + R + r] = l;
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();

  // 4. o = p . values: each thread sums its keys for its 8 columns, then the lane groups of a warp, then the warps
  float acc[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[r][j] = 0.0f;
#pragma unroll 2
  for (int s = slot; s < chunk; s += G::kKeysPerPass) {
    float v[8];
    dot::unpack8(*reinterpret_cast<const uint4*>(value_tile + s * D + lane * 8), value_tile, v);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float p = scores[r * scores_stride + s];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] += p * v[j];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float x = acc[r][j];
#pragma unroll
      for (int offset = 16; offset >= G::kLanes; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
      if (warp_lane < G::kLanes) warp_sums[(warp * R + r) * D + lane * 8 + j] = x;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < R * D; e += kBlockThreads) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < G::kWarps; ++w) total += warp_sums[w * R * D + e];
    out[e] = total;
  }
  __syncthreads();
}

}  // namespace jax_mpk::attention
