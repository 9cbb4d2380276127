"""Task-body kind ``attention``: the split-attention kernels of :mod:`jax_mpk.attention` (flash-decoding): a task
stages its query rows, then ``ffi/include/jax_mpk/tasks/attention.cuh`` streams its chunks of keys and values
through shared memory and multiplies them on tensor cores; the last task of each group of query rows merges the
group's chunks."""

from __future__ import annotations

import math

from ..emit import STORAGE, THREADS, Emitter, KernelBody, Tiling, is_row_reduction, linear, read_only
from ..dot_staging import ROW_STAGING_MAX_INLINE
from ..graph import Load, Node, topological
from ..indexmap import IndexMap, linear_form
from ..kernels import Kernel, Tensor
from ..layout import dtype_code
from .dot import DotPlan, stage_lhs, uniform_row_stride

# Chunks whose partials the merge loads before combining any (3 floats each in registers): the loads of a batch
# are in flight together. A branch on loaded data between them serializes them: a first form that skipped masked
# chunks with `continue` made every chunk's loads wait for the previous chunk's maximum (16 round trips to L2 at
# Llama-1B's batch 1: the merging task's epilogue went 4.3 -> 5.8 us).
MERGE_BATCH = 16


def tiling(kernel: Kernel) -> Tiling | None:
    """A task: all the query rows of one key/value head, whole chunks of keys."""
    if kernel.attention is None:
        return None
    whole = frozenset(kernel.attention.rows_dims)
    single = frozenset(range(len(kernel.domain) - 1)) - whole
    return Tiling(whole, single, last_unit=kernel.attention.chunk, split_last=True)


def render(body: KernelBody):
    """This kind's rendering of the body's kernel, or None when it is not a split-attention kernel."""
    return render_attention(body) if body.kernel.attention is not None else None


def shared_memory_bytes(rows: int, head_dim: int, chunk: int) -> int:
    """Shared memory of a split-attention task (the layout render_attention lays out; attention.cuh's
    scratch_bytes and scores_stride, which the rendered body checks): the query rows, their scores, the chunk's
    keys and values beside the warps' partial sums (at least the staging's block-reduction scratch), the
    chunk's partials and the merge flag. The pass sizes chunks by it, so one formula decides both."""
    return (4 * (rows * (_x_stride(head_dim) + _scores_stride(chunk)) + rows * head_dim + 2 * rows)
            + _scratch_bytes(rows, head_dim, chunk) + 16)  # fmt: skip


def _x_stride(head_dim: int) -> int:
    return -(-head_dim // 4) * 4


def _scores_stride(chunk: int) -> int:
    return -(-chunk // 32) * 32 + 8


def _scratch_bytes(rows: int, head_dim: int, chunk: int) -> int:
    kv_tiles = 2 * chunk * head_dim * 2  # two-byte keys and values (attention._rows_dims)
    warps, head_tiles = THREADS // 32, head_dim // 16
    key_groups = warps // head_tiles if warps >= head_tiles else 1  # attention.cuh's Geometry::kKeyGroups
    return max(4 * 8 * THREADS, kv_tiles + key_groups * rows * head_dim * 4)


def render_attention(body: KernelBody):
    """Split attention (attention.cuh): the task's query rows staged once, then per chunk of its keys the
    scores, their softmax's partial sums and the chunk's share of the output, stored as the chunk's partials."""
    k = body.kernel
    dot, spec, rank = k.dot, k.attention, len(k.domain)
    plan = DotPlan.of(k, body.tasks, body.target.shared_memory_bytes, body.target.comm_copies)
    key_form, value_form = linear_form(dot.rhs_map, dot.rhs.shape), linear_form(spec.values_map, spec.values.shape)
    assert plan is not None and key_form is not None and value_form is not None, "checked by attention.py"
    rows = math.prod(k.domain[d] for d in spec.rows_dims)
    # every task holds the rows dims whole and one index of the others (tiling): row positions fold with numbers
    extents = [k.domain[d] if d in spec.rows_dims else 1 for d in range(rank - 1)]
    assert all([h - lo for lo, h in zip(t.lo[: rank - 1], t.hi[: rank - 1])] == extents for t in body.tasks)
    head_dim, chunk = spec.partial_out.shape[-1], spec.chunk
    chunk_pad, x_stride = _scores_stride(chunk), _x_stride(head_dim)
    kv_type = STORAGE[dtype_code(dot.rhs.buffer.dtype)]
    scratch_bytes = _scratch_bytes(rows, head_dim, chunk)
    em = Emitter(body, rows_prefix=None)
    by_warps = body.target.attention_warps and _by_warps_fits(rows, head_dim, chunk, scratch_bytes)
    if body.target.score_loads_first:
        # the score's loads at no index (the position: an L2 round trip after the scores' products otherwise)
        # issued now, in flight while the queries are staged
        for load in _scalar_loads(spec.score):
            em.preloaded[load.uid] = em.value(load, ["0"] * len(load.shape))
    em.emit(f"static_assert(attention::scratch_bytes<{kv_type}, {rows}, {head_dim}>({chunk}) <= {scratch_bytes} && "
            f"attention::scores_stride({chunk}) == {chunk_pad}, \"bodies/attention.py lays out what attention.cuh uses\");")
    if by_warps:
        em.emit(f"static_assert(attention::warp_partials_bytes<{rows}, {head_dim}>() <= {scratch_bytes}, "
                f"\"bodies/attention.py checked that keys_by_warps fits\");")
    em.emit("float* xs = reinterpret_cast<float*>(smem);")
    em.emit(f"float* scores = xs + {rows * x_stride};")
    em.emit(f"float* scratch = scores + {rows * chunk_pad};")
    em.emit(f"float* out = scratch + {scratch_bytes // 4};")
    smem = shared_memory_bytes(rows, head_dim, chunk)
    row_stride = uniform_row_stride(body, plan) if dot.lhs_expr is None else None
    if by_warps:  # keys_by_warps stages the queries once it has issued its first keys' loads
        em.emit("auto stage = [&]() {")
        em.push()
    if row_stride is not None:  # stored query rows (attention.py stores them when that costs no level)
        lhs = body.pointer_name(dot.lhs, plan.lhs_const)
        first = linear(0, plan.lhs_coefs[: rank - 1], [f"t.lo[{d}]" for d in range(rank - 1)])
        lhs_t = STORAGE[dtype_code(dot.lhs.buffer.dtype)]
        em.emit(f"dot::stage_rows<{rows}, {plan.K}, {lhs_t}, {str(read_only(dot.lhs)).lower()}>("
                f"xs, {x_stride}, {lhs}, {first}, {row_stride}, {plan.lhs_k});")
    elif not stage_computed_rows_at_once(body, em, rows, plan.K, x_stride, extents):
        em.emit(f"for (index_t row = 0; row < {rows}; ++row) {{")
        em.push()
        stage_lhs(body, em, plan, em.tile_index("row", range(rank - 1), extents), f"(xs + row * {x_stride})")
        em.pop()
        em.emit("}")
    em.emit("__syncthreads();")
    body.mark_phase(em, "staged")
    if by_warps:
        em.pop()
        em.emit("};")
    lead = [f"t.lo[{d}]" for d in range(rank - 1)]
    (key_const, key_coefs), (value_const, value_coefs) = key_form, value_form
    keys = body.pointer_name(dot.rhs, key_const)
    values = body.pointer_name(spec.values, value_const)
    em.emit(f"const {kv_type}* keys = reinterpret_cast<const {kv_type}*>({keys}) + {linear(0, key_coefs[: rank - 1], lead)};")
    em.emit(f"const {kv_type}* values = reinterpret_cast<const {kv_type}*>({values}) + {linear(0, value_coefs[: rank - 1], lead)};")
    em.emit("auto score = [&](int row, index_t key, float qk) -> float {")
    em.push()
    idx = em.tile_index("row", range(rank - 1), extents) + ["key"]
    em.acc = em.rounded("qk", dtype_code(dot.acc_dtype))
    em.emit(f"return static_cast<float>({em.value(spec.score, idx)});")
    em.pop()
    em.emit("};")
    em.emit("auto store = [&](index_t part) {")
    em.push()
    for tensor, count, source in ((spec.partial_out, rows * head_dim, "out[e]"),
                                  (spec.partial_max, rows, f"out[{rows * head_dim} + e]"),
                                  (spec.partial_sum, rows, f"out[{rows * head_dim + rows} + e]")):  # fmt: skip
        per_row = head_dim if tensor is spec.partial_out else 1
        em.emit(f"for (index_t e = threadIdx.x; e < {count}; e += {THREADS}) {{")
        em.push()
        ridx = em.tile_index(f"e / {per_row}", range(rank - 1), extents)
        index = ridx + ["part"] + ([f"e % {per_row}"] if per_row > 1 else [])
        em.emit(f"ops::store<float>({', '.join(_element(em, tensor, index))}, {source});")
        em.pop()
        em.emit("}")
    em.pop()
    em.emit("};")
    body_fn = "keys_by_warps" if by_warps else "keys_in_chunks"
    em.emit(f"attention::{body_fn}<{kv_type}, {rows}, {head_dim}, {chunk}>(xs, {x_stride}, keys, {key_coefs[rank - 1]}, "
            f"values, {value_coefs[rank]}, t.lo[{rank - 1}], t.hi[{rank - 1}], scores, reinterpret_cast<char*>(scratch), "
            f"out, score, store{', stage' if by_warps else ''});")
    body.mark_phase(em, "computed")
    merge_if_last(body, em, rows, extents, f"reinterpret_cast<int*>(out + {rows * head_dim + 2 * rows})")
    return body.finish(em, smem=smem, prefetch=None)


def _by_warps_fits(rows: int, head_dim: int, chunk: int, scratch_bytes: int) -> bool:
    """Whether attention.cuh's keys_by_warps takes this task shape: at most 8 keys a warp and 8 rows, a lane's slice
    of a row 4, 8 or 16 bytes, the warps' partials within the scratch (warp_partials_bytes)."""
    warps = THREADS // 32
    return (chunk % warps == 0 and chunk // warps <= 8 and rows <= 8 and head_dim // 32 in (2, 4, 8)
            and head_dim % 32 == 0 and warps * rows * (head_dim + 2) * 4 <= scratch_bytes)  # fmt: skip


def _scalar_loads(node: Node) -> list[Load]:
    """The loads under ``node`` of one element whatever the index (a scalar of the call: the position)."""
    return [n for n in topological([node]) if isinstance(n, Load) and not n.children
            and all(hi - lo <= 1 for lo, hi in n.map.rect_image(tuple((0, s) for s in n.shape)))]  # fmt: skip


def merge_if_last(body: KernelBody, em: Emitter, rows: int, extents: list[int], flag: str) -> None:
    """The task that brings its group's counter to the group's task count (this call's share: counters only
    grow, as events do) merges the group's chunks into the output. The merge is on the critical path (the
    output projection waits for the last group), so it is kept to two round trips to L2: one acq_rel atomic
    (it releases this task's partials, which the barrier after ``store`` ordered before it, and acquires the
    others'), then the chunks' maxima, sums and outputs loaded in batches, each combined after it has landed
    (the batch's maximum first, so that its exponentials are independent; the batches before are rescaled)."""
    k = body.kernel
    spec, rank = k.attention, len(k.domain)
    group_dims = spec.group_dims(k.domain)
    sizes = [k.domain[d] for d in group_dims]
    group = linear(0, [math.prod(sizes[i + 1 :]) for i in range(len(sizes))], [f"t.lo[{d}]" for d in group_dims])
    per_group = len(body.tasks) // spec.groups(k.domain)
    head_dim, chunks = spec.partial_out.shape[-1], spec.partial_out.shape[-2]
    em.emit("if (threadIdx.x == 0) {")
    em.emit(f"  const uint64_t arrived = add_acq_rel(p.counters + merge_counter + {group}, 1) + 1;")
    em.emit(f"  *{flag} = arrived == {per_group}ull * call_epoch;")
    em.emit("}")
    em.emit("__syncthreads();")
    em.emit(f"if (*{flag}) {{")
    em.push()
    em.emit(f"for (index_t e = threadIdx.x; e < {rows * head_dim}; e += {THREADS}) {{")
    em.push()
    em.emit(f"const index_t d = e % {head_dim};")
    ridx = em.tile_index(f"e / {head_dim}", range(rank - 1), extents)

    m_ptr, o_ptr, l_ptr = (body.pointer_name(t) for t in (spec.partial_max, spec.partial_out, spec.partial_sum))
    em.emit(f"const index_t per_chunk = {_element(em, spec.partial_max, ridx + ['0'])[1]}, "
            f"values = {_element(em, spec.partial_out, ridx + ['0', 'd'])[1]};")
    batch = min(chunks, MERGE_BATCH)
    em.emit("float largest = -INFINITY, numerator = 0.0f, denominator = 0.0f;")
    em.emit(f"for (index_t first = 0; first < {chunks}; first += {batch}) {{")
    em.push()
    em.emit(f"float m[{batch}], o[{batch}], l[{batch}];")
    em.emit("#pragma unroll")
    em.emit(f"for (int b = 0; b < {batch}; ++b) {{")
    if chunks % batch:  # the last batch's missing chunks count as wholly masked ones (the guard is no data)
        em.emit(f"  if (first + b >= {chunks}) {{ m[b] = -INFINITY, o[b] = l[b] = 0.0f; continue; }}")
    em.emit(f"  m[b] = ops::load<float>({m_ptr}, per_chunk + first + b);")
    em.emit(f"  o[b] = ops::load<float>({o_ptr}, values + (first + b) * {head_dim});")
    em.emit(f"  l[b] = ops::load<float>({l_ptr}, per_chunk + first + b);")
    em.emit("}")
    em.emit("float batch_largest = m[0];")
    em.emit("#pragma unroll")
    em.emit(f"for (int b = 1; b < {batch}; ++b) batch_largest = fmaxf(batch_largest, m[b]);")
    em.emit("const float merged = fmaxf(largest, batch_largest);")
    em.emit("const float kept = merged == -INFINITY ? 1.0f : expf(largest - merged);  // the batches before")
    em.emit("numerator *= kept, denominator *= kept, largest = merged;")
    em.emit("#pragma unroll")
    em.emit(f"for (int b = 0; b < {batch}; ++b) {{  // selects, not branches; the exponentials independent")
    em.emit("  const float w = m[b] == -INFINITY ? 0.0f : expf(m[b] - merged);  // a wholly masked chunk adds nothing")
    em.emit("  numerator += w * o[b];")
    em.emit("  denominator += w * l[b];")
    em.emit("}")
    em.pop()
    em.emit("}")
    em.emit(em.store(spec.output, *_element(em, spec.output, ridx + ["d"]), "numerator / denominator"))
    em.pop()
    em.emit("}")
    em.pop()
    em.emit("}")


def _element(em: Emitter, tensor: Tensor, index: list[str]) -> tuple[str, str]:
    """(pointer, element offset) of ``tensor[index]``: the partials and the output, dense, as the kernel has them."""
    return em.element_offset(tensor, IndexMap.identity(tensor.shape), index, ())


def stage_computed_rows_at_once(body: KernelBody, em: Emitter, rows: int, K: int, x_stride: int,
                                extents: list[int]) -> bool:
    """xs[row * x_stride + k] = the computed lhs for all the task's rows in one loop, so that every thread's
    loads for every row are in flight together (a row at a time costs a memory round trip per row, the
    q rows with RoPE of a key/value head's query heads). Only without block reductions (they go row by
    row); returns whether it staged them."""
    dot, rank = body.kernel.dot, len(body.kernel.domain)
    if dot.lhs_expr is None:
        return False
    value, lhs_map = dot.lhs_expr.children[0], dot.lhs_expr.map
    if any(is_row_reduction(n, ROW_STAGING_MAX_INLINE + 1) for n in topological([value])):
        return False
    em.emit(f"for (index_t e = threadIdx.x; e < {rows * K}; e += {THREADS}) {{")
    em.push()
    em.emit(f"const index_t row = e / {K}, k = e - row * {K};")
    ridx = em.tile_index("row", range(rank - 1), extents)
    kidx = em.delinearize("k", [str(s) for s in dot.k_shape], ["0"] * len(dot.k_shape))
    value_idx = em.map_index(lhs_map, ridx + ["0"] + kidx)
    em.emit(f"xs[row * {x_stride} + k] = static_cast<float>({em.value(value, value_idx)});")
    em.pop()
    em.emit("}")
    return True
