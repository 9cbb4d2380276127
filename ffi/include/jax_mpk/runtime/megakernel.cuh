// The persistent-kernel runtime shared by every generated megakernel: the per-CTA task loop and the
// wait/signal/watchdog protocol. A generated source defines the task tables and a Dispatch type with
// `prefetch(task, smem)` (start loading the task's weights; every thread calls it before the wait) and
// `run(task, smem)`, then calls `run_worker`.
//
// Protocol (docs/plan_format.md): a task waits until counter[wait_event] >= wait_count * epoch, runs, and
// adds 1 to each event in its signal list. Counters live in device memory and are never reset: the epoch
// (calls completed so far, kept in Control) scales every target, and the last CTA to finish a call
// advances it. All CTAs must be co-resident (one per SM, cooperative launch).
//
// Several devices (a shard_map): a task that reads communication buffers also waits until every rank's
// remote counter[remote_wait_event] >= remote_wait_count * epoch (system scope: the counters of the other
// ranks are in their memory), and a task whose stores other ranks read adds to its own rank's remote
// counters after a system-scope release. Every rank runs the same graph with its epochs in step.
#pragma once

#include <cstdint>

#include "jax_mpk/layout.h"
#include "jax_mpk/runtime/comm.cuh"
#include "jax_mpk/runtime/params.h"

namespace jax_mpk {

using layout::TaskRecord;  // generated from jax_mpk/layout.py's TaskField

// kSystem: system scope, for counters another device writes or reads (a rank's remote events).
template <bool kSystem = false> __device__ __forceinline__ uint64_t load_acquire(const uint64_t* address) {
  uint64_t value;
  if constexpr (kSystem) {
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  } else {
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
  }
  return value;
}

// A counter a task both publishes its stores by and learns from whether every other contributor has published
// theirs (split attention's merge: the task that arrives last reads the others' partials): release and acquire
// in one round trip to L2, where a fence, an atomic and a second fence took three.
__device__ __forceinline__ uint64_t add_acq_rel(uint64_t* address, uint64_t value) {
  uint64_t before;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;" : "=l"(before) : "l"(address), "l"(value) : "memory");
  return before;
}

template <bool kSystem = false> __device__ __forceinline__ void add_relaxed(uint64_t* address, uint64_t value) {
  if constexpr (kSystem) {
    asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
  } else {
    asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(address), "l"(value) : "memory");
  }
}

// Release fence at GPU scope. __threadfence() is fence.sc (sequentially consistent), which the signal does
// not need and which costs more on every task.
__device__ __forceinline__ void fence_release() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records the first failure of this call and tells every other CTA to stop waiting.
__device__ inline void report_failure(const MegakernelParams& p, int32_t code, int32_t task, int32_t kernel,
                                      int32_t event, uint64_t counter, uint64_t target) {
  if (atomicCAS(&p.control->abort, 0, 1) == 0) {
    volatile ErrorRecord* record = p.error;
    record->task = task;
    record->kernel = kernel;
    record->event = event;
    record->cta = static_cast<int32_t>(blockIdx.x);
    record->counter = counter;
    record->target = target;
    __threadfence_system();
    record->code = code;
    __threadfence_system();
  }
}

// Thread 0 only: waits until `*counter >= target` (an acquire at system scope for another rank's counter).
// Returns false when the call is being aborted (watchdog here or elsewhere); `event` names the counter in
// the error record.
template <bool kSystem>
__device__ inline bool wait_until(const MegakernelParams& p, const uint64_t* counter, uint64_t target,
                                  int32_t task_index, int32_t kernel, int32_t event) {
  if (load_acquire<kSystem>(counter) >= target) return true;
  const uint64_t start = global_timer_ns();
  unsigned sleep_ns = 16;  // short: a dependency usually completes within a few microseconds
  while (true) {
    const uint64_t value = load_acquire<kSystem>(counter);
    if (value >= target) return true;
    if (*reinterpret_cast<volatile int32_t*>(&p.control->abort)) return false;
    if (global_timer_ns() - start > static_cast<uint64_t>(p.watchdog_ns)) {
      report_failure(p, kErrorWatchdog, task_index, kernel, event, value, target);
      return false;
    }
    __nanosleep(sleep_ns);
    if (sleep_ns < 128) sleep_ns *= 2;
  }
}

// Thread 0 only: the task's local event, then its remote event on every rank. In the error record a
// remote event r of rank k is event -(1 + r * layout::kMaxCudaRanks + k).
__device__ inline bool wait_for_task(const MegakernelParams& p, const TaskRecord& task, int32_t task_index,
                                     uint64_t epoch) {
  if (task.wait_event >= 0 &&
      !wait_until<false>(p, p.counters + task.wait_event, static_cast<uint64_t>(task.wait_count) * epoch,
                         task_index, task.kernel, task.wait_event)) {
    return false;
  }
  for (int32_t rank = 0; task.remote_wait_event >= 0 && rank < p.comm.num_ranks; ++rank) {
    if (!wait_until<true>(p, p.comm.counters[rank] + task.remote_wait_event,
                          static_cast<uint64_t>(task.remote_wait_count) * epoch, task_index, task.kernel,
                          -(1 + task.remote_wait_event * layout::kMaxCudaRanks + rank))) {
      return false;
    }
  }
  return true;
}

// Copies a task record into shared memory: lanes 0 .. 24 of the calling warp, one word each.
__device__ __forceinline__ void copy_record(TaskRecord* to, const TaskRecord* from, int lane) {
  constexpr int kWords = sizeof(TaskRecord) / sizeof(int32_t);
  if (lane < kWords) reinterpret_cast<int32_t*>(to)[lane] = __ldg(reinterpret_cast<const int32_t*>(from) + lane);
}

// This call's epoch (calls completed before it, plus one: every event target of the call is a multiple of it), set
// by run_worker before the first task, so that a body that needs it (a merge counter's target) reads shared
// memory instead of Control in global memory.
__shared__ uint64_t call_epoch;

// Profiling builds (JAX_MPK_PROFILE): the stamps of the task running now (layout::kProfileStamps), kept in shared
// memory by thread 0 and stored to the task's record only after the task has signalled: stores to the workspace
// during the task are drained by the fence before its signal, on the dependency chain (suspected of making
// profiled small tasks slower than they run unprofiled: docs/notes/cuda_megakernel.md, session 11). Bodies stamp
// their phases with mark_phase after a barrier, so that the stamp holds for the block.
__shared__ uint64_t task_stamps[layout::kProfileStamps];
__shared__ bool profiling;

__device__ __forceinline__ void mark_phase(int stamp) {
  if (threadIdx.x == 0 && profiling) task_stamps[stamp] = global_timer_ns();
}

// When `profile` is not null (JAX_MPK_PROFILE builds), thread 0 records for every task the global timer at the
// layout::kProfileStamps moments (the wait begins, the body begins, the body's own phases, the body ends, the
// task has signalled); a phase the body does not mark stays 0. A task given up (watchdog, abort) leaves its
// record as the previous call wrote it. `profile_sms[worker]` gets the physical SM the worker ran on.
template <class Dispatch>
__device__ void run_worker(const MegakernelParams& p, const TaskRecord* tasks, const int32_t* signals,
                           const int32_t* remote_signals, const int32_t* worker_begin, const int32_t* worker_tasks,
                           char* smem, Dispatch& dispatch, uint64_t* profile, uint64_t* profile_sms) {
  static_assert(sizeof(TaskRecord) % sizeof(int32_t) == 0 && sizeof(TaskRecord) / sizeof(int32_t) <= 32);
  // The tables are read once per call, and the weights streamed in between evict them from L2: a table read
  // after a task's wait is a DRAM round trip (~1 us) on the dependency chain, at every level. So while
  // thread 0 waits for task i, warp 1 copies the record of task i + 1 into shared memory (three slots:
  // warp 0 still reads record i while it signals, after the other warps may have moved on to i + 1), and
  // warp 0's lanes load the first events task i will signal.
  __shared__ TaskRecord records[3];
  __shared__ int32_t shared_go;
  const int32_t begin = worker_begin[blockIdx.x], end = worker_begin[blockIdx.x + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    call_epoch = load_acquire(&p.control->epoch) + 1;
    profiling = profile != nullptr;
    if (profile_sms != nullptr) {  // which physical SM this worker runs on in this call (are slow SMs physical?)
      uint32_t sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      profile_sms[blockIdx.x] = sm;
    }
  }
  if (warp == 1 && begin < end) copy_record(&records[0], tasks + worker_tasks[begin], lane);
  __syncthreads();
  const uint64_t epoch = call_epoch;
  for (int32_t i = begin, slot = 0; i < end; ++i) {
    const int32_t task_index = worker_tasks[i], next_slot = slot == 2 ? 0 : slot + 1;
    const TaskRecord& task = records[slot];
    dispatch.prefetch(task, smem);  // weights start streaming while we wait
    const int32_t first_signal =
        warp == 0 && lane < task.signal_count ? __ldg(signals + task.signal_begin + lane) : -1;
    if (warp == 1 && i + 1 < end) copy_record(&records[next_slot], tasks + worker_tasks[i + 1], lane);
    if (threadIdx.x == 0) {
      if (profile) {  // a phase this body does not mark stays 0
        task_stamps[layout::kStampWait] = global_timer_ns();
        task_stamps[layout::kStampStaged] = task_stamps[layout::kStampComputed] = 0;
      }
      shared_go = wait_for_task(p, task, task_index, epoch);
      if (profile) task_stamps[layout::kStampStart] = global_timer_ns();
    }
    __syncthreads();
    if (!shared_go) break;
    dispatch.run(task, smem);
    __syncthreads();
    if (profile) mark_phase(layout::kStampBodyEnd);
    // Signal: each lane of warp 0 fences (making the block's stores, ordered before it by the barrier,
    // visible at GPU scope: release), then adds to its share of the events. One release per event would
    // serialize a fence per event, and a task can feed a hundred events.
    if (threadIdx.x < 32) {
      fence_release();
      if (first_signal >= 0) add_relaxed(p.counters + first_signal, 1);
      for (int32_t s = threadIdx.x + 32; s < task.signal_count; s += 32) {
        add_relaxed(p.counters + signals[task.signal_begin + s], 1);
      }
      if (task.remote_signal_count > 0) {  // other ranks read what this task stored
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        for (int32_t s = threadIdx.x; s < task.remote_signal_count; s += 32) {
          add_relaxed<true>(p.comm.counters[p.comm.rank] + remote_signals[task.remote_signal_begin + s], 1);
        }
      }
      if (profile && threadIdx.x == 0) {
        task_stamps[layout::kStampSignalled] = global_timer_ns();
        uint64_t* record = profile + layout::kProfileStamps * task_index;
#pragma unroll
        for (int stamp = 0; stamp < layout::kProfileStamps; ++stamp) record[stamp] = task_stamps[stamp];
      }
    }
    slot = next_slot;
  }
  // A task given up (watchdog, abort) may leave weight copies in flight into shared memory.
  asm volatile("cp.async.wait_all;" ::: "memory");
  if (threadIdx.x == 0) {
    __threadfence();
    const uint64_t finished = atomicAdd(reinterpret_cast<unsigned long long*>(&p.control->ctas_done), 1ull) + 1;
    if (finished == static_cast<uint64_t>(gridDim.x) * epoch) {
      asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(&p.control->epoch), "l"(epoch) : "memory");
    }
  }
}

}  // namespace jax_mpk
