// Microbenchmark of L2 as the staging buffer of the stream-ahead (issue 12's item 3): while a dependency chain runs
// on two SMs (a layer's attention chain, during which HBM idles today), can a few other SMs ask L2 for the weights
// the next products will read, so that those products then read them at L2's rate, without slowing the chain?
// Session 13's idle prefetch (every waiting SM's own warp asking L2) slowed the step 15%: its prefetches queued in
// front of the chain's own loads in the same SM. chain_under_stream (session 17) found that streamers on *other*
// SMs cost the chain +0.29 us a step when they pause 1 us between groups, +1.16 us unpaced. Here the streamers do
// not read: they issue `cp.async.bulk.prefetch.L2` (the copy engine walks the bytes; one instruction a chunk), with
// or without an evict-last policy, a chunk of `chunk_kb` KB at a time and `pause` ns between chunks.
// One trial: (1) L2 is flushed (a 512 MB read); (2) a cooperative launch: CTAs 0 and 1 run chain_under_stream's
// chain (96 steps, each stamped when it signals), and `prefetchers` other CTAs prefetch the first `staged` MB of a
// 256 MB weight buffer; (3) a normal launch on every SM reads those `staged` MB with evict-first 16-byte loads
// (hits, if L2 kept them); (4) (1) and (2) again, then a read with the weight ring's evict-first cp.async copies
// into shared memory; (5) each after another flush, as many bytes never prefetched (HBM) read both ways. Every
// read is timed inside its kernel (first start to last end on the global timer). Reports the chain's median step
// time over its first 16 steps (under the prefetch) and over the rest, how long the prefetchers took to issue, and
// the four reads' TB/s; the chain's last row and every read's fold checked on the host. Session 18 found staged
// reads only 5-10% faster than cold ones; the control added then, per size, reads the same bytes twice with plain
// loads and times the second (`hot`): if that is well above the cold reads, L2 can serve them faster and the
// prefetches did not stay; if not, a read of this size is no faster from L2 on this GPU.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/l2_stage.cu -o /tmp/l2_stage && /tmp/l2_stage
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "jax_mpk/runtime/megakernel.cuh"
#include "jax_mpk/tasks/dot.cuh"
#include "micro.cuh"
#include "chain.cuh"

using namespace jax_mpk;

constexpr int kReadDepth = 8;  // the consumer's 16-byte loads in flight a thread

struct Prefetch {
  const char* data;
  int64_t bytes;                // the first `bytes` of data are asked of L2
  int chunk_bytes;              // one cp.async.bulk.prefetch each
  unsigned pause_ns;            // after each chunk a prefetcher issues
  int evict_last;               // the prefetches carry an evict-last policy
  int prefetchers;              // CTAs 2 .. 2 + prefetchers - 1
  unsigned long long* done_ns;  // how long the slowest prefetcher took to issue its chunks
};

// Asks L2 for [p, p + bytes) (bytes a multiple of 16); the copy engine fetches them, the thread goes on.
__device__ __forceinline__ void prefetch_bulk(const char* p, int bytes, bool evict_last) {
  if (evict_last) {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(p), "r"(bytes), "l"(policy)
                 : "memory");
  } else {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
  }
}

__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    stage(Chain chain, Prefetch prefetch) {
  if (blockIdx.x < 2) {
    for (int h = blockIdx.x; h < chain.hops; h += 2) chain_step(chain, h);
    return;
  }
  const int me = blockIdx.x - 2;
  if (me >= prefetch.prefetchers || threadIdx.x != 0) return;  // one thread issues: the copy engine does the rest
  const unsigned long long start = now_ns();
  const int64_t chunks = prefetch.bytes / prefetch.chunk_bytes;
  for (int64_t c = me; c < chunks; c += prefetch.prefetchers) {
    prefetch_bulk(prefetch.data + c * prefetch.chunk_bytes, prefetch.chunk_bytes, prefetch.evict_last);
    if (prefetch.pause_ns) __nanosleep(prefetch.pause_ns);
  }
  atomicMax(prefetch.done_ns, now_ns() - start);  // issued, not landed: the consumer tells what landed
}

// A read's bracket: when the block starts (the global timer, the same in every thread), and at its end the
// earliest start and the latest end over the blocks into span[0] and span[1], every thread's fold into sink.
__device__ unsigned long long read_started() {
  __shared__ unsigned long long start;
  if (threadIdx.x == 0) start = now_ns();
  __syncthreads();
  return start;
}
__device__ void read_finished(unsigned long long start, unsigned long long* span, uint32_t* sink, uint32_t sum) {
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicMin(&span[0], start);
    atomicMax(&span[1], now_ns());
  }
  atomicAdd(sink, sum);
}

// Every CTA reads its share of [data, data + bytes) with evict-first 16-byte loads (kStreamed, the weight
// stream's), or plain L2 loads that leave the lines there (the control: the same bytes read twice).
template <bool kStreamed>
__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    consume(const uint4* data, int64_t chunks, uint32_t* sink, unsigned long long* span) {
  const unsigned long long start = read_started();
  uint32_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlockThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x; base < chunks;
       base += kReadDepth * stride) {
    uint4 v[kReadDepth];
#pragma unroll
    for (int d = 0; d < kReadDepth; ++d) {
      const int64_t chunk = base + d * stride;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      v[d] = chunk >= chunks ? zero : kStreamed ? dot::load16_streamed(data + chunk) : __ldcg(data + chunk);
    }
#pragma unroll
    for (int d = 0; d < kReadDepth; ++d) sum += v[d].x ^ v[d].w;
  }
  read_finished(start, span, sink, sum);
}

// consume's read through the products' path instead: 16-byte evict-first cp.async copies into shared memory
// (dot.cuh's copy16_streamed, as the weight ring issues them), each thread two groups of kReadDepth in flight,
// then folded from there.
__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    consume_copies(const uint4* data, int64_t chunks, uint32_t* sink, unsigned long long* span) {
  extern __shared__ uint4 staged[];  // [2][kReadDepth][kBlockThreads]: a thread reads only its own slots
  const unsigned long long start = read_started();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlockThreads, group_stride = kReadDepth * stride;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  auto slot = [&](int buffer, int d) { return &staged[(buffer * kReadDepth + d) * kBlockThreads + threadIdx.x]; };
  auto issue = [&](int64_t base, int buffer) {  // one commit group, empty past the end
#pragma unroll
    for (int d = 0; d < kReadDepth; ++d) {
      const int64_t chunk = base + d * stride;
      if (chunk < chunks) dot::copy16_streamed(dot::shared_address(slot(buffer, d)), data + chunk);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  uint32_t sum = 0;
  issue(first, 0);
  int buffer = 0;
  for (int64_t base = first; base < chunks; base += group_stride, buffer ^= 1) {
    issue(base + group_stride, buffer ^ 1);
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#pragma unroll
    for (int d = 0; d < kReadDepth; ++d) {
      if (base + d * stride < chunks) sum += slot(buffer, d)->x ^ slot(buffer, d)->w;
    }
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  read_finished(start, span, sink, sum);
}

// Evicts what L2 holds: a plain read of a buffer ten times L2's size.
__global__ void flush(const uint4* data, int64_t chunks, uint32_t* sink) {
  uint32_t sum = 0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sum += __ldcg(data + c).y;
  }
  atomicAdd(sink, sum);
}

int main() {
  int device = 0, sms = 0, cooperative = 0, l2_bytes = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  if (!cooperative) {
    std::fprintf(stderr, "the device cannot launch cooperatively (all CTAs resident)\n");
    return 1;
  }
  // 96 steps: ~100 us, as long as a few layers' attention chains; the prefetch runs in its first part
  const int hops = 96, early = 16;
  const int64_t weight_bytes = int64_t(256) << 20, flush_bytes = int64_t(512) << 20;
  Chain chain{nullptr, nullptr, nullptr, hops};
  char* weights = nullptr;
  uint4* flush_data = nullptr;
  uint32_t* sink = nullptr;
  unsigned long long *done_ns = nullptr, *span = nullptr;
  CHECK(cudaMalloc(&chain.counter, sizeof(uint64_t)));
  CHECK(cudaMalloc(&chain.rows, sizeof(uint32_t) * kRowWords * (hops + 1)));
  CHECK(cudaMalloc(&chain.step_end, sizeof(unsigned long long) * hops));
  CHECK(cudaMalloc(&weights, weight_bytes));
  CHECK(cudaMalloc(&flush_data, flush_bytes));
  CHECK(cudaMalloc(&sink, sizeof(uint32_t)));
  CHECK(cudaMalloc(&done_ns, sizeof(unsigned long long)));
  CHECK(cudaMalloc(&span, 2 * sizeof(unsigned long long)));
  std::vector<uint32_t> host(weight_bytes / 4);
  for (auto& x : host) x = static_cast<uint32_t>(std::rand());
  CHECK(cudaMemcpy(weights, host.data(), weight_bytes, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(flush_data, 1, flush_bytes));
  std::vector<uint32_t> row0(kRowWords);
  for (int w = 0; w < kRowWords; ++w) row0[w] = static_cast<uint32_t>(std::rand());
  // the consumer's fold of a region, on the host: the sum over its 16-byte chunks of word 0 ^ word 3
  auto expected_fold = [&](int64_t offset, int64_t bytes) {
    uint32_t sum = 0;
    for (int64_t c = offset / 16; c < (offset + bytes) / 16; ++c) sum += host[c * 4] ^ host[c * 4 + 3];
    return sum;
  };
  auto flush_l2 = [&] {
    flush<<<sms * 4, 256>>>(flush_data, flush_bytes / 16, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
  };
  const int copies_smem = 2 * kReadDepth * kBlockThreads * 16;
  CHECK(cudaFuncSetAttribute(consume_copies, cudaFuncAttributeMaxDynamicSharedMemorySize, copies_smem));
  // One consumer read of [offset, offset + bytes), with loads or with cp.async copies (or plain loads: the hot
  // control): TB/s inside the kernel, the fold checked.
  auto consume_region = [&](int64_t offset, int64_t bytes, bool copies, bool plain = false) {
    const unsigned long long initial[2] = {~0ull, 0ull};
    CHECK(cudaMemcpy(span, initial, sizeof(initial), cudaMemcpyHostToDevice));
    CHECK(cudaMemset(sink, 0, sizeof(uint32_t)));
    const uint4* region = reinterpret_cast<const uint4*>(weights + offset);
    if (copies) {
      consume_copies<<<sms, kBlockThreads, copies_smem>>>(region, bytes / 16, sink, span);
    } else if (plain) {
      consume<false><<<sms, kBlockThreads>>>(region, bytes / 16, sink, span);
    } else {
      consume<true><<<sms, kBlockThreads>>>(region, bytes / 16, sink, span);
    }
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    unsigned long long times[2];
    uint32_t folded = 0;
    CHECK(cudaMemcpy(times, span, sizeof(times), cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&folded, sink, sizeof(folded), cudaMemcpyDeviceToHost));
    if (folded != expected_fold(offset, bytes)) {
      std::fprintf(stderr, "consumer fold %u, expected %u\n", folded, expected_fold(offset, bytes));
      std::exit(1);
    }
    return bytes / ((times[1] - times[0]) * 1e-9) / 1e12;
  };
  // One staging launch: the chain's step times (early: its first steps, under the prefetch; late: the rest)
  // and the time the prefetchers took to issue theirs; the chain's last row checked.
  struct ChainTimes {
    double early_us, late_us, issued_us;
  };
  auto run_stage = [&](Prefetch prefetch) {
    flush_l2();
    CHECK(cudaMemset(chain.counter, 0, sizeof(uint64_t)));
    CHECK(cudaMemset(done_ns, 0, sizeof(unsigned long long)));
    CHECK(cudaMemcpy(chain.rows, row0.data(), sizeof(uint32_t) * kRowWords, cudaMemcpyHostToDevice));
    void* args[] = {&chain, &prefetch};
    CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(stage), dim3(sms), dim3(kBlockThreads), args, 0,
                                      nullptr));
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<unsigned long long> ends(hops);
    unsigned long long issued = 0;
    CHECK(cudaMemcpy(ends.data(), chain.step_end, sizeof(unsigned long long) * hops, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&issued, done_ns, sizeof(issued), cudaMemcpyDeviceToHost));
    if (!chain_row_checks(chain, row0)) std::exit(1);
    std::vector<double> early_steps, late_steps;
    for (int h = 1; h < hops; ++h) (h <= early ? early_steps : late_steps).push_back((ends[h] - ends[h - 1]) / 1e3);
    std::sort(early_steps.begin(), early_steps.end());
    std::sort(late_steps.begin(), late_steps.end());
    return ChainTimes{early_steps[early_steps.size() / 2], late_steps[late_steps.size() / 2], issued / 1e3};
  };

  std::printf("L2 %d MB; a chain of %d steps on 2 SMs (step times: median of steps 1-%d, early, and of the rest, "
              "late); prefetchers ask L2 for the first `staged` MB of a 256 MB buffer (cp.async.bulk.prefetch.L2 "
              "from one thread each); then %d SMs read them with evict-first loads or cp.async copies (staged; each "
              "after a prefetch of its own), and as many bytes never prefetched (cold)\n", l2_bytes >> 20, hops, early,
              sms);
  std::printf("%-9s %-11s %5s %8s %6s | %8s %8s %9s | %12s %12s %12s %12s\n", "staged MB", "prefetchers", "chunk",
              "pause ns", "policy", "early us", "late us", "issued us", "staged loads", "staged cp", "cold loads",
              "cold cp");
  const ChainTimes alone = run_stage(Prefetch{weights, 0, 16384, 0, 0, 0, done_ns});
  std::printf("%-9s %-11s %5s %8s %6s | %8.3f %8.3f %9s |\n", "0", "0", "-", "-", "-", alone.early_us, alone.late_us,
              "-");
  const int64_t staged_mb[] = {16, 32, 48};
  const int prefetcher_counts[] = {4, 16, 130};
  const unsigned pauses[] = {0, 1000};
  for (int64_t mb : staged_mb) {
    // the control: what a read of bytes L2 holds gives here (plain loads, the second of two reads timed)
    flush_l2();
    consume_region(0, mb << 20, false, true);
    std::printf("%-9lld hot: read twice with plain loads, the second at %.2f TB/s\n", static_cast<long long>(mb),
                consume_region(0, mb << 20, false, true));
    for (int prefetchers : prefetcher_counts) {
      for (unsigned pause : pauses) {
        for (int evict_last = 0; evict_last <= 1; ++evict_last) {
          const int64_t bytes = mb << 20;
          const Prefetch prefetch{weights, bytes, 16384, pause, evict_last, std::min(prefetchers, sms - 2), done_ns};
          const ChainTimes times = run_stage(prefetch);
          const double staged_loads = consume_region(0, bytes, false);
          run_stage(prefetch);  // the loads' evict-first policy may have dropped what they read: stage again
          const double staged_copies = consume_region(0, bytes, true);
          double cold[2];
          for (int copies = 0; copies <= 1; ++copies) {
            flush_l2();
            cold[copies] = consume_region(weight_bytes - bytes, bytes, copies);  // never prefetched
          }
          std::printf("%-9lld %-11d %5d %8u %6s | %8.3f %8.3f %9.1f | %12.2f %12.2f %12.2f %12.2f\n",
                      static_cast<long long>(mb), prefetch.prefetchers, prefetch.chunk_bytes >> 10, pause,
                      evict_last ? "last" : "normal", times.early_us, times.late_us, times.issued_us, staged_loads,
                      staged_copies, cold[0], cold[1]);
        }
      }
    }
  }
  return 0;
}
