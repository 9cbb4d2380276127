#include "jax_mpk/cpu_executor.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "jax_mpk/plan.h"
#include "jax_mpk/plan_registry.h"
#include "jax_mpk/shared_memory.h"
#include "jax_mpk/str_cat.h"
#include "jax_mpk/tile_evaluator.h"

#if defined(__x86_64__) || defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace ffi = xla::ffi;

namespace jax_mpk {
namespace {

// Counters are fresh for every call, so every wait is for the first epoch.
constexpr int64_t kEpoch = 1;
// Most waits end within a few hundred polls; after that, yield so that workers outnumbering the cores
// still make progress.
constexpr int kSpinsBeforeYield = 256;
// About 11 days: any longer wait is a hang, and the bound keeps the deadline arithmetic from overflowing.
constexpr int64_t kMaxWatchdogMs = 1'000'000'000;

// XLA runs CPU computations with subnormals flushed to zero, and this handler is called on such a thread.
// The runtime promises IEEE arithmetic (a bfloat16 or float32 subnormal is loaded and stored unchanged), so
// every worker switches to IEEE mode with round-to-nearest for the run and then restores the caller's mode.
#if defined(__x86_64__) || defined(__SSE2__)
// MXCSR: flush-to-zero (bit 15), denormals-are-zero (bit 6), rounding control (bits 13-14; 0 is nearest).
using FpControl = unsigned;
constexpr FpControl kNonIeeeFpBits = (1u << 15) | (1u << 6) | (3u << 13);
FpControl ReadFpControl() { return _mm_getcsr(); }
void WriteFpControl(FpControl control) { _mm_setcsr(control); }
#elif defined(__aarch64__)
// FPCR: flush-to-zero (bit 24), rounding mode (bits 22-23; 0 is nearest).
using FpControl = uint64_t;
constexpr FpControl kNonIeeeFpBits = (uint64_t{1} << 24) | (uint64_t{3} << 22);
FpControl ReadFpControl() { return __builtin_aarch64_get_fpcr64(); }
void WriteFpControl(FpControl control) { __builtin_aarch64_set_fpcr64(control); }
#else
using FpControl = int;  // another architecture: the mode is left as it is
constexpr FpControl kNonIeeeFpBits = 0;
FpControl ReadFpControl() { return 0; }
void WriteFpControl(FpControl) {}
#endif

class ScopedIeeeArithmetic {
 public:
  ScopedIeeeArithmetic() : saved_(ReadFpControl()) { WriteFpControl(saved_ & ~kNonIeeeFpBits); }
  ~ScopedIeeeArithmetic() { WriteFpControl(saved_); }
  ScopedIeeeArithmetic(const ScopedIeeeArithmetic&) = delete;
  ScopedIeeeArithmetic& operator=(const ScopedIeeeArithmetic&) = delete;

 private:
  const FpControl saved_;
};

std::optional<DType> FromFfiDataType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32: return DType::kF32;
    case ffi::DataType::BF16: return DType::kBf16;
    case ffi::DataType::F16: return DType::kF16;
    case ffi::DataType::S32: return DType::kI32;
    case ffi::DataType::U32: return DType::kU32;
    case ffi::DataType::S8: return DType::kI8;
    case ffi::DataType::U8: return DType::kU8;
    case ffi::DataType::PRED: return DType::kBool;
    default: return std::nullopt;
  }
}

std::string DescribeBuffer(const ffi::AnyBuffer& buffer) {
  const std::optional<DType> dtype = FromFfiDataType(buffer.element_type());
  std::string description =
      dtype ? DTypeName(*dtype) : StrCat("<XLA dtype ", static_cast<int>(buffer.element_type()), ">");
  description += '[';
  const auto dims = buffer.dimensions();
  for (size_t d = 0; d < dims.size(); ++d) description += StrCat(d ? ", " : "", dims[d]);
  return description + ']';
}

bool BufferMatches(const ffi::AnyBuffer& buffer, DType dtype, const Shape& shape) {
  const auto dims = buffer.dimensions();
  return FromFfiDataType(buffer.element_type()) == dtype && dims.size() == static_cast<size_t>(shape.rank) &&
         std::equal(dims.begin(), dims.end(), shape.dims.begin());
}

ffi::Error CheckBuffer(const ffi::AnyBuffer& buffer, DType dtype, const Shape& shape, const std::string& what) {
  if (BufferMatches(buffer, dtype, shape)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(StrCat("jax_mpk: ", what, " is ", DescribeBuffer(buffer),
                                            ", but the plan expects ", DTypeName(dtype), shape.ToString()));
}

// Checks the buffers XLA passed against the plan and returns the base address of every plan tensor.
ffi::ErrorOr<std::vector<void*>> BindTensors(const Plan& plan, const ffi::RemainingArgs& args,
                                             const ffi::RemainingRets& rets) {
  if (args.size() != plan.inputs.size() || rets.size() != plan.outputs.size() + 1) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        StrCat("jax_mpk: the call has ", args.size(), " operands and ", rets.size(), " results; the plan takes ",
               plan.inputs.size(), " operands and ", plan.outputs.size(), " results plus the workspace")));
  }
  std::vector<void*> input_data;
  for (size_t i = 0; i < plan.inputs.size(); ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
    if (!buffer) return ffi::Unexpected(buffer.error());
    ffi::Error error = CheckBuffer(*buffer, plan.inputs[i].dtype, plan.inputs[i].shape, StrCat("operand ", i));
    if (error.failure()) return ffi::Unexpected(std::move(error));
    input_data.push_back(buffer->untyped_data());
  }
  std::vector<void*> output_data;
  for (size_t o = 0; o <= plan.outputs.size(); ++o) {
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> result = rets.get<ffi::AnyBuffer>(o);
    if (!result) return ffi::Unexpected(result.error());
    const ffi::AnyBuffer buffer = **result;
    const bool is_workspace = o == plan.outputs.size();
    Shape workspace_shape;
    workspace_shape.rank = 1;
    workspace_shape.dims[0] = std::max<int64_t>(plan.workspace_bytes, 1);
    ffi::Error error = is_workspace
                           ? CheckBuffer(buffer, DType::kU8, workspace_shape, "the workspace (last result)")
                           : CheckBuffer(buffer, plan.outputs[o].dtype, plan.outputs[o].shape, StrCat("result ", o));
    if (error.failure()) return ffi::Unexpected(std::move(error));
    output_data.push_back(buffer.untyped_data());
  }
  for (const Alias& alias : plan.aliases) {
    const bool empty = plan.inputs[alias.input].shape.NumElements() == 0;
    if (!empty && input_data[alias.input] != output_data[alias.output]) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          StrCat("jax_mpk: operand ", alias.input, " and result ", alias.output,
                 " must be one buffer (input_output_aliases), but XLA passed two")));
    }
  }
  std::vector<void*> tensor_data;
  tensor_data.reserve(plan.tensors.size());
  for (const Tensor& tensor : plan.tensors) {
    switch (tensor.kind) {
      case TensorKind::kInput: tensor_data.push_back(input_data[tensor.index]); break;
      case TensorKind::kOutput: tensor_data.push_back(output_data[tensor.index]); break;
      case TensorKind::kWorkspace:
        tensor_data.push_back(static_cast<char*>(output_data.back()) + tensor.index);
        break;
      case TensorKind::kComm: tensor_data.push_back(nullptr); break;  // in the ranks' buffers (CommGroup)
    }
  }
  return tensor_data;
}

// A counter is used in place in zeroed memory, never constructed: zero bytes are a lock-free atomic's 0, and
// constructing the counters in a process that maps a shared segment late would reset what others already counted.
// A lock-free atomic works across processes through a shared mapping.
static_assert(std::atomic<int64_t>::is_always_lock_free && sizeof(std::atomic<int64_t>) == sizeof(int64_t),
              "the remote event counters must be plain lock-free 64-bit words in (shared) memory");

// The communication buffers of a plan run by several ranks (the devices of a shard_map, each calling the handler
// on a thread of its own): per rank, two halves of COMM_BYTES (calls alternate between them, so a rank that
// starts its next call cannot overwrite what a slower rank still reads) and the remote event counters, which
// only grow: call e of a rank waits for count * e. All ranks' buffers are one zeroed block. When every rank runs
// in this process, the block is process memory, created by the first call of any rank and kept for the process
// (the ranks' call counts must stay in step). When the ranks run in several processes, it is a shared-memory
// segment that each process maps before its first call (ShareCommGroup).
class CommGroup {
 public:
  struct Rank {
    char* data = nullptr;  // 2 * comm_bytes
    std::atomic<int64_t>* counters = nullptr;
    int64_t calls = 0;  // touched by this rank's handler only
    std::mutex running;  // one call of a rank at a time
  };

  // The block in process memory (`shared` null) or in `shared`, BlockBytes(plan) long.
  CommGroup(const Plan& plan, std::unique_ptr<SharedMemory> shared)
      : ranks_(plan.num_ranks), comm_bytes_(plan.comm_bytes), shared_(std::move(shared)) {
    char* block = nullptr;
    if (shared_) {
      block = static_cast<char*>(shared_->data());
    } else {
      local_ = std::make_unique<uint64_t[]>(BlockBytes(plan) / 8);  // zeroed
      block = reinterpret_cast<char*>(local_.get());
    }
    for (size_t r = 0; r < ranks_.size(); ++r) {
      char* rank_block = block + r * RankBytes(plan);
      ranks_[r].counters = reinterpret_cast<std::atomic<int64_t>*>(rank_block);
      ranks_[r].data = rank_block + CountersBytes(plan);
    }
  }

  // The bytes of all ranks' buffers (a multiple of 64, each rank's counters and halves on their own lines).
  static size_t BlockBytes(const Plan& plan) { return std::max<size_t>(plan.num_ranks * RankBytes(plan), 64); }

  // The groups are found by plan key when all ranks run in this process, and by segment name (which names the
  // plan too) when they run in several: a mesh within this process and one over processes may run one plan.
  static std::string KeyOf(std::string_view plan_key, std::string_view segment) {
    return std::string(segment.empty() ? plan_key : segment);
  }

  // The group of a plan whose ranks all run in this process (created by the first call of any rank), or the one
  // ShareCommGroup mapped from a segment (`shared`); nullptr when this process mapped no such segment.
  static std::shared_ptr<CommGroup> Of(const std::string& key, bool shared, const Plan& plan) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    if (shared) {
      const auto found = registry().find(key);
      return found == registry().end() ? nullptr : found->second;
    }
    std::shared_ptr<CommGroup>& group = registry()[key];
    if (!group) group = std::make_shared<CommGroup>(plan, nullptr);
    return group;
  }

  static void Register(const std::string& key, std::shared_ptr<CommGroup> group) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    registry()[key] = std::move(group);
  }

  // Drops `group` (unless another one has taken its place): ranks still in a call keep it until they end.
  static void Forget(const std::string& key, const std::shared_ptr<CommGroup>& group) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    const auto found = registry().find(key);
    if (found != registry().end() && found->second == group) registry().erase(found);
  }

  Rank& rank(int64_t r) { return ranks_[r]; }
  int64_t num_ranks() const { return static_cast<int64_t>(ranks_.size()); }
  bool shared() const { return shared_ != nullptr; }

  // Every rank's half for call `epoch`.
  std::vector<char*> Bases(int64_t epoch) {
    std::vector<char*> bases;
    for (Rank& rank : ranks_) bases.push_back(rank.data + (epoch % 2) * comm_bytes_);
    return bases;
  }

  // A failed call leaves the remote counters short of their targets. A process-local group is then forgotten
  // and the next calls start a fresh one; the ranks in other processes cannot start afresh in step with this
  // one, so a shared group refuses every later call instead.
  std::atomic<bool> failed{false};

 private:
  static size_t RoundUp64(int64_t bytes) { return static_cast<size_t>((bytes + 63) / 64 * 64); }
  static size_t CountersBytes(const Plan& plan) { return RoundUp64(plan.num_remote_events * 8); }
  static size_t RankBytes(const Plan& plan) { return CountersBytes(plan) + RoundUp64(2 * plan.comm_bytes); }

  static std::mutex& registry_mutex() {
    static std::mutex mutex;
    return mutex;
  }
  static std::map<std::string, std::shared_ptr<CommGroup>>& registry() {
    static auto* groups = new std::map<std::string, std::shared_ptr<CommGroup>>();  // outlives XLA's threads
    return *groups;
  }

  std::vector<Rank> ranks_;
  int64_t comm_bytes_;
  std::unique_ptr<SharedMemory> shared_;
  std::unique_ptr<uint64_t[]> local_;
};

// What one rank's call of a multi-rank plan works with.
struct CommCall {
  CommGroup* group = nullptr;
  int64_t rank = 0;
  int64_t epoch = 0;  // this call's number on the rank, from 1
};

// One execution of a plan's task graph. The first failure (watchdog or task body) stops every worker at
// its next wait and becomes the call's error.
class TaskGraphRun {
 public:
  TaskGraphRun(const Plan& plan, const std::vector<void*>& tensor_data, std::chrono::milliseconds watchdog,
               CommCall comm = {})
      : plan_(plan), tensor_data_(tensor_data), watchdog_(watchdog), counters_(plan.num_events), comm_(comm) {
    for (std::atomic<int64_t>& counter : counters_) counter.store(0, std::memory_order_relaxed);
    if (comm_.group) comm_bases_ = comm_.group->Bases(comm_.epoch);
  }

  ffi::Error Run() {
    std::vector<std::thread> threads;
    for (size_t worker = 1; worker < plan_.workers.size(); ++worker) {
      if (plan_.workers[worker].empty()) continue;
      try {
        threads.emplace_back(&TaskGraphRun::RunWorker, this, worker);
      } catch (const std::system_error& error) {
        Abort(ffi::ErrorCode::kResourceExhausted,
              StrCat("jax_mpk: cannot start the thread of worker ", worker, ": ", error.what()));
        break;
      }
    }
    if (!plan_.workers.empty()) RunWorker(0);  // the calling thread is worker 0
    for (std::thread& thread : threads) thread.join();
    std::lock_guard<std::mutex> lock(error_mutex_);
    return first_error_;
  }

 private:
  void RunWorker(size_t worker) {
    const ScopedIeeeArithmetic ieee_arithmetic;
    TileEvaluator evaluator(plan_, tensor_data_, comm_bases_);
    for (const int task_id : plan_.workers[worker]) {
      const Task& task = plan_.tasks[task_id];
      if (!WaitForTask(task_id)) return;
      try {
        evaluator.RunTile(task);
      } catch (const std::exception& error) {
        Abort(ffi::ErrorCode::kInternal,
              StrCat("jax_mpk: task ", task_id, " (kernel ", task.kernel, ") failed: ", error.what()));
        return;
      }
      for (int64_t s = task.signal_begin; s < task.signal_begin + task.signal_count; ++s) {
        counters_[plan_.signals[s]].fetch_add(1, std::memory_order_release);  // publishes the task's stores
      }
      for (int64_t s = task.remote_signal_begin; s < task.remote_signal_begin + task.remote_signal_count; ++s) {
        comm_.group->rank(comm_.rank).counters[plan_.remote_signals[s]].fetch_add(1, std::memory_order_release);
      }
    }
  }

  // Returns false when the run is aborting, possibly by this wait's watchdog.
  bool WaitForTask(int task_id) {
    const Task& task = plan_.tasks[task_id];
    if (aborted_.load(std::memory_order_relaxed)) return false;
    if (task.wait_event >= 0 &&
        !WaitFor(counters_[task.wait_event], task.wait_count * kEpoch, task_id, [&] {
          return StrCat("event ", task.wait_event);
        })) {
      return false;
    }
    for (int64_t r = 0; task.remote_wait_event >= 0 && r < comm_.group->num_ranks(); ++r) {
      const std::atomic<int64_t>& counter = comm_.group->rank(r).counters[task.remote_wait_event];
      if (!WaitFor(counter, task.remote_wait_count * comm_.epoch, task_id, [&] {
            return StrCat("remote event ", task.remote_wait_event, " of rank ", r, " (this is rank ", comm_.rank,
                          ", call ", comm_.epoch, "; did every rank of the mesh call the plan?)");
          })) {
        return false;
      }
    }
    return true;
  }

  template <class Describe>
  bool WaitFor(const std::atomic<int64_t>& counter, int64_t target, int task_id, Describe describe) {
    for (int spin = 0; spin < kSpinsBeforeYield; ++spin) {
      if (counter.load(std::memory_order_acquire) >= target) return true;
    }
    const auto deadline = std::chrono::steady_clock::now() + watchdog_;
    while (true) {
      if (counter.load(std::memory_order_acquire) >= target) return true;
      if (aborted_.load(std::memory_order_relaxed)) return false;
      if (std::chrono::steady_clock::now() > deadline) {
        const Task& task = plan_.tasks[task_id];
        Abort(ffi::ErrorCode::kDeadlineExceeded,
              StrCat("jax_mpk watchdog: task ", task_id, " (kernel ", task.kernel, ") waited more than ",
                     watchdog_.count(), " ms on ", describe(), ": counter ", counter.load(std::memory_order_relaxed),
                     ", target ", target));
        return false;
      }
      std::this_thread::yield();
    }
  }

  void Abort(ffi::ErrorCode code, std::string message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (first_error_.success()) first_error_ = ffi::Error(code, std::move(message));
    }
    aborted_.store(true, std::memory_order_relaxed);
  }

  const Plan& plan_;
  const std::vector<void*>& tensor_data_;
  const std::chrono::milliseconds watchdog_;
  std::vector<std::atomic<int64_t>> counters_;
  const CommCall comm_;
  std::vector<char*> comm_bases_;
  std::atomic<bool> aborted_{false};
  std::mutex error_mutex_;
  ffi::Error first_error_;
};

// `comm_segment`: empty when all ranks of the plan run in this process, else the shared-memory segment that
// holds their communication buffers (ShareCommGroup).
ffi::Error MegakernelCpu(ffi::RemainingArgs args, ffi::RemainingRets rets, std::string_view plan_key,
                         int64_t watchdog_ms, std::string_view comm_segment) {
  const std::shared_ptr<const Plan> plan = FindPlan(plan_key);
  if (!plan) {
    return ffi::Error(ffi::ErrorCode::kNotFound,
                      StrCat("jax_mpk: plan not registered in this process: '", plan_key, "'"));
  }
  if (plan->platform != Platform::kCpu) {
    return ffi::Error::InvalidArgument(
        StrCat("jax_mpk: plan '", plan_key, "' was built for another platform; the CPU runtime runs CPU plans"));
  }
  if (watchdog_ms < 1 || watchdog_ms > kMaxWatchdogMs) {
    return ffi::Error::InvalidArgument(
        StrCat("jax_mpk: watchdog_ms = ", watchdog_ms, " is not in [1, ", kMaxWatchdogMs, "]"));
  }
  ffi::ErrorOr<std::vector<void*>> tensor_data = BindTensors(*plan, args, rets);
  if (!tensor_data) return tensor_data.error();
  const std::chrono::milliseconds watchdog(watchdog_ms);
  if (plan->num_ranks == 1) return TaskGraphRun(*plan, *tensor_data, watchdog).Run();
  ffi::ErrorOr<ffi::AnyBuffer> rank_operand = args.get<ffi::AnyBuffer>(plan->rank_input);
  if (!rank_operand) return rank_operand.error();
  const int32_t rank = *static_cast<const int32_t*>(rank_operand->untyped_data());  // checked by BindTensors
  if (rank < 0 || rank >= plan->num_ranks) {
    return ffi::Error::InvalidArgument(
        StrCat("jax_mpk: the rank operand is ", rank, ", not a rank of the plan's ", plan->num_ranks));
  }
  const std::string group_key = CommGroup::KeyOf(plan_key, comm_segment);
  const std::shared_ptr<CommGroup> group = CommGroup::Of(group_key, !comm_segment.empty(), *plan);
  if (!group) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
        StrCat("jax_mpk: plan '", plan_key, "' names the shared memory '", comm_segment, "', which this process "
               "has not mapped (share_comm_group)"));
  }
  if (group->failed.load()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
        StrCat("jax_mpk: an earlier call of plan '", plan_key, "' failed; its ranks run in several processes, which "
               "cannot start afresh in step: restart the processes to run it again"));
  }
  CommGroup::Rank& mine = group->rank(rank);
  std::unique_lock<std::mutex> running(mine.running, std::try_to_lock);
  if (!running.owns_lock()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
        StrCat("jax_mpk: rank ", rank, " of plan '", plan_key, "' is already running (two devices with one rank?)"));
  }
  CommCall comm{group.get(), rank, ++mine.calls};
  ffi::Error error = TaskGraphRun(*plan, *tensor_data, watchdog, comm).Run();
  if (error.failure()) {
    if (group->shared()) {
      group->failed.store(true);
    } else {
      CommGroup::Forget(group_key, group);
    }
  }
  return error;
}

ffi::Error MegakernelCpuOneProcess(ffi::RemainingArgs args, ffi::RemainingRets rets, std::string_view plan_key,
                                   int64_t watchdog_ms) {
  return MegakernelCpu(args, rets, plan_key, watchdog_ms, {});
}

}  // namespace

void ShareCommGroup(const std::string& plan_key, const std::string& segment) {
  const std::shared_ptr<const Plan> plan = FindPlan(plan_key);
  if (!plan || plan->platform != Platform::kCpu || plan->num_ranks < 2) {
    throw std::invalid_argument(
        StrCat("jax_mpk: share_comm_group: '", plan_key, "' is not a registered CPU plan of several ranks"));
  }
  auto shared = std::make_unique<SharedMemory>(segment, CommGroup::BlockBytes(*plan));
  CommGroup::Register(CommGroup::KeyOf(plan_key, segment), std::make_shared<CommGroup>(*plan, std::move(shared)));
}

}  // namespace jax_mpk

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMpkMegakernelCpu, jax_mpk::MegakernelCpuOneProcess,
                              xla::ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("plan_key")
                                  .Attr<int64_t>("watchdog_ms"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMpkMegakernelCpuProcesses, jax_mpk::MegakernelCpu,
                              xla::ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<std::string_view>("plan_key")
                                  .Attr<int64_t>("watchdog_ms")
                                  .Attr<std::string_view>("comm_segment"));
