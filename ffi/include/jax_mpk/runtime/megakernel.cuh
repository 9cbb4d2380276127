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

// Idle prefetch (JAX_MPK_IDLE_PREFETCH_BYTES > 0, from JAX_MPK_IDLE_PREFETCH_KB): during the attention chain most
// SMs wait while HBM idles, and the weights of their coming products are known. So while thread 0 waits for a
// task's dependencies, warp 1 asks L2 for what the worker's coming tasks stream (weight tiles; an attention
// chunk's keys and values, also the waited task's own), one 128-byte line a prefetch, paced at kIdlePrefetchBytes
// a microsecond, never more than kIdlePrefetchAheadBytes past the task waited for (L2, 50 MB on an H200, is shared
// by every SM and also holds what the chain reads). Not thread 0: a first form prefetched from the poll loop
// itself and delayed every task's start by its prefetches (a 2-layer profile: 275 -> 696 us).
// An earlier look-ahead that requested 128-384 KB an SM in one burst by all threads before every wait queued
// ahead of the chain's own loads and made the step slower.
#ifndef JAX_MPK_IDLE_PREFETCH_BYTES
#define JAX_MPK_IDLE_PREFETCH_BYTES 0
#endif
inline constexpr int64_t kIdlePrefetchBytes = JAX_MPK_IDLE_PREFETCH_BYTES;
inline constexpr int64_t kIdlePrefetchAheadBytes = 256 * 1024;
static_assert(kIdlePrefetchBytes >= 0, "idle prefetch pace");

// A span of memory a task streams, as rows (Dispatch::streamed_span; rows == 0: none).
struct TileSpan {
  const char* start = nullptr;
  int64_t row_bytes = 0, rows = 0, row_stride = 0;
  __host__ __device__ int64_t lines_per_row() const { return (row_bytes + 127) / 128; }
  __host__ __device__ int64_t lines() const { return rows * lines_per_row(); }  // 128-byte lines requested for it
  // Rows that start inside a line (a 48-column tile: 96 bytes at a 32-byte offset) also cover the line before.
  __host__ __device__ TileSpan lines_aligned() const {
    const int64_t head = static_cast<int64_t>(reinterpret_cast<uintptr_t>(start) % 128);
    return TileSpan{start - head, row_bytes + head, rows, row_stride};
  }
  __host__ __device__ const char* line_address(int64_t line) const {
    const int64_t row = line / lines_per_row();
    return start + row * row_stride + (line - row * lines_per_row()) * 128;
  }
};
inline constexpr int kStreamedParts = 2;  // a product's weight tile; an attention chunk's keys and values

// The cursor over the spans of a worker's coming tasks, kept in shared memory between waits. `Spans` answers
// span(position, part) (the task at that position of the worker's list; rows == 0 past its last part) and
// streams_before_wait(position) (its prefetch() starts its own stream). The walk is separate from the warp that
// issues the prefetches so that a host test can check it (tests/cuda/idle_prefetch_walk.cu: only tasks from the
// waited one on, no later task's line twice, `ahead` exact and within the budget).
struct IdlePrefetch {
  int32_t position;  // the worker's task whose span is being requested
  int32_t part;      // which of its spans
  int64_t line;      // the span's next line (row-major over its rows' lines)
  int64_t ahead;     // lines requested for tasks after the one waited for
  TileSpan tile;

  __host__ __device__ void reset(int32_t first) { position = first, part = 0, line = ahead = 0, tile = TileSpan{}; }

  // The worker starts waiting for the task at `waited`: lines requested for it stop counting as ahead; a cursor
  // not past it starts again at it (at its own spans unless its prefetch() streams them).
  // (nv_exec_check_disable: `Spans` is the device's WorkerSpans or a host test's; each side calls its own)
#pragma nv_exec_check_disable
  template <class Spans> __host__ __device__ void begin_wait(int32_t waited, Spans& spans) {
    if (position > waited) {
      for (int p = 0; p < kStreamedParts; ++p) ahead -= spans.span(waited, p).lines_aligned().lines();
    } else {
      reset(waited);
      if (!spans.streams_before_wait(waited)) tile = spans.span(waited, 0).lines_aligned();
    }
  }

  // The next round of at most `width` lines, [*first, *first + *count) of `tile`; false when nothing is left
  // before `end` or the budget (`ahead_lines` past the waited task) is used.
#pragma nv_exec_check_disable
  template <class Spans>
  __host__ __device__ bool next_round(int32_t waited, int32_t end, int64_t ahead_lines, int width, Spans& spans,
                                      int64_t* first, int64_t* count) {
    while (line >= tile.lines()) {  // this span done: the task's next span, else the next task's first
      const bool next_part = tile.lines() > 0 && part + 1 < kStreamedParts;
      if (!next_part && position + 1 >= end) return false;
      position += next_part ? 0 : 1;
      part = next_part ? part + 1 : 0;
      tile = spans.span(position, part).lines_aligned();
      line = 0;
    }
    if (ahead >= ahead_lines) return false;
    *first = line;
    *count = tile.lines() - line < width ? tile.lines() - line : width;
    line += *count;
    if (position > waited) ahead += *count;
    return true;
  }
};

// The spans of a worker's tasks by position, for IdlePrefetch (the task records from global memory, but the
// waited task's, which is in shared memory).
template <class Dispatch> struct WorkerSpans {
  Dispatch& dispatch;
  const TaskRecord* tasks;
  const int32_t* worker_tasks;
  const TaskRecord& waiting_task;
  int32_t waited;
  __device__ const TaskRecord& record(int32_t position) const {
    return position == waited ? waiting_task : tasks[worker_tasks[position]];
  }
  __device__ TileSpan span(int32_t position, int part) { return dispatch.streamed_span(record(position), part); }
  __device__ bool streams_before_wait(int32_t position) { return dispatch.streams_before_wait(record(position)); }
};

// Warp 1, while thread 0 waits for the task at `position` (until `*waited_for` becomes it): the 128-byte lines of
// the spans the coming tasks stream (from the waited task's own when its prefetch() does not start them, as an
// attention chunk's keys and values), 32 a round (a lane each), at most kIdlePrefetchBytes a microsecond, looking
// at the wait after every round (a task starts at most one round late). The cursor is the same in every lane and
// lives in registers meanwhile (in shared memory its accesses cost more than the prefetches; from one thread
// the prefetches came ~5 GB/s an SM at most).
template <class Dispatch>
__device__ void prefetch_while_waiting(IdlePrefetch& shared_look, Dispatch& dispatch, const TaskRecord& waiting_task,
                                       int32_t position, const volatile int32_t* waited_for, const TaskRecord* tasks,
                                       const int32_t* worker_tasks, int32_t end) {
  const int lane = threadIdx.x % 32;
  WorkerSpans<Dispatch> spans{dispatch, tasks, worker_tasks, waiting_task, position};
  IdlePrefetch look = shared_look;
  look.begin_wait(position, spans);
  const uint64_t start = global_timer_ns();
  int64_t issued = 0, first, count;
  // every decision is lane 0's (the flag and the timer read by each lane could differ): the cursor stays uniform
  while (__shfl_sync(0xffffffffu, *waited_for != position, 0)) {
    const int64_t elapsed_ns = static_cast<int64_t>(global_timer_ns() - start);
    if (__shfl_sync(0xffffffffu, issued * 1000 > kIdlePrefetchBytes * elapsed_ns, 0)) {
      __nanosleep(64);  // ahead of the pace
      continue;
    }
    if (!look.next_round(position, end, kIdlePrefetchAheadBytes / 128, 32, spans, &first, &count)) break;
    if (lane < count) asm volatile("prefetch.global.L2 [%0];" ::"l"(look.tile.line_address(first + lane)));
    issued += count * 128;
  }
  if (lane == 0) shared_look = look;
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
  __shared__ IdlePrefetch look;
  __shared__ volatile int32_t waited_for;  // the position of the last task thread 0 has waited for
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
    if constexpr (kIdlePrefetchBytes > 0) {
      look.reset(begin);
      waited_for = begin - 1;
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
      if constexpr (kIdlePrefetchBytes > 0) waited_for = i;
      if (profile) task_stamps[layout::kStampStart] = global_timer_ns();
    }
    if constexpr (kIdlePrefetchBytes > 0) {
      if (warp == 1) prefetch_while_waiting(look, dispatch, task, i, &waited_for, tasks, worker_tasks, end);
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
