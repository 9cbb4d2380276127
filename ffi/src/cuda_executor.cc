// The CUDA FFI handler: plans registered from Python (cubin, kernel name, buffer count), their device state
// (created on a device's first call and kept for CUDA-graph replays), the cooperative launch, the
// communication buffers of a shard_map's ranks, and the error record the kernel leaves (watchdog, bad task).
// Over 600 lines because these share one lifetime and one lock per plan; splitting them would spread that
// protocol over files.
#include "jax_mpk/cuda_executor.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "jax_mpk/runtime/params.h"
#include "jax_mpk/str_cat.h"

namespace ffi = xla::ffi;

namespace jax_mpk {

bool CudaPlanSpec::SameLaunch(const CudaPlanSpec& other) const {
  return kernel_name == other.kernel_name && num_events == other.num_events &&
         threads == other.threads && smem_bytes == other.smem_bytes && arg_bytes == other.arg_bytes &&
         ret_bytes == other.ret_bytes && aliases == other.aliases && num_ctas == other.num_ctas &&
         rank_devices == other.rank_devices && comm_bytes == other.comm_bytes &&
         num_remote_events == other.num_remote_events;
}

namespace {

size_t NumBuffers(const CudaPlanSpec& spec) { return spec.arg_bytes.size() + spec.ret_bytes.size(); }

// The size of the plan kernel's parameter, KernelParams<NumBuffers(spec)>.
size_t ParamsBytes(const CudaPlanSpec& spec) { return sizeof(MegakernelParams) + NumBuffers(spec) * sizeof(char*); }

// About 11 days, as on CPU: any longer wait is a hang, and the bound keeps watchdog_ns from overflowing.
constexpr int64_t kMaxWatchdogMs = 1'000'000'000;
constexpr int64_t kMaxThreadsPerCta = 1024;
constexpr int64_t kMaxSmemBytes = int64_t{1} << 30;     // far above any GPU's; the device check is exact
constexpr int64_t kMaxEvents = int64_t{1} << 31;
constexpr int64_t kMaxCtas = int64_t{1} << 20;
constexpr int64_t kMaxBufferBytes = int64_t{1} << 50;

std::string CudaStatusText(cudaError_t status) {
  return StrCat(cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

ffi::Error CudaFailure(cudaError_t status, const std::string& what) {
  return ffi::Error::Internal(StrCat("jax_mpk: ", what, " failed (", CudaStatusText(status), ")"));
}

// `what` is only built on failure.
#define JAX_MPK_RETURN_IF_CUDA_ERROR(expr, what)                                  \
  do {                                                                             \
    const cudaError_t jax_mpk_status_ = (expr);                                    \
    if (jax_mpk_status_ != cudaSuccess) return CudaFailure(jax_mpk_status_, what); \
  } while (0)
// The same, in a function that returns ffi::ErrorOr<T>.
#define JAX_MPK_RETURN_UNEXPECTED_IF_CUDA_ERROR(expr, what)                                     \
  do {                                                                                           \
    const cudaError_t jax_mpk_status_ = (expr);                                                  \
    if (jax_mpk_status_ != cudaSuccess) return ffi::Unexpected(CudaFailure(jax_mpk_status_, what)); \
  } while (0)

// Device-resident state of one plan on one device (runtime/params.h). Created on the plan's first call on the
// device and never freed: a CUDA graph captured from a call keeps pointing at it.
struct DeviceState {
  std::mutex mutex;  // serializes the handler's calls on this device with CheckCudaError
  int device = 0;
  unsigned grid = 0;
  char* block = nullptr;       // counters, then Control: one allocation, so that one memset resets both
  size_t block_bytes = 0;
  uint64_t* counters = nullptr;
  Control* control = nullptr;
  ErrorRecord* error_host = nullptr;    // host-mapped
  ErrorRecord* error_device = nullptr;  // its device address
  cudaStream_t side_stream = nullptr;   // ours, non-blocking: zeroing outside XLA's stream
  // Several ranks: this device's rank and communication buffer (two halves, then the remote counters).
  int rank = 0;
  char* comm = nullptr;
  size_t comm_block_bytes = 0;
  int64_t last_watchdog_ms = 0;         // of the last launch, for the watchdog message
  // The kernel's parameter block (runtime/params.h, KernelParams): MegakernelParams, then the buffer
  // addresses; filled by every call under `mutex`, and copied by the launch.
  std::vector<uint64_t> params_block;
  // Kernel errors taken from the record but not reported yet (a call being captured cannot report them).
  std::string unreported;
  ffi::ErrorCode unreported_code = ffi::ErrorCode::kOk;
};

struct CudaPlan {
  CudaPlan(std::string key, CudaPlanSpec spec) : key(std::move(key)), spec(std::move(spec)) {}

  const std::string key;
  const CudaPlanSpec spec;
  std::mutex mutex;  // guards library, kernel and states
  cudaLibrary_t library = nullptr;  // loaded on first use, shared by all devices, never unloaded
  cudaKernel_t kernel = nullptr;
  std::map<int, std::unique_ptr<DeviceState>> states;  // by device ordinal
  // Several ranks: every rank's communication buffer and remote counters, filled in as each device creates
  // its state (a rank's first call waits until all are there).
  std::vector<char*> comm_peers;
  std::vector<uint64_t*> comm_counters;
  int comm_registered = 0;
  std::condition_variable comm_ready;
  // Ranks in several processes: a failed call cannot be restarted in step with the other processes' ranks
  // (ranks of one process reset together), so the plan refuses every later call in this process.
  std::atomic<bool> failed_across_processes{false};
};

bool SpansProcesses(const CudaPlanSpec& spec) {
  return std::any_of(spec.rank_devices.begin(), spec.rank_devices.end(), [](int64_t d) { return d < 0; });
}

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<CudaPlan>, std::less<>> plans;
};

Registry& GlobalRegistry() {
  static auto* registry = new Registry();  // never destroyed: handlers may run during interpreter exit
  return *registry;
}

std::shared_ptr<CudaPlan> FindCudaPlan(std::string_view key) {
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  const auto found = registry.plans.find(key);
  return found == registry.plans.end() ? nullptr : found->second;
}

// Makes `device` current for this scope. XLA calls the handler with its device already current, so this
// normally costs one cudaGetDevice.
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (changed_) cudaSetDevice(previous_);
  }

  cudaError_t Enter(int device) {
    cudaError_t status = cudaGetDevice(&previous_);
    if (status != cudaSuccess || previous_ == device) return status;
    status = cudaSetDevice(device);
    changed_ = status == cudaSuccess;
    return status;
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// While this thread captures a stream into a CUDA graph, CUDA refuses "unsafe" calls (cudaMalloc, module
// loading, ...) unless the thread's capture mode is relaxed. None of the calls made in this scope enqueue
// work on the capturing stream, so they stay out of the graph.
class ScopedRelaxedCapture {
 public:
  explicit ScopedRelaxedCapture(bool capturing) : active_(capturing) {
    if (active_) cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  ~ScopedRelaxedCapture() {
    if (active_) cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  ScopedRelaxedCapture(const ScopedRelaxedCapture&) = delete;
  ScopedRelaxedCapture& operator=(const ScopedRelaxedCapture&) = delete;

 private:
  const bool active_;
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Loads the plan's image and finds its kernel, once per process. Caller holds plan.mutex.
ffi::Error LoadKernel(CudaPlan& plan) {
  if (plan.kernel) return ffi::Error::Success();
  cudaLibrary_t library = nullptr;
  // std::string keeps a NUL after the bytes, so a PTX image is NUL-terminated as CUDA requires.
  JAX_MPK_RETURN_IF_CUDA_ERROR(
      cudaLibraryLoadData(&library, plan.spec.image.c_str(), nullptr, nullptr, 0, nullptr, nullptr, 0),
      StrCat("loading the megakernel image of plan '", plan.key, "' (", plan.spec.image.size(),
             " bytes; cudaLibraryLoadData)"));
  cudaKernel_t kernel = nullptr;
  // With lazy module loading (CUDA's default) an invalid image is only found here.
  const cudaError_t status = cudaLibraryGetKernel(&kernel, library, plan.spec.kernel_name.c_str());
  if (status != cudaSuccess) {
    cudaLibraryUnload(library);
    return CudaFailure(status, StrCat("loading kernel '", plan.spec.kernel_name, "' from the megakernel image of plan '",
                                      plan.key, "' (", plan.spec.image.size(),
                                      " bytes; cudaLibraryGetKernel; the kernel must be declared extern \"C\")"));
  }
  plan.library = library;
  plan.kernel = kernel;
  return ffi::Error::Success();
}

ffi::Error DeviceAttribute(int* value, cudaDeviceAttr attribute, int device, const char* name) {
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(value, attribute, device),
                               StrCat("cudaDeviceGetAttribute(", name, ") on device ", device));
  return ffi::Error::Success();
}

// Frees what a failed CreateState allocated.
void ReleasePartialState(DeviceState& state) {
  if (state.comm) cudaFree(state.comm);
  if (state.side_stream) cudaStreamDestroy(state.side_stream);
  if (state.error_host) cudaFreeHost(state.error_host);
  if (state.block) cudaFree(state.block);
}

ffi::Error AllocateState(const CudaPlan& plan, DeviceState& state) {
  const std::string where = StrCat(" for plan '", plan.key, "' on device ", state.device);
  const size_t counter_bytes = static_cast<size_t>(std::max<int64_t>(plan.spec.num_events, 1)) * sizeof(uint64_t);
  static_assert(alignof(Control) <= sizeof(uint64_t), "Control follows the counters");
  state.block_bytes = counter_bytes + sizeof(Control);
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&state.block), state.block_bytes),
                               StrCat("cudaMalloc of ", state.block_bytes, " bytes of event counters and control",
                                      where));
  state.counters = reinterpret_cast<uint64_t*>(state.block);
  state.control = reinterpret_cast<Control*>(state.block + counter_bytes);
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaHostAlloc(reinterpret_cast<void**>(&state.error_host), sizeof(ErrorRecord),
                                             cudaHostAllocMapped | cudaHostAllocPortable),
                               StrCat("cudaHostAlloc of the error record", where));
  std::memset(state.error_host, 0, sizeof(ErrorRecord));
  JAX_MPK_RETURN_IF_CUDA_ERROR(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&state.error_device), state.error_host, 0),
      StrCat("cudaHostGetDevicePointer of the error record", where));
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&state.side_stream, cudaStreamNonBlocking),
                               StrCat("cudaStreamCreateWithFlags", where));
  // Zeroed on our own stream and waited for, so this works while XLA's stream is being captured and is done
  // before the first launch is enqueued.
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(state.block, 0, state.block_bytes, state.side_stream),
                               StrCat("zeroing the event counters and control", where));
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(state.side_stream), StrCat("cudaStreamSynchronize", where));
  const CudaPlanSpec& spec = plan.spec;
  if (spec.rank_devices.empty()) return ffi::Error::Success();
  // Several ranks: the kernels of the other devices read this buffer and these counters directly.
  const int64_t num_ranks = static_cast<int64_t>(spec.rank_devices.size());
  state.rank = static_cast<int>(std::find(spec.rank_devices.begin(), spec.rank_devices.end(), state.device) -
                                spec.rank_devices.begin());
  if (state.rank == num_ranks) {
    std::string devices;
    for (const int64_t d : spec.rank_devices) devices += StrCat(devices.empty() ? "" : ", ", d);
    return ffi::Error::InvalidArgument(StrCat("jax_mpk: device ", state.device, " is not one of the devices of plan '",
                                              plan.key, "' (a shard_map over devices ", devices, ")"));
  }
  for (const int64_t peer : spec.rank_devices) {
    if (peer == state.device || peer < 0) continue;  // another process's rank: mapped by ImportCudaComm
    int can_access = 0;
    JAX_MPK_RETURN_IF_CUDA_ERROR(cudaDeviceCanAccessPeer(&can_access, state.device, static_cast<int>(peer)),
                                 StrCat("cudaDeviceCanAccessPeer(", state.device, ", ", peer, ")"));
    if (!can_access) {
      return ffi::Error(ffi::ErrorCode::kUnimplemented,
                        StrCat("jax_mpk: device ", state.device, " cannot access the memory of device ", peer,
                               ", which the collectives of plan '", plan.key, "' need (peer access)"));
    }
    const cudaError_t status = cudaDeviceEnablePeerAccess(static_cast<int>(peer), 0);  // XLA has usually done it
    if (status == cudaErrorPeerAccessAlreadyEnabled) {
      cudaGetLastError();
    } else if (status != cudaSuccess) {
      return CudaFailure(status, StrCat("cudaDeviceEnablePeerAccess(", peer, ")", where));
    }
  }
  state.comm_block_bytes = static_cast<size_t>(2 * spec.comm_bytes + 8 * spec.num_remote_events);
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMalloc(reinterpret_cast<void**>(&state.comm), std::max<size_t>(state.comm_block_bytes, 8)),
                               StrCat("cudaMalloc of ", state.comm_block_bytes, " bytes of communication buffer", where));
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(state.comm, 0, state.comm_block_bytes, state.side_stream),
                               StrCat("zeroing the communication buffer", where));
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(state.side_stream), StrCat("cudaStreamSynchronize", where));
  return ffi::Error::Success();
}

// Publishes rank `rank`'s communication buffer (this process's, or another's mapped by ImportCudaComm) to the
// plan's ranks in this process. Caller holds plan.mutex.
void RegisterComm(CudaPlan& plan, int rank, char* comm) {
  const size_t num_ranks = plan.spec.rank_devices.size();
  if (num_ranks == 0) return;
  plan.comm_peers.resize(num_ranks, nullptr);
  plan.comm_counters.resize(num_ranks, nullptr);
  plan.comm_peers[rank] = comm;
  plan.comm_counters[rank] = reinterpret_cast<uint64_t*>(comm + 2 * plan.spec.comm_bytes);
  ++plan.comm_registered;
  plan.comm_ready.notify_all();
}

// Fills params.comm once every rank has its buffer; waits up to `timeout` for the other ranks' first calls.
ffi::Error BindComm(CudaPlan& plan, const DeviceState& state, std::chrono::milliseconds timeout,
                    MegakernelParams& params) {
  const int num_ranks = static_cast<int>(plan.spec.rank_devices.size());
  params.comm.num_ranks = std::max(num_ranks, 1);
  if (num_ranks == 0) return ffi::Error::Success();
  std::unique_lock<std::mutex> lock(plan.mutex);
  if (!plan.comm_ready.wait_for(lock, timeout, [&] { return plan.comm_registered == num_ranks; })) {
    return ffi::Error(ffi::ErrorCode::kDeadlineExceeded,
                      StrCat("jax_mpk watchdog: device ", state.device, " (rank ", state.rank, " of plan '", plan.key,
                             "') waited more than ", timeout.count(), " ms for the other ranks' first call (",
                             plan.comm_registered, " of ", num_ranks,
                             " ranks arrived; does every device of the mesh call the plan?)"));
  }
  for (int r = 0; r < num_ranks; ++r) {
    params.comm.peers[r] = plan.comm_peers[r];
    params.comm.counters[r] = plan.comm_counters[r];
  }
  params.comm.half_bytes = plan.spec.comm_bytes;
  params.comm.rank = state.rank;
  return ffi::Error::Success();
}

// Loads the kernel on `device` (current), checks that a cooperative grid of it fits, and allocates the
// device state. Caller holds plan.mutex.
ffi::ErrorOr<std::unique_ptr<DeviceState>> CreateState(CudaPlan& plan, int device) {
  const CudaPlanSpec& spec = plan.spec;
  if (ffi::Error error = LoadKernel(plan); error.failure()) return ffi::Unexpected(std::move(error));
  const void* kernel = reinterpret_cast<const void*>(plan.kernel);  // the runtime API takes cudaKernel_t so

  int sm_count = 0, cooperative = 0, smem_optin = 0, major = 0, minor = 0;
  for (ffi::Error error :
       {DeviceAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device, "MultiProcessorCount"),
        DeviceAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device, "CooperativeLaunch"),
        DeviceAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device, "MaxSharedMemoryPerBlockOptin"),
        DeviceAttribute(&major, cudaDevAttrComputeCapabilityMajor, device, "ComputeCapabilityMajor"),
        DeviceAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device, "ComputeCapabilityMinor")}) {
    if (error.failure()) return ffi::Unexpected(std::move(error));
  }
  const std::string what = StrCat("kernel '", spec.kernel_name, "' of plan '", plan.key, "' on device ", device,
                                  " (sm_", major, minor, ", ", sm_count, " SMs)");
  if (!cooperative) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kUnimplemented,
                                      StrCat("jax_mpk: ", what, ": the device does not support cooperative launches")));
  }

  // Also loads the image into this device's context, so that no later launch (perhaps being captured into
  // a CUDA graph) has to.
  cudaFuncAttributes attributes{};
  {
    const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
    if (status != cudaSuccess) {
      return ffi::Unexpected(CudaFailure(
          status, StrCat("preparing ", what,
                         status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidKernelImage
                             ? " (was the image compiled for this GPU's architecture?)"
                             : "",
                         "; cudaFuncGetAttributes")));
    }
  }

  // The kernel must take exactly one parameter, a KernelParams<buffers of the plan> by value. Older drivers
  // may not answer: then this check is skipped.
  size_t param_offset = 0, param_size = 0;
  if (cudaFuncGetParamInfo(kernel, 0, &param_offset, &param_size) == cudaSuccess) {
    size_t extra_offset = 0, extra_size = 0;
    const bool has_more = cudaFuncGetParamInfo(kernel, 1, &extra_offset, &extra_size) == cudaSuccess;
    if (param_size != ParamsBytes(spec) || has_more) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          StrCat("jax_mpk: ", what, " must take exactly one parameter, `const jax_mpk::KernelParams<",
                 NumBuffers(spec), ">` (", ParamsBytes(spec), " bytes) by value; its first parameter has ",
                 param_size, " bytes", has_more ? " and it has more than one" : "")));
    }
  }
  cudaGetLastError();  // a refused parameter query is not an error of ours

  const std::string resources =
      StrCat(spec.threads, " threads, ", spec.smem_bytes, " bytes of dynamic and ", attributes.sharedSizeBytes,
             " bytes of static shared memory, ", attributes.numRegs, " registers per thread");
  if (spec.threads > attributes.maxThreadsPerBlock) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        StrCat("jax_mpk: ", what, " cannot run a CTA of ", resources, ": at most ", attributes.maxThreadsPerBlock,
               " threads per CTA fit (registers or __launch_bounds__)")));
  }
  if (static_cast<int64_t>(attributes.sharedSizeBytes) + spec.smem_bytes > smem_optin) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        StrCat("jax_mpk: ", what, " cannot run a CTA of ", resources, ": a CTA may use at most ", smem_optin,
               " bytes of shared memory on this device")));
  }
  if (spec.smem_bytes > 0) {  // beyond 48 KiB (static included) a kernel must opt in; harmless below
    JAX_MPK_RETURN_UNEXPECTED_IF_CUDA_ERROR(
        cudaKernelSetAttributeForDevice(plan.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(spec.smem_bytes), device),
        StrCat("allowing ", spec.smem_bytes, " bytes of dynamic shared memory for ", what,
               " (cudaKernelSetAttributeForDevice)"));
  }
  int ctas_per_sm = 0;
  JAX_MPK_RETURN_UNEXPECTED_IF_CUDA_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas_per_sm, kernel, static_cast<int>(spec.threads),
                                                    static_cast<size_t>(spec.smem_bytes)),
      StrCat("the occupancy query of ", what));
  if (ctas_per_sm < 1) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kResourceExhausted,
                                      StrCat("jax_mpk: ", what, ": not one CTA of ", resources, " fits on an SM")));
  }
  const int64_t grid = spec.num_ctas > 0 ? spec.num_ctas : sm_count;
  if (grid > static_cast<int64_t>(ctas_per_sm) * sm_count) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        StrCat("jax_mpk: ", what, ": the plan needs ", grid, " co-resident CTAs, but only ", ctas_per_sm,
               " per SM fit (", resources, ")")));
  }

  auto state = std::make_unique<DeviceState>();
  state->device = device;
  state->grid = static_cast<unsigned>(grid);
  state->params_block.assign(ParamsBytes(spec) / sizeof(uint64_t), 0);
  if (ffi::Error error = AllocateState(plan, *state); error.failure()) {
    ReleasePartialState(*state);
    return ffi::Unexpected(std::move(error));
  }
  return state;
}

ffi::ErrorOr<DeviceState*> GetOrCreateState(CudaPlan& plan, int device, bool capturing) {
  std::lock_guard<std::mutex> lock(plan.mutex);
  if (const auto found = plan.states.find(device); found != plan.states.end()) return found->second.get();
  const ScopedRelaxedCapture relaxed(capturing);
  ffi::ErrorOr<std::unique_ptr<DeviceState>> state = CreateState(plan, device);
  if (!state) return ffi::Unexpected(state.error());
  DeviceState* created = state->get();
  plan.states.emplace(device, std::move(*state));
  RegisterComm(plan, created->rank, created->comm);
  return created;
}

// A copy of the record the kernel wrote, read after its code (the kernel writes the code last).
ErrorRecord ReadErrorRecord(const ErrorRecord* record) {
  const volatile ErrorRecord* shared = record;
  ErrorRecord copy{};
  copy.code = shared->code;
  if (copy.code == kErrorNone) return copy;
  std::atomic_thread_fence(std::memory_order_acquire);
  copy.task = shared->task;
  copy.kernel = shared->kernel;
  copy.event = shared->event;
  copy.cta = shared->cta;
  copy.counter = shared->counter;
  copy.target = shared->target;
  return copy;
}

// kErrorIndexOutOfRange records: event = the tensor, counter = the element position, target = its size.
std::string DescribeKernelError(const ErrorRecord& record, const DeviceState& state) {
  switch (record.code) {
    case kErrorWatchdog:
      return StrCat("jax_mpk watchdog: task ", record.task, " (kernel ", record.kernel, ") waited more than ",
                    state.last_watchdog_ms, " ms on event ", record.event, ": counter ", record.counter,
                    ", target ", record.target, " (CTA ", record.cta, " on device ", state.device, ")");
    case kErrorIndexOutOfRange:
      return StrCat("jax_mpk: task ", record.task, " (kernel ", record.kernel,
                    ") failed: a computed element position is outside its tensor (tensor ", record.event,
                    ", position ", record.counter, ", size ", record.target, "; CTA ", record.cta, " on device ",
                    state.device, ")");
    default:
      return StrCat("jax_mpk: the megakernel reported error code ", record.code, " in task ", record.task,
                    " (kernel ", record.kernel, "; event ", record.event, ", counter ", record.counter,
                    ", target ", record.target, "; CTA ", record.cta, " on device ", state.device, ")");
  }
}

ffi::ErrorCode FfiCodeOf(int32_t code) {
  return code == kErrorWatchdog ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kInternal;
}

// Moves an error out of the record into state.unreported. Only the CTA that sets Control.abort writes the
// record (fields first, code last), and only a reset clears abort, so no kernel writes the record again before
// the reset that follows: clearing the code here races with nothing. The exception is a CUDA graph replayed
// meanwhile, whose captured reset re-arms abort: an error it writes while the host clears the code may be lost.
void TakeRecord(DeviceState& state) {
  const ErrorRecord record = ReadErrorRecord(state.error_host);
  if (record.code == kErrorNone) return;
  reinterpret_cast<volatile ErrorRecord*>(state.error_host)->code = kErrorNone;
  const std::string message = DescribeKernelError(record, state);
  if (state.unreported.empty()) {
    state.unreported = message;
    state.unreported_code = FfiCodeOf(record.code);
  } else {
    state.unreported += StrCat("; later: ", message);
  }
}

// The handler's check of the errors previous calls' kernels left. When not capturing and there is one, enqueues
// the reset of the counters and Control on `stream` (after the kernel that failed and any launched on its state
// since) and returns the error: this call does not run. While XLA captures the call into a CUDA graph, an error
// return would only be logged by XLA, which then fails the execution with an unrelated message; the captured
// launch is preceded by a reset anyway (MegakernelCuda), so the call runs and the message waits for the next
// call that is not captured, or for CheckCudaError. Caller holds state.mutex.
ffi::Error TakeDeferredError(CudaPlan& plan, DeviceState& state, cudaStream_t stream, bool capturing) {
  TakeRecord(state);
  if (capturing || state.unreported.empty()) return ffi::Error::Success();
  if (SpansProcesses(plan.spec)) {
    plan.failed_across_processes = true;
    std::string message = std::exchange(state.unreported, std::string());
    return ffi::Error(state.unreported_code,
                      StrCat(message, ". Reported by a later call of plan '", plan.key, "', which did not run; its ranks "
                             "run in several processes, which cannot restart in step, so this process refuses its "
                             "later calls (restart the processes)"));
  }
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(state.block, 0, state.block_bytes, stream),
                               "resetting the event counters and control after a failed call");
  if (state.comm) {  // epochs restart at 1: so do this rank's remote counters (the other ranks failed as well)
    JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(state.comm, 0, state.comm_block_bytes, stream),
                                 "resetting the communication buffer after a failed call");
  }
  std::string message = std::exchange(state.unreported, std::string());
  return ffi::Error(state.unreported_code,
                    StrCat(message, ". Reported by a later call of plan '", plan.key,
                           "', which did not run; the plan's state on this device is reset"));
}

// Checks the buffers XLA passed against the plan and writes their addresses into `buffers` (operands, then
// results).
ffi::Error BindBuffers(const CudaPlan& plan, const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                       char** buffers) {
  const CudaPlanSpec& spec = plan.spec;
  if (args.size() != spec.arg_bytes.size() || rets.size() != spec.ret_bytes.size()) {
    return ffi::Error::InvalidArgument(StrCat("jax_mpk: the call has ", args.size(), " operands and ", rets.size(),
                                              " results; plan '", plan.key, "' takes ", spec.arg_bytes.size(),
                                              " operands and ", spec.ret_bytes.size(), " results"));
  }
  const size_t num_args = args.size();
  for (size_t i = 0; i < num_args; ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
    if (!buffer) return buffer.error();
    if (buffer->size_bytes() != static_cast<size_t>(spec.arg_bytes[i])) {
      return ffi::Error::InvalidArgument(StrCat("jax_mpk: operand ", i, " has ", buffer->size_bytes(),
                                                " bytes, but plan '", plan.key, "' expects ", spec.arg_bytes[i]));
    }
    buffers[i] = static_cast<char*>(buffer->untyped_data());
  }
  for (size_t o = 0; o < rets.size(); ++o) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> result = rets.get<ffi::AnyBuffer>(o);
    if (!result) return result.error();
    const ffi::AnyBuffer buffer = **result;
    if (buffer.size_bytes() != static_cast<size_t>(spec.ret_bytes[o])) {
      return ffi::Error::InvalidArgument(StrCat("jax_mpk: result ", o, " has ", buffer.size_bytes(),
                                                " bytes, but plan '", plan.key, "' expects ", spec.ret_bytes[o]));
    }
    buffers[num_args + o] = static_cast<char*>(buffer.untyped_data());
  }
  for (const auto& [input, output] : spec.aliases) {
    if (spec.arg_bytes[input] != 0 && buffers[input] != buffers[num_args + output]) {
      return ffi::Error::InvalidArgument(StrCat("jax_mpk: operand ", input, " and result ", output,
                                                " must be one buffer (input_output_aliases), but XLA passed two"));
    }
  }
  return ffi::Error::Success();
}

// Launches the kernel with the parameter block in state.params_block (whose size the kernel's image knows).
ffi::Error Launch(const CudaPlan& plan, DeviceState& state, cudaStream_t stream) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeCooperative;  // all CTAs co-resident: they wait on each other
  attribute.val.cooperative = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(state.grid);
  config.blockDim = dim3(static_cast<unsigned>(plan.spec.threads));
  config.dynamicSmemBytes = static_cast<size_t>(plan.spec.smem_bytes);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  void* kernel_args[] = {state.params_block.data()};
  cudaGetLastError();  // errors of earlier calls were reported by them
  cudaError_t status = cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(plan.kernel), kernel_args);
  if (status == cudaSuccess) status = cudaGetLastError();
  if (status == cudaSuccess) return ffi::Error::Success();
  return CudaFailure(status, StrCat("launching kernel '", plan.spec.kernel_name, "' of plan '", plan.key,
                                    "' on device ", state.device, " (", state.grid, " CTAs of ", plan.spec.threads,
                                    " threads, ", plan.spec.smem_bytes, " bytes of dynamic shared memory)"));
}

ffi::Error MegakernelCuda(cudaStream_t stream, int32_t device, ffi::RemainingArgs args, ffi::RemainingRets rets,
                          std::string_view plan_key, int64_t watchdog_ms) {
  const std::shared_ptr<CudaPlan> plan = FindCudaPlan(plan_key);
  if (!plan) {
    return ffi::Error(ffi::ErrorCode::kNotFound,
                      StrCat("jax_mpk: CUDA plan not registered in this process: '", plan_key, "'"));
  }
  if (watchdog_ms < 1 || watchdog_ms > kMaxWatchdogMs) {
    return ffi::Error::InvalidArgument(
        StrCat("jax_mpk: watchdog_ms = ", watchdog_ms, " is not in [1, ", kMaxWatchdogMs, "]"));
  }
  ScopedDevice scoped_device;
  JAX_MPK_RETURN_IF_CUDA_ERROR(scoped_device.Enter(device), StrCat("making device ", device, " current"));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  JAX_MPK_RETURN_IF_CUDA_ERROR(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  if (capturing && !plan->spec.rank_devices.empty()) {
    // A replay restarts at epoch 1 (the captured reset), which the other ranks' counters do not follow.
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      StrCat("jax_mpk: plan '", plan_key, "' runs on several devices and cannot be captured into a "
                             "CUDA graph (call it through the target jax_mpk_megakernel_ranks)"));
  }

  ffi::ErrorOr<DeviceState*> found = GetOrCreateState(*plan, device, capturing);
  if (!found) return found.error();
  DeviceState& state = **found;
  std::lock_guard<std::mutex> lock(state.mutex);
  if (plan->failed_across_processes) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      StrCat("jax_mpk: an earlier call of plan '", plan_key, "' failed, and its ranks run in several "
                             "processes, which cannot restart in step: restart the processes"));
  }
  if (ffi::Error error = TakeDeferredError(*plan, state, stream, capturing); error.failure()) return error;

  MegakernelParams params{};
  char** buffers = reinterpret_cast<char**>(state.params_block.data()) + sizeof(MegakernelParams) / sizeof(char*);
  if (ffi::Error error = BindBuffers(*plan, args, rets, buffers); error.failure()) return error;
  params.counters = state.counters;
  params.control = state.control;
  params.error = state.error_device;
  params.watchdog_ns = watchdog_ms * 1'000'000;
  if (ffi::Error error = BindComm(*plan, state, std::chrono::milliseconds(watchdog_ms), params); error.failure()) {
    return error;
  }
  if (capturing) {
    // A graph replays this launch without this function, so no host check can reset a state that a failed
    // call left; and XLA updates a re-captured graph in place, which CUDA allows only if every capture has the
    // same nodes. So every captured launch comes with the same reset: each replay starts from zeroed counters
    // and Control (epoch 1). One small memset node; calls that are not captured do no device work but the
    // launch.
    JAX_MPK_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(state.block, 0, state.block_bytes, stream),
                                 "capturing the reset of the event counters and control");
  }
  std::memcpy(state.params_block.data(), &params, sizeof(params));
  if (ffi::Error error = Launch(*plan, state, stream); error.failure()) return error;
  state.last_watchdog_ms = watchdog_ms;
  return ffi::Error::Success();
}

void CheckSpec(const CudaPlanSpec& spec) {
  auto fail = [](const std::string& message) { throw std::invalid_argument("jax_mpk: register_cuda_plan: " + message); };
  if (spec.image.empty()) fail("the kernel image is empty");
  if (spec.kernel_name.empty() || spec.kernel_name.find('\0') != std::string::npos) {
    fail("kernel_name must be a non-empty name without NUL characters");
  }
  if (spec.num_events < 0 || spec.num_events > kMaxEvents) {
    fail(StrCat("num_events = ", spec.num_events, " is not in [0, ", kMaxEvents, "]"));
  }
  if (spec.threads < 1 || spec.threads > kMaxThreadsPerCta) {
    fail(StrCat("threads = ", spec.threads, " is not in [1, ", kMaxThreadsPerCta, "]"));
  }
  if (spec.smem_bytes < 0 || spec.smem_bytes > kMaxSmemBytes) {
    fail(StrCat("smem_bytes = ", spec.smem_bytes, " is not in [0, ", kMaxSmemBytes, "]"));
  }
  if (spec.num_ctas < 0 || spec.num_ctas > kMaxCtas) {
    fail(StrCat("num_ctas = ", spec.num_ctas, " is not in [0, ", kMaxCtas, "] (0: one CTA per SM)"));
  }
  if (spec.rank_devices.size() == 1 || spec.rank_devices.size() > static_cast<size_t>(layout::kMaxCudaRanks)) {
    fail(StrCat(spec.rank_devices.size(), " rank devices: a plan runs on one device (none listed) or on 2 to ",
                layout::kMaxCudaRanks, " (MAX_CUDA_RANKS in jax_mpk/layout.py)"));
  }
  for (size_t r = 0; r < spec.rank_devices.size(); ++r) {
    const int64_t device = spec.rank_devices[r];
    if (device < -1) fail(StrCat("rank ", r, "'s device ", device, " is neither an ordinal nor -1 (another process)"));
    if (device >= 0 && std::count(spec.rank_devices.begin(), spec.rank_devices.end(), device) != 1) {
      fail(StrCat("device ", device, " is listed for more than one rank"));
    }
  }
  if (!spec.rank_devices.empty() &&
      std::none_of(spec.rank_devices.begin(), spec.rank_devices.end(), [](int64_t d) { return d >= 0; })) {
    fail("every rank is another process's (-1): this process runs none of the plan's ranks");
  }
  if (spec.comm_bytes < 0 || spec.comm_bytes > kMaxBufferBytes || spec.num_remote_events < 0 ||
      spec.num_remote_events > kMaxEvents) {
    fail(StrCat("comm_bytes = ", spec.comm_bytes, " or num_remote_events = ", spec.num_remote_events,
                " is out of range"));
  }
  if (NumBuffers(spec) > static_cast<size_t>(kMaxBuffers)) {
    fail(StrCat(spec.arg_bytes.size(), " operands and ", spec.ret_bytes.size(), " results make ", NumBuffers(spec),
                " buffers; a megakernel takes at most ", kMaxBuffers,
                " (its kernel parameters hold their addresses: kMaxBuffers in runtime/params.h)"));
  }
  for (size_t i = 0; i < spec.arg_bytes.size(); ++i) {
    if (spec.arg_bytes[i] < 0 || spec.arg_bytes[i] > kMaxBufferBytes) {
      fail(StrCat("arg_bytes[", i, "] = ", spec.arg_bytes[i], " is not a byte size"));
    }
  }
  for (size_t o = 0; o < spec.ret_bytes.size(); ++o) {
    if (spec.ret_bytes[o] < 0 || spec.ret_bytes[o] > kMaxBufferBytes) {
      fail(StrCat("ret_bytes[", o, "] = ", spec.ret_bytes[o], " is not a byte size"));
    }
  }
  for (const auto& [input, output] : spec.aliases) {
    if (input < 0 || input >= static_cast<int64_t>(spec.arg_bytes.size()) || output < 0 ||
        output >= static_cast<int64_t>(spec.ret_bytes.size())) {
      fail(StrCat("alias (", input, ", ", output, ") names no operand and result (", spec.arg_bytes.size(),
                  " operands, ", spec.ret_bytes.size(), " results)"));
    }
    if (spec.arg_bytes[input] != spec.ret_bytes[output]) {
      fail(StrCat("alias (", input, ", ", output, ") joins buffers of ", spec.arg_bytes[input], " and ",
                  spec.ret_bytes[output], " bytes"));
    }
  }
}

}  // namespace

void RegisterCudaPlan(std::string key, CudaPlanSpec spec) {
  CheckSpec(spec);
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  std::shared_ptr<CudaPlan>& slot = registry.plans[key];
  // The same key and launch: keep the loaded kernel and device state. The image may differ and still be the same
  // program: nvcc embeds its build directory in the line info, so a cubin compiled by another process (read back
  // from the shared cache) differs in those bytes.
  if (slot && slot->spec.SameLaunch(spec)) return;
  if (slot && SpansProcesses(slot->spec)) {
    std::lock_guard<std::mutex> plan_lock(slot->mutex);
    if (!slot->states.empty()) {
      throw std::invalid_argument(StrCat(
          "jax_mpk: register_cuda_plan: plan '", key, "' runs ranks in other processes, which mapped its "
          "communication buffer; another plan cannot replace it under the same key"));
    }
  }
  slot = std::make_shared<CudaPlan>(std::move(key), std::move(spec));
}

bool HasCudaPlan(std::string_view key) { return FindCudaPlan(key) != nullptr; }

namespace {

// Throws std::runtime_error naming `what` when `status` is a failure (the host-side entry points; the handler
// returns ffi errors instead).
void CheckCuda(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) throw std::runtime_error(StrCat("jax_mpk: ", what, " failed (", CudaStatusText(status), ")"));
}

}  // namespace

std::optional<std::string> CheckCudaError(std::string_view key, int device) {
  const std::shared_ptr<CudaPlan> plan = FindCudaPlan(key);
  if (!plan) throw UnknownCudaPlanError(StrCat("jax_mpk: CUDA plan not registered in this process: '", key, "'"));
  DeviceState* state = nullptr;
  {
    std::lock_guard<std::mutex> lock(plan->mutex);
    const auto found = plan->states.find(device);
    if (found == plan->states.end()) return std::nullopt;  // never ran there
    state = found->second.get();
  }
  auto check = [&](cudaError_t status, const char* what) {
    CheckCuda(status, StrCat("check_cuda_error: ", what, " on device ", device));
  };
  ScopedDevice scoped_device;
  check(scoped_device.Enter(device), "making the device current");
  std::lock_guard<std::mutex> lock(state->mutex);
  TakeRecord(*state);
  if (state->unreported.empty()) return std::nullopt;
  // The caller synchronized, so no kernel of this plan runs on the device: reset on our own stream.
  check(cudaMemsetAsync(state->block, 0, state->block_bytes, state->side_stream),
        "resetting the event counters and control");
  if (state->comm) {
    check(cudaMemsetAsync(state->comm, 0, state->comm_block_bytes, state->side_stream),
          "resetting the communication buffer");
  }
  check(cudaStreamSynchronize(state->side_stream), "cudaStreamSynchronize");
  std::string message = std::exchange(state->unreported, std::string());
  if (SpansProcesses(plan->spec)) {
    plan->failed_across_processes = true;
    message += "; the plan's ranks run in several processes, which cannot restart in step, so this process "
               "refuses its later calls (restart the processes)";
  }
  return message;
}

namespace {

// The plan of `key` whose ranks run in several processes, for Export/ImportCudaComm.
std::shared_ptr<CudaPlan> PlanAcrossProcesses(std::string_view key, const char* what) {
  std::shared_ptr<CudaPlan> plan = FindCudaPlan(key);
  if (!plan) throw std::invalid_argument(StrCat("jax_mpk: ", what, ": CUDA plan not registered in this process: '", key, "'"));
  if (!SpansProcesses(plan->spec)) {
    throw std::invalid_argument(StrCat("jax_mpk: ", what, ": plan '", key, "' has no rank in another process"));
  }
  return plan;
}

}  // namespace

std::string ExportCudaComm(std::string_view key, int device) {
  const std::shared_ptr<CudaPlan> plan = PlanAcrossProcesses(key, "export_cuda_comm");
  const auto& devices = plan->spec.rank_devices;
  if (std::find(devices.begin(), devices.end(), device) == devices.end()) {
    throw std::invalid_argument(StrCat("jax_mpk: export_cuda_comm: device ", device, " runs no rank of plan '", key, "'"));
  }
  ScopedDevice scoped_device;
  CheckCuda(scoped_device.Enter(device), StrCat("making device ", device, " current"));
  ffi::ErrorOr<DeviceState*> state = GetOrCreateState(*plan, device, /*capturing=*/false);
  if (!state) throw std::runtime_error(std::string(state.error().message()));
  cudaIpcMemHandle_t handle{};
  CheckCuda(cudaIpcGetMemHandle(&handle, (*state)->comm),
            StrCat("cudaIpcGetMemHandle of plan '", key, "''s communication buffer on device ", device));
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (const unsigned char byte : std::string_view(handle.reserved, sizeof(handle.reserved))) {
    hex += kHex[byte >> 4];
    hex += kHex[byte & 15];
  }
  return hex;
}

void ImportCudaComm(std::string_view key, int device, int rank, std::string_view handle_hex) {
  const std::shared_ptr<CudaPlan> plan = PlanAcrossProcesses(key, "import_cuda_comm");
  const auto& devices = plan->spec.rank_devices;
  if (rank < 0 || rank >= static_cast<int>(devices.size()) || devices[rank] >= 0) {
    throw std::invalid_argument(StrCat("jax_mpk: import_cuda_comm: rank ", rank, " of plan '", key,
                                       "' is not another process's (its ranks' devices here: -1 for those)"));
  }
  cudaIpcMemHandle_t handle{};
  if (handle_hex.size() != 2 * sizeof(handle.reserved) ||
      handle_hex.find_first_not_of("0123456789abcdef") != std::string_view::npos) {
    throw std::invalid_argument(StrCat("jax_mpk: import_cuda_comm: the handle of rank ", rank, " is not ",
                                       2 * sizeof(handle.reserved), " lowercase hex digits"));
  }
  auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < sizeof(handle.reserved); ++i) {
    handle.reserved[i] = static_cast<char>(nibble(handle_hex[2 * i]) << 4 | nibble(handle_hex[2 * i + 1]));
  }
  {
    std::lock_guard<std::mutex> lock(plan->mutex);
    if (plan->comm_peers.size() == devices.size() && plan->comm_peers[rank]) return;  // imported before
  }
  ScopedDevice scoped_device;
  CheckCuda(scoped_device.Enter(device), StrCat("making device ", device, " current"));
  void* peer = nullptr;  // mapped for the plan's life, as the plan's own buffers are
  CheckCuda(cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess),
            StrCat("cudaIpcOpenMemHandle of rank ", rank, "'s communication buffer of plan '", key, "' on device ", device));
  std::lock_guard<std::mutex> lock(plan->mutex);
  RegisterComm(*plan, rank, static_cast<char*>(peer));
}

}  // namespace jax_mpk

// kCmdBufferCompatible: XLA may capture this call into a CUDA graph and replay it without running this function.
// That is correct because nothing a call needs is host state: the counters, Control and ErrorRecord have fixed
// addresses for the plan's life on the device, and buffer addresses are baked into the captured launch, which
// XLA re-captures whenever they change. A replay skips only host work that correctness does not need: the
// buffer checks (fixed by the executable) and the deferred error check, so an error in a replayed call
// surfaces at the next call that is not replayed, or through CheckCudaError. Captured calls differ in two ways
// (both checked on an H100 with --xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=FUSION,
// CUSTOM_CALL, tests/test_cuda_executor.py): the launch is preceded by a memset of the counters and Control, so
// every replay starts from epoch 1 and no failed call can poison later replays; and a pending error does not
// fail the call (XLA would swallow the message) but waits for the next call that is not captured. The device
// state may be created while XLA captures: CreateState relaxes the thread's capture mode and puts nothing on
// the captured stream. A replayed graph keeps the kernel it was captured with, also after its key was
// registered again with another plan, until XLA re-captures it: a key should name its plan's content.
namespace {
auto MegakernelBinding() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
      .Ctx<xla::ffi::DeviceOrdinal>()
      .RemainingArgs()
      .RemainingRets()
      .Attr<std::string_view>("plan_key")
      .Attr<int64_t>("watchdog_ms");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMpkMegakernelCuda, jax_mpk::MegakernelCuda, MegakernelBinding(),
                              {xla::ffi::Traits::kCmdBufferCompatible});

// The same handler for plans that several devices run together, without kCmdBufferCompatible: a captured
// launch would restart at epoch 1 on every replay (the reset above), which the other ranks' remote counters
// and the alternating halves of the communication buffers do not follow. XLA then launches it directly.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMpkMegakernelCudaRanks, jax_mpk::MegakernelCuda, MegakernelBinding());
