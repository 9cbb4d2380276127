"""Task-body kind ``dot``: a product kernel whose operands have linear layouts. The task's activation rows are
staged in shared memory (loaded, or computed: an RMSNorm or softmax recomputed per task), the weight tile is
streamed by ``ffi/include/jax_mpk/tasks/dot.cuh`` (columns: the weight ring, on tensor cores for several rows;
rows: a tied LM head's embedding rows), then the epilogue runs on the accumulators."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..emit import (FOLD_UNROLL, STORAGE, THREADS, Emitter, KernelBody, Tiling, folds_side_by_side, is_row_reduction,
                    linear, read_only)
from ..dot_staging import MAX_SHARED_WEIGHT_ROWS, ROW_STAGING_MAX_INLINE, shared_weight_dims
from ..graph import topological
from ..indexmap import linear_form
from ..kernels import Kernel
from ..layout import DType, dtype_code

PREFETCH_BYTES = 64 * 1024  # weight bytes a task asks L2 for before it waits (products without a ring)
# The weight ring of dot.cuh (columns-layout products with a weight operand): slots of shared memory that a
# task's weight tile streams through with cp.async, the first RING_SLOTS - 1 issued before the task waits.
RING_SLOTS = 4
RING_SLOT_BYTES = 32 * 1024
RING_BYTES = RING_SLOTS * RING_SLOT_BYTES
WARP_SLOT_BYTES = RING_SLOT_BYTES // (THREADS // 32)  # a warp's part of a slot in the warp ring (kWarpSlotBytes)
MMA_MAX_COLUMNS = 512  # the widest column tile of the tensor-core dot (its accumulators are registers)
# a ring product's call per tile width, its shape as template arguments, up to this many widths in a kernel
STATIC_TILE_WIDTHS = 2
# Output columns are tiled in multiples of this, so weight rows load as whole 32-byte sectors of bf16 weights.
COLUMN_ALIGN = 16


def tiling(kernel: Kernel) -> Tiling | None:
    """The rows that share a weight stay whole in every tile (each task streams its tile of it once for all of
    them), and those that share an operand the graph writes (the query heads of a KV head) while that leaves half
    the workers busy; columns in whole sectors where they divide, and for rows that share a weight ring at most
    as many as the tensor-core dot takes (an untied LM head at batch 8: 2302 columns a task left its 8 rows'
    accumulators no room beside the ring, and each row streamed the tile again)."""
    if kernel.dot is None:
        return None
    columns = kernel.domain[-1] if kernel.domain else 0
    weight_rows = shared_weight_dims(kernel)
    rhs = linear_form(kernel.dot.rhs_map, kernel.dot.rhs.shape)
    streams_columns = rhs is not None and rhs[1][len(kernel.domain) - 1] == 1  # the weight ring's layout
    return Tiling(frozenset(weight_rows), last_unit=COLUMN_ALIGN if columns % COLUMN_ALIGN == 0 else 1,
                  whole_if_busy=frozenset(shared_weight_dims(kernel, written=True) - weight_rows),
                  max_last=MMA_MAX_COLUMNS if weight_rows and streams_columns else 0)  # fmt: skip


def render(body: KernelBody):
    """This kind's rendering of the body's kernel, or None when it is not a product with linear layouts."""
    if body.kernel.dot is None or body.kernel.attention is not None:
        return None
    plan = DotPlan.of(body.kernel, body.tasks, body.target.shared_memory_bytes, body.target.comm_copies)
    if plan is None:
        return None
    return render_together(body, plan) if plan.together else render_columns_or_rows(body, plan)


def render_columns_or_rows(body: KernelBody, plan: DotPlan):
    k = body.kernel
    dot = k.dot
    rank = len(k.domain)
    em = Emitter(body, rows_prefix=None)
    rhs = body.pointer_name(dot.rhs, plan.rhs_const)
    w_type = STORAGE[dtype_code(dot.rhs.buffer.dtype)]
    smem = emit_dot_buffers(em, plan, 1, scratch=plan.layout == "columns_vec" or dot.lhs_expr is not None)
    em.emit(f"const index_t rows = {body.tile_count(rank - 1)};")
    em.emit(f"const index_t n_lo = t.lo[{rank - 1}], n_len = {body.tile_size(rank - 1)};")
    em.emit("for (index_t row = 0; row < rows; ++row) {")
    em.push()
    ridx = em.tile_index("row", range(rank - 1))
    rhs_base = linear(0, plan.rhs_coefs[: rank - 1], ridx)
    em.emit(f"const index_t rhs_base = {rhs_base} + n_lo * {plan.rhs_n};")
    stage_lhs(body, em, plan, ridx, "xs")
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
    return body.finish(em, smem=smem, prefetch=weight_prefetch(body, plan))


def render_together(body: KernelBody, plan: DotPlan):
    """All the tile's rows staged (xs[r][k]), then one pass over the weight tile for all of them (through
    the ring, dot::columns_ring, or dot::rows_shared), then the epilogue over rows x columns."""
    body.uses_ring = plan.layout == "columns_vec"
    k = body.kernel
    dot, rank, R = k.dot, len(k.domain), plan.together
    em = Emitter(body, rows_prefix=None)
    rhs = body.pointer_name(dot.rhs, plan.rhs_const)
    w_type = STORAGE[dtype_code(dot.rhs.buffer.dtype)]
    x_stride, n_pad = plan.x_stride, plan.n_pad
    smem = emit_dot_buffers(em, plan, R, scratch=True)
    em.emit(f"const index_t n_lo = t.lo[{rank - 1}], n_len = {body.tile_size(rank - 1)};")
    prefetch = ring_begin(body, plan) if body.uses_ring else weight_prefetch(body, plan)
    if body.uses_ring and not read_only(dot.rhs):  # written by the graph: streamed once the task may read it
        em.emit(prefetch(body) + "  // the tile streams while the rows are staged")
        prefetch = None
    row_stride = uniform_row_stride(body, plan) if R > 1 else None
    if row_stride is not None:  # one staging pass over all rows: all their loads in flight together
        lhs = body.pointer_name(dot.lhs, plan.lhs_const)
        first = linear(0, plan.lhs_coefs[: rank - 1], [f"t.lo[{d}]" for d in range(rank - 1)])
        lhs_t = STORAGE[dtype_code(dot.lhs.buffer.dtype)]
        em.emit(f"dot::stage_rows<{R}, {plan.K}, {lhs_t}, {str(read_only(dot.lhs)).lower()}>("
                f"xs, {x_stride}, {lhs}, {first}, {row_stride}, {plan.lhs_k});")
    elif R > 1 and stages_rows_together(k):
        stage_computed_rows_together(body, em, plan, R)
    else:
        em.emit(f"for (index_t row = 0; row < {R}; ++row) {{")
        em.push()
        ridx = together_row_index(em, body)
        em.emit(f"float* x_row = xs + row * {x_stride};")
        stage_lhs(body, em, plan, ridx, "x_row")
        em.pop()
        em.emit("}")
    em.emit("__syncthreads();")
    body.mark_phase(em, "staged")
    w = f"reinterpret_cast<const {w_type}*>({rhs}) + ({weight_tile_origin(body, plan)})"
    if body.uses_ring:
        ring_dot = "columns_ring_mma" if plan.mma else "columns_warp_ring" if uses_warp_ring(body, plan) else "columns_ring"
        if ring_dot == "columns_warp_ring":  # uses_warp_ring's test, checked against dot.cuh's own
            em.emit(f"static_assert(dot::warp_ring_fits<{w_type}>({plan.max_n}), \"bodies/dot.py: uses_warp_ring\");")
        # the tile's shape as template arguments (dot.cuh's static_or): a call per tile width where the tasks have
        # at most STATIC_TILE_WIDTHS of them (a balanced split has two), else the shape read at run time
        def ring_call(n: int | None) -> str:
            shape = f", {plan.K}, {n}" if n else ""
            return (f"dot::{ring_dot}<{w_type}, {R}{shape}>(xs, {x_stride}, smem + kRingOffset, {w}, {plan.rhs_k}, "
                    f"{plan.K}, static_cast<int>(n_len), acc, {n_pad});")

        widths: list[int | None] = sorted({t.hi[rank - 1] - t.lo[rank - 1] for t in body.tasks}, reverse=True)
        if len(widths) > STATIC_TILE_WIDTHS:
            widths = [None]
        if len(widths) == 1:
            em.emit(ring_call(widths[0]))
        else:
            for i, n in enumerate(widths):
                test = "" if i == len(widths) - 1 else f"if (n_len == {n}) "
                em.emit(f"{'} else ' if i else ''}{test}{{")
                em.emit("  " + ring_call(n))
            em.emit("}")
    else:
        em.emit(f"dot::rows_shared<{w_type}, {R}>(xs, {x_stride}, {w}, {plan.rhs_n}, {plan.K}, "
                f"static_cast<int>(n_len), acc, {n_pad});")
    em.emit("__syncthreads();")
    body.mark_phase(em, "computed")

    def element(e: str) -> list[str]:
        em.emit(f"const index_t row = {e} / n_len, col = {e} - row * n_len;")
        em.acc = em.rounded(f"acc[row * {n_pad} + col]", dtype_code(dot.acc_dtype))
        return together_row_index(em, body) + ["(n_lo + col)"]

    em.elements(f"{R} * n_len", element)
    em.emit("__syncthreads();")
    return body.finish(em, smem=smem, prefetch=prefetch)


def together_row_index(em: Emitter, body: KernelBody) -> list[str]:
    """Domain index of the tile's row named `row` in a kernel whose tasks' rows share the weight tile: every
    task has the same row extents (``rows_together``), emitted as numbers, so that the index of a row of an
    unrolled loop folds to t.lo plus a constant (with t.hi - t.lo it cost three integer divisions per row and
    position: the side-by-side staging of 8 rows ran 17-34% slower than one row after the other)."""
    rank, t = len(body.kernel.domain), body.tasks[0]
    return em.tile_index("row", range(rank - 1), [t.hi[d] - t.lo[d] for d in range(rank - 1)])


def uniform_row_stride(body: KernelBody, plan: DotPlan) -> int | None:
    """The lhs offset between consecutive rows of the tile (in tile order) when it is one number (the
    rows are an arithmetic progression in memory), else None. Needs a loaded lhs."""
    rank = len(body.kernel.domain)
    if body.kernel.dot.lhs_expr is not None:
        return None
    t = body.tasks[0]
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


def weight_tile_origin(body: KernelBody, plan: DotPlan) -> str:
    """Element offset of the task's weight tile (its first k-row, first column)."""
    rank = len(body.kernel.domain)
    return linear(0, plan.rhs_coefs, [f"t.lo[{d}]" for d in range(rank)])


def uses_warp_ring(body: KernelBody, plan: DotPlan) -> bool:
    """Whether the product streams through dot.cuh's warp ring (JAX_MPK_WARP_RING; CUDA-core dots whose widest tile
    a warp covers, as warp_ring_fits)."""
    elt = np.dtype(body.kernel.dot.rhs.buffer.dtype).itemsize
    return (body.target.warp_ring and not plan.mma and plan.max_n % 8 == 0 and plan.max_n // 8 <= 32
            and plan.max_n * elt <= WARP_SLOT_BYTES)  # fmt: skip


def ring_begin(body: KernelBody, plan: DotPlan):
    """Renders the call that starts streaming the task's weight tile into the ring, given where the pointers
    come from (codegen's buffer slots in Dispatch::prefetch, or the body)."""
    dot, rank = body.kernel.dot, len(body.kernel.domain)
    w_type = STORAGE[dtype_code(dot.rhs.buffer.dtype)]
    origin = weight_tile_origin(body, plan)
    begin = f"warp_ring_begin<{w_type}>" if uses_warp_ring(body, plan) else f"ring_begin<{w_type}, {str(plan.mma).lower()}>"

    def render(slots) -> str:
        return (
            f"dot::{begin}(smem + kRingOffset, reinterpret_cast<const {w_type}*>("
            f"{slots.pointer(dot.rhs, plan.rhs_const)}) + ({origin}), {plan.rhs_k}, {plan.K}, "
            f"{body.tile_size(rank - 1)});"
        )

    return render


def stage_lhs(body: KernelBody, em: Emitter, plan: DotPlan, ridx: list[str], xs: str) -> None:
    """{xs}[k] = the product's activation row at domain row ``ridx``: loaded, or computed."""
    dot, rank = body.kernel.dot, len(body.kernel.domain)
    if dot.lhs_expr is None:
        lhs = body.pointer_name(dot.lhs, plan.lhs_const)
        em.emit(f"const index_t lhs_base = {linear(0, plan.lhs_coefs[: rank - 1], ridx)};")
        lhs_t = STORAGE[dtype_code(dot.lhs.buffer.dtype)]
        never_written = str(read_only(dot.lhs)).lower()
        em.emit(f"dot::stage_rows<1, {plan.K}, {lhs_t}, {never_written}>({xs}, 0, {lhs}, lhs_base, 0, {plan.lhs_k});")
    else:
        stage_computed_row(body, em, ridx, plan.K, xs)


def computed_lhs(dot):
    """(the lhs expression, its map from (domain row ++ k), how many of its dims are the row, the zeros that
    stand for the contraction when only the row is wanted)."""
    value = dot.lhs_expr.children[0]
    return value, dot.lhs_expr.map, len(value.shape) - len(dot.k_shape), ["0"] * (1 + len(dot.k_shape))


def stage_computed_row(body: KernelBody, em: Emitter, ridx: list[str], K: int, xs: str) -> None:
    """xs[k] = the lhs expression at (row, k): the row's reductions block-cooperatively (scratch space
    after the accumulators, xs is being filled), then each thread computes its share of the k's."""
    dot = body.kernel.dot
    value, lhs_map, prefix, zeros = computed_lhs(dot)
    rows = em.map_index(lhs_map, list(ridx) + zeros)[:prefix]
    em.rows_prefix, em.scratch, em.row_reduction_min = rows, "reinterpret_cast<char*>(scratch)", ROW_STAGING_MAX_INLINE + 1
    reductions = [node for node in topological([value]) if em.is_row_reduction(node)]
    # (Target.staging_loads_first) a thread's positions in one group: their loads, then the row's reductions
    # while they are in flight, then their values
    loads_first = body.target.staging_loads_first and bool(reductions) and K <= FOLD_UNROLL * THREADS
    if not loads_first:
        for node in reductions:
            em.row_reduction(node, rows)
    if K <= THREADS and not loads_first:
        em.emit(f"for (index_t k = threadIdx.x; k < {K}; k += {THREADS}) {{")
        em.push()
        kidx = em.delinearize("k", [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))
        trailing = em.map_index(lhs_map, list(ridx) + ["0"] + kidx)[prefix:]
        em.emit(f"{xs}[k] = static_cast<float>({em.value(value, rows + trailing)});")
        em.pop()
        em.emit("}")
        return
    # a group of a thread's k's at a time, their loads first (a division's slow path between two k's loads
    # kept the second waiting)
    group, position, guard = em.open_position_groups("k", K)

    def index() -> list[str]:
        kidx = em.delinearize(position(), [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))
        return rows + em.map_index(lhs_map, list(ridx) + ["0"] + kidx)[prefix:]

    reduced_first = frozenset(n.uid for n in reductions) if loads_first else frozenset()
    em.preload_row_loads(value, index, group, var="u", reduced_first=reduced_first)
    if loads_first:  # the fold reads its own positions: not the preloaded ones
        em.emit("// JAX_MPK_STAGING_LOADS_FIRST: the row's loads above, its reductions while they fly")
        preloaded, em.preloaded = em.preloaded, {}
        for node in reductions:
            em.row_reduction(node, rows)
        em.preloaded = preloaded
    em.emit("#pragma unroll")
    em.emit(f"for (int u = 0; u < {group}; ++u) {{")
    em.push()
    store = f"{xs}[k] = static_cast<float>({em.value(value, index())});"
    em.emit(store if guard is None else f"if ({guard}) {store}")
    em.pop()
    em.emit("}")
    em.preloaded = {}
    em.pop()
    em.emit("}")


def stages_rows_together(kernel: Kernel) -> bool:
    """Whether the rows of a computed lhs can be staged side by side: each of its block reductions
    ``folds_side_by_side``."""
    if kernel.dot.lhs_expr is None:
        return False
    return all(folds_side_by_side(node) for node in topological([kernel.dot.lhs_expr.children[0]])
               if is_row_reduction(node, ROW_STAGING_MAX_INLINE + 1))  # fmt: skip


def stage_computed_rows_together(body: KernelBody, em: Emitter, plan: DotPlan, R: int) -> None:
    """xs[row][k] = the lhs expression at each of the tile's R rows, the rows side by side: every row
    reduction of all rows in one pass (their loads in flight together, one pair of barriers), then each
    thread computes its k's for all rows. Staging R rows one after the other costs R dependent passes over
    L2 (~1.5 us each) per task, more than the dependency level it saves (JAX_MPK_STAGE_SHARED_ROWS)."""
    dot, rank = body.kernel.dot, len(body.kernel.domain)
    value, lhs_map, prefix, zeros = computed_lhs(dot)
    names = [f"r{d}" for d in range(prefix)]
    ridx: list[str] = []

    def row_outer() -> list[str]:
        """Emits, inside a loop over the rows named `row`, the row's domain index and its lhs row index as
        r0, r1, ... (the same names in every loop, so that a row reduction is found at them)."""
        ridx[:] = together_row_index(em, body)
        for d, name in enumerate(em.map_index(lhs_map, list(ridx) + zeros)[:prefix]):
            em.emit(f"const index_t {names[d]} = {name};")
        return names

    em.rows_prefix, em.scratch = names, "reinterpret_cast<char*>(scratch)"
    em.row_reduction_min = ROW_STAGING_MAX_INLINE + 1
    for node in topological([value]):
        if em.is_row_reduction(node):
            em.row_reductions_together(node, R, row_outer)
    pairs = plan.K < THREADS  # rows short of a thread each: the threads take (row, k) pairs, all busy
    if pairs:
        em.emit(f"for (index_t e = threadIdx.x; e < {R * plan.K}; e += {THREADS}) {{")
        em.push()
        em.emit(f"const int row = e / {plan.K};")
        em.emit(f"const index_t k = e - row * {plan.K};")
    else:  # each thread's k for all rows: their loads in flight together
        em.emit(f"for (index_t k = threadIdx.x; k < {plan.K}; k += {THREADS}) {{")
        em.push()
    kidx = em.delinearize("k", [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))

    def row_position() -> list[str]:
        rows = row_outer()
        return rows + em.map_index(lhs_map, list(ridx) + ["0"] + kidx)[prefix:]

    if not pairs:
        em.preload_row_loads(value, row_position, R)
        em.emit("#pragma unroll")
        em.emit(f"for (int row = 0; row < {R}; ++row) {{")
        em.push()
    em.emit(f"xs[row * {plan.x_stride} + k] = static_cast<float>({em.value(value, row_position())});")
    em.preloaded = {}
    for _ in range(1 if pairs else 2):  # the loops opened above
        em.pop()
        em.emit("}")


def weight_prefetch(body: KernelBody, plan: DotPlan):
    """Code that asks L2 for the head of the weight tile of the task's first row before the task waits."""
    dot, rank = body.kernel.dot, len(body.kernel.domain)
    if not read_only(dot.rhs) or plan.layout == "columns_scalar":
        return None
    elt = np.dtype(dot.rhs.buffer.dtype).itemsize
    # the tile as memory rows: bytes a row, rows, bytes between rows (C++ expressions over n_len)
    if plan.layout == "columns_vec":
        row_bytes, rows, stride = f"n_len * {elt}", f"(index_t){plan.K}", plan.rhs_k * elt
    else:
        row_bytes, rows, stride = str(plan.K * elt), "n_len", plan.rhs_n * elt
    # Only the head of the tile: L2 holds ~50 MB for 132 SMs, and a prefetch larger than a task's share
    # is evicted before use while it competes with the loads of the tasks running now.
    head_rows = f"min({rows}, (index_t)max((index_t)1, (index_t){PREFETCH_BYTES} / (index_t)({row_bytes})))"
    origin = weight_tile_origin(body, plan)

    def render(slots) -> str:
        return (
            f"const index_t n_len = max(t.hi[{rank - 1}] - t.lo[{rank - 1}], 1); "
            f"const char* start = {slots.pointer(dot.rhs, plan.rhs_const)} + ({origin}) * {elt}; "
            f"dot::prefetch_l2(start, {row_bytes}, {head_rows}, {stride});"
        )

    return render


@dataclass
class DotPlan:
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
    shared_memory_bytes: int  # the target's budget for the task's shared memory, ring included
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
    def of(kernel: Kernel, tasks, shared_memory_bytes: int, comm_copies: bool = False) -> DotPlan | None:
        """The vector form of ``kernel``'s product (None: the generic form, element by element). A communication
        buffer is read through the vector paths only where every rank keeps a copy of every slot (comm_copies)."""
        dot = kernel.dot
        rank = len(kernel.domain)
        if rank == 0 or not tasks or (kernel.reads_comm() and not comm_copies):
            return None
        if dot.lhs_expr is None:
            lhs = linear_form(dot.lhs_map, dot.lhs.shape)
        else:  # computed while staged: only the contraction's nesting matters
            lhs = 0, [0] * rank + [math.prod(dot.k_shape[d + 1 :]) for d in range(len(dot.k_shape))]
        rhs = linear_form(dot.rhs_map, dot.rhs.shape)
        if lhs is None or rhs is None:
            return None
        (lc, lcoef), (rc, rcoef) = lhs, rhs
        lk, rk, K = flatten_contraction(lcoef[rank:], rcoef[rank:], dot.k_shape)
        if K is None or lcoef[rank - 1] != 0:
            return None
        max_n = max(t.hi[rank - 1] - t.lo[rank - 1] for t in tasks)
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
        plan = DotPlan(layout, K, max_n, lc, lcoef[:rank], lk, rc, rcoef[:rank], rk, rn, vector_rows,
                       shared_memory_bytes)  # fmt: skip
        if dot_smem_bytes(plan, 1) > plan.shared_memory_bytes:
            return None  # a row and its accumulators do not fit: the flat kind loops over K per element
        plan.together = rows_together(kernel, tasks, plan)
        plan.mma = tensor_core_rows(kernel, tasks, plan)
        return plan


def rows_together(kernel: Kernel, tasks, plan: DotPlan) -> int:
    """Rows per task that share one pass over the weight tile (0: the task's rows go one by one): tiles of
    one row count (at most MAX_SHARED_WEIGHT_ROWS) whose rows share the weight tile (the weight does not
    vary along them), and
    * columns_vec: streamed through the ring, any row count for a weight (never written: the ring starts before
      the task waits), two rows or more for an operand the graph writes (the query heads of a KV head over its
      values: the ring starts after the wait); column tiles that fit a slot and room for the ring above the
      task's shared memory;
    * vector rows: dot::rows_shared, for two rows or more."""
    rank = len(kernel.domain)
    extents = {tuple(h - l for l, h in zip(t.lo[: rank - 1], t.hi[: rank - 1])) for t in tasks}
    if len(extents) != 1:
        return 0
    (extent,) = extents
    rows = math.prod(extent)
    if not 1 <= rows <= MAX_SHARED_WEIGHT_ROWS or any(c and e > 1 for c, e in zip(plan.rhs_coefs, extent)):
        return 0
    base = dot_smem_bytes(plan, rows)
    if plan.layout == "rows":
        return rows if plan.vector_rows and rows >= 2 and base <= plan.shared_memory_bytes else 0
    if plan.layout != "columns_vec" or (rows < 2 and not read_only(kernel.dot.rhs)):
        return 0
    itemsize = np.dtype(kernel.dot.rhs.buffer.dtype).itemsize
    for t in tasks:
        n_len = t.hi[rank - 1] - t.lo[rank - 1]
        if n_len * itemsize > RING_SLOT_BYTES or n_len // 8 > THREADS:
            return 0
    return rows if -(-base // 128) * 128 + RING_BYTES <= plan.shared_memory_bytes else 0


def rows_fit_beside_ring(rows: int, K: int, shared_memory_bytes: int) -> bool:
    """Whether ``rows`` activation rows of a K-long contraction, staged for the tensor cores, fit beside the
    weight ring with accumulators for the widest column tile: the shared memory condition of rows_together and
    tensor_core_rows for any tiling. Fusion splits a weight product's K until it holds (_split_narrow_products):
    rows that do not fit go one by one, each streaming the whole weight tile again."""
    plan = DotPlan(layout="columns_vec", K=K, max_n=MMA_MAX_COLUMNS, lhs_const=0, lhs_coefs=[], lhs_k=0, rhs_const=0,
                   rhs_coefs=[], rhs_k=0, rhs_n=1, vector_rows=False, shared_memory_bytes=shared_memory_bytes,
                   together=rows, mma=True)  # fmt: skip
    return -(-dot_smem_bytes(plan, rows) // 128) * 128 + RING_BYTES <= shared_memory_bytes


def tensor_core_rows(kernel: Kernel, tasks, plan: DotPlan) -> bool:
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
    return -(-dot_smem_bytes(padded, plan.together) // 128) * 128 + RING_BYTES <= plan.shared_memory_bytes


def dot_smem_bytes(plan: DotPlan, rows: int) -> int:
    """Shared memory of a product task below the ring: xs[rows][x_stride], acc[rows][n_pad], then scratch for
    block reductions and the columns GEMV's partial sums."""
    return 4 * (rows * (plan.x_stride + plan.n_pad) + 8 * THREADS)


def emit_dot_buffers(em: Emitter, plan: DotPlan, rows: int, scratch: bool) -> int:
    """Declares the pointers of that layout (scratch only when the body uses it); returns its bytes."""
    em.emit("float* xs = reinterpret_cast<float*>(smem);")
    em.emit(f"float* acc = xs + {rows * plan.x_stride};")
    if scratch:
        em.emit(f"float* scratch = acc + {rows * plan.n_pad};")
    return dot_smem_bytes(plan, rows)


def flatten_contraction(lcoef, rcoef, k_shape):
    """One stride per operand over the flattened contraction, when the contraction dims nest."""
    if not k_shape:
        return 0, 0, None
    for coefs in (lcoef, rcoef):
        for j in range(len(k_shape) - 1):
            if coefs[j] != coefs[j + 1] * k_shape[j + 1]:
                return 0, 0, None
    return lcoef[-1], rcoef[-1], math.prod(k_shape)
