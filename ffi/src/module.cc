// The Python extension `jax_mpk._ext`: FFI handler capsules and the process-wide plan registry.
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "jax_mpk/cpu_executor.h"
#include "jax_mpk/cuda_executor.h"
#include "jax_mpk/plan.h"
#include "jax_mpk/plan_registry.h"
#include "jax_mpk/runtime/params.h"
#include "jax_mpk/shared_memory.h"
#include "jax_mpk/str_cat.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_mpk {
namespace {

using PlanWords = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

#ifdef JAX_MPK_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

nb::dict Registrations() {
  nb::dict targets;
  targets["jax_mpk_megakernel"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCpu));
  targets["jax_mpk_megakernel_ranks"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCpu));
  targets["jax_mpk_megakernel_processes"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCpuProcesses));
  return targets;
}

nb::dict CudaRegistrations() {
  nb::dict targets;
#ifdef JAX_MPK_WITH_CUDA
  targets["jax_mpk_megakernel"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCuda));
  targets["jax_mpk_megakernel_ranks"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCudaRanks));
#endif
  return targets;
}

void RequireCuda() {
  if (!kHasCuda) {
    throw std::runtime_error("jax_mpk: this build of jax_mpk._ext has no CUDA backend (built with JAX_MPK_CUDA=OFF "
                             "or without a CUDA toolkit)");
  }
}

void RegisterCudaPlanFromPython(std::string key, const nb::bytes& image, std::string kernel_name, int64_t num_events,
                                int64_t threads, int64_t smem_bytes, int64_t num_args, int64_t num_rets,
                                std::vector<int64_t> arg_bytes, std::vector<int64_t> ret_bytes,
                                std::vector<std::pair<int64_t, int64_t>> aliases, int64_t num_ctas,
                                std::vector<int64_t> rank_devices, int64_t comm_bytes, int64_t num_remote_events) {
  RequireCuda();
  if (num_args < 0 || static_cast<size_t>(num_args) != arg_bytes.size() || num_rets < 0 ||
      static_cast<size_t>(num_rets) != ret_bytes.size()) {
    throw std::invalid_argument(StrCat("jax_mpk: register_cuda_plan: num_args = ", num_args, " and num_rets = ",
                                       num_rets, ", but arg_bytes has ", arg_bytes.size(), " entries and ret_bytes ",
                                       ret_bytes.size()));
  }
  CudaPlanSpec spec;
  spec.image.assign(image.c_str(), image.size());
  spec.kernel_name = std::move(kernel_name);
  spec.num_events = num_events;
  spec.threads = threads;
  spec.smem_bytes = smem_bytes;
  spec.arg_bytes = std::move(arg_bytes);
  spec.ret_bytes = std::move(ret_bytes);
  spec.aliases = std::move(aliases);
  spec.num_ctas = num_ctas;
  spec.rank_devices = std::move(rank_devices);
  spec.comm_bytes = comm_bytes;
  spec.num_remote_events = num_remote_events;
#ifdef JAX_MPK_WITH_CUDA
  // RegisterCudaPlan's std::invalid_argument reaches Python as ValueError.
  RegisterCudaPlan(std::move(key), std::move(spec));
#endif
}

bool HasCudaPlanFromPython(const std::string& key) {
#ifdef JAX_MPK_WITH_CUDA
  return HasCudaPlan(key);
#else
  (void)key;
  return false;
#endif
}

std::optional<std::string> CheckCudaErrorFromPython(const std::string& key, int device) {
  RequireCuda();
#ifdef JAX_MPK_WITH_CUDA
  try {
    nb::gil_scoped_release no_gil;  // may wait for the device
    return CheckCudaError(key, device);
  } catch (const UnknownCudaPlanError& error) {
    throw nb::key_error(error.what());
  }
#else
  (void)key;
  (void)device;
  return std::nullopt;
#endif
}

std::string ExportCudaCommFromPython(const std::string& key, int device) {
  RequireCuda();
#ifdef JAX_MPK_WITH_CUDA
  nb::gil_scoped_release no_gil;  // loads the kernel, allocates and zeroes the buffer
  return ExportCudaComm(key, device);
#else
  (void)key;
  (void)device;
  return {};
#endif
}

void ImportCudaCommFromPython(const std::string& key, int device, int rank, const std::string& handle) {
  RequireCuda();
#ifdef JAX_MPK_WITH_CUDA
  nb::gil_scoped_release no_gil;
  ImportCudaComm(key, device, rank, handle);
#else
  (void)key;
  (void)device;
  (void)rank;
  (void)handle;
#endif
}

void RegisterPlanFromWords(std::string key, const PlanWords& words) {
  // ParsePlan's std::invalid_argument reaches Python as ValueError.
  auto plan = std::make_shared<const Plan>(ParsePlan(words.data(), words.shape(0)));
  RegisterPlan(std::move(key), std::move(plan));
}

}  // namespace
}  // namespace jax_mpk

NB_MODULE(_ext, m) {
  m.doc() = "C++ runtime of jax_mpk: FFI handlers and the process-wide plan registry.";
  m.def("registrations", &jax_mpk::Registrations,
        "FFI handler capsules by custom-call target name, for jax.ffi.register_ffi_target(..., platform='cpu').");
  m.def("cuda_registrations", &jax_mpk::CudaRegistrations,
        "FFI handler capsules of the CUDA backend by custom-call target name (the same names as registrations()), "
        "for jax.ffi.register_ffi_target(..., platform='CUDA'); empty when built without CUDA.");
  m.def(
      "has_cuda", [] { return jax_mpk::kHasCuda; }, "Whether this build has the CUDA backend.");
  m.attr("max_cuda_buffers") = jax_mpk::kMaxBuffers;  // operands + results a CUDA megakernel takes
  m.def("register_cuda_plan", &jax_mpk::RegisterCudaPlanFromPython, "key"_a, "cubin"_a, "kernel_name"_a,
        "num_events"_a, "threads"_a, "smem_bytes"_a, "num_args"_a, "num_rets"_a, "arg_bytes"_a, "ret_bytes"_a,
        "aliases"_a, "num_ctas"_a = 0, "rank_devices"_a = std::vector<int64_t>(), "comm_bytes"_a = 0,
        "num_remote_events"_a = 0,
        "Stores a compiled megakernel (cubin, fatbin or PTX bytes) and its calling convention under `key`, for "
        "the CUDA handler. Nothing touches the GPU here: the image is loaded on the first call on each device. "
        "An identical registration keeps the existing plan; a different one replaces it. num_ctas = 0 launches "
        "one CTA per SM. A plan that several devices run together (a shard_map body) lists their ordinals in rank "
        "order in rank_devices (-1 for a rank that another process runs), with the bytes of one rank's "
        "communication buffer and its remote event count. Raises ValueError for invalid arguments, RuntimeError "
        "without CUDA.");
  m.def("export_cuda_comm", &jax_mpk::ExportCudaCommFromPython, "key"_a, "device"_a,
        "For a registered CUDA plan with ranks in other processes: creates its state on device ordinal `device` "
        "(one of its ranks') and returns a CUDA IPC handle of its communication buffer, as hex. Raises ValueError "
        "for a plan or device that is not such, RuntimeError for a CUDA failure.");
  m.def("import_cuda_comm", &jax_mpk::ImportCudaCommFromPython, "key"_a, "device"_a, "rank"_a, "handle"_a,
        "Maps rank `rank`'s communication buffer (an export_cuda_comm handle from its process) into device "
        "`device`'s context for the plan's calls; a second import of a rank is ignored. Raises ValueError for a "
        "rank this process runs or a malformed handle, RuntimeError for a CUDA failure.");
  m.def("has_cuda_plan", &jax_mpk::HasCudaPlanFromPython, "key"_a,
        "Whether a CUDA plan is registered under `key` in this process (always False without CUDA).");
  m.def("check_cuda_error", &jax_mpk::CheckCudaErrorFromPython, "key"_a, "device"_a,
        "After the caller synchronized the device: the error message of the last failed call of CUDA plan `key` "
        "on device ordinal `device`, resetting the plan's state there, or None. Raises KeyError for an unknown "
        "key.");
  m.def("register_plan", &jax_mpk::RegisterPlanFromWords, "key"_a, "words"_a,
        "Parses and validates a plan (1-D int64 array) and stores it under `key`, replacing any earlier plan "
        "with that key. Raises ValueError for an invalid plan.");
  m.def("share_comm_group", &jax_mpk::ShareCommGroup, "key"_a, "segment"_a,
        "For a registered CPU plan of several ranks run by several processes: maps its communication buffers "
        "from the POSIX shared-memory segment `segment` ('/name'), created by the first process to come, for "
        "the calls that name it (target jax_mpk_megakernel_processes). Raises ValueError for a plan that is not one, "
        "RuntimeError when the segment cannot be mapped.");
  m.def("unlink_shared_memory", &jax_mpk::SharedMemory::Unlink, "segment"_a,
        "Removes the name of a shared-memory segment (mappings stay valid); no error when it is already gone.");
}
