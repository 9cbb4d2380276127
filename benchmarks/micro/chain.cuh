// The dependency chain of chain_under_stream and l2_stage: two CTAs ping-pong `hops` steps, each what a megakernel
// hop and a small task do. Include after jax_mpk/runtime/megakernel.cuh (its acquire load, fence and signal) and
// micro.cuh (the timer and CHECK).
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>

constexpr int kRowWords = 1024;  // a 4 KB row of uint32: what a small task of the chain reads and writes

struct Chain {
  uint64_t* counter;             // steps signalled so far
  uint32_t* rows;                // [hops + 1][kRowWords]: row h is written by step h (row 0 by the host)
  unsigned long long* step_end;  // [hops]: when step h signalled (global timer), or null
  int hops;
};

// Step h of the chain (run by CTA h % 2): thread 0 polls with the megakernel's acquire load until step h - 1 has
// signalled, the block reads the row that step stored (L2 loads, __ldcg, as the bodies read the workspace) and
// stores row h + 1 = row h plus h, then fences and signals (megakernel.cuh's fence_release and add_relaxed).
__device__ void chain_step(const Chain& c, int h) {
  if (threadIdx.x == 0) {
    while (jax_mpk::load_acquire(c.counter) < static_cast<uint64_t>(h)) __nanosleep(16);
  }
  __syncthreads();
  const uint32_t* previous = c.rows + static_cast<int64_t>(h) * kRowWords;
  uint32_t* next = c.rows + static_cast<int64_t>(h + 1) * kRowWords;
  for (int w = threadIdx.x; w < kRowWords; w += jax_mpk::kBlockThreads) {
    next[w] = __ldcg(previous + w) + static_cast<uint32_t>(h);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    jax_mpk::fence_release();
    if (threadIdx.x == 0) {
      jax_mpk::add_relaxed(c.counter, 1);
      if (c.step_end != nullptr) c.step_end[h] = now_ns();
    }
  }
}

// On the host, after a launch: whether the chain's last row is row 0 plus 0 + 1 + ... + (hops - 1) (reports the
// first wrong word).
inline bool chain_row_checks(const Chain& c, const std::vector<uint32_t>& row0) {
  std::vector<uint32_t> last(kRowWords);
  CHECK(cudaMemcpy(last.data(), c.rows + static_cast<int64_t>(c.hops) * kRowWords, sizeof(uint32_t) * kRowWords,
                   cudaMemcpyDeviceToHost));
  const uint32_t added = static_cast<uint32_t>(static_cast<uint64_t>(c.hops) * (c.hops - 1) / 2);
  for (int w = 0; w < kRowWords; ++w) {
    if (last[w] != row0[w] + added) {
      std::fprintf(stderr, "chain row %d: %u, expected %u\n", w, last[w], row0[w] + added);
      return false;
    }
  }
  return true;
}
