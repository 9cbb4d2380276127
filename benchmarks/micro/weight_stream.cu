// Microbenchmark of the weight ring of dot.cuh at the scale of a product level: one CTA per SM, every CTA streams
// its tile(s) of a bf16 W[K, N] (row-major: the columns layout of x @ W) as the megakernel's products do, with no
// dependency waits, so that a level's bandwidth can be split into DRAM access pattern, ring protocol and
// arithmetic. For each weight shape and column-tile width it reports the aggregate TB/s of
//   read        plain 16-byte loads of the same tiles, JAX_MPK_READ_DEPTH (default 8) in flight per thread (what
//               the access pattern allows at one CTA per SM)
//   ring copies ring_begin / ring_advance alone, each thread adding up its share of every slot
//   ring dot    ring_begin + columns_ring<bf16, 1> (a b1 product task, checked against a host reference)
//   bulk copies the same ring filled by cp.async.bulk (one copy per tile row, issued by warp 0, completion on an
//               mbarrier per slot): fewer instructions per byte than cp.async's 16 bytes a thread
//   warp ring   warp_ring_begin + columns_warp_ring<bf16, 1> (each warp's part of a slot private to it: no block
//               barrier per slot; tiles of at most 256 columns), checked like the ring dot
// for one level alone (16 launches, one matrix each: the ramp at a level's start and end included) and for 16
// levels back to back in one launch (no ramps but the first and last). Every matrix is read from HBM: 16
// different matrices, together far larger than L2. The copies modes check their sums against the host.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/weight_stream.cu -o /tmp/weight_stream && /tmp/weight_stream
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "jax_mpk/tasks/dot.cuh"
#include "micro.cuh"

using namespace jax_mpk;
using T = __nv_bfloat16;

enum Mode { kRead, kRingCopies, kRingDot, kBulkCopies, kWarpRingDot, kModes };
const char* kModeNames[kModes] = {"read", "ring copies", "ring dot", "bulk copies", "warp ring"};

// The sum of this thread's 16-byte chunks of a slot holding `rows` rows of `row_bytes` bytes `stride` apart.
__device__ __forceinline__ float add_slot(uint32_t slot, int rows, int row_bytes, int stride) {
  const int chunks_per_row = row_bytes / 16;
  float total = 0.0f;
  for (int c = threadIdx.x; c < rows * chunks_per_row; c += kBlockThreads) {
    const int r = c / chunks_per_row, chunk = c - r * chunks_per_row;
    float v[8];
    dot::load8_shared(slot + r * stride + chunk * 16, static_cast<const T*>(nullptr), v);
#pragma unroll
    for (int j = 0; j < 8; ++j) total += v[j];
  }
  return total;
}

#ifndef JAX_MPK_READ_DEPTH
#define JAX_MPK_READ_DEPTH 8
#endif
inline constexpr int kReadDepth = JAX_MPK_READ_DEPTH;

// Plain loads of the tile, kReadDepth chunks in flight per thread.
__device__ float read_tile(const T* w, int64_t k_stride, int K, int n_len) {
  const int chunks_per_row = n_len * static_cast<int>(sizeof(T)) / 16, chunks = K * chunks_per_row;
  float total = 0.0f;
  for (int base = threadIdx.x; base < chunks; base += kReadDepth * kBlockThreads) {
    uint4 v[kReadDepth];
#pragma unroll
    for (int i = 0; i < kReadDepth; ++i) {
      const int c = base + i * kBlockThreads, r = c / chunks_per_row, chunk = c - r * chunks_per_row;
      v[i] = c < chunks ? __ldg(reinterpret_cast<const uint4*>(w + r * k_stride) + chunk) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kReadDepth; ++i) {
      float f[8];
      dot::unpack8(v[i], static_cast<const T*>(nullptr), f);
#pragma unroll
      for (int j = 0; j < 8; ++j) total += f[j];
    }
  }
  return total;
}

__device__ float ring_copies(char* ring, const T* w, int64_t k_stride, int K, int n_len) {
  dot::ring_begin<T, false>(ring, w, k_stride, K, n_len);
  const int slot_rows = dot::RingRows<T, false>::per_slot(n_len), row_bytes = n_len * static_cast<int>(sizeof(T));
  const int stages = (K + slot_rows - 1) / slot_rows;
  float total = 0.0f;
  for (int s = 0; s < stages; ++s) {
    dot::ring_advance<T, false>(ring, w, k_stride, K, n_len, s);
    total += add_slot(dot::shared_address(ring) + (s % dot::kRingSlots) * dot::kRingSlotBytes,
                      min(K - s * slot_rows, slot_rows), row_bytes, row_bytes);
  }
  __syncthreads();  // the last slots are read before the next tile's copies overwrite them
  return total;
}

// The ring filled with bulk copies: warp 0 issues one cp.async.bulk per k-row of a stage, lane 0 announces the
// stage's bytes on the slot's mbarrier, every thread waits on the slot's phase before reading it. `stage` counts
// within the tile, `slot_use` across the run (the mbarriers' phases continue from tile to tile).
__device__ __forceinline__ void bulk_issue(char* ring, uint64_t* bars, const T* w, int64_t k_stride, int K,
                                           int n_len, int stage, int slot_use) {
  if (threadIdx.x >= 32) return;
  const int slot_rows = dot::RingRows<T, false>::per_slot(n_len), row_bytes = n_len * static_cast<int>(sizeof(T));
  const int k0 = stage * slot_rows, rows = K - k0 < slot_rows ? K - k0 : slot_rows;
  if (rows <= 0) return;
  const uint32_t slot = dot::shared_address(ring) + (slot_use % dot::kRingSlots) * dot::kRingSlotBytes;
  const uint32_t bar = dot::shared_address(bars + slot_use % dot::kRingSlots);
  if (threadIdx.x == 0) {
    // the slot's previous contents were read through the generic proxy; the copy writes through the async one
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(rows * row_bytes) : "memory");
  }
  __syncwarp();
  for (int r = threadIdx.x; r < rows; r += 32) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     slot + r * row_bytes),
                 "l"(w + (k0 + r) * k_stride), "r"(row_bytes), "r"(bar)
                 : "memory");
  }
}

__device__ __forceinline__ void bulk_wait(uint64_t* bars, int stage) {
  const uint32_t bar = dot::shared_address(bars + stage % dot::kRingSlots), parity = (stage / dot::kRingSlots) & 1;
  const unsigned long long start = now_ns();
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    if (!done && now_ns() - start > 100000000ull) {  // 100 ms: a copy that never completes is a bug, not a wait
      if (threadIdx.x == 0) printf("bulk_wait: stage %d never completed (block %d)\n", stage, blockIdx.x);
      __trap();
    }
  }
}

// `uses`: stages consumed so far through these mbarriers (their phases continue across tiles).
__device__ float bulk_copies(char* ring, uint64_t* bars, int& uses, const T* w, int64_t k_stride, int K, int n_len) {
  const int slot_rows = dot::RingRows<T, false>::per_slot(n_len), row_bytes = n_len * static_cast<int>(sizeof(T));
  const int stages = (K + slot_rows - 1) / slot_rows;
  for (int s = 0; s < dot::kRingSlots - 1 && s < stages; ++s) bulk_issue(ring, bars, w, k_stride, K, n_len, s, uses + s);
  float total = 0.0f;
  for (int s = 0; s < stages; ++s) {
    bulk_wait(bars, uses + s);
    __syncthreads();  // every thread is done with the slot of stage s - 1, which is refilled now
    if (s + dot::kRingSlots - 1 < stages) bulk_issue(ring, bars, w, k_stride, K, n_len, s + dot::kRingSlots - 1, uses + s + dot::kRingSlots - 1);
    total += add_slot(dot::shared_address(ring) + ((uses + s) % dot::kRingSlots) * dot::kRingSlotBytes,
                      min(K - s * slot_rows, slot_rows), row_bytes, row_bytes);
  }
  __syncthreads();
  uses += stages;
  return total;
}

// Streams `levels` matrices of `matrix` elements in turn; a CTA takes tiles blockIdx.x, + gridDim.x, ... of each
// (tile = k_len rows x n_len columns). stamps[2 * block] = start, + 1 = end; sums[0] += every value read.
__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    stream(const T* w, int64_t matrix, int levels, int K, int N, int n_len, int k_len, int mode, const float* x,
           float* out, double* sums, unsigned long long* stamps) {
  extern __shared__ __align__(128) char smem[];
  char* ring = smem;
  float* xs = reinterpret_cast<float*>(smem + dot::kRingSlots * dot::kRingSlotBytes);
  float* acc = xs + k_len;
  const int acc_len = n_len < 4096 ? n_len : 4096;  // the ring dot's widest tile
  uint64_t* bars = reinterpret_cast<uint64_t*>(acc + acc_len + (k_len + acc_len) % 2);
  if (threadIdx.x < dot::kRingSlots) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(dot::shared_address(bars + threadIdx.x)) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  const unsigned long long start = now_ns();
  const int tiles_n = N / n_len, tiles = tiles_n * (K / k_len);
  float total = 0.0f;
  int uses = 0;
  for (int level = 0; level < levels; ++level) {
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int n0 = (tile % tiles_n) * n_len, k0 = (tile / tiles_n) * k_len;
      const T* tile_w = w + level * matrix + int64_t(k0) * N + n0;
      if (mode == kRead) {
        total += read_tile(tile_w, N, k_len, n_len);
      } else if (mode == kRingCopies) {
        total += ring_copies(ring, tile_w, N, k_len, n_len);
      } else if (mode == kBulkCopies) {
        total += bulk_copies(ring, bars, uses, tile_w, N, k_len, n_len);
      } else {
        const bool warp_ring = mode == kWarpRingDot;
        if (warp_ring) {
          dot::warp_ring_begin<T>(ring, tile_w, N, k_len, n_len);
        } else {
          dot::ring_begin<T, false>(ring, tile_w, N, k_len, n_len);
        }
        for (int k = threadIdx.x; k < k_len; k += kBlockThreads) xs[k] = x[k0 + k];
        __syncthreads();
        if (warp_ring) {
          dot::columns_warp_ring<T, 1>(xs, k_len, ring, tile_w, N, k_len, n_len, acc, n_len);
        } else {
          dot::columns_ring<T, 1>(xs, k_len, ring, tile_w, N, k_len, n_len, acc, n_len);
        }
        __syncthreads();
        for (int n = threadIdx.x; n < n_len; n += kBlockThreads) out[(int64_t(level) * tiles + tile) * n_len + n] = acc[n];
        __syncthreads();
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    stamps[2 * blockIdx.x] = start;
    stamps[2 * blockIdx.x + 1] = now_ns();
  }
  if (mode != kRingDot && mode != kWarpRingDot) atomicAdd(sums, static_cast<double>(total));
}

__global__ void fill(T* w, int64_t n, unsigned seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    w[i] = __float2bfloat16((h >> 8) / 16777216.0f);  // [0, 1): sums of millions of values stay well conditioned
  }
}

// The reference for the copies modes: every value of the first `levels` matrices, added in double.
__global__ void reference_sum(const T* w, int64_t n, double* sum) {
  double total = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    total += __bfloat162float(w[i]);
  }
  atomicAdd(sum, total);
}

struct Span {
  double block_us, span_us;
};
Span spans(const std::vector<unsigned long long>& stamps) {
  const int blocks = stamps.size() / 2;
  unsigned long long first = ~0ull, last = 0;
  std::vector<double> durations(blocks);
  for (int b = 0; b < blocks; ++b) {
    first = std::min(first, stamps[2 * b]);
    last = std::max(last, stamps[2 * b + 1]);
    durations[b] = (stamps[2 * b + 1] - stamps[2 * b]) / 1e3;
  }
  std::sort(durations.begin(), durations.end());
  return {durations[blocks / 2], (last - first) / 1e3};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void measure(const char* name, T* w, int64_t buffer, int K, int N, int n_len, int sms) {
  // split along K until the tiles fill the SMs (k_len a divisor of K, whole 16-row steps)
  int splits = 1;
  while ((N / n_len) * splits * 2 <= sms && K % (splits * 2) == 0 && (K / (splits * 2)) % 16 == 0) splits *= 2;
  const int k_len = K / splits, tiles = (N / n_len) * splits;
  const int64_t matrix = int64_t(K) * N;
  const int levels = static_cast<int>(std::min<int64_t>(16, buffer / matrix));
  const double bytes = matrix * sizeof(T);
  float *x, *out;
  double* sums;
  unsigned long long* stamps;
  CHECK(cudaMalloc(&x, K * sizeof(float)));
  CHECK(cudaMalloc(&out, int64_t(levels) * tiles * n_len * sizeof(float)));
  CHECK(cudaMalloc(&sums, 2 * sizeof(double)));
  CHECK(cudaMalloc(&stamps, 2 * sms * sizeof(unsigned long long)));
  std::vector<float> host_x(K);
  for (int k = 0; k < K; ++k) host_x[k] = std::sin(0.37f * k + 0.1f);
  CHECK(cudaMemcpy(x, host_x.data(), K * sizeof(float), cudaMemcpyHostToDevice));
  const int smem = dot::kRingSlots * dot::kRingSlotBytes + 4 * (k_len + std::min(n_len, 4096) + 1) + 8 * dot::kRingSlots;
  CHECK(cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  std::vector<unsigned long long> host_stamps(2 * sms);
  // the reference sum of the first `levels` matrices (the copies modes must read exactly these values)
  double expected = 0, got = 0;
  CHECK(cudaMemset(sums, 0, 2 * sizeof(double)));
  reference_sum<<<4 * sms, 256>>>(w, levels * matrix, sums + 1);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(&expected, sums + 1, sizeof(double), cudaMemcpyDeviceToHost));
  for (int mode = 0; mode < kModes; ++mode) {
    const bool dot_fits = n_len / 8 <= kBlockThreads && n_len * int(sizeof(T)) <= dot::kRingSlotBytes;
    const bool ring_fits = n_len * int(sizeof(T)) <= dot::kRingSlotBytes;
    if ((mode == kRingDot && !dot_fits) || (mode != kRead && !ring_fits)) continue;
    if (mode == kWarpRingDot && !dot::warp_ring_fits<T>(n_len)) continue;
    std::fprintf(stderr, "%s n_len %d: %s\n", name, n_len, kModeNames[mode]);
    auto launch = [&](int first_level, int count) {
      stream<<<sms, kBlockThreads, smem>>>(w + first_level * matrix, matrix, count, K, N, n_len, k_len, mode, x, out,
                                           sums, stamps);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaMemcpy(host_stamps.data(), stamps, host_stamps.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
      return spans(host_stamps);
    };
    // 16 levels back to back, checked
    CHECK(cudaMemset(sums, 0, sizeof(double)));
    launch(0, levels);
    const char* verdict = "";
    if (mode != kRingDot && mode != kWarpRingDot) {
      CHECK(cudaMemcpy(&got, sums, sizeof(double), cudaMemcpyDeviceToHost));
      if (std::abs(got - expected) > 1e-4 * expected) verdict = "  <-- WRONG SUM";
    } else {
      // a few tiles of the first matrix against the host
      std::vector<T> host_w(matrix);
      CHECK(cudaMemcpy(host_w.data(), w, matrix * sizeof(T), cudaMemcpyDeviceToHost));
      std::vector<float> host_out(int64_t(tiles) * n_len);
      CHECK(cudaMemcpy(host_out.data(), out, host_out.size() * sizeof(float), cudaMemcpyDeviceToHost));
      for (int tile : {0, tiles / 2, tiles - 1}) {
        const int n0 = (tile % (N / n_len)) * n_len, k0 = (tile / (N / n_len)) * k_len;
        for (int n = 0; n < n_len; n += 7) {
          double ref = 0, scale = 0;
          for (int k = 0; k < k_len; ++k) {
            const double term = host_x[k0 + k] * double(__bfloat162float(host_w[int64_t(k0 + k) * N + n0 + n]));
            ref += term, scale += std::abs(term);
          }
          if (std::abs(host_out[int64_t(tile) * n_len + n] - ref) > 1e-4 * scale + 1e-6) verdict = "  <-- WRONG PRODUCT";
        }
      }
    }
    std::vector<double> together, alone, alone_block;
    for (int rep = 0; rep < 3; ++rep) together.push_back(bytes * levels / (launch(0, levels).span_us * 1e6));
    for (int rep = 0; rep < 2 * levels; ++rep) {
      const Span s = launch(rep % levels, 1);
      alone.push_back(bytes / (s.span_us * 1e6));
      alone_block.push_back(s.block_us);
    }
    std::printf("%-16s K %5d N %5d tile %5d cols x %5d rows (%4d B a row, %3d tiles) %-12s: %d levels together "
                "%5.2f TB/s | one level %5.2f TB/s, block median %6.2f us (%5.1f GB/s per SM)%s\n",
                name, K, N, n_len, k_len, n_len * int(sizeof(T)), tiles, kModeNames[mode], levels, median(together),
                median(alone), median(alone_block),
                bytes / std::max(1, std::min(tiles, sms)) * ((tiles + sms - 1) / sms) / (median(alone_block) * 1e3),
                verdict);
  }
  CHECK(cudaFree(x));
  CHECK(cudaFree(out));
  CHECK(cudaFree(sums));
  CHECK(cudaFree(stamps));
}

int main() {
  int sms;
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // a run cut short keeps every line it printed
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t buffer = int64_t(1) << 30;  // 1 GiB of bf16: 16 matrices of up to 64 MB, far larger than L2
  T* w;
  CHECK(cudaMalloc(&w, buffer * sizeof(T)));
  fill<<<8 * sms, 256>>>(w, buffer, 12345u);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::printf("ring: %d slots x %d bytes, %d threads, %d SMs, plain reads %d in flight a thread\n", dot::kRingSlots,
              dot::kRingSlotBytes, kBlockThreads, sms, kReadDepth);
  struct Shape {
    const char* name;
    int K, N;
  };
  for (const Shape& shape : {Shape{"llama-1b gate", 2048, 8192}, Shape{"llama-1b down", 8192, 2048},
                             Shape{"qwen3-8b gate", 4096, 12288}, Shape{"qwen3-8b qkv", 4096, 6144}}) {
    for (int n_len : {64, 128, 256, 512, 1024, 2048}) {
      if (n_len < shape.N) measure(shape.name, w, buffer, shape.K, shape.N, n_len, sms);
    }
    measure(shape.name, w, buffer, shape.K, shape.N, shape.N, sms);  // whole rows: contiguous tiles
  }
  CHECK(cudaFree(w));
  return 0;
}
