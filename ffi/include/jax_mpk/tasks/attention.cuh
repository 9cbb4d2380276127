// Split attention (flash-decoding): a task takes the R query rows that share one key/value head (the query
// heads of a KV head) and a range of whole chunks of its keys. Per chunk and row: scores against the chunk's
// keys, their largest value m, l = sum exp(score - m) and o = sum exp(score - m) * value, handed to the
// caller's `store` as the chunk's partials; the group's last task merges them (jax_mpk/attention.py).
//
// Bandwidth first: a chunk's keys and values are copied to shared memory with cp.async, both issued before any
// score is computed, so a chunk costs one memory round trip plus its bytes at the SM's share of HBM; the next
// chunk's keys are issued as soon as this chunk's scores are done, its values as soon as this chunk's output
// is, so that a task of several chunks keeps its copies in flight behind its arithmetic. (The first form read
// keys into registers four per lane group at a time and capped the values' tile at 32 KB: a batch-8 task of
// Qwen3-8B moved 6 GB/s, one sixth of its SM's share.)
//
// Threads: a key's D values are kLanes = D / 8 lanes of 16 bytes, so a pass of the block covers
// kBlockThreads / kLanes keys.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/dot.cuh"

namespace jax_mpk::attention {

template <int D> struct Geometry {
  static_assert(D % 8 == 0 && D / 8 <= 32 && (32 % (D / 8)) == 0, "a key's 16-byte vectors fill whole lane groups of a warp");
  static constexpr int kLanes = D / 8;                         // lanes per key
  static constexpr int kKeysPerPass = kBlockThreads / kLanes;  // keys the block reads at once
  static constexpr int kWarps = kBlockThreads / 32;
};

// Shared memory (bytes) of scratch: a chunk's keys, its values, then the warps' partial sums of o.
template <class T, int R, int D>
__host__ __device__ constexpr int scratch_bytes(int chunk) {
  return 2 * chunk * D * static_cast<int>(sizeof(T)) + Geometry<D>::kWarps * R * D * 4;
}

// Floats from one row's scores to the next.
__host__ __device__ constexpr int scores_stride(int chunk) { return (chunk + 3) / 4 * 4; }

// Issue (and commit as one group) the copies of kChunk keys' D elements, key s from src + s * stride, to
// tile[s * D ...].
template <class T, int D, int kChunk>
__device__ __forceinline__ void copy_async(T* tile, const T* src, int64_t stride) {
  using G = Geometry<D>;
  const int lane = threadIdx.x % G::kLanes, slot = threadIdx.x / G::kLanes;
  const uint32_t base = dot::shared_address(tile) + lane * 16;
#pragma unroll 4
  for (int s = slot; s < kChunk; s += G::kKeysPerPass) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + s * D * static_cast<int>(sizeof(T))),
                 "l"(src + s * stride + lane * 8) : "memory");
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void commit_empty() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Every copy group but the newest one has landed (this thread's; a barrier makes it everyone's).
__device__ __forceinline__ void wait_all_but_newest() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// q: R rows of D floats (row stride q_stride) in shared memory. keys/values: key s of the task's KV head at
// keys + s * key_stride, values + s * value_stride (D contiguous two-byte elements, 16-byte aligned). The task
// takes keys [first, last), whole chunks of kChunk. scores: R rows of scores_stride(kChunk) floats; scratch:
// scratch_bytes<T, R, D>(kChunk), 16-byte aligned; out: R * D + 2 * R floats. score(r, s, dot) is the softmax's
// input for row r and key s given q . k (the user's scaling and masking). Per chunk, store(part) is called by
// every thread with out[r * D + d] = o, out[R * D + r] = m, out[R * D + R + r] = l (part = first key / kChunk).
// Ends with a barrier; no copy is left in flight.
template <class T, int R, int D, int kChunk, class Score, class Store>
__device__ void keys_in_chunks(const float* q, int q_stride, const T* keys, int64_t key_stride, const T* values,
                               int64_t value_stride, int first, int last, float* scores, char* scratch, float* out,
                               Score score, Store store) {
  using G = Geometry<D>;
  static_assert(R >= 1 && R <= 8, "query rows per task");
  static_assert(kChunk >= 1 && (kChunk * D * sizeof(T)) % 16 == 0, "whole 16-byte vectors");
  constexpr int kStride = scores_stride(kChunk);
  const int lane = threadIdx.x % G::kLanes, slot = threadIdx.x / G::kLanes;
  const int warp = threadIdx.x / 32, warp_lane = threadIdx.x % 32;
  T* key_tile = reinterpret_cast<T*>(scratch);
  T* value_tile = key_tile + kChunk * D;
  float* warp_sums = reinterpret_cast<float*>(value_tile + kChunk * D);

  copy_async<T, D, kChunk>(key_tile, keys + first * key_stride, key_stride);
  copy_async<T, D, kChunk>(value_tile, values + first * value_stride, value_stride);
#pragma unroll 1
  for (int begin = first; begin < last; begin += kChunk) {
    const bool more = begin + kChunk < last;
    wait_all_but_newest();  // this chunk's keys (its values may still be on their way)
    __syncthreads();

    // 1. scores from the key tile: a lane group per key
#pragma unroll 2
    for (int base = 0; base < kChunk; base += G::kKeysPerPass) {  // warp-uniform: the lanes shuffle
      const int s = base + slot;
      float k[8];
      if (s < kChunk) {
        dot::unpack8(*reinterpret_cast<const uint4*>(key_tile + s * D + lane * 8), key_tile, k);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) k[j] = 0.0f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 a = *reinterpret_cast<const float4*>(q + r * q_stride + lane * 8);
        const float4 b = *reinterpret_cast<const float4*>(q + r * q_stride + lane * 8 + 4);
        float sum = a.x * k[0] + a.y * k[1] + a.z * k[2] + a.w * k[3] + b.x * k[4] + b.y * k[5] + b.z * k[6] +
                    b.w * k[7];
#pragma unroll
        for (int offset = G::kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0 && s < kChunk) scores[r * kStride + s] = score(r, begin + s, sum);
      }
    }
    __syncthreads();  // the key tile is free, the scores complete
    if (more) {
      copy_async<T, D, kChunk>(key_tile, keys + (begin + kChunk) * key_stride, key_stride);
    } else {
      commit_empty();  // keeps "all but the newest group" meaning this chunk's values below
    }

    // 2. per row (a warp each): m, p = exp(score - m) in place, l
    for (int r = warp; r < R; r += G::kWarps) {
      float m = -INFINITY;
      for (int s = warp_lane; s < kChunk; s += 32) m = fmaxf(m, scores[r * kStride + s]);
      for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
      // a chunk whose scores are all -inf (masked) contributes nothing, not exp(-inf - -inf) = NaN
      const float reference = m == -INFINITY ? 0.0f : m;
      float l = 0.0f;
      for (int s = warp_lane; s < kChunk; s += 32) {
        const float p = expf(scores[r * kStride + s] - reference);
        scores[r * kStride + s] = p;
        l += p;
      }
      l = dot::warp_sum(l);
      if (warp_lane == 0) {
        out[R * D + r] = m;
        out[R * D + R + r] = l;
      }
    }
    wait_all_but_newest();  // this chunk's values
    __syncthreads();

    // 3. o = p . values: each thread sums its keys for its 8 columns, then the lane groups of a warp, then the warps
    float acc[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[r][j] = 0.0f;
#pragma unroll 2
    for (int s = slot; s < kChunk; s += G::kKeysPerPass) {
      float v[8];
      dot::unpack8(*reinterpret_cast<const uint4*>(value_tile + s * D + lane * 8), value_tile, v);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float p = scores[r * kStride + s];
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
    __syncthreads();  // the value tile is free, the warps' sums complete
    if (more) {
      copy_async<T, D, kChunk>(value_tile, values + (begin + kChunk) * value_stride, value_stride);
    } else {
      commit_empty();
    }
    for (int e = threadIdx.x; e < R * D; e += kBlockThreads) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < G::kWarps; ++w) total += warp_sums[w * R * D + e];
      out[e] = total;
    }
    __syncthreads();
    store(begin / kChunk);
    __syncthreads();  // out, the scores and the warps' sums are the next chunk's
  }
  asm volatile("cp.async.wait_all;" ::: "memory");  // only empty groups remain; leave none behind
}

}  // namespace jax_mpk::attention
