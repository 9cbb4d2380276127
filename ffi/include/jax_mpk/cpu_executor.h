// The CPU runtime: the FFI handler of the custom-call target "jax_mpk_megakernel" on the CPU platform.
//
//   operands:   the plan's inputs, in order
//   results:    the plan's outputs, in order, then the workspace, uint8[max(WORKSPACE_BYTES, 1)]
//   attributes: plan_key (string): a plan registered in this process (plan_registry.h)
//               watchdog_ms (int64, 1..1e9): how long any task may wait on its event before the call fails
//
// Each call runs the plan's task graph with one thread per worker list, fresh zeroed event counters and
// epoch 1 (docs/plan_format.md, "Tasks and events").
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMpkMegakernelCpu);
