// Microbenchmark of the latency a dependency chain pays while the other SMs stream HBM: can weights stream during
// a layer's attention chain without slowing it? (Session 13's idle L2 prefetch, 16 KB/us a waiting SM, slowed the
// step 15-44%; the stream-ahead of the runtime-v2 issue needs to know at what streaming rate the chain stays fast.)
// One CTA per SM, all resident (a cooperative launch). CTAs 0 and 1 ping-pong a chain of `hops` steps, each what a
// megakernel hop and a small task do: thread 0 polls a counter with the megakernel's acquire load until the other
// CTA's step has signalled, the block reads the 4 KB row that step stored (L2 loads, __ldcg, as the bodies read
// the workspace), stores its own row, fences and signals (megakernel.cuh's fence_release and add_relaxed). The
// other CTAs stream a 4 GiB buffer with 16-byte evict-first loads (dot.cuh's load16_streamed, 8 in flight a
// thread), sleeping `pause` ns after each group of loads: from no pause (the aggregate read bandwidth) through
// longer pauses to no streamers at all. For each setting it reports the streamers' aggregate TB/s (over the whole
// launch) and the chain's time a step (the median and the largest of 3 runs of 2000 steps), the chain's last row
// checked against the host.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I ffi/include -DJAX_MPK_BLOCK_THREADS=512 \
//        -DJAX_MPK_RING_SLOTS=4 -DJAX_MPK_RING_SLOT_BYTES=32768 -DJAX_MPK_RING_MAX_ROWS=8 -DJAX_MPK_MMA_MAX_COLUMNS=512 \
//        benchmarks/micro/chain_under_stream.cu -o /tmp/chain_under_stream && /tmp/chain_under_stream
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

constexpr int kStreamDepth = 8;  // 16-byte loads in flight a streaming thread (weight_stream's plain reads)

struct Stream {
  const uint4* data;
  int64_t chunks;  // 16-byte chunks in the buffer
  unsigned pause_ns;
  unsigned long long* bytes;  // read by all streamers together
  volatile int* done;         // set by the CTA that runs the chain's last step
  uint32_t* sink;             // what the streamers read, folded (keeps their loads)
};

__global__ void __launch_bounds__(JAX_MPK_BLOCK_THREADS, 1)
    run(Chain chain, Stream stream, int with_streamers, unsigned long long* chain_ns) {
  if (blockIdx.x < 2) {
    const unsigned long long start = now_ns();
    for (int h = blockIdx.x; h < chain.hops; h += 2) chain_step(chain, h);
    if (blockIdx.x == (chain.hops - 1) % 2 && threadIdx.x == 0) {  // the CTA that ran the last step
      *chain_ns = now_ns() - start;
      *stream.done = 1;
    }
    return;
  }
  if (!with_streamers) return;
  const int streamers = gridDim.x - 2, me = blockIdx.x - 2;
  uint32_t sum = 0;
  unsigned long long chunks_read = 0;
  for (int64_t base = static_cast<int64_t>(me) * kBlockThreads + threadIdx.x, group = 1;; ++group) {
    uint4 v[kStreamDepth];
#pragma unroll
    for (int d = 0; d < kStreamDepth; ++d) {
      const int64_t chunk = (base + static_cast<int64_t>(d) * streamers * kBlockThreads) % stream.chunks;
      v[d] = dot::load16_streamed(stream.data + chunk);
    }
#pragma unroll
    for (int d = 0; d < kStreamDepth; ++d) sum += v[d].x ^ v[d].w;
    chunks_read += kStreamDepth;
    base += static_cast<int64_t>(kStreamDepth) * streamers * kBlockThreads;
    if (stream.pause_ns) __nanosleep(stream.pause_ns);
    if (group % 16 == 0 && *stream.done) break;  // not every group: the flag's load would pace the loads
  }
  atomicXor(stream.sink, sum);
  atomicAdd(stream.bytes, chunks_read * 16ull);
}

int main() {
  int device = 0, sms = 0, cooperative = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) {
    std::fprintf(stderr, "the device cannot launch cooperatively (all CTAs resident)\n");
    return 1;
  }
  const int hops = 2000;
  const int64_t stream_bytes = int64_t(4) << 30;
  Chain chain{nullptr, nullptr, nullptr, hops};
  Stream stream{nullptr, stream_bytes / 16, 0, nullptr, nullptr, nullptr};
  unsigned long long* chain_ns = nullptr;
  CHECK(cudaMalloc(&chain.counter, sizeof(uint64_t)));
  CHECK(cudaMalloc(&chain.rows, sizeof(uint32_t) * kRowWords * (hops + 1)));
  uint4* data = nullptr;
  CHECK(cudaMalloc(&data, stream_bytes));
  stream.data = data;
  CHECK(cudaMalloc(&stream.bytes, sizeof(unsigned long long)));
  CHECK(cudaMalloc(const_cast<int**>(&stream.done), sizeof(int)));
  CHECK(cudaMalloc(&stream.sink, sizeof(uint32_t)));
  CHECK(cudaMalloc(&chain_ns, sizeof(unsigned long long)));
  std::vector<uint32_t> row0(kRowWords);
  for (int w = 0; w < kRowWords; ++w) row0[w] = static_cast<uint32_t>(std::rand());
  {  // random stream data
    std::vector<uint32_t> chunk(1 << 24);
    for (auto& x : chunk) x = static_cast<uint32_t>(std::rand()) | 1u;
    for (int64_t off = 0; off < stream_bytes; off += chunk.size() * 4) {
      CHECK(cudaMemcpy(reinterpret_cast<char*>(data) + off, chunk.data(), chunk.size() * 4, cudaMemcpyHostToDevice));
    }
  }
  std::printf("chain of %d steps (a 4 KB row read after an acquire poll, stored, fenced, signalled) between two SMs; "
              "%d SMs streaming 16-byte evict-first loads\n", hops, sms - 2);
  std::printf("%-16s %12s %15s %15s\n", "streamers", "stream TB/s", "step us median", "step us largest");
  const unsigned pauses[] = {0, 250, 500, 1000, 2000, 4000, 8000};
  for (int setting = 0; setting <= 7; ++setting) {
    const bool with_streamers = setting < 7;
    stream.pause_ns = with_streamers ? pauses[setting] : 0;
    std::vector<double> steps;
    double bandwidth = 0.0;
    for (int run_index = 0; run_index < 3; ++run_index) {
      CHECK(cudaMemset(chain.counter, 0, sizeof(uint64_t)));
      CHECK(cudaMemcpy(chain.rows, row0.data(), sizeof(uint32_t) * kRowWords, cudaMemcpyHostToDevice));
      CHECK(cudaMemset(stream.bytes, 0, sizeof(unsigned long long)));
      CHECK(cudaMemset(const_cast<int*>(stream.done), 0, sizeof(int)));
      int streamers_flag = with_streamers;
      void* args[] = {&chain, &stream, &streamers_flag, &chain_ns};
      cudaEvent_t begin, end;
      CHECK(cudaEventCreate(&begin));
      CHECK(cudaEventCreate(&end));
      CHECK(cudaEventRecord(begin));
      CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(run), dim3(sms), dim3(kBlockThreads), args, 0, nullptr));
      CHECK(cudaEventRecord(end));
      CHECK(cudaGetLastError());
      CHECK(cudaEventSynchronize(end));
      float ms = 0.0f;
      CHECK(cudaEventElapsedTime(&ms, begin, end));
      unsigned long long ns = 0, bytes = 0;
      CHECK(cudaMemcpy(&ns, chain_ns, sizeof(ns), cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(&bytes, stream.bytes, sizeof(bytes), cudaMemcpyDeviceToHost));
      if (!chain_row_checks(chain, row0)) return 1;
      steps.push_back(ns / 1e3 / hops);
      bandwidth = std::max(bandwidth, bytes / (ms * 1e-3) / 1e12);  // over the whole launch: a lower bound
      CHECK(cudaEventDestroy(begin));
      CHECK(cudaEventDestroy(end));
    }
    std::sort(steps.begin(), steps.end());
    char label[32];
    if (with_streamers) {
      std::snprintf(label, sizeof(label), "pause %u ns", stream.pause_ns);
    } else {
      std::snprintf(label, sizeof(label), "none");
    }
    std::printf("%-16s %12.2f %15.3f %15.3f\n", label, bandwidth, steps[steps.size() / 2], steps.back());
  }
  return 0;
}
