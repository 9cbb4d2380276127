// The CUDA runtime: the FFI handler of the custom-call target "jax_mpk_megakernel" on the CUDA platform,
// and the process-wide registry of CUDA plans (a compiled megakernel plus its calling convention).
//
//   operands:   the plan's operands, in order (byte sizes as registered)
//   results:    the plan's results, in order (byte sizes as registered; the workspace is simply one of them)
//   attributes: plan_key (string): a plan registered with RegisterCudaPlan in this process
//               watchdog_ms (int64, 1..1e9): how long any task may wait on its event before the call fails
//
// Each call launches the plan's kernel once, cooperatively, with one CTA per worker (by default one per SM):
//
//   extern "C" __global__ void KERNEL_NAME(const jax_mpk::KernelParams<NUM_BUFFERS> p);   // runtime/params.h
//
// p.buffers[] holds the operands, then the results (NUM_BUFFERS of them, at most kMaxBuffers). Event counters and the Control block live in device memory
// and persist across calls (the kernel's epoch protocol, runtime/megakernel.cuh); they are zeroed once when
// the plan is first used on a device and again after a failed call.
//
// Errors found by the kernel (watchdog, index out of range) land in a host-mapped ErrorRecord, written only by
// the CTA that sets Control.abort (runtime/megakernel.cuh, report_failure). The handler does not wait for its
// kernel, so such an error is reported by the NEXT call of the plan on that device, which resets the state and
// does not run, or by CheckCudaError after the caller synchronized.
//
// Calls that XLA captures into a CUDA graph (the handler is kCmdBufferCompatible) capture a memset of the
// counters and Control before the launch, so every replay starts from a zeroed state (epoch 1); they never
// fail for a pending error (XLA would only log the message) but leave it to the next call that is not
// captured, or to CheckCudaError.
//
// Plans that several devices run together (a shard_map body) are called through the target
// "jax_mpk_megakernel_ranks", whose handler XLA never captures into a CUDA graph.
//
// This header needs no CUDA header: module.cc includes it in every build.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jax_mpk {

struct CudaPlanSpec {
  std::string image;          // cubin, fatbin or PTX, as cudaLibraryLoadData takes it
  std::string kernel_name;    // the kernel's symbol: extern "C", so not mangled
  int64_t num_events = 0;     // event counters (uint64 each)
  int64_t threads = 0;        // threads per CTA
  int64_t smem_bytes = 0;     // dynamic shared memory per CTA
  std::vector<int64_t> arg_bytes;  // byte size of each operand
  std::vector<int64_t> ret_bytes;  // byte size of each result
  std::vector<std::pair<int64_t, int64_t>> aliases;  // (operand, result) pairs that must be one buffer
  int64_t num_ctas = 0;       // grid size; 0: the device's SM count
  // Several devices running the plan together (a shard_map body; empty: one device). Device ordinals in rank
  // order, -1 for a rank that another process runs; each rank allocates a communication buffer of
  // 2 * comm_bytes and num_remote_events counters, and every rank's kernel gets every rank's addresses
  // (runtime/params.h, CommParams): another process's through ExportCudaComm / ImportCudaComm (CUDA IPC).
  std::vector<int64_t> rank_devices;
  int64_t comm_bytes = 0;
  int64_t num_remote_events = 0;

  // Everything but the image: the launch and buffers a registered plan's device state was made for.
  bool SameLaunch(const CudaPlanSpec& other) const;
};

// Raised by CheckCudaError for a key that names no CUDA plan.
class UnknownCudaPlanError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Validates `spec` (std::invalid_argument on failure) and stores it under `key`. Nothing touches the GPU here:
// the image is loaded on the plan's first call on each device. Registering an identical spec again keeps the
// existing plan and its device state; a different spec replaces it (device state starts afresh). Device
// resources of a replaced plan are never freed, since captured CUDA graphs may still point at them; such a
// graph keeps running the old kernel until XLA re-captures it, so a key should name its plan's content.
void RegisterCudaPlan(std::string key, CudaPlanSpec spec);

bool HasCudaPlan(std::string_view key);

// For the caller that synchronized the device: the error message of the plan's last failed call on `device`
// (resetting the plan's state there, as the handler would), or nullopt when there is none or the plan never
// ran on that device. Throws UnknownCudaPlanError for an unknown key, std::runtime_error for a CUDA failure.
std::optional<std::string> CheckCudaError(std::string_view key, int device);

// A plan whose ranks run in several processes (rank_devices holds -1): makes its state on `device` now (the
// kernel loaded, the communication buffer allocated) and returns a CUDA IPC handle of that buffer as hex, for
// the other processes' ImportCudaComm. Throws std::invalid_argument for a plan that is not such a plan or a
// device that is not one of its ranks', std::runtime_error for a CUDA failure.
std::string ExportCudaComm(std::string_view key, int device);

// Maps another process's communication buffer of rank `rank` (an ExportCudaComm handle) into `device`'s context,
// for this process's ranks' kernels; once per plan and rank (a second import of a rank is ignored). Throws as
// ExportCudaComm does, and std::invalid_argument for a rank this process runs or a malformed handle.
void ImportCudaComm(std::string_view key, int device, int rank, std::string_view handle_hex);

}  // namespace jax_mpk

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMpkMegakernelCuda);
// The same handler, not command-buffer compatible: the target of plans that several devices run together.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxMpkMegakernelCudaRanks);
