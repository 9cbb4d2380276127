// Microbenchmark of what a task's code costs when it is not in the SM's instruction cache. A megakernel runs a
// different device function at every level of a layer (Qwen3-0.6B b1: ~8,600 instructions of task bodies a layer,
// 16 bytes each, besides the task loop's own), and an ncu run of one step sampled 32% of the bodies' warps stalled
// on "no instruction" (session 17). Two numbers decide whether a smaller code footprint is worth a redesign: how
// much straight-line code the instruction caches hold, and how fast code they do not hold arrives.
// A kernel of N dependent integer multiply-adds (N 16-byte instructions of straight-line code) runs its body
// twice in a row (the first pass fetches the code, the second finds what the caches kept), timed with clock64 by
// one warp, or by all 16 warps of a 512-thread block (the megakernel's, which fetch the same code together); one
// CTA on one SM, launched 5 times (the first launch also brings the code from DRAM into L2). For N = 256 .. 32768
// (4 KB .. 512 KB) it reports cycles an instruction: the first launch's first pass, then the median over launches
// 2-5 of the first pass (code in L2, not in the SM's caches: what a megakernel's task finds) and of the second
// pass (as warm as the caches can keep it), and the result checked against the host.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/icache.cu -o /tmp/icache && /tmp/icache
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "micro.cuh"

// x = x * x + (2 * step + 1) for step = First .. First + N - 1: a chain the compiler cannot shorten (each step's
// constant differs, the product is not linear), one IMAD each; halves by template recursion, so that the code is
// straight-line at every N (nvcc unrolls a loop of at most 8192 iterations).
template <int N, int First = 0>
__device__ __forceinline__ uint32_t chain(uint32_t x) {
  if constexpr (N <= 256) {
#pragma unroll
    for (int step = First; step < First + N; ++step) {
      asm volatile("mad.lo.u32 %0, %0, %0, %1;" : "+r"(x) : "r"(2 * step + 1));
    }
    return x;
  } else {
    return chain<N / 2, First + N / 2>(chain<N / 2, First>(x));
  }
}

// The host's copy of chain<N>.
uint32_t chain_on_host(uint32_t x, int n) {
  for (int step = 0; step < n; ++step) x = x * x + static_cast<uint32_t>(2 * step + 1);
  return x;
}

template <int N>
__global__ void __launch_bounds__(512, 1) twice(uint32_t seed, int warps, uint32_t* result, long long* cycles) {
  if (static_cast<int>(threadIdx.x / 32) >= warps) return;
  uint32_t x = seed + threadIdx.x;
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    __syncwarp();
    const long long start = clock64();
    x = chain<N>(x);
    __syncwarp();
    if (threadIdx.x == 0) cycles[pass] = clock64() - start;
  }
  result[threadIdx.x] = x;
}

template <int N>
void measure(int warps) {
  uint32_t* result = nullptr;
  long long* cycles = nullptr;
  CHECK(cudaMalloc(&result, 512 * sizeof(uint32_t)));
  CHECK(cudaMalloc(&cycles, 2 * sizeof(long long)));
  const uint32_t seed = 12345u + N;
  double first_launch = 0.0;
  std::vector<double> cold, warm;
  for (int launch = 0; launch < 5; ++launch) {
    twice<N><<<1, 512>>>(seed, warps, result, cycles);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    long long host_cycles[2];
    CHECK(cudaMemcpy(host_cycles, cycles, sizeof(host_cycles), cudaMemcpyDeviceToHost));
    uint32_t first = 0;
    CHECK(cudaMemcpy(&first, result, sizeof(first), cudaMemcpyDeviceToHost));
    const uint32_t expected = chain_on_host(chain_on_host(seed, N), N);
    if (first != expected) {
      std::fprintf(stderr, "N %d: thread 0's result %u, expected %u\n", N, first, expected);
      std::exit(1);
    }
    if (launch == 0) {
      first_launch = static_cast<double>(host_cycles[0]) / N;
    } else {
      cold.push_back(static_cast<double>(host_cycles[0]) / N);
      warm.push_back(static_cast<double>(host_cycles[1]) / N);
    }
  }
  std::sort(cold.begin(), cold.end());
  std::sort(warm.begin(), warm.end());
  std::printf("%6d %7d KB %6d | %14.2f %14.2f %14.2f\n", N, N * 16 / 1024, warps, first_launch, cold[cold.size() / 2],
              warm[warm.size() / 2]);
  CHECK(cudaFree(result));
  CHECK(cudaFree(cycles));
}

template <int N>
void measure_both() {
  measure<N>(1);
  measure<N>(16);
}

int main() {
  std::printf("straight-line code of N dependent IMADs run twice by one CTA; cycles an instruction (clock64)\n");
  std::printf("%6s %10s %6s | %14s %14s %14s\n", "N", "code", "warps", "first launch", "cold (in L2)", "second pass");
  measure_both<256>();
  measure_both<1024>();
  measure_both<4096>();
  measure_both<8192>();
  measure_both<16384>();
  measure_both<32768>();
  return 0;
}
