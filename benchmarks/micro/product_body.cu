// Microbenchmark of a product task's body with its weight tile already in shared memory: what dot.cuh's ring
// products cost beyond their bytes. Session 17 found a Qwen3-0.6B b1 product phase of 2.5-3.3 us for a 64 KB tile in
// shared memory, and session 18 that warm code does not shorten it (`twice`: 2.4-3.1 us), against a few hundred
// instructions a warp of arithmetic. Here one block per SM, alone on the GPU, streams a tile into the ring, waits
// for all of it (cp.async.wait_all and a barrier), then runs the product and a barrier, timed with clock64 and the
// global timer by thread 0; then, to split the total, the partial sums alone (sum_partials over as many partials as
// the product writes, from the ring). Each block does it `kReps` times in a row: the first is the code's cold start
// (from L2), the median of the others warm. Tiles are those of Llama-1B and Qwen3-0.6B at batch 1 (K x n_len, 2-byte
// weights), the products the ones the planner picks at b1 (the warp ring, columns_warp_ring), the block ring
// (columns_ring) and the tensor-core ring (columns_ring_mma) at 1 and 8 rows. Every product's outputs are checked
// against the host. Each product runs with its tile's shape read at run time (`run`) and given as template
// arguments (`static`: the planner's, dot.cuh's static_or). Reports, per tile and product: cycles and ns (median
// over the blocks) cold and warm; the warm phases from dot.cuh's JAX_MPK_PRODUCT_MARK seam (the fastest and the
// slowest warp's ring loop, the partials' stores between their barriers, the partial sums and the last barrier);
// the sum alone; and the SM clock they imply.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/product_body.cu -o /tmp/product_body && /tmp/product_body
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

// dot.cuh's measuring seam: each warp's clock where the product's phases meet (thread 0 of the warp)
__shared__ long long product_marks[3][JAX_MPK_BLOCK_THREADS / 32];
#define JAX_MPK_PRODUCT_MARK(point) \
  if (threadIdx.x % 32 == 0) product_marks[point][threadIdx.x / 32] = clock64()

#include "jax_mpk/runtime/megakernel.cuh"
#include "jax_mpk/tasks/dot.cuh"
#include "micro.cuh"

using namespace jax_mpk;
using W = __nv_bfloat16;

constexpr int kReps = 5;
constexpr int kMaxRows = 8;

enum Product { kWarpRing, kBlockRing, kMmaRing };
const char* const kProductNames[] = {"warp ring", "block ring", "mma ring"};

// The product's phases (cycles, from product_marks): its fastest and slowest warp's ring loop, the partials'
// stores with the barriers around them, and the partial sums with the barrier after them.
enum Phase { kLoopFastest, kLoopSlowest, kStores, kSums, kPhases };
const char* const kPhaseNames[] = {"loop min", "loop max", "stores", "sums"};

struct Times {
  long long cycles[kReps];
  unsigned long long ns[kReps];
  long long phases[kReps][kPhases];
  long long sum_cycles;  // the partial sums alone (warm)
};

__device__ __forceinline__ long long clock_now() { return clock64(); }

// The tile [K][n_len] (row stride n_len) times rows xs[R][K]: acc[R][n_len]. Shared memory: the ring, then
// xs[R][x_stride], then acc.
// kK, kN: the tile's shape as template arguments (the planner's static shape), or 0 (read at run time).
template <Product P, int R, int kK, int kN>
__global__ void __launch_bounds__(kBlockThreads, 1)
    product(const W* w, const float* x, int K, int n_len, int partials, float* out, Times* times) {
  extern __shared__ __align__(128) char smem[];
  char* ring = smem;
  const int x_stride = K + 8;  // % 32 == 8: columns_ring_mma's B loads free of bank conflicts
  float* xs = reinterpret_cast<float*>(smem + dot::kRingSlots * dot::kRingSlotBytes);
  float* acc = xs + R * x_stride;
  for (int i = threadIdx.x; i < R * K; i += kBlockThreads) xs[(i / K) * x_stride + i % K] = x[i];
  for (int rep = 0; rep < kReps; ++rep) {
    if constexpr (P == kWarpRing) {
      dot::warp_ring_begin<W>(ring, w, n_len, K, n_len);
    } else {
      dot::ring_begin<W, P == kMmaRing>(ring, w, n_len, K, n_len);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    const long long c0 = clock_now();
    const unsigned long long t0 = now_ns();
    if constexpr (P == kWarpRing) {
      dot::columns_warp_ring<W, R, kK, kN>(xs, x_stride, ring, w, n_len, K, n_len, acc, n_len);
    } else if constexpr (P == kBlockRing) {
      dot::columns_ring<W, R, kK, kN>(xs, x_stride, ring, w, n_len, K, n_len, acc, n_len);
    } else {
      dot::columns_ring_mma<W, R, kK, kN>(xs, x_stride, ring, w, n_len, K, n_len, acc, n_len);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const long long end = clock_now();
      times[blockIdx.x].cycles[rep] = end - c0;
      times[blockIdx.x].ns[rep] = now_ns() - t0;
      long long fastest = product_marks[0][0], slowest = fastest, stored = product_marks[2][0];
      for (int w = 1; w < kBlockThreads / 32; ++w) {
        fastest = min(fastest, product_marks[0][w]);
        slowest = max(slowest, product_marks[0][w]);
        stored = max(stored, product_marks[2][w]);
      }
      long long* phases = times[blockIdx.x].phases[rep];
      phases[kLoopFastest] = fastest - c0;
      phases[kLoopSlowest] = slowest - c0;
      phases[kStores] = stored - slowest;
      phases[kSums] = end - stored;
    }
    if (rep == 0 && blockIdx.x == 0) {
      for (int i = threadIdx.x; i < R * n_len; i += kBlockThreads) out[i] = acc[i];
    }
    __syncthreads();
  }
  // the partial sums alone, from what the ring holds now (the last product's partials)
  const long long c0 = clock_now();
  dot::sum_partials<R>(reinterpret_cast<const float*>(ring), partials, n_len, acc, n_len);
  __syncthreads();
  if (threadIdx.x == 0) times[blockIdx.x].sum_cycles = clock_now() - c0;
}

// How many partial sums per output each product writes (dot.cuh's own arithmetic).
int partials_of(Product p, int K, int n_len) {
  const int warps = kBlockThreads / 32, vectors = n_len / 8;
  if (p == kWarpRing) return warps * (32 / vectors);
  if (p == kBlockRing) {
    const bool shuffle = vectors < 32 && 32 % vectors == 0;
    return shuffle ? warps : kBlockThreads / vectors;
  }
  const int blocks = n_len / 16;
  return blocks >= warps ? 1 : warps / blocks;
}

template <Product P, int R, int kK = 0, int kN = 0>
void run(int sms, int K, int n_len, const std::vector<W>& w_host, const std::vector<float>& x_host, const W* w,
         const float* x, float* out, Times* times) {
  const int smem = dot::kRingSlots * dot::kRingSlotBytes + 4 * (R * (K + 8) + R * n_len);
  CHECK(cudaFuncSetAttribute(product<P, R, kK, kN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int partials = partials_of(P, K, n_len);
  product<P, R, kK, kN><<<sms, kBlockThreads, smem>>>(w, x, K, n_len, partials, out, times);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> got(R * n_len);
  std::vector<Times> t(sms);
  CHECK(cudaMemcpy(got.data(), out, sizeof(float) * R * n_len, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(t.data(), times, sizeof(Times) * sms, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < n_len; ++n) {
      double want = 0, scale = 0;
      for (int k = 0; k < K; ++k) {
        const double term = double(x_host[r * K + k]) * double(__bfloat162float(w_host[k * n_len + n]));
        want += term;
        scale += std::fabs(term);
      }
      worst = std::max(worst, std::fabs(got[r * n_len + n] - want) / (scale + 1e-30));
    }
  }
  if (worst > 1e-5) {
    std::fprintf(stderr, "%s R=%d %dx%d: relative error %.2e\n", kProductNames[P], R, K, n_len, worst);
    std::exit(1);
  }
  auto median = [&](auto value) {
    std::vector<double> v;
    for (const Times& b : t) v.push_back(static_cast<double>(value(b)));
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double cold_cycles = median([](const Times& b) { return b.cycles[0]; });
  const double cold_ns = median([](const Times& b) { return b.ns[0]; });
  const double warm_cycles = median([](const Times& b) {
    std::vector<long long> v(b.cycles + 1, b.cycles + kReps);
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  });
  const double warm_ns = median([](const Times& b) {
    std::vector<unsigned long long> v(b.ns + 1, b.ns + kReps);
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  });
  const double sum_cycles = median([](const Times& b) { return b.sum_cycles; });
  double phases[kPhases];  // warm: the median over the blocks of each block's median over reps 2..
  for (int f = 0; f < kPhases; ++f) {
    phases[f] = median([f](const Times& b) {
      std::vector<long long> v;
      for (int rep = 1; rep < kReps; ++rep) v.push_back(b.phases[rep][f]);
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    });
  }
  std::printf("%5d x %-4d %3d KB | %-10s %d %-6s | %8.0f %7.0f | %8.0f %7.0f | %8.0f %8.0f %6.0f %6.0f | %8d %9.0f | "
              "%6.2f\n", K, n_len, K * n_len * 2 / 1024, kProductNames[P], R, kK ? "static" : "run", cold_cycles,
              cold_ns, warm_cycles, warm_ns, phases[kLoopFastest], phases[kLoopSlowest], phases[kStores],
              phases[kSums], partials, sum_cycles, warm_cycles / std::max(warm_ns, 1.0));
}

int main() {
  int device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Qwen3-0.6B b1: Q/K/V 256 x 128, O 128 x 128, gate/up 384 x 128, down 192 x 128; Llama-1B b1 widths 64 and 32
  constexpr int kMaxElems = 384 * 128, kMaxK = 768;
  std::vector<W> w_host(kMaxElems);
  std::vector<float> x_host(kMaxRows * kMaxK);
  for (auto& v : w_host) v = __float2bfloat16(static_cast<float>(std::rand()) / RAND_MAX - 0.5f);
  // the rows are bf16 values (what columns_ring_mma requires: they convert to W exactly)
  for (auto& v : x_host) v = __bfloat162float(__float2bfloat16(static_cast<float>(std::rand()) / RAND_MAX - 0.5f));
  W* w = nullptr;
  float *x = nullptr, *out = nullptr;
  Times* times = nullptr;
  CHECK(cudaMalloc(&w, sizeof(W) * kMaxElems));
  CHECK(cudaMalloc(&x, sizeof(float) * x_host.size()));
  CHECK(cudaMalloc(&out, sizeof(float) * kMaxRows * 512));
  CHECK(cudaMalloc(&times, sizeof(Times) * sms));
  CHECK(cudaMemcpy(w, w_host.data(), sizeof(W) * kMaxElems, cudaMemcpyHostToDevice));
  std::printf("one %d-thread block per SM (%d), the tile in shared memory; medians over the blocks; warm: median of "
              "reps 2-%d; static: the shape as template arguments\n", kBlockThreads, sms, kReps);
  std::printf("%-17s | %-19s | %8s %7s | %8s %7s | %8s %8s %6s %6s | %8s %9s | %6s\n", "tile (K x n)",
              "product R shape", "cold cyc", "cold ns", "warm cyc", "warm ns", kPhaseNames[0], kPhaseNames[1],
              kPhaseNames[2], kPhaseNames[3], "partials", "sum cyc", "GHz");
  // every product of one tile, with the shape read at run time and as template arguments
  auto tile = [&](auto k_tag, auto n_tag) {
    constexpr int K = decltype(k_tag)::value, N = decltype(n_tag)::value;
    std::vector<float> x_tile(kMaxRows * K);  // x_host's rows cut to K
    for (int r = 0; r < kMaxRows; ++r)
      for (int k = 0; k < K; ++k) x_tile[r * K + k] = x_host[r * kMaxK + k];
    CHECK(cudaMemcpy(x, x_tile.data(), sizeof(float) * x_tile.size(), cudaMemcpyHostToDevice));
    const std::vector<W> w_tile(w_host.begin(), w_host.begin() + K * N);
    if constexpr (dot::warp_ring_fits<W>(N)) {
      run<kWarpRing, 1>(sms, K, N, w_tile, x_tile, w, x, out, times);
      run<kWarpRing, 1, K, N>(sms, K, N, w_tile, x_tile, w, x, out, times);
    }
    run<kBlockRing, 1>(sms, K, N, w_tile, x_tile, w, x, out, times);
    run<kBlockRing, 1, K, N>(sms, K, N, w_tile, x_tile, w, x, out, times);
    if constexpr (N % 16 == 0) {
      run<kMmaRing, 1>(sms, K, N, w_tile, x_tile, w, x, out, times);
      run<kMmaRing, 1, K, N>(sms, K, N, w_tile, x_tile, w, x, out, times);
      run<kMmaRing, 8>(sms, K, N, w_tile, x_tile, w, x, out, times);
      run<kMmaRing, 8, K, N>(sms, K, N, w_tile, x_tile, w, x, out, times);
    }
  };
  tile(std::integral_constant<int, 256>{}, std::integral_constant<int, 128>{});
  tile(std::integral_constant<int, 128>{}, std::integral_constant<int, 128>{});
  tile(std::integral_constant<int, 384>{}, std::integral_constant<int, 128>{});
  tile(std::integral_constant<int, 192>{}, std::integral_constant<int, 128>{});
  tile(std::integral_constant<int, 512>{}, std::integral_constant<int, 64>{});
  tile(std::integral_constant<int, 768>{}, std::integral_constant<int, 32>{});
  return 0;
}
