// What the host passes to a generated megakernel, shared by the FFI handler (host C++) and the
// generated CUDA source (device). Plain data only, so both compilers agree on the layout.
#pragma once
#include <cstdint>

#include "jax_mpk/layout.h"

namespace jax_mpk {


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

// What every plan's kernel gets besides its buffer addresses; the runtime's device functions take this part.
struct MegakernelParams {
  uint64_t* counters;   // one per event
  Control* control;
  ErrorRecord* error;   // host-mapped
  int64_t watchdog_ns;
  CommParams comm;
};

// The kernel's one parameter, by value: MegakernelParams, then the address of every buffer of the call (its
// operands, then its results; the last result is the workspace), sized for the plan, so that a small plan
// passes a small block. Buffer addresses thus sit in the kernel's parameter (constant) bank, read at constant
// offsets like any operand: no device-side table to fill per call, or to lose from L2 to streamed weights.
// A block beyond the classic 4 KB needs CUDA >= 12.1 (nvcc, and a driver >= R530) on Volta or newer, which
// take up to 32,764 bytes. The host fills the block as bytes: the buffers start right after
// MegakernelParams (checked below, and by the handler against the kernel's own parameter size).
template <int kNumBuffers>
struct KernelParams : MegakernelParams {
  char* buffers[kNumBuffers];
};

inline constexpr int kMaxParamBytes = 32764;
// 4073 buffers. A model passed as one array per weight has ~11 per layer (400 for Qwen3-8B); a KV cache of
// one array per layer adds 4 per layer (keys and values, in and out).
inline constexpr int kMaxBuffers = static_cast<int>((kMaxParamBytes - sizeof(MegakernelParams)) / sizeof(char*));
static_assert(sizeof(MegakernelParams) % alignof(char*) == 0, "buffers follow MegakernelParams without padding");
static_assert(sizeof(KernelParams<kMaxBuffers>) == sizeof(MegakernelParams) + kMaxBuffers * sizeof(char*) &&
                  sizeof(KernelParams<kMaxBuffers>) <= kMaxParamBytes,
              "kernel parameters are limited to 32,764 bytes");

}  // namespace jax_mpk
