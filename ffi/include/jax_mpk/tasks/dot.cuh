// Skinny matrix products for decode: one output row (a few hundred columns at most) per call, or up to 8
// rows that share the weight (rows_shared, columns_ring), weights streamed once with 16-byte loads and float
// accumulation; the activation rows are staged in shared memory by the caller. Two weight layouts:
//   columns: acc[n] = sum_k x[k] * w[k * k_stride + n]   (x @ W with W[K, N] row-major)
//   rows:    acc[n] = sum_k x[k] * w[n * n_stride + k]   (x @ W.T, e.g. a tied LM head)
// Vector paths need 16-byte alignment (checked by codegen); the scalar paths take any layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/elementwise.cuh"

namespace jax_mpk::dot {

// 8 values from 16 bytes of 2-byte floats.
__device__ __forceinline__ void unpack8(const uint4& v, const __nv_bfloat16*, float out[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack8(const uint4& v, const __half*, float out[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Weights and the KV cache are read once a step: streamed through L2 with its default policy they may push out
// what the dependency chain reads again soon (activations, split-K partials, the task tables, the kernel's code).
// With JAX_MPK_STREAM_EVICT_FIRST (the default, as the knob's: on an H200 Qwen3-0.6B b1 1.336 -> 1.225 ms, Llama-1B
// b1 1.181 -> 1.131, only Qwen3-8B b1 slower, +0.6%; 0 turns it off) the stream's loads and copies carry an
// evict-first policy, so that they replace one another before anything else.
// With JAX_MPK_SHARED_CODE (codegen's default; 0 inlines them), the ring products and the ring's first copies
// are functions of their own that every task of the same weight type and tile shape calls, instead of a copy
// inlined into every variant and into every case of Dispatch::prefetch (the megakernel's own function held ~40K
// instructions, most of them 368 inlined copies of warp_ring_begin: ~20K shared). On an H200 the step time did not
// change (Llama-1B and Qwen3-0.6B b1), but nvcc runs in about half the time.
#ifndef JAX_MPK_SHARED_CODE
#define JAX_MPK_SHARED_CODE 0
#endif
#if JAX_MPK_SHARED_CODE
#define JAX_MPK_RING_FUNCTION __noinline__
#define JAX_MPK_RING_BEGIN __noinline__
#else
#define JAX_MPK_RING_FUNCTION
#define JAX_MPK_RING_BEGIN __forceinline__
#endif

// With JAX_MPK_STATIC_TILES (default 1; 0 for measuring), the ring products take their tile's shape from their
// template arguments where the planner gives it (static_or below), else from their run-time arguments.
#ifndef JAX_MPK_STATIC_TILES
#define JAX_MPK_STATIC_TILES 1
#endif

// With JAX_MPK_VECTOR_PARTIALS (codegen's default 1, its knob of the same name; 0 here for
// benchmarks/micro/product_body.cu to build both), a static one-row warp-ring product adds its partial sums
// another way: see columns_warp_ring.
#ifndef JAX_MPK_VECTOR_PARTIALS
#define JAX_MPK_VECTOR_PARTIALS 0
#endif

// A measuring seam: the ring products call JAX_MPK_PRODUCT_MARK(point) where their phases meet (0: this warp's
// ring loop is done; 1: every warp's is, after the barrier; 2: the partial sums are stored, after the barrier).
// Nothing by default; benchmarks/micro/product_body.cu defines it to time the phases with clock64.
#ifndef JAX_MPK_PRODUCT_MARK
#define JAX_MPK_PRODUCT_MARK(point)
#endif

#ifndef JAX_MPK_STREAM_EVICT_FIRST
#define JAX_MPK_STREAM_EVICT_FIRST 1
#endif
__device__ __forceinline__ uint64_t stream_policy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));  // not volatile: hoisted, shared
  return policy;
}
// cp.async of 16 bytes of a stream (a weight tile, a chunk of the KV cache) into shared memory.
__device__ __forceinline__ void copy16_streamed(uint32_t to, const void* from) {
  if constexpr (JAX_MPK_STREAM_EVICT_FIRST) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(to), "l"(from),
                 "l"(stream_policy()) : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(from) : "memory");
  }
}
// 16 bytes of a weight through the read-only path.
__device__ __forceinline__ uint4 load16_streamed(const void* from) {
  if constexpr (JAX_MPK_STREAM_EVICT_FIRST) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(from), "l"(stream_policy()));
    return v;
  } else {
    return __ldg(reinterpret_cast<const uint4*>(from));
  }
}

template <class W> __device__ __forceinline__ void load8(const W* p, float out[8]) {
  unpack8(load16_streamed(p), p, out);
}
__device__ __forceinline__ void load8(const float* p, float out[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
// int32 weights never take a vector path (codegen's elt_ok), but rows() instantiates it for any W.
__device__ __forceinline__ void load8(const int32_t* p, float out[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(__ldg(p + j));
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

// 16 bytes of T as 16 / sizeof(T) floats.
__device__ __forceinline__ void unpack16(const uint4& v, const float*, float out[4]) {
  out[0] = __uint_as_float(v.x), out[1] = __uint_as_float(v.y), out[2] = __uint_as_float(v.z), out[3] = __uint_as_float(v.w);
}
template <class T> __device__ __forceinline__ void unpack16(const uint4& v, const T* tag, float out[8]) { unpack8(v, tag, out); }

// store(e, load(e)) for e < kTotal, every thread's loads (up to 16 at a time) issued before its first store:
// `xs` is a generic pointer that the compiler cannot tell from global memory, so interleaved loads and stores
// would serialize on it and cost one memory round trip per item a thread stages instead of one per 16.
template <int kTotal, class Loaded, class Load, class Store>
__device__ __forceinline__ void loads_then_stores(Load load, Store store) {
  constexpr int kChunk = 16 * kBlockThreads;
#pragma unroll 1
  for (int e0 = 0; e0 < kTotal; e0 += kChunk) {
    constexpr int kPerThread = ((kTotal < kChunk ? kTotal : kChunk) + kBlockThreads - 1) / kBlockThreads;
    Loaded staged[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = e0 + u * kBlockThreads + threadIdx.x;
      if (e < kTotal && e < e0 + kChunk) staged[u] = load(e);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int e = e0 + u * kBlockThreads + threadIdx.x;
      if (e < kTotal && e < e0 + kChunk) store(e, staged[u]);
    }
  }
}

// Stage R activation rows, xs[r * x_stride + k] = base[offset + r * row_stride + k * k_stride] (k < K), in
// shared memory as float. Contiguous rows, 16-byte aligned, load 16 bytes at a time: an activation that every SM
// stages at once is a few hundred L2 lines each requested by all SMs, and there each request, not each byte,
// costs (8 rows of 2048 bf16 took 10 us with 2-byte loads, 3.5 us with 16-byte ones).
template <int R, int K, class T, bool kReadOnly>
__device__ __forceinline__ void stage_rows(float* xs, int x_stride, const char* base, int64_t offset,
                                           int64_t row_stride, int64_t k_stride) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  if constexpr ((std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) &&
                K % kPer == 0) {
    const T* first = reinterpret_cast<const T*>(base) + offset;
    const bool aligned = (reinterpret_cast<uintptr_t>(first) | reinterpret_cast<uintptr_t>(xs)) % 16 == 0 &&
                         (R == 1 || (row_stride % kPer == 0 && x_stride % 4 == 0));
    if (k_stride == 1 && aligned) {  // the same in every thread
      constexpr int kRowVectors = K / kPer;
      loads_then_stores<R * kRowVectors, uint4>(
          [=](int v) {
            const int r = v / kRowVectors;
            const uint4* source = reinterpret_cast<const uint4*>(first + r * row_stride + (v - r * kRowVectors) * kPer);
            return kReadOnly ? __ldg(source) : __ldcg(source);
          },
          [=](int v, const uint4& loaded) {
            const int r = v / kRowVectors;
            float values[kPer];
            unpack16(loaded, first, values);
            float4* target = reinterpret_cast<float4*>(xs + r * x_stride + (v - r * kRowVectors) * kPer);
#pragma unroll
            for (int i = 0; i < kPer / 4; ++i) target[i] = make_float4(values[4 * i], values[4 * i + 1], values[4 * i + 2], values[4 * i + 3]);
          });
      return;
    }
  }
  loads_then_stores<R * K, float>(
      [=](int e) {
        const int r = e / K;
        const int64_t index = offset + r * row_stride + (e - r * K) * k_stride;
        return kReadOnly ? ops::load_readonly<T>(base, index) : ops::load<T>(base, index);
      },
      [=](int e, float loaded) {
        const int r = e / K;
        xs[r * x_stride + e - r * K] = loaded;
      });
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

// Short rows (K < 256, vector loads), for R activation rows that share the weight: a group of lanes per output,
// a power of two covering K / 8 vectors (attention scores over a 64-wide head: 8 lanes, so that a warp works on
// four keys at once), each loaded weight vector multiplied with all R rows (the query heads of a KV head read
// its keys once). acc[r * acc_stride + n] = sum_k xs[r * x_stride + k] * w[n * n_stride + k]; K % 8 == 0.
template <class W, int R>
__device__ void rows_short(const float* xs, int x_stride, const W* w, int64_t n_stride, int K, int n_len, float* acc,
                           int acc_stride) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  int group = 1;  // K <= 8 * group: one vector each
  while (group * 8 < K && group < 32) group *= 2;
  const int per_warp = 32 / group, member = lane % group, slot = lane / group;
  const int rounds = (n_len + warps * per_warp - 1) / (warps * per_warp);
  // kInFlight rounds' loads are issued before any is used: one round's 16 bytes per lane are too few bytes in
  // flight to cover a memory round trip (attention scores over a cache are this loop)
  constexpr int kInFlight = 4;
#pragma unroll 1
  for (int r0 = 0; r0 < rounds; r0 += kInFlight) {
    float wv[kInFlight][8];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int n = ((r0 + u) * warps + warp) * per_warp + slot;
      if (n < n_len && member * 8 < K) load8(w + n * n_stride + member * 8, wv[u]);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int n = ((r0 + u) * warps + warp) * per_warp + slot;
      float sum[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        sum[r] = 0.0f;
        if (n < n_len && member * 8 < K) {
#pragma unroll
          for (int j = 0; j < 8; ++j) sum[r] += xs[r * x_stride + member * 8 + j] * wv[u][j];
        }
        for (int offset = group / 2; offset > 0; offset /= 2) sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], offset);
        if (n < n_len && member == 0) acc[r * acc_stride + n] = sum[r];
      }
    }
  }
}

// Rows layout: a group of lanes per output (a whole warp for long rows; for short ones, rows_short); vector loads
// when K % 8 == 0 and rows are 16-byte aligned.
template <class W>
__device__ void rows(const float* x, const W* w, int64_t n_stride, int64_t k_stride, int K, int n_len, bool vectorized,
                     float* acc) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  if (vectorized && K < 256) {
    rows_short<W, 1>(x, 0, w, n_stride, K, n_len, acc, 0);
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

// One step of transpose_sum: lanes pair up across bit S; each keeps one half of v[0 .. 2S) and adds its
// partner's copy of that half.
template <int S, int V>
__device__ __forceinline__ void transpose_step(float (&v)[V], int lane) {
  if constexpr (S >= 1) {
    const bool upper = lane & S;  // keeps v[S .. 2S), its partner v[0 .. S)
#pragma unroll
    for (int i = 0; i < S; ++i) {
      const float keep = upper ? v[i + S] : v[i], send = upper ? v[i] : v[i + S];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, S);
    }
    transpose_step<S / 2>(v, lane);  // compile-time steps: v stays in registers
  }
}

// Sum of 32 lanes' values v[i], transposed: returns, in lane L, the total of v[L % V] over all lanes
// (V - 1 + log2(32 / V) shuffles, instead of 5 per value).
template <int V>
__device__ __forceinline__ float transpose_sum(float (&v)[V], int lane) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "a power of two up to a warp");
  transpose_step<V / 2>(v, lane);
  float total = v[0];
  for (int offset = 16; offset >= V; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  return total;
}

// Rows layout for R activation rows that share the weight (a batch through a tied LM head; the query heads of a
// KV head over its keys): each weight row is read once for all of them.
// acc[r * acc_stride + n] = sum_k xs[r * x_stride + k] * w[n * n_stride + k]. Short rows: rows_short. Else a warp
// takes kOuts outputs at a time (their loads in flight together), lanes striding K by 256 with 16-byte loads.
// K % 8 == 0, rows 16-byte aligned, x_stride % 4 == 0.
template <class W, int R>
__device__ void rows_shared(const float* xs, int x_stride, const W* w, int64_t n_stride, int K, int n_len, float* acc,
                            int acc_stride) {
  static_assert(R >= 2 && R <= 8, "rows per task");
  if (K < 256) {
    rows_short<W, R>(xs, x_stride, w, n_stride, K, n_len, acc, acc_stride);
    return;
  }
  constexpr int kOuts = 4;
  constexpr int kRowsPow2 = R <= 2 ? 2 : R <= 4 ? 4 : 8;
  constexpr int V = kOuts * kRowsPow2;  // sums per lane: value o * kRowsPow2 + r
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  // A quarter warp's 16-byte shared loads at a 32-byte lane stride would hit each bank twice: lanes of odd
  // quads read their 8 x's upper half first (and swap their weights' halves to match).
  const bool swap = (lane >> 2) & 1;
  for (int n0 = warp * kOuts; n0 < n_len; n0 += warps * kOuts) {
    float sum[V];
#pragma unroll
    for (int i = 0; i < V; ++i) sum[i] = 0.0f;
#pragma unroll 2
    for (int k = lane * 8; k < K; k += 256) {
      float wv[kOuts][8];
#pragma unroll
      for (int o = 0; o < kOuts; ++o) load8(w + min(n0 + o, n_len - 1) * n_stride + k, wv[o]);  // past n_len: dropped
#pragma unroll
      for (int o = 0; o < kOuts; ++o)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float a = wv[o][j], b = wv[o][j + 4];
          wv[o][j] = swap ? b : a;
          wv[o][j + 4] = swap ? a : b;
        }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float* x = xs + r * x_stride + k;
        const float4 first = *reinterpret_cast<const float4*>(x + (swap ? 4 : 0));
        const float4 second = *reinterpret_cast<const float4*>(x + (swap ? 0 : 4));
#pragma unroll
        for (int o = 0; o < kOuts; ++o) {
          const float xv[8] = {first.x, first.y, first.z, first.w, second.x, second.y, second.z, second.w};
#pragma unroll
          for (int j = 0; j < 8; ++j) sum[o * kRowsPow2 + r] += xv[j] * wv[o][j];
        }
      }
    }
    const float total = transpose_sum<V>(sum, lane);
    const int value = lane % V, o = value / kRowsPow2, r = value % kRowsPow2;
    if (lane < V && r < R && n0 + o < n_len) acc[r * acc_stride + n0 + o] = total;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Weight ring: the weight tile of a columns-layout product (W[K, N] row-major, tile = all K rows x n_len
// columns) streams into a ring of shared-memory slots with cp.async, and the dot reads it from there.
// The first kRingSlots - 1 slots are issued by `ring_begin` *before* the task waits for its dependencies
// (weights are never written by the graph), so the stream is already running while the activation row is
// produced; then every stage consumed frees a slot for the next. Nothing is held in registers while a copy
// is in flight, so the ring does not compete with the task bodies for the kernel's one register budget.
//
// Protocol: every thread commits exactly one cp.async group per stage index (empty past the end of the
// tile), so before stage s is read it has committed stages 0 .. s + kRingSlots - 2, and waiting until at
// most kRingSlots - 2 groups are pending means its part of stage s has landed; the barrier that follows
// publishes every thread's part and also tells that all threads are done with the slot stage s - 1 used,
// which is refilled right after.
//
// The geometry comes from the generated source (codegen places the ring in shared memory).
#if !defined(JAX_MPK_RING_SLOTS) || !defined(JAX_MPK_RING_SLOT_BYTES) || !defined(JAX_MPK_RING_MAX_ROWS) || \
    !defined(JAX_MPK_MMA_MAX_COLUMNS)
#error "define JAX_MPK_RING_SLOTS, _SLOT_BYTES, _MAX_ROWS and JAX_MPK_MMA_MAX_COLUMNS before including dot.cuh"
#endif
inline constexpr int kRingSlots = JAX_MPK_RING_SLOTS;
inline constexpr int kRingSlotBytes = JAX_MPK_RING_SLOT_BYTES;
inline constexpr int kRingMaxRows = JAX_MPK_RING_MAX_ROWS;  // activation rows multiplied with one weight tile
static_assert(kRingSlots >= 2 && kRingSlotBytes % 16 == 0, "ring geometry");
static_assert(kRingMaxRows * kBlockThreads * 8 * 4 <= kRingSlots * kRingSlotBytes,
              "the ring holds the partial sums of every row at the end");

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// How a slot holds k-rows of the weight tile. The CUDA-core dot reads rows packed back to back. The tensor-core
// dot (kMma) reads 8 consecutive k-rows at the same columns with one ldmatrix; packed rows whose length is a
// multiple of 128 bytes would put all 8 in the same banks (an 8-way conflict), so its rows are 16 bytes apart
// more than their length, and a slot holds a whole number of 16-row k-steps.
template <class W, bool kMma> struct RingRows {
  static __device__ __forceinline__ int stride_bytes(int n_len) { return n_len * static_cast<int>(sizeof(W)) + (kMma ? 16 : 0); }
  static __device__ __forceinline__ int per_slot(int n_len) {
    const int rows = kRingSlotBytes / stride_bytes(n_len);
    return kMma ? rows / 16 * 16 : rows;
  }
};

template <class W, bool kMma>
__device__ __forceinline__ void ring_issue(char* ring, const W* w, int64_t k_stride, int K, int n_len, int stage) {
  const int slot_rows = RingRows<W, kMma>::per_slot(n_len), row_stride = RingRows<W, kMma>::stride_bytes(n_len);
  const int k0 = stage * slot_rows;
  const int rows = K - k0 < slot_rows ? K - k0 : slot_rows;  // <= 0 past the end: an empty group
  const int chunks_per_row = n_len * static_cast<int>(sizeof(W)) / 16;
  const uint32_t slot = shared_address(ring) + (stage % kRingSlots) * kRingSlotBytes;
#pragma unroll 1
  for (int c = threadIdx.x; c < rows * chunks_per_row; c += kBlockThreads) {
    const int r = c / chunks_per_row, chunk = c - r * chunks_per_row;
    const char* src = reinterpret_cast<const char*>(w + (k0 + r) * k_stride) + chunk * 16;
    copy16_streamed(slot + r * row_stride + chunk * 16, src);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Start streaming the tile: stages 0 .. kRingSlots - 2. Called by every thread of the block; kMma must be the
// same as the dot that consumes the ring (columns_ring_mma: true, columns_ring: false).
template <class W, bool kMma = false>
__device__ JAX_MPK_RING_BEGIN void ring_begin(char* ring, const W* w, int64_t k_stride, int K, int n_len) {
#pragma unroll 1
  for (int s = 0; s < kRingSlots - 1; ++s) ring_issue<W, kMma>(ring, w, k_stride, K, n_len, s);
}

// Before consuming stage s of the ring: wait until this thread's part of it has landed, publish every thread's
// part (the barrier also says that all threads are done with the slot stage s - 1 used), and refill that slot.
template <class W, bool kMma>
__device__ __forceinline__ void ring_advance(char* ring, const W* w, int64_t k_stride, int K, int n_len, int s) {
  asm volatile("cp.async.wait_group %0;" ::"n"(kRingSlots - 2) : "memory");
  __syncthreads();
  ring_issue<W, kMma>(ring, w, k_stride, K, n_len, s + kRingSlots - 1);
}

// sum[r][j] += the sums of the warp's other lane groups that hold the same columns (lane l's columns are those of
// l % vectors; vectors a power of two below 32): afterwards every lane holds its columns' total over the warp.
template <int R>
__device__ __forceinline__ void add_lane_groups(float (&sum)[R][8], int vectors) {
  for (int offset = 16; offset >= vectors; offset /= 2)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) sum[r][j] += __shfl_xor_sync(0xffffffffu, sum[r][j], offset);
}

// acc[r * acc_stride + n] = the sum of `partials` partial sums part[(r * partials + p) * n_len + n]. Called by
// every thread of the block.
template <int R>
__device__ __forceinline__ void sum_partials(const float* part, int partials, int n_len, float* acc, int acc_stride) {
  for (int o = threadIdx.x; o < R * n_len; o += kBlockThreads) {
    const int r = o / n_len, n = o - r * n_len;
    float total = 0.0f;
    for (int p = 0; p < partials; ++p) total += part[(r * partials + p) * n_len + n];
    acc[r * acc_stride + n] = total;
  }
}

__device__ __forceinline__ void load8_shared(uint32_t address, const float*, float out[8]) {
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(out[0]), "=f"(out[1]), "=f"(out[2]), "=f"(out[3]) : "r"(address));
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(out[4]), "=f"(out[5]), "=f"(out[6]), "=f"(out[7]) : "r"(address + 16));
}
template <class W> __device__ __forceinline__ void load8_shared(uint32_t address, const W* tag, float out[8]) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address));
  unpack8(v, tag, out);
}

// sum[r][j] += xs[r * x_stride + k0 + k] * (the 8 weights at `slot` + k * row_bytes)[j] for k = first, first + step,
// ... < rows: a thread's share of a ring slot, for its 8 columns. kCount > 0: exactly kCount rows from first (rows
// unused), a loop the compiler unrolls whole, every row's loads issued before the first multiply.
template <class W, int R, int kCount = 0>
__device__ __forceinline__ void multiply_slot_rows(uint32_t slot, int row_bytes, int first, int rows, int step,
                                                   const float* xs, int x_stride, int k0, float (&sum)[R][8]) {
  auto multiply_row = [&](int k) {
    float wv[8];
    load8_shared(slot + k * row_bytes, static_cast<const W*>(nullptr), wv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float xk = xs[r * x_stride + k0 + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) sum[r][j] += xk * wv[j];
    }
  };
  if constexpr (kCount > 0) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) multiply_row(first + i * step);
  } else {
#pragma unroll 4
    for (int k = first; k < rows; k += step) multiply_row(k);
  }
}

// The ring products' tile shape, K x n_len, is known to the planner when every task of a kernel has the same
// (template arguments kK and kN; 0: the run-time arguments K and n_len, which must then equal them): the index
// arithmetic then folds to shifts and constants, and the warp ring's row loop unrolls whole. With run-time shapes
// a 64 KB warp-ring product began with a chain of integer divisions and loaded its rows one after another: 3,424
// cycles alone on an H200, 1,680 static (benchmarks/micro/product_body.cu, session 18).
template <int kStatic>
__device__ __forceinline__ int static_or(int value) { return JAX_MPK_STATIC_TILES && kStatic ? kStatic : value; }

// acc[r * acc_stride + n] = sum_k xs[r * x_stride + k] * w[k * k_stride + n] for r < R, n < n_len, after
// ring_begin(ring, w, k_stride, K, n_len). n_len % 8 == 0, n_len / 8 <= kBlockThreads.
// Thread (v, group) accumulates columns 8v .. 8v+7 over the k-rows group, group + groups, ... of every
// stage (threads past groups * vectors idle); when a warp holds several groups of the same columns
// (n_len / 8 a power of two below 32) they are summed with shuffles first; the partial sums, written over
// the (by then idle) ring, are then added up per output.
template <class W, int R, int kK = 0, int kN = 0>
__device__ JAX_MPK_RING_FUNCTION void columns_ring(const float* xs, int x_stride, char* ring, const W* w,
                                                  int64_t k_stride, int K_run, int n_len_run, float* acc,
                                                  int acc_stride) {
  static_assert(R >= 1 && R <= kRingMaxRows, "rows per task");
  const int K = static_or<kK>(K_run), n_len = static_or<kN>(n_len_run);
  const int vectors = n_len / 8;
  const int groups = kBlockThreads / vectors;
  const int v = threadIdx.x % vectors, group = threadIdx.x / vectors;
  const int active_rows = group < groups ? 1 << 30 : 0;  // idle threads still take part in the barriers
  const int slot_rows = RingRows<W, false>::per_slot(n_len);
  const int stages = (K + slot_rows - 1) / slot_rows;
  const uint32_t ring_base = shared_address(ring);
  const int row_bytes = n_len * static_cast<int>(sizeof(W));
  float sum[R][8];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[r][j] = 0.0f;
#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    ring_advance<W, false>(ring, w, k_stride, K, n_len, s);
    const int k0 = s * slot_rows;
    const int rows = min(min(K - k0, slot_rows), active_rows);
    const uint32_t slot = ring_base + (s % kRingSlots) * kRingSlotBytes + v * 8 * static_cast<int>(sizeof(W));
    multiply_slot_rows<W, R>(slot, row_bytes, group, rows, groups, xs, x_stride, k0, sum);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool shuffle = vectors < 32 && 32 % vectors == 0;  // a warp holds 32 / vectors whole groups
  if (shuffle) add_lane_groups<R>(sum, vectors);
  const int partials = shuffle ? kBlockThreads / 32 : groups;
  const int slot_of = shuffle ? warp : group;
  JAX_MPK_PRODUCT_MARK(0);
  __syncthreads();  // every thread is done reading the ring: it now holds the partial sums
  JAX_MPK_PRODUCT_MARK(1);
  float* part = reinterpret_cast<float*>(ring);
  if (shuffle ? lane < vectors : group < groups) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) part[(r * partials + slot_of) * n_len + v * 8 + j] = sum[r][j];
  }
  __syncthreads();
  JAX_MPK_PRODUCT_MARK(2);
  sum_partials<R>(part, partials, n_len, acc, acc_stride);
}

// ---------------------------------------------------------------------------------------------------------
// Warp ring (JAX_MPK_WARP_RING): the weight ring with each warp's share of every slot private to it. Warp w copies
// the k-rows of a stage it will itself multiply (rows [w * per_warp, (w + 1) * per_warp) of the stage), so a
// stage is published with __syncwarp instead of a block barrier and a warp refills its part of a slot as soon as
// it is done with it: no warp waits for the slowest 16 bytes of the whole block's 32 KB, as columns_ring does
// at every slot. (The ring's copies alone stream a Llama-1B gate matrix at 3.2-3.4 TB/s, plain loads with 128 KB
// in flight an SM at 3.7-3.8: benchmarks/results/session12.) The block synchronizes once, for the partial sums.
// Layout: warp w's part of a slot is kWarpSlotBytes = kRingSlotBytes / kRingWarps bytes at w * that, rows packed back to back.
// Supports n_len % 8 == 0, n_len / 8 <= 32 (a warp covers a row: 32 / vectors rows at once) and a row of at most
// a warp's part of a slot (warp_ring_fits).
inline constexpr int kRingWarps = kBlockThreads / 32;
inline constexpr int kWarpSlotBytes = kRingSlotBytes / kRingWarps;
static_assert(kRingSlotBytes % (16 * kRingWarps) == 0, "a warp's part of a slot holds whole 16-byte chunks");

template <class W> __host__ __device__ constexpr int warp_ring_rows(int n_len) {  // a warp's k-rows of a stage
  return kWarpSlotBytes / (n_len * static_cast<int>(sizeof(W)));
}
template <class W> __host__ __device__ constexpr bool warp_ring_fits(int n_len) {
  return n_len % 8 == 0 && n_len / 8 <= 32 && n_len * static_cast<int>(sizeof(W)) <= kWarpSlotBytes;
}

// This warp's copies of stage `stage`, then one commit (empty past the end of the tile) by each lane.
template <class W>
__device__ __forceinline__ void warp_ring_issue(char* ring, const W* w, int64_t k_stride, int K, int n_len, int stage) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_warp = warp_ring_rows<W>(n_len), row_bytes = n_len * static_cast<int>(sizeof(W));
  const int k0 = stage * per_warp * kRingWarps + warp * per_warp;
  const int rows = K - k0 < per_warp ? K - k0 : per_warp;  // <= 0 past the end
  const int chunks_per_row = row_bytes / 16;
  const uint32_t part = shared_address(ring) + (stage % kRingSlots) * kRingSlotBytes + warp * kWarpSlotBytes;
#pragma unroll 1
  for (int c = lane; c < rows * chunks_per_row; c += 32) {
    const int r = c / chunks_per_row, chunk = c - r * chunks_per_row;
    copy16_streamed(part + r * row_bytes + chunk * 16, reinterpret_cast<const char*>(w + (k0 + r) * k_stride) + chunk * 16);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Start streaming the tile: stages 0 .. kRingSlots - 2 (every thread of the block, before the task waits).
template <class W>
__device__ JAX_MPK_RING_BEGIN void warp_ring_begin(char* ring, const W* w, int64_t k_stride, int K, int n_len) {
#pragma unroll 1
  for (int s = 0; s < kRingSlots - 1; ++s) warp_ring_issue<W>(ring, w, k_stride, K, n_len, s);
}

// columns_ring's product through the warp ring: acc[r * acc_stride + n] = sum_k xs[r * x_stride + k] * w[k, n],
// after warp_ring_begin(ring, w, k_stride, K, n_len); warp_ring_fits<W>(n_len).
template <class W, int R, int kK = 0, int kN = 0>
__device__ JAX_MPK_RING_FUNCTION void columns_warp_ring(const float* xs, int x_stride, char* ring, const W* w,
                                                       int64_t k_stride, int K_run, int n_len_run, float* acc,
                                                       int acc_stride) {
  static_assert(R >= 1 && R <= kRingMaxRows, "rows per task");
  const int K = static_or<kK>(K_run), n_len = static_or<kN>(n_len_run);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int vectors = n_len / 8, at_once = 32 / vectors;  // lanes past at_once * vectors idle
  const int v = lane % vectors, sub = lane / vectors;
  const int per_warp = warp_ring_rows<W>(n_len), row_bytes = n_len * static_cast<int>(sizeof(W));
  const int stages = (K + per_warp * kRingWarps - 1) / (per_warp * kRingWarps);
  // A static tile of whole stages, whose rows the lanes of a column share evenly: every lane multiplies the same
  // constant number of rows a stage (0: counted at run time).
  constexpr bool kStatic = JAX_MPK_STATIC_TILES && kK && kN;
  constexpr int kPerWarp = kStatic ? warp_ring_rows<W>(kN) : 1, kAtOnce = kStatic ? 32 / (kN / 8) : 1;
  constexpr int kRowsPerLane =
      kStatic && kK % (kPerWarp * kRingWarps) == 0 && kPerWarp % kAtOnce == 0 ? kPerWarp / kAtOnce : 0;
  const uint32_t base = shared_address(ring) + warp * kWarpSlotBytes + v * 8 * static_cast<int>(sizeof(W));
  float sum[R][8] = {};
#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    asm volatile("cp.async.wait_group %0;" ::"n"(kRingSlots - 2) : "memory");
    __syncwarp();  // the warp's copies of stage s are visible to all its lanes, and its reads of stage s - 1 done
    warp_ring_issue<W>(ring, w, k_stride, K, n_len, s + kRingSlots - 1);
    const int k0 = s * per_warp * kRingWarps + warp * per_warp;
    const uint32_t slot = base + (s % kRingSlots) * kRingSlotBytes;
    if constexpr (kRowsPerLane > 0) {
      if (sub < at_once) {
        multiply_slot_rows<W, R, kRowsPerLane>(slot, row_bytes, sub, 0, at_once, xs, x_stride, k0, sum);
      }
    } else {
      const int rows = sub < at_once ? min(K - k0, per_warp) : 0;
      multiply_slot_rows<W, R>(slot, row_bytes, sub, rows, at_once, xs, x_stride, k0, sum);
    }
  }
  // JAX_MPK_VECTOR_PARTIALS: a warp's subs add up with shuffles, each then stores its share of the warp's sums
  // with one vector store into a row per warp padded so that the readers' banks differ, and every thread adds
  // kRingWarps / kShare rows of one output, kShare lanes an output finishing with shuffles (no scalar stores with
  // 8-way bank conflicts, no 4 of 16 warps adding 32 partials each while the others wait).
  constexpr int kShare = kN ? kBlockThreads / kN : 0;  // threads an output
  if constexpr (JAX_MPK_VECTOR_PARTIALS && kStatic && R == 1 && 32 % (kN / 8) == 0 && kN / 8 >= 4 &&
                kBlockThreads % kN == 0 && kShare <= kRingWarps && (kShare & (kShare - 1)) == 0) {
    constexpr int kVectors = kN / 8, kSubs = 32 / kVectors, kChunk = 8 / kSubs, kOutputsPerWarp = 32 / kShare;
    constexpr int kRow = kN + (kOutputsPerWarp - kN % 32 + 32) % 32;  // % 32 == kOutputsPerWarp
    add_lane_groups<R>(sum, kVectors);
    float mine[kChunk] = {};  // this sub's share of the warp's 8 sums: columns v * 8 + sub * kChunk ..
#pragma unroll
    for (int s = 0; s < kSubs; ++s)
#pragma unroll
      for (int c = 0; c < kChunk; ++c) mine[c] = sub == s ? sum[0][s * kChunk + c] : mine[c];
    JAX_MPK_PRODUCT_MARK(0);
    __syncthreads();
    JAX_MPK_PRODUCT_MARK(1);
    float* part = reinterpret_cast<float*>(ring) + warp * kRow + v * 8 + sub * kChunk;
    if constexpr (kChunk % 4 == 0) {
#pragma unroll
      for (int c = 0; c < kChunk; c += 4) {
        *reinterpret_cast<float4*>(part + c) = make_float4(mine[c], mine[c + 1], mine[c + 2], mine[c + 3]);
      }
    } else if constexpr (kChunk == 2) {
      *reinterpret_cast<float2*>(part) = make_float2(mine[0], mine[1]);
    } else {
#pragma unroll
      for (int c = 0; c < kChunk; ++c) part[c] = mine[c];
    }
    __syncthreads();
    JAX_MPK_PRODUCT_MARK(2);
    const int output = warp * kOutputsPerWarp + lane % kOutputsPerWarp, share = lane / kOutputsPerWarp;
    const float* rows = reinterpret_cast<const float*>(ring) + output;
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kRingWarps / kShare; ++i) total += rows[(share + i * kShare) * kRow];
#pragma unroll
    for (int offset = kOutputsPerWarp; offset < 32; offset *= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (share == 0) acc[output] = total;
    return;
  }
  // Every (warp, sub) holds partial sums of its columns: written over the ring once every warp is done with it.
  // (Adding a warp's subs with shuffles first, and the partials with a few lanes an output, measured slower:
  // benchmarks/micro/product_body.cu, session 18.)
  const int sums_per_warp = at_once, partials = kRingWarps * sums_per_warp;
  JAX_MPK_PRODUCT_MARK(0);
  __syncthreads();
  JAX_MPK_PRODUCT_MARK(1);
  float* part = reinterpret_cast<float*>(ring);
  if (sub < sums_per_warp) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 8; ++j) part[(r * partials + warp * sums_per_warp + sub) * n_len + v * 8 + j] = sum[r][j];
  }
  __syncthreads();
  JAX_MPK_PRODUCT_MARK(2);
  sum_partials<R>(part, partials, n_len, acc, acc_stride);
}

// The tensor-core form of columns_ring, for 2 .. 8 rows (1 works too: the microbenchmark times it; the planner
// keeps one row on CUDA cores, faster there) whose staged values are exactly W's values (a bf16 or f16
// activation times a weight of the same type; CUDA-core FMAs cannot keep up with the weight stream at 8 rows: 64
// FMAs per 16 bytes). One mma.sync m16n8k16 per 16 output columns x 16 k: the weight tile is A (read from the ring
// with ldmatrix.trans, the ring's k-rows being A's columns), the rows are B (k x 8, rows past R zero), float
// accumulation. Warps take 16-column blocks; when there are fewer blocks than warps, kWarps / blocks warps share a
// block and split its k-steps, and their sums are added through shared memory (over the idle ring) at the end.
// After ring_begin<W, true>(ring, w, k_stride, K, n_len). n_len % 16 == 0, n_len <= kMmaMaxColumns, K % 16 == 0;
// x_stride % 32 == 8 keeps the B loads (8 rows at one k) free of bank conflicts.
inline constexpr int kMmaMaxColumns = JAX_MPK_MMA_MAX_COLUMNS;  // its accumulators are registers
static_assert(kMmaMaxColumns % 16 == 0, "whole 16-column blocks");

__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __nv_bfloat16*) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, const __half*) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// c += a * b on tensor cores; the instruction names the operands' type, hence the macro.
#define JAX_MPK_MMA_16X8X16(TYPE)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, "                 \
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                                                 \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <class W>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<W, __half> || std::is_same_v<W, __nv_bfloat16>, "2-byte float operands");
  if constexpr (std::is_same_v<W, __half>) {
    JAX_MPK_MMA_16X8X16("f16");
  } else {
    JAX_MPK_MMA_16X8X16("bf16");
  }
}
#undef JAX_MPK_MMA_16X8X16

template <class W, int R, int kK = 0, int kN = 0>
__device__ JAX_MPK_RING_FUNCTION void columns_ring_mma(const float* xs, int x_stride, char* ring, const W* w,
                                                      int64_t k_stride, int K_run, int n_len_run, float* acc,
                                                      int acc_stride) {
  static_assert(R >= 1 && R <= 8, "rows per task: the 8 columns of B");
  const int K = static_or<kK>(K_run), n_len = static_or<kN>(n_len_run);
  constexpr int kWarps = kBlockThreads / 32;
  constexpr int kBlocksPerWarp = (kMmaMaxColumns / 16 + kWarps - 1) / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int blocks = n_len / 16;
  const int k_groups = blocks >= kWarps ? 1 : kWarps / blocks;  // warps sharing a block
  const int first_block = warp % blocks, k_group = warp / blocks;  // (k_group >= k_groups: idle)
  const int block_step = blocks >= kWarps ? kWarps : blocks;      // a warp's blocks: first, first + step, ...
  const int slot_rows = RingRows<W, true>::per_slot(n_len), row_stride = RingRows<W, true>::stride_bytes(n_len);
  const int stages = (K + slot_rows - 1) / slot_rows;
  // ldmatrix: lane L gives the address of k-row (L % 8) + 8 * (L / 16), columns 8 * ((L / 8) % 2) of the step's
  // 16 x 16 block: the four 8 x 8 matrices a0 .. a3 of the A fragment, transposed
  const uint32_t lane_offset = ((lane % 8) + (lane / 16) * 8) * row_stride + ((lane / 8) % 2) * 8 * static_cast<int>(sizeof(W));
  // B fragment: row g = lane / 4 (zero past R), k-pairs 2q and 2q + 8 of the step
  const int g = lane / 4, q = lane % 4;
  const float* x_lane = xs + (g < R ? g : 0) * x_stride + 2 * q;
  float c[kBlocksPerWarp][4];
#pragma unroll
  for (int j = 0; j < kBlocksPerWarp; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f;
#pragma unroll 1
  for (int s = 0; s < stages; ++s) {
    ring_advance<W, true>(ring, w, k_stride, K, n_len, s);
    const int k0 = s * slot_rows;
    const int steps = k_group < k_groups ? min(K - k0, slot_rows) / 16 : 0;
    const uint32_t slot = shared_address(ring) + (s % kRingSlots) * kRingSlotBytes + lane_offset;
#pragma unroll 2
    for (int step = k_group; step < steps; step += k_groups) {
      const float2 lo = *reinterpret_cast<const float2*>(x_lane + k0 + step * 16);
      const float2 hi = *reinterpret_cast<const float2*>(x_lane + k0 + step * 16 + 8);
      const uint32_t b0 = g < R ? pack2(lo.x, lo.y, w) : 0u, b1 = g < R ? pack2(hi.x, hi.y, w) : 0u;
#pragma unroll
      for (int j = 0; j < kBlocksPerWarp; ++j) {
        const int block = first_block + j * block_step;
        if (block < blocks && (j == 0 || blocks >= kWarps)) {
          uint32_t a[4];
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                       : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                       : "r"(slot + step * 16 * row_stride + block * 16 * static_cast<int>(sizeof(W))));
          mma_16x8x16<W>(c[j], a, b0, b1);
        }
      }
    }
  }
  // c[j]: columns 16 * block + g (c[j][0..1]) and + 8 (c[j][2..3]), rows 2q and 2q + 1
  JAX_MPK_PRODUCT_MARK(0);
  __syncthreads();  // every warp is done reading the ring: it now holds the k-groups' partial sums
  JAX_MPK_PRODUCT_MARK(1);
  float* part = reinterpret_cast<float*>(ring);  // part[(row * k_groups + k_group) * n_len + column]
  if (k_group < k_groups) {
#pragma unroll
    for (int j = 0; j < kBlocksPerWarp; ++j) {
      const int block = first_block + j * block_step;
      if (block < blocks && (j == 0 || blocks >= kWarps)) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = 2 * q + (i & 1), column = 16 * block + g + (i >> 1) * 8;
          if (row < R) part[(row * k_groups + k_group) * n_len + column] = c[j][i];
        }
      }
    }
  }
  __syncthreads();
  JAX_MPK_PRODUCT_MARK(2);
  sum_partials<R>(part, k_groups, n_len, acc, acc_stride);
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
