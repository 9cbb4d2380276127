// The CPU runtime: the FFI handler of the custom-call target "jax_mpk_megakernel" on the CPU platform.
//
//   operands:   the plan's inputs, in order
//   results:    the plan's outputs, in order, then the workspace, uint8[max(WORKSPACE_BYTES, 1)]
//   attributes: plan_key (string): a plan registered in this process (plan_registry.h)
//               watchdog_ms (int64, 1..1e9): how long any task may wait on its event before the call fails
//
// Each call runs the plan's task graph with one thread per worker list, fresh zeroed event counters and
// epoch 1 (docs/plan_format.md, "Tasks and events").
//
// "jax_mpk_megakernel_processes" (JaxMpkMegakernelCpuProcesses) is the same for a plan whose ranks run in several
// processes, with one more attribute: comm_segment (string), the shared memory its buffers are in (ShareCommGroup).
#pragma once

#include <string>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMpkMegakernelCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMpkMegakernelCpuProcesses);

namespace jax_mpk {

// For a plan of several ranks that run in several processes (a shard_map over devices of several processes,
// jax.distributed): places the plan's communication buffers and remote event counters in the POSIX shared-memory
// segment `segment` ("/name"), created by whichever process comes first, for the calls that name it
// (comm_segment). Each process calls it before its ranks' first call, with the same name; the name can be
// unlinked once all have. `plan_key` must name a registered CPU plan of several ranks
// (std::invalid_argument); std::runtime_error when the segment cannot be mapped.
void ShareCommGroup(const std::string& plan_key, const std::string& segment);

}  // namespace jax_mpk
