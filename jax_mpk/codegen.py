"""Codegen: render a scheduled task graph as ONE persistent CUDA kernel.

The generated source only instantiates what lives in headers: the task loop and wait/signal protocol
(``ffi/include/jax_mpk/runtime/megakernel.cuh``), storage access (``tasks/elementwise.cuh``), the scalar ops
(``scalar_ops.h``, generated from ``jax_mpk/scalar_ops.py``), block reductions (``tasks/reduce.cuh``) and the
task bodies' device code (``tasks/<kind>.cuh``). Each kernel is rendered by its task-body kind
(:mod:`jax_mpk.bodies`: attention, dot, rows, flat) with the expression emitter (:mod:`jax_mpk.emit`); this
module assembles the source: the variants, the task tables and the dispatch. Kernels whose bodies differ only in
the buffers they touch (the same layer repeated) share one device function, a *variant*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bodies
from .bodies.dot import MMA_MAX_COLUMNS, RING_BYTES, RING_SLOT_BYTES, RING_SLOTS
from .dot_staging import MAX_SHARED_WEIGHT_ROWS
from .emit import THREADS, KernelBody
from .errors import InvalidArgumentError
from .kernels import Tensor
from .layout import TaskField, TensorKind, profile_sm_words
from .plan import task_records
from .schedule import Schedule
from .target import Target
from .tasks import TaskGraph

KERNEL_NAME = "jax_mpk_megakernel"
# The task bodies' shared memory starts on a 128-byte boundary whatever the static shared memory before it. On an
# H200 (session 16, Llama-1B b1) a base 16 bytes past a 32-byte boundary cost 7-11% (1.121 ms at 0 bytes past a
# 128-byte boundary, 1.206 at 16, 1.131 at 64, 1.251 at 80, 1.130 at 96): 16 more bytes of static shared memory in
# session 14 had moved the base from 64 to 80 and made main 12% slower.
SHARED_BASE_ALIGNMENT = 128


@dataclass
class GeneratedSource:
    text: str
    threads: int
    smem_bytes: int
    kernel_name: str
    num_variants: int


def generate(graph: TaskGraph, sched: Schedule, profile_offset: int | None = None) -> GeneratedSource:
    """The megakernel's source, within the shared memory of the GPU the graph was fused for (a CPU-fused graph:
    the default architecture's). With ``profile_offset``, every task records the stamps of
    ``layout.PROFILE_STAMPS`` (uint64 nanoseconds; product bodies mark their own phases) in the workspace at that
    byte offset."""
    kg = graph.kernels
    target = kg.target or Target("cuda", 1)
    budget = target.shared_memory_bytes
    slots = _BufferSlots(len(kg.input_specs), len(kg.output_specs))
    variants: dict[str, int] = {}
    variant_texts: list[str] = []
    calls, prefetches = [], []
    smem, ring_offset = 0, None  # the ring sits above the shared memory of every task that uses one
    for kernel, tasks in zip(kg.kernels, graph.tasks_by_kernel()):
        body = KernelBody(kernel, tasks, budget, graph.merge_counters.get(kernel.index, -1), profile_offset is not None,
                          target.comm_copies, target.warp_ring)  # fmt: skip
        text, kernel_smem, prefetch = bodies.render(body)
        smem = max(smem, kernel_smem)
        if body.uses_ring:
            ring_offset = max(ring_offset or 0, -(-kernel_smem // 128) * 128)
        if text not in variants:
            variants[text] = len(variants)
            variant_texts.append(text.replace("VARIANT", f"variant_{variants[text]}"))
        args = ", ".join(body.arguments(slots.pointer))
        calls.append(f"      case {kernel.index}: variant_{variants[text]}(p, t, smem{', ' if args else ''}{args}); break;")
        if prefetch:
            prefetches.append(f"      case {kernel.index}: {{ {prefetch(slots)} }} break;")
    profile = profile_sms = "nullptr"
    if profile_offset is not None:
        workspace = slots.num_inputs + slots.num_outputs
        profile = f"reinterpret_cast<uint64_t*>(p.buffers[{workspace}] + {profile_offset})"
        profile_sms = f"{profile} + {profile_sm_words(len(graph.tasks))}"
    if ring_offset is not None:
        smem = max(smem, ring_offset + RING_BYTES)
    if target.smem_floor > budget:
        raise InvalidArgumentError(f"JAX_MPK_SMEM_FLOOR={target.smem_floor}: more than the {budget} bytes of shared "
                                   f"memory a CTA may use on compute capability {target.compute_capability}")
    # the floor's line keeps the source apart from the default's: the extension keeps one kernel per plan key
    # (plan.plan_key), and its launch's shared memory differs
    floor = [f"// JAX_MPK_SMEM_FLOOR: {target.smem_floor} bytes of dynamic shared memory asked for"]
    floor = floor if target.smem_floor else []
    smem = max(smem, target.smem_floor)
    # every kind keeps within the budget (the ring's users leave room for it): a violation is a bug of a kind
    assert smem <= budget, f"{smem} bytes of shared memory, more than the target's {budget} (jax_mpk bug)"
    # 32-bit index arithmetic (divisions are several times cheaper) unless a tensor is too large for it
    wide = max((b.nbytes for b in kg.buffers), default=0) >= 1 << 31
    lines = [
        "// Generated by jax_mpk.codegen: one persistent megakernel for one task graph. Do not edit.",
        *floor,
        f"#define JAX_MPK_BLOCK_THREADS {THREADS}",
        f"#define JAX_MPK_RING_SLOTS {RING_SLOTS}",
        f"#define JAX_MPK_RING_SLOT_BYTES {RING_SLOT_BYTES}",
        f"#define JAX_MPK_RING_MAX_ROWS {MAX_SHARED_WEIGHT_ROWS}",
        f"#define JAX_MPK_MMA_MAX_COLUMNS {MMA_MAX_COLUMNS}",
        f"#define JAX_MPK_STREAM_EVICT_FIRST {int(target.stream_evict_first)}",
        '#include "jax_mpk/runtime/megakernel.cuh"',
        *[f'#include "jax_mpk/tasks/{header}.cuh"' for header in bodies.HEADERS],
        "",
        "namespace {",
        "using namespace jax_mpk;",
        f"using index_t = {'int64_t' if wide else 'int32_t'};",
        f"constexpr int kRingOffset = {ring_offset or 0};  // byte offset of the weight ring in shared memory",
        "",
        *_task_tables(graph, sched),
        "",
        *variant_texts,
        f"using Params = KernelParams<{slots.num_buffers}>;  // the operands, the results, the workspace",
        "struct Dispatch {",
        "  const Params& p;",
        "  __device__ void prefetch(const TaskRecord& t, char* smem) {",
        "    switch (t.kernel) {",
        *prefetches,
        "      default: break;",
        "    }",
        "  }",
        "  __device__ void run(const TaskRecord& t, char* smem) {",
        "    switch (t.kernel) {",
        *calls,
        "      default: __trap();",
        "    }",
        "  }",
        "};",
        "}  // namespace",
        "",
        f'extern "C" __global__ void __launch_bounds__({THREADS}, 1) {KERNEL_NAME}(const Params p) {{',
        f"  extern __shared__ __align__({SHARED_BASE_ALIGNMENT}) char smem[];",
        "  Dispatch dispatch{p};",
        f"  run_worker(p, kTasks, kSignals, kRemoteSignals, kWorkerBegin, kWorkerTasks, smem, dispatch, {profile},",
        f"             {profile_sms});",
        "}",
        "",
    ]
    return GeneratedSource("\n".join(lines), THREADS, smem, KERNEL_NAME, len(variants))


class _BufferSlots:
    """Operands, then results, then the workspace: the order the FFI handler fills KernelParams.buffers."""

    def __init__(self, num_inputs: int, num_outputs: int):
        self.num_inputs, self.num_outputs = num_inputs, num_outputs
        self.num_buffers = num_inputs + num_outputs + 1

    def pointer(self, tensor: Tensor, element_offset: int = 0) -> str:
        b = tensor.buffer
        byte_offset = element_offset * np.dtype(b.dtype).itemsize
        if b.kind == TensorKind.COMM:  # in this rank's buffer, this call's half (stores go to every rank's)
            return f"(comm::local(p) + {b.index + byte_offset})"
        if b.kind == TensorKind.INPUT:
            slot = b.index
        elif b.kind == TensorKind.OUTPUT:
            slot = self.num_inputs + b.index
        else:
            slot, byte_offset = self.num_inputs + self.num_outputs, byte_offset + b.index
        return f"(p.buffers[{slot}] + {byte_offset})" if byte_offset else f"p.buffers[{slot}]"


def _task_tables(graph: TaskGraph, sched: Schedule) -> list[str]:
    """The plan's task records as TaskRecord initializers (megakernel.cuh mirrors layout.TaskField)."""

    def record(words: list[int]) -> str:
        def join(values):
            return ",".join(map(str, values))

        scalars, lo, hi = words[: TaskField.LO], words[TaskField.LO : TaskField.HI], words[TaskField.HI : TaskField.REMOTE_WAIT_EVENT]
        remote = words[TaskField.REMOTE_WAIT_EVENT :]
        return f"{{{join(scalars)},{{{join(lo)}}},{{{join(hi)}}},{join(remote)}}}"

    records, signals, remote_signals = task_records(graph.tasks)
    begin, flat = [0], []
    for worker in sched.workers:
        flat += worker
        begin.append(len(flat))
    return [
        "__device__ const TaskRecord kTasks[] = {",
        *[f"  {record(r)}," for r in records],
        "};",
        f"__device__ const int32_t kSignals[] = {{{','.join(map(str, signals or [0]))}}};",
        f"__device__ const int32_t kRemoteSignals[] = {{{','.join(map(str, remote_signals or [0]))}}};",
        f"__device__ const int32_t kWorkerBegin[] = {{{','.join(map(str, begin))}}};",
        f"__device__ const int32_t kWorkerTasks[] = {{{','.join(map(str, flat or [0]))}}};",
    ]
