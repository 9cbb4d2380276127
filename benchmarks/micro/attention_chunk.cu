// Microbenchmark of attention::keys_in_chunks (ffi/include/jax_mpk/tasks/attention.cuh) alone: one CTA per SM,
// each the task of one (sequence, KV head) group as the megakernel runs it, on a random bf16 cache. Reports
// per-block time of the whole call, of its copies alone, and of the whole call with every block reading the same
// keys (from L2), so that a task's time can be split into memory and arithmetic without the rest of the
// megakernel; the whole call's partials are checked against a host reference first.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/attention_chunk.cu -o /tmp/attention_chunk && /tmp/attention_chunk
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "jax_mpk/tasks/attention.cuh"
#include "micro.cuh"

using namespace jax_mpk;
using T = __nv_bfloat16;

// mode 0: the whole call; 1: the copies alone (both tiles, waited); 2: the whole call with every block reading
// the same keys and values (from L2 after the first: the arithmetic, barriers and stores at L2 latency). kByWarps:
// attention::keys_by_warps instead of keys_in_chunks (the batch-1 form of JAX_MPK_ATTENTION_WARPS).
template <int R, int D, int kChunk, bool kByWarps>
__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    run(const T* keys, const T* values, const int* pos, float* partials, int kv_heads, int keys_per_task,
        int mode, unsigned long long* elapsed) {
  static_assert(!kByWarps || attention::warp_partials_bytes<R, D>() <= attention::scratch_bytes<T, R, D>(kChunk));
  extern __shared__ __align__(128) char smem[];
  float* q = reinterpret_cast<float*>(smem);
  float* scores = q + R * D;
  char* scratch = reinterpret_cast<char*>(scores + R * attention::scores_stride(kChunk));
  float* out = reinterpret_cast<float*>(scratch + attention::scratch_bytes<T, R, D>(kChunk));
  for (int e = threadIdx.x; e < R * D; e += kBlockThreads) q[e] = 0.01f * (e % 7);
  const int group = blockIdx.x, seq = group / kv_heads, head = group % kv_heads;
  const int64_t stride = int64_t(kv_heads) * D, ctx = keys_per_task;
  const T* k = keys + (seq * ctx) * stride + head * D;
  const T* v = values + (seq * ctx) * stride + head * D;
  __syncthreads();
  const unsigned long long start = now_ns();
  auto score = [&](int row, int key, float qk) { return key <= __ldg(pos) ? qk * 0.088f : -1e30f; };
  auto store = [&](int part) {
    for (int e = threadIdx.x; e < R * D + 2 * R; e += kBlockThreads) partials[(group * 64 + part) * (R * D + 2 * R) + e] = out[e];
  };
  auto body = [&](const T* keys, const T* values) {
    if constexpr (kByWarps) {
      attention::keys_by_warps<T, R, D, kChunk>(q, D, keys, stride, values, stride, 0, keys_per_task, scores, scratch, out, score, store,
                                                [] { __syncthreads(); });  // q is in place
    } else {
      attention::keys_in_chunks<T, R, D, kChunk>(q, D, keys, stride, values, stride, 0, keys_per_task, scores, scratch, out, score, store);
    }
  };
  if (mode == 0) {
    body(k, v);
  } else if (mode == 1) {
    for (int first = 0; first < keys_per_task; first += kChunk) {
      attention::copy_async<T, D, kChunk>(reinterpret_cast<T*>(scratch), k + first * stride, stride);
      attention::copy_async<T, D, kChunk>(reinterpret_cast<T*>(scratch) + kChunk * D, v + first * stride, stride);
      asm volatile("cp.async.wait_all;" ::: "memory");
      __syncthreads();
    }
  } else {
    body(keys, values);
  }
  __syncthreads();
  if (threadIdx.x == 0) elapsed[blockIdx.x] = now_ns() - start;
}

template <int R, int D, int kChunk, bool kByWarps = false>
void measure(const char* name, int batch, int kv_heads, int ctx, int keys_per_task) {
  // kCopies caches, one per repetition in turn, together far larger than L2 (50 MB on an H200): the copies read
  // HBM as the megakernel's do
  constexpr int kCopies = 8;
  const size_t elements = size_t(batch) * ctx * kv_heads * D;
  std::vector<T> host(elements);
  unsigned seed = 12345;
  for (auto& x : host) {
    seed = seed * 1664525u + 1013904223u;
    x = __float2bfloat16(((seed >> 9) & 0xffff) / 65536.0f - 0.5f);
  }
  T *keys, *values;
  int* pos;
  float* partials;
  unsigned long long* elapsed;
  const int groups = batch * kv_heads;
  CHECK(cudaMalloc(&keys, kCopies * elements * sizeof(T)));
  CHECK(cudaMalloc(&values, kCopies * elements * sizeof(T)));
  CHECK(cudaMalloc(&pos, sizeof(int)));
  CHECK(cudaMalloc(&partials, size_t(groups) * 64 * (R * D + 2 * R) * sizeof(float)));
  CHECK(cudaMalloc(&elapsed, groups * sizeof(unsigned long long)));
  for (int copy = 0; copy < kCopies; ++copy) {
    CHECK(cudaMemcpy(keys + copy * elements, host.data(), elements * sizeof(T), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(values + copy * elements, host.data(), elements * sizeof(T), cudaMemcpyHostToDevice));
  }
  const int p = ctx - 1;
  CHECK(cudaMemcpy(pos, &p, sizeof(int), cudaMemcpyHostToDevice));
  const int smem = 4 * (R * D + R * attention::scores_stride(kChunk) + R * D + 2 * R) + attention::scratch_bytes<T, R, D>(kChunk) + 16;
  CHECK(cudaFuncSetAttribute(run<R, D, kChunk, kByWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  std::vector<unsigned long long> times(groups);
  // the whole call's partials against a float reference on the host (a few groups; the tensor-core form rounds q
  // and the probabilities to bf16, hence the tolerance)
  run<R, D, kChunk, kByWarps><<<groups, kBlockThreads, smem>>>(keys, values, pos, partials, kv_heads, keys_per_task, 0, elapsed);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const int record = R * D + 2 * R, parts = keys_per_task / kChunk;
  std::vector<float> got(size_t(groups) * 64 * record);
  CHECK(cudaMemcpy(got.data(), partials, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int group : {0, groups / 3, groups - 1}) {
    const int seq = group / kv_heads, head = group % kv_heads;
    for (int part = 0; part < parts; ++part) {
      for (int r = 0; r < R; ++r) {
        std::vector<double> sc(kChunk);
        double m = -1e300, l = 0;
        for (int j = 0; j < kChunk; ++j) {
          const size_t key = (size_t(seq) * ctx + part * kChunk + j) * kv_heads * D + head * D;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(0.01f * ((r * D + d) % 7)) * __bfloat162float(host[key + d]);
          sc[j] = dot * 0.088;
          m = std::max(m, sc[j]);
        }
        std::vector<double> o(D, 0.0);
        for (int j = 0; j < kChunk; ++j) {
          const size_t key = (size_t(seq) * ctx + part * kChunk + j) * kv_heads * D + head * D;
          const double pj = std::exp(sc[j] - m);
          l += pj;
          for (int d = 0; d < D; ++d) o[d] += pj * __bfloat162float(host[key + d]);
        }
        const float* rec = got.data() + (size_t(group) * 64 + part) * record;
        worst = std::max(worst, std::abs(rec[R * D + r] - m) / (std::abs(m) + 1e-3));
        worst = std::max(worst, std::abs(rec[R * D + R + r] - l) / l);
        for (int d = 0; d < D; ++d) worst = std::max(worst, std::abs(rec[r * D + d] - o[d]) / (l * 0.05));
      }
    }
  }
  std::printf("%-28s largest relative error %.2e%s\n", name, worst, worst < 2e-2 ? "" : "  <-- WRONG");
  const char* modes[] = {"whole call", "copies only", "same keys, every block (L2)"};
  for (int mode = 0; mode < 3; ++mode) {
    std::vector<double> medians;
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    float total_ms = 0;
    for (int rep = 0; rep < 20; ++rep) {
      CHECK(cudaMemset(partials, 0, 4));  // a kernel between repetitions; the cache stays where it is
      CHECK(cudaEventRecord(a));
      const size_t copy = mode == 2 ? 0 : (rep % kCopies) * elements;
      run<R, D, kChunk, kByWarps><<<groups, kBlockThreads, smem>>>(keys + copy, values + copy, pos, partials, kv_heads,
                                                         keys_per_task, mode, elapsed);
      CHECK(cudaEventRecord(b));
      CHECK(cudaGetLastError());
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      if (rep >= 5) total_ms += ms;
      CHECK(cudaMemcpy(times.data(), elapsed, groups * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
      std::sort(times.begin(), times.end());
      if (rep >= 5) medians.push_back(times[groups / 2] / 1000.0);
    }
    std::sort(medians.begin(), medians.end());
    const double bytes = 2.0 * keys_per_task * D * sizeof(T);
    std::printf("%-28s %-30s blocks %4d keys/task %4d chunk %4d: block median %7.2f us (%6.1f GB/s per SM), launch %7.2f us\n",
                name, modes[mode], groups, keys_per_task, kChunk, medians[medians.size() / 2],
                bytes / (medians[medians.size() / 2] * 1e3), 1e3 * total_ms / 15);
  }
  CHECK(cudaFree(keys));
  CHECK(cudaFree(values));
  CHECK(cudaFree(pos));
  CHECK(cudaFree(partials));
  CHECK(cudaFree(elapsed));
}

int main() {
  // the tasks of the 2-layer profiles (ctx 1024): 128 of them, one per SM
  measure<4, 128, 256>("qwen3-8b b8 (2 chunks)", 16, 8, 512, 512);
  measure<4, 128, 128>("qwen3-8b b8 (chunk 128)", 16, 8, 512, 512);
  measure<4, 128, 256>("qwen3-8b b8 (1 chunk)", 16, 8, 256, 256);
  measure<4, 64, 512>("llama-1b b8", 16, 8, 512, 512);
  measure<4, 64, 256>("llama-1b b8 (chunk 256)", 16, 8, 512, 512);
  measure<4, 64, 64>("llama-1b b1", 16, 8, 64, 64);
  measure<2, 128, 256>("qwen3-0.6b b8", 16, 8, 512, 512);
  measure<4, 64, 64, true>("llama-1b b1, by warps", 16, 8, 64, 64);
  measure<2, 128, 64>("qwen3-0.6b b1", 16, 8, 64, 64);
  measure<2, 128, 64, true>("qwen3-0.6b b1, by warps", 16, 8, 64, 64);
  return 0;
}
