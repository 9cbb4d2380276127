// What the host passes to a generated megakernel, shared by the FFI handler (host C++) and the
// generated CUDA source (device). Plain data only, so both compilers agree on the layout.
#pragma once
#include <cstdint>

#include "jax_mpk/layout.h"

namespace jax_mpk {

// Buffers are the custom call's operands, then its results (the last one is the workspace). A model passed
// as one array per weight has ~11 per layer (400 for Qwen3-8B); the whole struct is the kernel's parameter
// block, which must stay within the classic 4 KB limit.
inline constexpr int kMaxBuffers = 480;

enum ErrorCode : int32_t {
  kErrorNone = 0,
  kErrorWatchdog = 1,       // a wait exceeded the watchdog time
  kErrorIndexOutOfRange = 2  // a computed element position fell outside its tensor
};

// Written by the kernel into host-mapped memory; the first error wins (atomicCAS on `code`).
struct ErrorRecord {
  int32_t code;
  int32_t task;
  int32_t kernel;
  int32_t event;
  int32_t cta;
  int32_t pad;
  uint64_t counter;
  uint64_t target;
};

// Device-resident state of one plan on one device, persistent across calls (no reset launch):
// event counters only grow; a call with epoch e waits for count * e.
struct Control {
  uint64_t epoch;      // calls completed
  uint64_t ctas_done;  // CTAs that finished, over all calls (gridDim.x per call)
  int32_t abort;       // set by the first failing CTA so that the others stop waiting
  int32_t pad;
};

// The communication buffers of a plan that several devices run together (docs/plan_format.md, COMM tensors):
// every rank's buffer, two halves of `half_bytes` (call e uses half e % 2), and every rank's remote event
// counters; all in device memory that every rank's kernel can reach (peer access).
struct CommParams {
  char* peers[layout::kMaxCudaRanks];
  uint64_t* counters[layout::kMaxCudaRanks];
  int64_t half_bytes;
  int32_t rank;
  int32_t num_ranks;  // 1: no collectives, the rest is unused
};

struct MegakernelParams {
  char* buffers[kMaxBuffers];
  uint64_t* counters;   // one per event
  Control* control;
  ErrorRecord* error;   // host-mapped
  int64_t watchdog_ns;
  CommParams comm;
};
static_assert(sizeof(MegakernelParams) <= 4096, "kernel parameters are limited to 4 KB");

}  // namespace jax_mpk
