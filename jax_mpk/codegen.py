"""Codegen: render a scheduled task graph as ONE persistent CUDA kernel.

The generated source only instantiates what lives in headers: the task loop and wait/signal protocol
(``ffi/include/jax_mpk/runtime/megakernel.cuh``), storage access (``tasks/elementwise.cuh``), the scalar ops
(``scalar_ops.h``, generated from ``jax_mpk/scalar_ops.py``),
block reductions (``tasks/reduce.cuh``) and the skinny matrix products (``tasks/dot.cuh``). What is rendered
here is each kernel's expression (its index arithmetic with compile-time shapes) and the task tables.
Kernels whose bodies differ only in the buffers they touch (the same layer repeated) share one device
function, a *variant*.

Kernel bodies take one of three forms:
* dot:  the activation row is staged in shared memory and the weights streamed by ``jax_mpk::dot``;
  the epilogue (residual add, SwiGLU gate ...) runs on the accumulators.
* rows: kernels with reductions over trailing dims (RMSNorm, softmax, argmax): per row of the tile, the
  block reduces cooperatively, then every thread produces a share of the row's outputs.
* flat: everything else: threads stride over the tile's elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .fusion import MAX_SHARED_WEIGHT_ROWS, ROW_STAGING_MAX_INLINE, Kernel, Tensor
from .graph import Acc, Elementwise, Load, Node, Piecewise, Reduce, Reindex, topological
from .indexmap import Affine, IndexMap
from .layout import DTYPES, SCALAR_OP_OF, DType, NodeOp, ReduceKind, TaskField, TensorKind
from .plan import dtype_code, task_records
from .schedule import Schedule
from .tasks import TaskGraph

THREADS = 512
KERNEL_NAME = "jax_mpk_megakernel"
MAX_DOT_SMEM_BYTES = 160 * 1024
PREFETCH_BYTES = 64 * 1024  # weight bytes a task asks L2 for before it waits (products without a ring)
# The weight ring of dot.cuh (columns-layout products with a weight operand): slots of shared memory that a
# task's weight tile streams through with cp.async, the first RING_SLOTS - 1 issued before the task waits.
RING_SLOTS = 4
RING_SLOT_BYTES = 32 * 1024
RING_BYTES = RING_SLOTS * RING_SLOT_BYTES
MAX_SMEM_BYTES = 227 * 1024  # dynamic shared memory a Hopper CTA may opt in to
MMA_MAX_COLUMNS = 512  # the widest column tile of the tensor-core dot (its accumulators are registers)
# Strided positions of a row that a thread folds per unrolled step of a cooperative reduction (their loads
# are issued together). Output loops are not unrolled: batching 2-4 positions' values before their stores
# raised the kernel's register count and broke the load schedule of the GEMV variants, which share it.
FOLD_UNROLL = 4
ROW_REDUCTION = 256  # reductions at least this long are done by the whole block, row by row; shorter inline

_STORAGE = {code: info.cuda_storage for code, info in DTYPES.items()}
_VALUE = {code: info.cuda_value for code, info in DTYPES.items()}
_ROUND = {code: info.cuda_round for code, info in DTYPES.items() if info.cuda_round}
_REDUCER = {
    ReduceKind.SUM: "reduce::Sum", ReduceKind.PROD: "reduce::Prod", ReduceKind.MAX: "reduce::Max",
    ReduceKind.MIN: "reduce::Min", ReduceKind.AND: "reduce::And", ReduceKind.OR: "reduce::Or",
}  # fmt: skip


@dataclass
class GeneratedSource:
    text: str
    threads: int
    smem_bytes: int
    kernel_name: str
    num_variants: int


def generate(graph: TaskGraph, sched: Schedule, profile_offset: int | None = None) -> GeneratedSource:
    """The megakernel's source. With ``profile_offset``, every task records its wait/start/end times
    (uint64 nanoseconds, 3 per task) in the workspace at that byte offset."""
    kg = graph.kernels
    slots = _BufferSlots(len(kg.input_specs), len(kg.output_specs))
    variants: dict[str, int] = {}
    variant_texts: list[str] = []
    calls, prefetches = [], []
    smem, ring_offset = 0, None  # the ring sits above the shared memory of every task that uses one
    for kernel, tasks in zip(kg.kernels, graph.tasks_by_kernel()):
        body = _KernelBody(kernel, tasks)
        text, tensors, kernel_smem, prefetch = body.render()
        smem = max(smem, kernel_smem)
        if body.uses_ring:
            ring_offset = max(ring_offset or 0, -(-kernel_smem // 128) * 128)
        if text not in variants:
            variants[text] = len(variants)
            variant_texts.append(text.replace("VARIANT", f"variant_{variants[text]}"))
        args = ", ".join(slots.pointer(t, offset) for t, offset in tensors)
        calls.append(f"      case {kernel.index}: variant_{variants[text]}(p, t, smem{', ' if args else ''}{args}); break;")
        if prefetch:
            prefetches.append(f"      case {kernel.index}: {{ {prefetch(slots)} }} break;")
    profile = "nullptr"
    if profile_offset is not None:
        workspace = slots.num_inputs + slots.num_outputs
        profile = f"reinterpret_cast<uint64_t*>(p.buffers[{workspace}] + {profile_offset})"
    if ring_offset is not None:
        smem = max(smem, ring_offset + RING_BYTES)
    # 32-bit index arithmetic (divisions are several times cheaper) unless a tensor is too large for it
    wide = max((b.nbytes for b in kg.buffers), default=0) >= 1 << 31
    lines = [
        "// Generated by jax_mpk.codegen: one persistent megakernel for one task graph. Do not edit.",
        f"#define JAX_MPK_BLOCK_THREADS {THREADS}",
        f"#define JAX_MPK_RING_SLOTS {RING_SLOTS}",
        f"#define JAX_MPK_RING_SLOT_BYTES {RING_SLOT_BYTES}",
        f"#define JAX_MPK_RING_MAX_ROWS {MAX_SHARED_WEIGHT_ROWS}",
        f"#define JAX_MPK_MMA_MAX_COLUMNS {MMA_MAX_COLUMNS}",
        '#include "jax_mpk/runtime/megakernel.cuh"',
        '#include "jax_mpk/tasks/dot.cuh"',
        '#include "jax_mpk/tasks/elementwise.cuh"',
        '#include "jax_mpk/tasks/reduce.cuh"',
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
        "  extern __shared__ __align__(16) char smem[];",
        "  Dispatch dispatch{p};",
        f"  run_worker(p, kTasks, kSignals, kRemoteSignals, kWorkerBegin, kWorkerTasks, smem, dispatch, {profile});",
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
        if b.kind == TensorKind.COMM:  # in rank 0's buffer, this call's half; codegen moves to other ranks
            return f"(p.comm.peers[0] + comm::half_offset(p) + {b.index + byte_offset})"
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


@dataclass
class _Fold:
    acc: str  # accumulator variable
    acc_t: str  # its value type (ArgBest's value type for arg-reductions)
    reducer: str  # the reduce:: combiner type
    arg: bool
    result: str  # expression of the reduced value


class _NotRowForm(Exception):
    """A reduction is read at an index that is not its row: fall back to the flat form."""


class _KernelBody:
    """Renders one kernel as a device function of (params, task, smem, tensor pointers...)."""

    def __init__(self, kernel: Kernel, tasks):
        self.kernel, self.tasks = kernel, tasks
        # Pointer parameters: (tensor, constant element offset). Constant offsets (the layer index into
        # stacked weights, a static cache slot) travel in the pointer, so that repeated layers render the
        # same text and share one variant.
        self.tensors: list[tuple[Tensor, int]] = []
        self.tensor_names: dict[tuple, str] = {}
        self.uses_ring = False

    # -------------------------------------------------------------------------------------- interface
    def render(self):
        dot = self.kernel.dot
        if dot is not None:
            plan = _DotPlan.of(self.kernel, self.tasks)
            if plan is not None and plan.together:
                return self._render_dot_together(plan)
            if plan is not None:
                return self._render_dot(plan)
        if dot is None and any(_is_row_reduction(n) for n in self.kernel.nodes()):
            try:
                return self._render_rows()
            except _NotRowForm:
                self.tensors, self.tensor_names = [], {}
        return self._render_flat()

    def pointer_name(self, tensor: Tensor, element_offset: int = 0) -> str:
        key = (id(tensor.buffer), element_offset)
        if key not in self.tensor_names:
            self.tensor_names[key] = f"b{len(self.tensors)}"
            self.tensors.append((tensor, element_offset))
        return self.tensor_names[key]

    def _signature(self) -> str:
        params = ", ".join(f"char* b{i}" for i in range(len(self.tensors)))
        return f"__device__ __noinline__ void VARIANT(const MegakernelParams& p, const TaskRecord& t, char* smem{', ' if params else ''}{params})"

    # ------------------------------------------------------------------------------------------- flat
    def _render_flat(self):
        k = self.kernel
        em = _Emitter(self, rows_prefix=None)
        rank = len(k.domain)
        em.emit(f"const index_t count = {_tile_count(rank)};")

        def element(e: str) -> list[str]:
            idx = em.tile_index(e, range(rank))
            if k.dot is not None:
                em.acc = self._generic_accumulator(em, idx)
            return idx

        em.elements("count", element)
        return self._finish(em, smem=8 * THREADS, prefetch=None)

    def _generic_accumulator(self, em: _Emitter, idx: list[str]) -> str:
        dot = self.kernel.dot
        acc = em.fresh("acc")
        em.emit(f"float {acc} = 0.0f;")
        kcount = math.prod(dot.k_shape)
        em.emit(f"for (index_t kk = 0; kk < {kcount}; ++kk) {{")
        em.push()
        kidx = em.delinearize("kk", [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))
        combined = list(idx) + kidx
        if dot.lhs_expr is None:
            a = em.load_value(dot.lhs, dot.lhs_map, combined, np.float32)
        else:
            a = em.value(dot.lhs_expr, combined)
        b = em.load_value(dot.rhs, dot.rhs_map, combined, np.float32)
        em.emit(f"{acc} += static_cast<float>({a}) * static_cast<float>({b});")
        em.pop()
        em.emit("}")
        return em.rounded(acc, dtype_code(dot.acc_dtype))

    # ------------------------------------------------------------------------------------------- rows
    def _render_rows(self):
        k = self.kernel
        reduces = [n for n in k.nodes() if _is_row_reduction(n)]
        prefix = len(reduces[0].shape)
        if any(len(r.shape) != prefix for r in reduces) or prefix > len(k.domain):
            raise _NotRowForm
        rank = len(k.domain)
        em = _Emitter(self, rows_prefix=[f"r{d}" for d in range(prefix)])
        em.emit(f"const index_t rows = {_tile_count(prefix)};")
        em.emit("for (index_t row = 0; row < rows; ++row) {")
        em.push()
        rows_idx = em.tile_index("row", range(prefix))
        for d, name in enumerate(rows_idx):
            em.emit(f"const index_t r{d} = {name};")
        for r in reduces:
            em.row_reduction(r, [f"r{d}" for d in range(prefix)])
        trailing = [_tile_size(d) for d in range(prefix, rank)]
        em.emit(f"const index_t count = {' * '.join(trailing) if trailing else '1'};")
        em.elements("count", lambda e: [f"r{d}" for d in range(prefix)] + em.tile_index(e, range(prefix, rank)))
        em.pop()
        em.emit("}")
        return self._finish(em, smem=8 * THREADS, prefetch=None)

    # -------------------------------------------------------------------------------------------- dot
    def _render_dot(self, plan: _DotPlan):
        k = self.kernel
        dot = k.dot
        rank = len(k.domain)
        em = _Emitter(self, rows_prefix=None)
        rhs = self.pointer_name(dot.rhs, plan.rhs_const)
        w_type = _STORAGE[dtype_code(dot.rhs.buffer.dtype)]
        smem = _emit_dot_buffers(em, plan, 1, scratch=plan.layout == "columns_vec" or dot.lhs_expr is not None)
        em.emit(f"const index_t rows = {_tile_count(rank - 1)};")
        em.emit(f"const index_t n_lo = t.lo[{rank - 1}], n_len = t.hi[{rank - 1}] - n_lo;")
        em.emit("for (index_t row = 0; row < rows; ++row) {")
        em.push()
        ridx = em.tile_index("row", range(rank - 1))
        rhs_base = _linear(0, plan.rhs_coefs[: rank - 1], ridx)
        em.emit(f"const index_t rhs_base = {rhs_base} + n_lo * {plan.rhs_n};")
        self._stage_lhs(em, plan, ridx, "xs")
        em.emit("__syncthreads();")
        w = f"reinterpret_cast<const {w_type}*>({rhs}) + rhs_base"
        if plan.layout == "columns_vec":
            em.emit(f"dot::columns_vec(xs, {w}, {plan.rhs_k}, {plan.K}, static_cast<int>(n_len), acc, scratch);")
        elif plan.layout == "rows":
            em.emit(f"dot::rows(xs, {w}, {plan.rhs_n}, {plan.rhs_k}, {plan.K}, static_cast<int>(n_len), {str(plan.vector_rows).lower()}, acc);")
        else:
            em.emit(f"dot::columns_scalar(xs, {w}, {plan.rhs_k}, {plan.rhs_n}, {plan.K}, static_cast<int>(n_len), acc);")
        em.emit("__syncthreads();")

        def element(e: str) -> list[str]:
            em.acc = em.rounded(f"acc[{e}]", dtype_code(dot.acc_dtype))
            return list(ridx) + [f"(n_lo + {e})"]

        em.elements("n_len", element)
        em.emit("__syncthreads();")
        em.pop()
        em.emit("}")
        return self._finish(em, smem=smem, prefetch=self._weight_prefetch(plan))

    def _render_dot_together(self, plan: _DotPlan):
        """All the tile's rows staged (xs[r][k]), then one pass over the weight tile for all of them (through
        the ring, dot::columns_ring, or dot::rows_shared), then the epilogue over rows x columns."""
        self.uses_ring = plan.layout == "columns_vec"
        k = self.kernel
        dot, rank, R = k.dot, len(k.domain), plan.together
        em = _Emitter(self, rows_prefix=None)
        rhs = self.pointer_name(dot.rhs, plan.rhs_const)
        w_type = _STORAGE[dtype_code(dot.rhs.buffer.dtype)]
        x_stride, n_pad = plan.x_stride, plan.n_pad
        smem = _emit_dot_buffers(em, plan, R, scratch=True)
        em.emit(f"const index_t n_lo = t.lo[{rank - 1}], n_len = t.hi[{rank - 1}] - n_lo;")
        row_stride = self._uniform_row_stride(plan) if R > 1 else None
        if row_stride is not None:  # one staging pass over all rows: all their loads in flight together
            lhs = self.pointer_name(dot.lhs, plan.lhs_const)
            first = _linear(0, plan.lhs_coefs[: rank - 1], [f"t.lo[{d}]" for d in range(rank - 1)])
            lhs_t = _STORAGE[dtype_code(dot.lhs.buffer.dtype)]
            em.emit(f"dot::stage_rows<{R}, {plan.K}, {lhs_t}, {str(_read_only(dot.lhs)).lower()}>("
                    f"xs, {x_stride}, {lhs}, {first}, {row_stride}, {plan.lhs_k});")
        else:
            em.emit(f"for (index_t row = 0; row < {R}; ++row) {{")
            em.push()
            ridx = em.tile_index("row", range(rank - 1))
            em.emit(f"float* x_row = xs + row * {x_stride};")
            self._stage_lhs(em, plan, ridx, "x_row")
            em.pop()
            em.emit("}")
        em.emit("__syncthreads();")
        w = f"reinterpret_cast<const {w_type}*>({rhs}) + ({self._weight_tile_origin(plan)})"
        if self.uses_ring:
            ring_dot = "columns_ring_mma" if plan.mma else "columns_ring"
            em.emit(f"dot::{ring_dot}<{w_type}, {R}>(xs, {x_stride}, smem + kRingOffset, {w}, {plan.rhs_k}, {plan.K}, "
                    f"static_cast<int>(n_len), acc, {n_pad});")
        else:
            em.emit(f"dot::rows_shared<{w_type}, {R}>(xs, {x_stride}, {w}, {plan.rhs_n}, {plan.K}, "
                    f"static_cast<int>(n_len), acc, {n_pad});")
        em.emit("__syncthreads();")

        def element(e: str) -> list[str]:
            em.emit(f"const index_t row = {e} / n_len, col = {e} - row * n_len;")
            em.acc = em.rounded(f"acc[row * {n_pad} + col]", dtype_code(dot.acc_dtype))
            return em.tile_index("row", range(rank - 1)) + ["(n_lo + col)"]

        em.elements(f"{R} * n_len", element)
        em.emit("__syncthreads();")
        prefetch = self._ring_prefetch(plan) if self.uses_ring else self._weight_prefetch(plan)
        return self._finish(em, smem=smem, prefetch=prefetch)

    def _uniform_row_stride(self, plan: _DotPlan) -> int | None:
        """The lhs offset between consecutive rows of the tile (in tile order) when it is one number (the
        rows are an arithmetic progression in memory), else None. Needs a loaded lhs."""
        rank = len(self.kernel.domain)
        if self.kernel.dot.lhs_expr is not None:
            return None
        t = self.tasks[0]
        extents = [t.hi[d] - t.lo[d] for d in range(rank - 1)]
        varying = [d for d in range(rank - 1) if extents[d] > 1]
        if not varying:
            return None
        row_stride = plan.lhs_coefs[varying[-1]]
        stride = row_stride
        for d in reversed(varying):
            if plan.lhs_coefs[d] != stride:
                return None
            stride *= extents[d]
        return row_stride

    def _weight_tile_origin(self, plan: _DotPlan) -> str:
        """Element offset of the task's weight tile (its first k-row, first column)."""
        rank = len(self.kernel.domain)
        return _linear(0, plan.rhs_coefs, [f"t.lo[{d}]" for d in range(rank)])

    def _ring_prefetch(self, plan: _DotPlan):
        dot, rank = self.kernel.dot, len(self.kernel.domain)
        w_type = _STORAGE[dtype_code(dot.rhs.buffer.dtype)]
        origin = self._weight_tile_origin(plan)

        def render(slots) -> str:
            return (
                f"dot::ring_begin<{w_type}, {str(plan.mma).lower()}>(smem + kRingOffset, reinterpret_cast<const {w_type}*>("
                f"{slots.pointer(dot.rhs, plan.rhs_const)}) + ({origin}), {plan.rhs_k}, {plan.K}, "
                f"t.hi[{rank - 1}] - t.lo[{rank - 1}]);"
            )

        return render

    def _stage_lhs(self, em: _Emitter, plan: _DotPlan, ridx: list[str], xs: str) -> None:
        """{xs}[k] = the product's activation row at domain row ``ridx``: loaded, or computed."""
        dot, rank = self.kernel.dot, len(self.kernel.domain)
        if dot.lhs_expr is None:
            lhs = self.pointer_name(dot.lhs, plan.lhs_const)
            em.emit(f"const index_t lhs_base = {_linear(0, plan.lhs_coefs[: rank - 1], ridx)};")
            lhs_t = _STORAGE[dtype_code(dot.lhs.buffer.dtype)]
            read_only = str(_read_only(dot.lhs)).lower()
            em.emit(f"dot::stage_rows<1, {plan.K}, {lhs_t}, {read_only}>({xs}, 0, {lhs}, lhs_base, 0, {plan.lhs_k});")
        else:
            self._stage_computed_row(em, ridx, plan.K, xs)

    def _stage_computed_row(self, em: _Emitter, ridx: list[str], K: int, xs: str) -> None:
        """xs[k] = the lhs expression at (row, k): the row's reductions block-cooperatively (scratch space
        after the accumulators, xs is being filled), then each thread computes its share of the k's."""
        dot = self.kernel.dot
        value, lhs_map = dot.lhs_expr.children[0], dot.lhs_expr.map
        prefix = len(value.shape) - len(dot.k_shape)
        zeros = ["0"] * (1 + len(dot.k_shape))
        rows = em.map_index(lhs_map, list(ridx) + zeros)[:prefix]
        em.rows_prefix, em.scratch, em.row_reduction_min = rows, "reinterpret_cast<char*>(scratch)", ROW_STAGING_MAX_INLINE + 1
        for node in topological([value]):
            if em.is_row_reduction(node):
                em.row_reduction(node, rows)
        em.emit(f"for (index_t k = threadIdx.x; k < {K}; k += {THREADS}) {{")
        em.push()
        kidx = em.delinearize("k", [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))
        trailing = em.map_index(lhs_map, list(ridx) + ["0"] + kidx)[prefix:]
        em.emit(f"{xs}[k] = static_cast<float>({em.value(value, rows + trailing)});")
        em.pop()
        em.emit("}")

    def _weight_prefetch(self, plan: _DotPlan):
        """Code that asks L2 for the weight tile of the task's first row before the task waits."""
        dot, rank = self.kernel.dot, len(self.kernel.domain)
        if not _read_only(dot.rhs) or plan.layout == "columns_scalar":
            return None
        elt = np.dtype(dot.rhs.buffer.dtype).itemsize
        # Only the head of the tile: L2 holds ~50 MB for 132 SMs, and a prefetch larger than a task's share
        # is evicted before use while it competes with the loads of the tasks running now.
        if plan.layout == "columns_vec":
            row_bytes, stride = f"n_len * {elt}", plan.rhs_k * elt
            rows = f"min((index_t){plan.K}, (index_t)({PREFETCH_BYTES} / (n_len * {elt})))"
        else:
            row_bytes, stride = str(plan.K * elt), plan.rhs_n * elt
            rows = f"min(n_len, (index_t){max(1, PREFETCH_BYTES // (plan.K * elt))})"
        first = self._weight_tile_origin(plan)

        def render(slots) -> str:
            return (
                f"const index_t n_len = max(t.hi[{rank - 1}] - t.lo[{rank - 1}], 1); "
                f"dot::prefetch_l2({slots.pointer(dot.rhs, plan.rhs_const)} + ({first}) * {elt}, "
                f"{row_bytes}, {rows}, {stride});"
            )

        return render

    def _finish(self, em: _Emitter, smem: int, prefetch):
        body = "\n".join("  " + line for line in em.lines)
        text = f"{self._signature()} {{\n{body}\n}}\n"
        return text, list(self.tensors), smem, prefetch


@dataclass
class _DotPlan:
    """How a DOT kernel maps onto dot.cuh: linear forms of both operands over (domain ++ k)."""

    layout: str  # columns_vec | columns_scalar | rows
    K: int
    max_n: int
    lhs_const: int
    lhs_coefs: list[int]
    lhs_k: int
    rhs_const: int
    rhs_coefs: list[int]
    rhs_k: int
    rhs_n: int
    vector_rows: bool
    # > 0: the task's rows (this many) share one pass over the weight tile: the ring (columns_vec) or
    # dot::rows_shared (rows)
    together: int = 0
    # the ring's rows multiply on tensor cores (dot::columns_ring_mma), see _tensor_core_rows
    mma: bool = False

    @property
    def k_pad(self) -> int:
        return -(-self.K // 4) * 4

    @property
    def x_stride(self) -> int:
        """Floats from one staged row to the next: k_pad, and for the tensor-core dot 8 more than a multiple of
        32 (its B loads read 8 rows at one k: 8 different banks)."""
        return self.k_pad + (8 - self.k_pad) % 32 if self.mma else self.k_pad

    @property
    def n_pad(self) -> int:
        return -(-self.max_n // 4) * 4

    @staticmethod
    def of(kernel: Kernel, tasks) -> _DotPlan | None:
        dot = kernel.dot
        rank = len(kernel.domain)
        if rank == 0 or not tasks or kernel.reads_comm():
            return None
        if dot.lhs_expr is None:
            lhs = _linear_form(dot.lhs_map, dot.lhs.shape)
        else:  # computed while staged: only the contraction's nesting matters
            lhs = 0, [0] * rank + [math.prod(dot.k_shape[d + 1 :]) for d in range(len(dot.k_shape))]
        rhs = _linear_form(dot.rhs_map, dot.rhs.shape)
        if lhs is None or rhs is None:
            return None
        (lc, lcoef), (rc, rcoef) = lhs, rhs
        lk, rk, K = _flatten_contraction(lcoef[rank:], rcoef[rank:], dot.k_shape)
        if K is None or lcoef[rank - 1] != 0:
            return None
        max_n = max(t.hi[rank - 1] - t.lo[rank - 1] for t in tasks)
        if 4 * (K + max_n + 8 * THREADS) + 64 > MAX_DOT_SMEM_BYTES:
            return None
        rn = rcoef[rank - 1]
        elt_ok = dtype_code(dot.rhs.buffer.dtype) in (DType.F32, DType.BF16, DType.F16)
        aligned = all(c % 8 == 0 for c in [rc, *rcoef[: rank - 1]])
        layout, vector_rows = "columns_scalar", False
        if rn == 1 and elt_ok and aligned and rk % 8 == 0 and all(
            t.lo[rank - 1] % 8 == 0 and (t.hi[rank - 1] - t.lo[rank - 1]) % 8 == 0 for t in tasks
        ):
            layout = "columns_vec"
        elif rk == 1:
            layout = "rows"
            vector_rows = elt_ok and aligned and K % 8 == 0 and rn % 8 == 0
        plan = _DotPlan(layout, K, max_n, lc, lcoef[:rank], lk, rc, rcoef[:rank], rk, rn, vector_rows)
        plan.together = _rows_together(kernel, tasks, plan)
        plan.mma = _tensor_core_rows(kernel, tasks, plan)
        return plan


def _rows_together(kernel: Kernel, tasks, plan: _DotPlan) -> int:
    """Rows per task that share one pass over the weight tile (0: the task's rows go one by one): tiles of
    one row count (at most MAX_SHARED_WEIGHT_ROWS) whose rows share the weight tile (the weight does not
    vary along them), and
    * columns_vec, a weight (never written): streamed through the ring, any row count; column tiles that fit
      a slot and room for the ring above the task's shared memory;
    * vector rows over K >= 256: dot::rows_shared, for two rows or more."""
    rank = len(kernel.domain)
    extents = {tuple(h - l for l, h in zip(t.lo[: rank - 1], t.hi[: rank - 1])) for t in tasks}
    if len(extents) != 1:
        return 0
    (extent,) = extents
    rows = math.prod(extent)
    if not 1 <= rows <= MAX_SHARED_WEIGHT_ROWS or any(c and e > 1 for c, e in zip(plan.rhs_coefs, extent)):
        return 0
    base = _dot_smem_bytes(plan, rows)
    if plan.layout == "rows":
        return rows if plan.vector_rows and plan.K >= 256 and rows >= 2 and base <= MAX_SMEM_BYTES else 0
    if plan.layout != "columns_vec" or not _read_only(kernel.dot.rhs):
        return 0
    itemsize = np.dtype(kernel.dot.rhs.buffer.dtype).itemsize
    for t in tasks:
        n_len = t.hi[rank - 1] - t.lo[rank - 1]
        if n_len * itemsize > RING_SLOT_BYTES or n_len // 8 > THREADS:
            return 0
    return rows if -(-base // 128) * 128 + RING_BYTES <= MAX_SMEM_BYTES else 0


def _tensor_core_rows(kernel: Kernel, tasks, plan: _DotPlan) -> bool:
    """Whether the ring's rows multiply on tensor cores (dot::columns_ring_mma): 2 rows or more of bf16/f16
    values times a weight of the same type (so that the staged rows convert to it exactly), whole 16-column
    blocks of at most MMA_MAX_COLUMNS, K in whole 16-row steps, and room for the padded staged rows."""
    dot, rank = kernel.dot, len(kernel.domain)
    if plan.layout != "columns_vec" or plan.together < 2:
        return False
    w_dtype = np.dtype(dot.rhs.buffer.dtype)
    x_dtype = np.dtype(dot.lhs_expr.dtype if dot.lhs_expr is not None else dot.lhs.buffer.dtype)
    if dtype_code(w_dtype) not in (DType.BF16, DType.F16) or x_dtype != w_dtype or plan.K % 16:
        return False
    if any((t.hi[rank - 1] - t.lo[rank - 1]) % 16 or t.hi[rank - 1] - t.lo[rank - 1] > MMA_MAX_COLUMNS for t in tasks):
        return False
    padded = replace(plan, mma=True)
    return -(-_dot_smem_bytes(padded, plan.together) // 128) * 128 + RING_BYTES <= MAX_SMEM_BYTES


def _dot_smem_bytes(plan: _DotPlan, rows: int) -> int:
    """Shared memory of a product task below the ring: xs[rows][x_stride], acc[rows][n_pad], then scratch for
    block reductions and the columns GEMV's partial sums."""
    return 4 * (rows * (plan.x_stride + plan.n_pad) + 8 * THREADS)


def _emit_dot_buffers(em: _Emitter, plan: _DotPlan, rows: int, scratch: bool) -> int:
    """Declares the pointers of that layout (scratch only when the body uses it); returns its bytes."""
    em.emit("float* xs = reinterpret_cast<float*>(smem);")
    em.emit(f"float* acc = xs + {rows * plan.x_stride};")
    if scratch:
        em.emit(f"float* scratch = acc + {rows * plan.n_pad};")
    return _dot_smem_bytes(plan, rows)


def _linear_form(index_map: IndexMap, tensor_shape) -> tuple[int, list[int]] | None:
    """offset = const + sum(coef * index) when the map is one affine stage (or the identity)."""
    strides = [math.prod(tensor_shape[d + 1 :]) for d in range(len(tensor_shape))]
    if index_map.is_identity:
        return 0, strides
    if len(index_map.stages) != 1 or not isinstance(index_map.stages[0], Affine):
        return None
    stage = index_map.stages[0]
    const = sum(s * o for s, o in zip(strides, stage.offset))
    coefs = [sum(strides[r] * stage.matrix[r][c] for r in range(len(strides))) for c in range(len(index_map.in_shape))]
    return const, coefs


def _flatten_contraction(lcoef, rcoef, k_shape):
    """One stride per operand over the flattened contraction, when the contraction dims nest."""
    if not k_shape:
        return 0, 0, None
    for coefs in (lcoef, rcoef):
        for j in range(len(k_shape) - 1):
            if coefs[j] != coefs[j + 1] * k_shape[j + 1]:
                return 0, 0, None
    return lcoef[-1], rcoef[-1], math.prod(k_shape)


def _is_row_reduction(node: Node, minimum: int = ROW_REDUCTION) -> bool:
    """Reductions at least ``minimum`` long are done by the whole block, row by row; short ones (split-K
    sums) inline."""
    return isinstance(node, Reduce) and math.prod(node.children[0].shape[len(node.shape) :]) >= minimum


def _read_only(tensor: Tensor) -> bool:
    return tensor.buffer.kind == TensorKind.INPUT


def _tile_size(dim: int) -> str:
    return f"(t.hi[{dim}] - t.lo[{dim}])"


def _tile_count(rank: int) -> str:
    return " * ".join(f"(index_t)(t.hi[{d}] - t.lo[{d}])" for d in range(rank)) or "1"


def _linear(const: int, coefs, idx) -> str:
    terms = [f"{c} * (index_t){i}" if c != 1 else f"(index_t){i}" for c, i in zip(coefs, idx) if c != 0]
    if const or not terms:
        terms.append(str(const))
    return " + ".join(terms)


class _Emitter:
    """Emits C++ statements computing expression nodes at symbolic indices (strings), with memoization
    per scope (a loop body or a branch)."""

    def __init__(self, body: _KernelBody, rows_prefix):
        self.body, self.rows_prefix = body, rows_prefix
        self.lines: list[str] = []
        self.depth = 0
        self.scopes: list[dict] = [{}]
        self.counter = 0
        self.acc: str | None = None
        self.reductions: dict[int, str] = {}
        self.scratch = "smem"  # char* to shared memory that block reductions may use
        self.row_reduction_min = ROW_REDUCTION

    def is_row_reduction(self, node: Node) -> bool:
        return _is_row_reduction(node, self.row_reduction_min)

    # ---------------------------------------------------------------------------------------- output
    def emit(self, line: str) -> None:
        self.lines.append("  " * self.depth + line)

    def push(self) -> None:
        self.depth += 1
        self.scopes.append({})

    def pop(self) -> None:
        self.depth -= 1
        self.scopes.pop()

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def delinearize(self, flat: str, sizes: list[str], offsets: list[str]) -> list[str]:
        names, rest = [], flat
        for d in range(len(sizes)):
            name = self.fresh("i")
            inner = " * ".join(sizes[d + 1 :]) or "1"
            self.emit(f"const index_t {name} = {offsets[d]} + ({rest}) / ({inner}) % {sizes[d]};" if d else
                      f"const index_t {name} = {offsets[d]} + ({rest}) / ({inner});")
            names.append(name)
        return names

    def tile_index(self, flat: str, dims) -> list[str]:
        """Domain indices of position ``flat`` of the task's tile restricted to ``dims`` (row-major)."""
        dims = list(dims)
        return self.delinearize(flat, [_tile_size(d) for d in dims], [f"t.lo[{d}]" for d in dims])

    def rounded(self, expr: str, code: DType) -> str:
        name = self.fresh("v")
        fn = _ROUND.get(code)
        self.emit(f"const {_VALUE[code]} {name} = {fn}({expr});" if fn else f"const {_VALUE[code]} {name} = {expr};")
        return name

    # ---------------------------------------------------------------------------------------- indices
    def map_index(self, index_map: IndexMap, idx: list[str]) -> list[str]:
        cur, shape = list(idx), list(index_map.in_shape)
        for stage in index_map.stages:
            if isinstance(stage, Affine):
                new = []
                for row, off in zip(stage.matrix, stage.offset):
                    terms = [(a, c) for a, c in zip(row, cur) if a != 0]
                    if not terms:
                        new.append(str(off))
                    elif len(terms) == 1 and terms[0][0] == 1 and off == 0:
                        new.append(terms[0][1])
                    else:
                        parts = [c if a == 1 else f"{a} * {c}" for a, c in terms]
                        if off:
                            parts.append(str(off))
                        name = self.fresh("i")
                        self.emit(f"const index_t {name} = {' + '.join(parts)};")
                        new.append(name)
                cur = new
            else:
                lin = self.fresh("l")
                strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
                self.emit(f"const index_t {lin} = {_linear(0, strides, cur)};")
                cur = self.delinearize(lin, [str(s) for s in stage.out_shape], ["0"] * len(stage.out_shape))
            shape = list(stage.out_shape)
        return cur

    # ----------------------------------------------------------------------------------------- values
    def value(self, node: Node, idx: list[str]) -> str:
        name = self._known(node, idx)
        if name is None:
            # elementwise operands first, deepest first, so that a chain of hundreds of fused operations
            # does not recurse once per link
            for operand in self._unknown_elementwise_operands(node, idx):
                self.scopes[-1][(operand.uid, tuple(idx))] = self._compute(operand, idx)
            name = self.scopes[-1][(node.uid, tuple(idx))] = self._compute(node, idx)
        return name

    def _known(self, node: Node, idx: list[str]) -> str | None:
        key = (node.uid, tuple(idx))
        return next((scope[key] for scope in reversed(self.scopes) if key in scope), None)

    def _unknown_elementwise_operands(self, node: Node, idx: list[str]) -> list[Node]:
        """Elementwise nodes below ``node`` (through elementwise nodes, at the same index) not yet computed,
        children before parents in the order the recursive computation would emit them."""
        order, seen, stack = [], {node.uid}, [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if expanded:
                order.append(current)
                continue
            stack.append((current, True))
            for child in reversed(current.children if isinstance(current, Elementwise) else ()):
                if isinstance(child, Elementwise) and child.uid not in seen and self._known(child, idx) is None:
                    seen.add(child.uid)
                    stack.append((child, False))
        return order[:-1]  # node itself last

    def element_offset(self, tensor: Tensor, index_map: IndexMap, idx: list[str], dyn) -> tuple[str, str]:
        """(pointer parameter, element offset expression) of ``tensor[map(idx) + dyn]``."""
        strides = [math.prod(tensor.shape[d + 1 :]) for d in range(len(tensor.shape))]
        form = _linear_form(index_map, tensor.shape)
        if form is None:
            const, offset = 0, _linear(0, strides, self.map_index(index_map, idx))
        else:
            const, coefs = form
            offset = _linear(0, coefs, idx)
        for dim, value, hi in dyn:
            offset = f"{offset} + {strides[dim]} * static_cast<index_t>(ops::dynamic_offset({value}, {hi}))"
        pointer = self.body.pointer_name(tensor, const)
        if tensor.buffer.kind == TensorKind.COMM:  # slot r of the buffer lives on rank r
            slot = math.prod(tensor.buffer.shape) // tensor.buffer.shape[0]
            element = self.fresh("c")
            self.emit(f"const index_t {element} = {offset};")
            return f"comm::on_rank(p, {pointer}, {element} / {slot})", f"{element} % {slot}"
        return pointer, offset

    def load_value(self, tensor: Tensor, index_map: IndexMap, idx: list[str], dtype, dyn=()) -> str:
        code = dtype_code(tensor.buffer.dtype)
        fn = "ops::load_readonly" if _read_only(tensor) else "ops::load"
        name = self.fresh("x")
        ptr, offset = self.element_offset(tensor, index_map, idx, dyn)
        self.emit(f"const {_VALUE[code]} {name} = {fn}<{_STORAGE[code]}>({ptr}, {offset});")
        target = dtype_code(dtype)
        if _VALUE[target] != _VALUE[code]:
            return self.rounded(f"ops::convert<{_VALUE[target]}>({name})", target)
        return name

    def _compute(self, node: Node, idx: list[str]) -> str:
        code = dtype_code(node.dtype)
        vt = _VALUE[code]
        if isinstance(node, Load):
            dyn = [(d, self.value(c, idx), hi) for d, c, hi in zip(node.dims, node.children, node.his)]
            return self.load_value(node.tensor, node.map, idx, node.dtype, dyn)
        if isinstance(node, Acc):
            return self.acc
        if isinstance(node, Reindex):
            return self.value(node.children[0], self.map_index(node.map, idx))
        if isinstance(node, Reduce):
            return self._reduce(node, idx)
        if isinstance(node, Piecewise):
            return self._piecewise(node, idx)
        assert isinstance(node, Elementwise), node
        op = node.op
        if op == NodeOp.CONST:
            return _literal(node.params[0], code)
        if op == NodeOp.IOTA:
            return self.rounded(f"static_cast<{vt}>({idx[node.params[0]]})", code)
        args = [self.value(c, idx) for c in node.children]
        if op == NodeOp.CONVERT:
            return self.rounded(f"ops::convert<{vt}>({args[0]})", code)
        if op in SCALAR_OP_OF:
            return self.rounded(f"ops::{SCALAR_OP_OF[op].cpp_name}({', '.join(args)})", code)
        if op == NodeOp.SELECT_N:
            pred, cases = args[0], args[1:]
            if dtype_code(node.children[0].dtype) == DType.BOOL:
                return self.rounded(f"({pred} ? {cases[1]} : {cases[0]})", code)
            expr = cases[-1]
            for i in reversed(range(len(cases) - 1)):
                expr = f"({pred} <= {i} ? {cases[i]} : {expr})"
            return self.rounded(expr, code)
        if op == NodeOp.CLAMP:
            return self.rounded(f"ops::clamp({args[0]}, {args[1]}, {args[2]})", code)
        if op == NodeOp.INTEGER_POW:
            return self.rounded(f"ops::integer_pow({args[0]}, {int(node.params[0])})", code)
        if op == NodeOp.ROUND:
            fn = "ops::round_half_even" if int(node.params[0]) == 1 else "ops::round_half_away"
            return self.rounded(f"{fn}({args[0]})", code)
        raise NotImplementedError(f"codegen for {op!r}")

    def _piecewise(self, node: Piecewise, idx: list[str]) -> str:
        code = dtype_code(node.dtype)
        result = self.fresh("pw")
        self.emit(f"{_VALUE[code]} {result};")
        bounds = list(node.los) + [node.shape[node.axis]]
        axis_index = idx[node.axis]
        for k, child in enumerate(node.children):
            if bounds[k + 1] <= bounds[k]:
                continue
            keyword = "if" if k == 0 else "} else if"
            self.emit(f"{keyword} ({axis_index} < {bounds[k + 1]}) {{")
            self.push()
            shifted = list(idx)
            shifted[node.axis] = f"({axis_index} - {bounds[k]})"
            self.emit(f"{result} = {self.value(child, shifted)};")
            self.pop()
        self.emit("}")
        return result

    # ------------------------------------------------------------------------------------- reductions
    def _reduce(self, node: Reduce, idx: list[str]) -> str:
        if self.rows_prefix is not None and self.is_row_reduction(node):
            if list(idx) != self.rows_prefix[: len(node.shape)] or node.uid not in self.reductions:
                raise _NotRowForm
            return self.reductions[node.uid]
        fold = self._fold(node, idx, cooperative=False)  # short: each thread loops over it alone
        return self.rounded(fold.result, dtype_code(node.dtype))

    def row_reduction(self, node: Reduce, row: list[str]) -> None:
        """Cooperative reduction of one row: every thread folds a strided share, then the block combines."""
        fold = self._fold(node, row, cooperative=True)
        if fold.arg:
            self.emit(f"{fold.acc} = reduce::block_arg_reduce({fold.acc}, reinterpret_cast<{fold.acc_t}*>({self.scratch}), "
                      f"reinterpret_cast<int32_t*>({self.scratch} + 4 * {THREADS}));")
        else:
            self.emit(f"{fold.acc} = reduce::block_reduce<{fold.reducer}>({fold.acc}, "
                      f"reinterpret_cast<{fold.acc_t}*>({self.scratch}));")
        self.reductions[node.uid] = self.rounded(fold.result, dtype_code(node.dtype))

    def _fold(self, node: Reduce, outer: list[str], cooperative: bool) -> _Fold:
        """Emit an accumulator and the loop folding ``node``'s child over its inner positions: all of them,
        or (``cooperative``) this thread's share, positions threadIdx.x + k * THREADS, in a loop with a
        compile-time trip count that the compiler unrolls so that a thread's loads are issued together."""
        child = node.children[0]
        inner = child.shape[len(node.shape) :]
        code = dtype_code(child.dtype)
        arg = node.kind in (ReduceKind.ARGMAX, ReduceKind.ARGMIN)
        acc_t = "int32_t" if code == DType.BOOL else _VALUE[code]  # shuffles take no bool
        reducer = (
            f"reduce::ArgBest<{str(node.kind == ReduceKind.ARGMAX).lower()}, {acc_t}>"
            if arg
            else f"{_REDUCER[node.kind]}<{acc_t}>"
        )
        acc = self.fresh("red")
        length = math.prod(inner)
        init = f"{reducer}::init()"
        if node.kind == ReduceKind.SUM and length == 1 and acc_t == "float":
            init = "-0.0f"  # XLA: a sum of one element is that element (a single -0 stays -0); x + -0 == x
        self.emit(f"{reducer} {acc} = {init};" if arg else f"{acc_t} {acc} = {init};")
        if cooperative:
            self.emit(f"#pragma unroll {min(FOLD_UNROLL, -(-length // THREADS))}")
            self.emit(f"for (index_t j0 = 0; j0 < {length}; j0 += {THREADS}) {{")
            self.push()
            self.emit("const index_t j = j0 + threadIdx.x;")
            self.emit(f"if (j < {length}) {{")
        else:
            self.emit(f"for (index_t j = 0; j < {length}; ++j) {{")
        self.push()
        jidx = self.delinearize("j", [str(s) for s in inner], ["0"] * len(inner))
        v = self.value(child, list(outer) + jidx)
        item = f"{{static_cast<{acc_t}>({v}), static_cast<int32_t>(j)}}" if arg else f"static_cast<{acc_t}>({v})"
        self.emit(f"{acc} = {reducer}::combine({acc}, {item});")
        self.pop()
        self.emit("}")
        if cooperative:
            self.pop()
            self.emit("}")
        result = f"{acc}.index" if arg else f"static_cast<{_VALUE[dtype_code(node.dtype)]}>({acc})"
        return _Fold(acc, acc_t, reducer, arg, result)

    # ------------------------------------------------------------------------------------------ stores
    def elements(self, count: str, element) -> None:
        """Every thread computes, then stores, the kernel's outputs at its share of ``count`` tile positions.

        ``element(e)`` emits the domain index of position ``e`` and returns it. All outputs' values are
        computed before the first store: a store may alias any later load as far as the compiler knows, so
        a store between them would make the second output's loads wait for the first one's.
        """
        self.emit(f"for (index_t e = threadIdx.x; e < {count}; e += {THREADS}) {{")
        self.push()
        idx = element("e")
        stores = []
        for out in self.body.kernel.outputs:
            value = self.value(out.node, idx)
            dyn = [(dim, self.value(node, idx), hi) for dim, node, hi in out.dyn]
            ptr, offset = self.element_offset(out.tensor, out.map, idx, dyn)
            stores.append(f"ops::store<{_STORAGE[dtype_code(out.tensor.buffer.dtype)]}>({ptr}, {offset}, {value});")
        for line in stores:
            self.emit(line)
        self.pop()
        self.emit("}")


def _literal(value: float, code: DType) -> str:
    if code in (DType.F32, DType.BF16, DType.F16):
        if math.isnan(value):
            return "__int_as_float(0x7fc00000)"
        if math.isinf(value):
            return "__int_as_float(0x7f800000)" if value > 0 else "__int_as_float(0xff800000)"
        return f"{float(np.float32(value))!r}f"
    if code == DType.BOOL:
        return "true" if value else "false"
    if code in (DType.U32, DType.U8):
        return f"{int(value)}u"
    return f"static_cast<int32_t>({int(value)})"
