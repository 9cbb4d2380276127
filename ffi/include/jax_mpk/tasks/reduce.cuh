// Block-wide reductions used by row programs (RMSNorm, softmax, argmax ...): every thread folds a strided
// share of the row, then the block combines the partials through shared memory. All threads of the block
// must call these, and all get the result.
#pragma once

#include <cstdint>

#include "jax_mpk/runtime/block.cuh"
#include "jax_mpk/tasks/elementwise.cuh"

namespace jax_mpk::reduce {

template <class T> struct Sum { __device__ static T init() { return T(0); } __device__ static T combine(T a, T b) { return ops::add(a, b); } };
template <class T> struct Prod { __device__ static T init() { return T(1); } __device__ static T combine(T a, T b) { return ops::mul(a, b); } };
template <class T> struct Max;
template <class T> struct Min;
template <> struct Max<float> { __device__ static float init() { return -INFINITY; } __device__ static float combine(float a, float b) { return ops::max_(a, b); } };
template <> struct Min<float> { __device__ static float init() { return INFINITY; } __device__ static float combine(float a, float b) { return ops::min_(a, b); } };
template <> struct Max<int32_t> { __device__ static int32_t init() { return INT32_MIN; } __device__ static int32_t combine(int32_t a, int32_t b) { return ops::max_(a, b); } };
template <> struct Min<int32_t> { __device__ static int32_t init() { return INT32_MAX; } __device__ static int32_t combine(int32_t a, int32_t b) { return ops::min_(a, b); } };
template <> struct Max<uint32_t> { __device__ static uint32_t init() { return 0u; } __device__ static uint32_t combine(uint32_t a, uint32_t b) { return ops::max_(a, b); } };
template <> struct Min<uint32_t> { __device__ static uint32_t init() { return UINT32_MAX; } __device__ static uint32_t combine(uint32_t a, uint32_t b) { return ops::min_(a, b); } };
template <class T> struct And { __device__ static T init() { return T(1); } __device__ static T combine(T a, T b) { return ops::and_(a, b); } };
template <class T> struct Or { __device__ static T init() { return T(0); } __device__ static T combine(T a, T b) { return ops::or_(a, b); } };

template <class Op, class T>
__device__ T block_reduce(T value, T* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value = Op::combine(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = Op::init();
#pragma unroll
  for (int w = 0; w < warps; ++w) value = Op::combine(value, scratch[w]);
  return value;
}

// block_reduce of kRows rows at once (a batch's rows that one product task stages): each row's partials are
// combined exactly as block_reduce combines them (the same shuffle tree, then the warps in order), so a row's
// value does not depend on how many rows are reduced with it; one pair of barriers for all rows.
template <class Op, class T, int kRows>
__device__ void block_reduce_rows(T (&values)[kRows], T* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    for (int offset = 16; offset > 0; offset /= 2) {
      values[r] = Op::combine(values[r], __shfl_xor_sync(0xffffffffu, values[r], offset));
    }
  }
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) scratch[r * warps + warp] = values[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    T value = Op::init();
#pragma unroll
    for (int w = 0; w < warps; ++w) value = Op::combine(value, scratch[r * warps + w]);
    values[r] = value;
  }
}

// Arg-reductions carry (value, first position); NaN counts as the extreme, like XLA.
template <bool kMax, class T>
struct ArgBest {
  T value;
  int32_t index;
  __device__ static ArgBest init() { return {kMax ? Max<T>::init() : Min<T>::init(), INT32_MAX}; }
  __device__ static bool is_nan(T v) { return v != v; }
  __device__ static ArgBest combine(ArgBest a, ArgBest b) {
    if (is_nan(a.value) || is_nan(b.value)) {
      if (is_nan(a.value) && is_nan(b.value)) return a.index <= b.index ? a : b;
      return is_nan(a.value) ? a : b;
    }
    if (a.value == b.value) return a.index <= b.index ? a : b;
    return (kMax ? a.value > b.value : a.value < b.value) ? a : b;
  }
};

template <bool kMax, class T>
__device__ ArgBest<kMax, T> block_arg_reduce(ArgBest<kMax, T> best, T* value_scratch, int32_t* index_scratch) {
  using Best = ArgBest<kMax, T>;
  for (int offset = 16; offset > 0; offset /= 2) {
    Best other{__shfl_xor_sync(0xffffffffu, best.value, offset), __shfl_xor_sync(0xffffffffu, best.index, offset)};
    best = Best::combine(best, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kBlockThreads / 32;
  __syncthreads();
  if (lane == 0) {
    value_scratch[warp] = best.value;
    index_scratch[warp] = best.index;
  }
  __syncthreads();
  best = Best::init();
#pragma unroll
  for (int w = 0; w < warps; ++w) best = Best::combine(best, Best{value_scratch[w], index_scratch[w]});
  return best;
}

}  // namespace jax_mpk::reduce
