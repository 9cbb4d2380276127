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
// Arithmetic on tensor cores: with the tiles in shared memory, CUDA-core FMAs (q re-read from shared memory per
// key, a shuffle reduction per key and row) took ~10 us a 256-key chunk of Qwen3-8B at batch 8, 2.5x the chunk's
// bytes at the SM's share of HBM (benchmarks/micro/attention_chunk.cu). Scores: S^T = K q^T with mma.sync
// m16n8k16, the key tile as A (16 keys x 16 of D, ldmatrix), the query rows as B (rows past R zero); output:
// o^T = V^T p^T, the value tile as A (ldmatrix.trans), the probabilities as B, rounded to the values' type as the
// unsplit form rounds them (after exp, before the sum over chunks). Float accumulation in both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/dot.cuh"

namespace jax_mpk::attention {

// Tiles: key s's D elements as D / 8 vectors of 16 bytes, vector c stored at position c ^ f(s), so that the
// 8 rows of an 8 x 8 ldmatrix (8 consecutive keys, one vector each) fall in 8 different bank groups.
template <int D> struct Geometry {
  static_assert(D % 16 == 0 && D <= 256, "whole 16-wide mma steps along the head");
  static constexpr int kVectors = D / 8;  // 16-byte vectors per key
  static constexpr int kWarps = kBlockThreads / 32;
  static constexpr int kHeadTiles = D / 16;  // the output's 16-row mma tiles along the head
  // warps that share one head tile of the output, each over part of the chunk's keys (their sums added at the end)
  static constexpr int kKeyGroups = kWarps >= kHeadTiles ? kWarps / kHeadTiles : 1;
};

template <int D>
__device__ __forceinline__ int tile_offset(int s, int c) {  // bytes
  constexpr int kVectors = Geometry<D>::kVectors;
  constexpr int kKeysPerLine = kVectors >= 8 ? 1 : 8 / kVectors;  // keys in 128 bytes (one pass over the banks)
  constexpr int kMask = kVectors >= 8 ? 7 : kVectors - 1;
  return (s * kVectors + (c ^ ((s / kKeysPerLine) & kMask))) * 16;
}

// Shared memory (bytes) of scratch: a chunk's keys, its values, then the key groups' partial sums of o.
template <class T, int R, int D>
__host__ __device__ constexpr int scratch_bytes(int chunk) {
  return 2 * chunk * D * static_cast<int>(sizeof(T)) + Geometry<D>::kKeyGroups * R * D * 4;
}

// Floats from one row's scores to the next: 8 more than a multiple of 32, so that the probabilities' B loads (8
// rows at one key) use 8 different banks.
__host__ __device__ constexpr int scores_stride(int chunk) { return (chunk + 31) / 32 * 32 + 8; }

// Issue (and commit as one group) the copies of kChunk keys' D elements, key s from src + s * stride, into tile.
template <class T, int D, int kChunk>
__device__ __forceinline__ void copy_async(T* tile, const T* src, int64_t stride) {
  constexpr int kVectors = Geometry<D>::kVectors;
  const uint32_t base = dot::shared_address(tile);
#pragma unroll 4
  for (int v = threadIdx.x; v < kChunk * kVectors; v += kBlockThreads) {
    const int s = v / kVectors, c = v % kVectors;
    dot::copy16_streamed(base + tile_offset<D>(s, c), src + s * stride + c * 8);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

__device__ __forceinline__ void commit_empty() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Every copy group but the newest one has landed (this thread's; a barrier makes it everyone's).
__device__ __forceinline__ void wait_all_but_newest() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// q: R rows of D floats (row stride q_stride) in shared memory, values of T. keys/values: key s of the task's KV
// head at keys + s * key_stride, values + s * value_stride (D contiguous two-byte elements, 16-byte aligned).
// The task takes keys [first, last), whole chunks of kChunk (a multiple of 16). scores: R rows of
// scores_stride(kChunk) floats; scratch: scratch_bytes<T, R, D>(kChunk), 16-byte aligned; out: R * D + 2 * R
// floats. score(r, s, dot) is the softmax's input for row r and key s given q . k (the user's scaling and
// masking). Per chunk, store(part) is called by every thread with out[r * D + d] = o, out[R * D + r] = m,
// out[R * D + R + r] = l (part = first key / kChunk). Ends with a barrier; no copy is left in flight.
template <class T, int R, int D, int kChunk, class Score, class Store>
__device__ void keys_in_chunks(const float* q, int q_stride, const T* keys, int64_t key_stride, const T* values,
                               int64_t value_stride, int first, int last, float* scores, char* scratch, float* out,
                               Score score, Store store) {
  using G = Geometry<D>;
  static_assert(R >= 1 && R <= 8, "query rows per task: the 8 columns of B");
  static_assert(kChunk % 16 == 0, "whole 16-key mma tiles");
  constexpr int kStride = scores_stride(kChunk), kKeyTiles = kChunk / 16, kHeadSteps = D / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, q4 = lane % 4;  // mma fragments: B column (query row) g, k-pairs 2 q4 and 2 q4 + 8
  T* key_tile = reinterpret_cast<T*>(scratch);
  T* value_tile = key_tile + kChunk * D;
  float* partial_o = reinterpret_cast<float*>(value_tile + kChunk * D);  // [key group][row][D]
  const uint32_t key_base = dot::shared_address(key_tile), value_base = dot::shared_address(value_tile);

  copy_async<T, D, kChunk>(key_tile, keys + first * key_stride, key_stride);
  copy_async<T, D, kChunk>(value_tile, values + first * value_stride, value_stride);
  // the query rows as B fragments, once per task: q[g][16 step + 2 q4 (+1)] and 8 further
  uint32_t qb[kHeadSteps][2];
#pragma unroll
  for (int step = 0; step < kHeadSteps; ++step) {
    const float* row = q + (g < R ? g : 0) * q_stride + 16 * step + 2 * q4;
    qb[step][0] = g < R ? dot::pack2(row[0], row[1], key_tile) : 0u;
    qb[step][1] = g < R ? dot::pack2(row[8], row[9], key_tile) : 0u;
  }
  // ldmatrix: lane L addresses row L % 8 of the 8 x 8 matrix L / 8
  const int ld_row = lane % 8, ld_matrix = lane / 8;
#pragma unroll 1
  for (int begin = first; begin < last; begin += kChunk) {
    const bool more = begin + kChunk < last;
    wait_all_but_newest();  // this chunk's keys (its values may still be on their way)
    __syncthreads();

    // 1. scores: a warp per 16 keys; A = the keys (matrices: keys 0-7 / 8-15 x head 0-7, then head 8-15)
#pragma unroll 1
    for (int tile = warp; tile < kKeyTiles; tile += G::kWarps) {
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int key = 16 * tile + ld_row + 8 * (ld_matrix % 2);
#pragma unroll
      for (int step = 0; step < kHeadSteps; ++step) {
        uint32_t a[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                     : "r"(key_base + tile_offset<D>(key, 2 * step + ld_matrix / 2)));
        dot::mma_16x8x16<T>(c, a, qb[step][0], qb[step][1]);
      }
      // c[i]: key 16 tile + g (+ 8 for i >= 2), query row 2 q4 (+ 1 for odd i)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * q4 + (i & 1), s = 16 * tile + g + 8 * (i >> 1);
        if (row < R) scores[row * kStride + s] = score(row, begin + s, c[i]);
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
      for (int s = lane; s < kChunk; s += 32) m = fmaxf(m, scores[r * kStride + s]);
      for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
      // a chunk whose scores are all -inf (masked) contributes nothing, not exp(-inf - -inf) = NaN
      const float reference = m == -INFINITY ? 0.0f : m;
      float l = 0.0f;
      for (int s = lane; s < kChunk; s += 32) {
        const float p = expf(scores[r * kStride + s] - reference);
        scores[r * kStride + s] = p;
        l += p;
      }
      l = dot::warp_sum(l);
      if (lane == 0) {
        out[R * D + r] = m;
        out[R * D + R + r] = l;
      }
    }
    wait_all_but_newest();  // this chunk's values
    __syncthreads();

    // 3. o^T = V^T p^T: a warp per 16 of the head and key group; A = the values transposed (matrices: head 0-7 /
    // 8-15 x keys 0-7, then keys 8-15), B = the probabilities
    const int head_tile = warp % G::kHeadTiles, group = warp / G::kHeadTiles;
    if (group < G::kKeyGroups) {
      float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const float* p_lane = scores + (g < R ? g : 0) * kStride + 2 * q4;
#pragma unroll 2
      for (int step = group; step < kKeyTiles; step += G::kKeyGroups) {
        uint32_t a[4];
        const int key = 16 * step + ld_row + 8 * (ld_matrix / 2);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                     : "r"(value_base + tile_offset<D>(key, 2 * head_tile + ld_matrix % 2)));
        const float2 lo = *reinterpret_cast<const float2*>(p_lane + 16 * step);
        const float2 hi = *reinterpret_cast<const float2*>(p_lane + 16 * step + 8);
        const uint32_t b0 = g < R ? dot::pack2(lo.x, lo.y, value_tile) : 0u;
        const uint32_t b1 = g < R ? dot::pack2(hi.x, hi.y, value_tile) : 0u;
        dot::mma_16x8x16<T>(o, a, b0, b1);
      }
      // o[i]: head element 16 head_tile + g (+ 8 for i >= 2), query row 2 q4 (+ 1 for odd i)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * q4 + (i & 1), d = 16 * head_tile + g + 8 * (i >> 1);
        if (row < R) partial_o[(group * R + row) * D + d] = o[i];
      }
    }
    __syncthreads();  // the value tile is free, the groups' sums complete
    if (more) {
      copy_async<T, D, kChunk>(value_tile, values + (begin + kChunk) * value_stride, value_stride);
    } else {
      commit_empty();
    }
    for (int e = threadIdx.x; e < R * D; e += kBlockThreads) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < G::kKeyGroups; ++w) total += partial_o[w * R * D + e];
      out[e] = total;
    }
    __syncthreads();
    store(begin / kChunk);
    __syncthreads();  // out, the scores and the groups' sums are the next chunk's
  }
  asm volatile("cp.async.wait_all;" ::: "memory");  // only empty groups remain; leave none behind
}

// ------------------------------------------------------------------------------------------------------------
// keys_by_warps (JAX_MPK_ATTENTION_WARPS): the batch-1 form of keys_in_chunks, for chunks of a few keys a warp. A
// chunk of 64 keys at batch 1 gives keys_in_chunks' tensor cores almost nothing to do, while its phases (scores on
// 4 of 16 warps, a softmax on R warps, the values' products, the key groups' sums, the store) are each a block
// barrier: ~2.4 us of a 64-key task with its keys already in shared memory (session 20's trace). Here each warp
// takes kChunk / 16 keys for all R rows: its lanes load their slices of those keys and values straight into
// registers (lane l: elements [l, l + 1) * D / 32 of a row, through L2: the step's append stores one row during
// the call), compute the scores (a warp sum each), the softmax and o over the warp's keys, and the warps' partials
// merge through shared memory: one barrier a chunk before the store. The probabilities are rounded to the values'
// type relative to the warp's largest score (keys_in_chunks: relative to the chunk's), then rescaled in float.

// Shared memory (bytes) keys_by_warps uses of scratch: every warp's o, largest score and sum, per row.
template <int R, int D>
__host__ __device__ constexpr int warp_partials_bytes() {
  return (kBlockThreads / 32) * R * (D + 2) * 4;
}

// kSlice two-byte values from global memory through L2 (not the read-only path), as floats.
template <class T, int kSlice>
__device__ __forceinline__ void load_slice(const T* from, float out[kSlice]) {
  static_assert(sizeof(T) == 2 && (kSlice == 2 || kSlice == 4 || kSlice == 8), "4, 8 or 16 bytes of two-byte values");
  uint32_t words[kSlice / 2];
  if constexpr (kSlice == 2) {
    if constexpr (JAX_MPK_STREAM_EVICT_FIRST) {
      asm volatile("ld.global.cg.L2::cache_hint.u32 %0, [%1], %2;" : "=r"(words[0]) : "l"(from), "l"(dot::stream_policy()));
    } else {
      asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(words[0]) : "l"(from));
    }
  } else if constexpr (kSlice == 4) {
    if constexpr (JAX_MPK_STREAM_EVICT_FIRST) {
      asm volatile("ld.global.cg.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
                   : "=r"(words[0]), "=r"(words[1]) : "l"(from), "l"(dot::stream_policy()));
    } else {
      asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(words[0]), "=r"(words[1]) : "l"(from));
    }
  } else {
    if constexpr (JAX_MPK_STREAM_EVICT_FIRST) {
      asm volatile("ld.global.cg.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                   : "=r"(words[0]), "=r"(words[1]), "=r"(words[2]), "=r"(words[3])
                   : "l"(from), "l"(dot::stream_policy()));
    } else {
      asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(words[0]), "=r"(words[1]), "=r"(words[2]), "=r"(words[3]) : "l"(from));
    }
  }
#pragma unroll
  for (int i = 0; i < kSlice / 2; ++i) {
    if constexpr (std::is_same_v<T, __half>) {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      out[2 * i] = pair.x, out[2 * i + 1] = pair.y;
    } else {
      out[2 * i] = __uint_as_float(words[i] << 16), out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
}

// keys_in_chunks' contract (q, keys, values, first, last, out, score, store; scores unused), scratch:
// warp_partials_bytes<R, D>(), and stage(): called by every thread once the first chunk's loads are issued, it
// fills q and ends with a barrier (the queries' staging, an L2 round trip, overlaps the keys').
template <class T, int R, int D, int kChunk, class Score, class Store, class Stage>
__device__ void keys_by_warps(const float* q, int q_stride, const T* keys, int64_t key_stride, const T* values,
                              int64_t value_stride, int first, int last, float* /*scores*/, char* scratch, float* out,
                              Score score, Store store, Stage stage) {
  constexpr int kWarps = kBlockThreads / 32, kKeys = kChunk / kWarps, kSlice = D / 32;
  static_assert(R >= 1 && R <= 8 && kChunk % kWarps == 0 && kKeys >= 1 && kKeys <= 8, "a few keys a warp");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* partial_o = reinterpret_cast<float*>(scratch);  // [warp][row][D]
  float* partial_m = partial_o + kWarps * R * D;          // [warp][row]
  float* partial_l = partial_m + kWarps * R;              // [warp][row]
  float k[kKeys][kSlice], v[kKeys][kSlice];
  auto issue = [&](int begin) {  // this warp's keys and values of the chunk from `begin`
#pragma unroll
    for (int i = 0; i < kKeys; ++i) {
      load_slice<T, kSlice>(keys + (begin + warp * kKeys + i) * key_stride + lane * kSlice, k[i]);
    }
#pragma unroll
    for (int i = 0; i < kKeys; ++i) {
      load_slice<T, kSlice>(values + (begin + warp * kKeys + i) * value_stride + lane * kSlice, v[i]);
    }
  };
  if (first < last) issue(first);
  stage();
  float qs[R][kSlice];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < kSlice; ++j) qs[r][j] = q[r * q_stride + lane * kSlice + j];
  }
#pragma unroll 1
  for (int begin = first; begin < last; begin += kChunk) {
    const int key0 = begin + warp * kKeys;
    if (begin != first) issue(begin);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float s[kKeys];
#pragma unroll
      for (int i = 0; i < kKeys; ++i) {
        float dot_qk = 0.0f;
#pragma unroll
        for (int j = 0; j < kSlice; ++j) dot_qk += qs[r][j] * k[i][j];
        s[i] = score(r, key0 + i, dot::warp_sum(dot_qk));
      }
      float m = s[0];
#pragma unroll
      for (int i = 1; i < kKeys; ++i) m = fmaxf(m, s[i]);
      // keys all masked (-inf) contribute nothing, not exp(-inf - -inf) = NaN
      const float reference = m == -INFINITY ? 0.0f : m;
      float l = 0.0f, o[kSlice] = {};
#pragma unroll
      for (int i = 0; i < kKeys; ++i) {
        const float p = expf(s[i] - reference);
        const float rounded = static_cast<float>(static_cast<T>(p));  // as keys_in_chunks' B operand
        l += p;
#pragma unroll
        for (int j = 0; j < kSlice; ++j) o[j] += rounded * v[i][j];
      }
#pragma unroll
      for (int j = 0; j < kSlice; ++j) partial_o[(warp * R + r) * D + lane * kSlice + j] = o[j];
      if (lane == 0) partial_m[warp * R + r] = m, partial_l[warp * R + r] = l;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < R * D; e += kBlockThreads) {
      const int r = e / D;
      float m = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, partial_m[w * R + r]);
      float o = 0.0f, l = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = partial_m[w * R + r];
        const float scale = mw == -INFINITY ? 0.0f : expf(mw - m);  // a warp of masked keys adds nothing
        o += scale * partial_o[(w * R + r) * D + e % D];
        l += scale * partial_l[w * R + r];
      }
      out[e] = o;
      if (e % D == 0) out[R * D + r] = m, out[R * D + R + r] = l;
    }
    __syncthreads();
    store(begin / kChunk);
    __syncthreads();  // out and the partials are the next chunk's
  }
}

}  // namespace jax_mpk::attention
