"""Task-body kind ``rows``: kernels with reductions over trailing dims (RMSNorm, softmax, argmax) and no product:
per row of the tile, the block reduces cooperatively (``tasks/reduce.cuh``), then every thread produces a share of
the row's outputs."""

from __future__ import annotations

import math
import re

from ..emit import THREADS, Emitter, KernelBody, NotRowForm, Tiling, is_row_reduction
from ..kernels import Kernel
from ..target import Target


def tiling(kernel: Kernel) -> Tiling | None:
    """A kernel whose row reductions are read at the domain's first ``rows`` dims in another order or with
    dims left out (a cache append's [layer, batch, position, head, dim] domain whose per-head norm is indexed by
    [batch, head]): those dims may be cut, the others are kept whole. Otherwise no rule of its own: flat's generic
    cut, in which ``tasks.tile_domain`` keeps the dims after a prefix reduction's rows whole."""
    if kernel.dot is not None or all(_is_prefix(n, kernel.domain) for n in kernel.nodes() if is_row_reduction(n)):
        return None
    probed = _probe_rows(kernel)
    if probed is None:
        return None
    return Tiling(whole=frozenset(range(probed[0], len(kernel.domain))))


def _is_prefix(node, domain) -> bool:
    return tuple(node.shape) == tuple(domain[: len(node.shape)])


def render(body: KernelBody):
    """This kind's rendering of the body's kernel, or None when it has a product, no long reduction, or one read
    at an index that is not made of its rows."""
    if body.kernel.dot is not None or not any(is_row_reduction(n) for n in body.kernel.nodes()):
        return None
    try:
        return render_rows(body)
    except NotRowForm:
        body.forget_pointers()
    probed = _probe_rows(body.kernel)
    if probed is not None:
        try:
            return render_rows(body, *probed)
        except NotRowForm:
            body.forget_pointers()
    return None


def _probe_rows(kernel: Kernel) -> tuple[int, dict[int, list[str]]] | None:
    """(rows, where each row reduction is read) when every row reduction is read at one index made of the
    domain's first ``rows`` dims only, found by rendering the outputs once with every dim a row; else None."""
    names = [f"r{d}" for d in range(len(kernel.domain))]
    probe = Emitter(KernelBody(kernel, None, Target("cuda", 1)), rows_prefix=names)  # values only: as the default target renders them
    probe.row_reads = {}
    try:
        for out in kernel.outputs:
            probe.value(out.node, names)
            for _, node, _ in out.dyn:
                probe.value(node, names)
    except NotRowForm:
        return None
    used = [re.findall(r"[A-Za-z_]\w*", index) for idx in probe.row_reads.values() for index in idx]
    if any(name not in names and name != "index_t" for names_in in used for name in names_in):
        return None
    rows = 1 + max((names.index(name) for names_in in used for name in names_in if name in names), default=-1)
    return rows, probe.row_reads


def render_rows(body: KernelBody, rows: int | None = None, reads: dict[int, list[str]] | None = None):
    """Row by row over the tile's first ``rows`` dims (by default as many as the reductions have, each read at
    its row), each row reduction computed at its index ``reads`` before the row's elements."""
    k = body.kernel
    reduces = [n for n in k.nodes() if is_row_reduction(n)]
    prefix = len(reduces[0].shape) if rows is None else rows
    if (rows is None and any(len(r.shape) != prefix for r in reduces)) or prefix > len(k.domain):
        raise NotRowForm
    if reads is not None and any(r.uid not in reads for r in reduces):
        raise NotRowForm  # read only inside another row reduction's fold: the probe did not reach it
    rank = len(k.domain)
    em = Emitter(body, rows_prefix=[f"r{d}" for d in range(prefix)])
    em.emit(f"const index_t rows = {body.tile_count(prefix)};")
    em.emit("for (index_t row = 0; row < rows; ++row) {")
    em.push()
    rows_idx = em.tile_index("row", range(prefix))
    for d, name in enumerate(rows_idx):
        em.emit(f"const index_t r{d} = {name};")
    trailing = [body.tile_size(d) for d in range(prefix, rank)]
    count = f"const index_t count = {' * '.join(trailing) if trailing else '1'};"
    widest = max((math.prod(t.hi[d] - t.lo[d] for d in range(prefix, rank)) for t in body.tasks), default=0)
    one_pass = body.target.rows_loads_first and body.target.element_loads_first and widest <= THREADS
    if one_pass:
        em.emit(count)
        # one element a thread: its operands (at the last element for threads past the row's end, so that
        # every load is in bounds), then the row's reductions while they are in flight, then its values
        em.emit("const index_t e = min((index_t)threadIdx.x, count - 1);  // JAX_MPK_ROWS_LOADS_FIRST")
        idx = [f"r{d}" for d in range(prefix)] + em.tile_index("e", range(prefix, rank))
        em.reduced_later = frozenset(r.uid for r in reduces)
        em.operands_first(em.output_roots(), idx)
    for r in reduces:
        em.row_reduction(r, [f"r{d}" for d in range(prefix)][: len(r.shape)] if reads is None else reads[r.uid])
    if one_pass:
        em.emit("if (threadIdx.x < count) {")
        em.push()
        em.store_outputs(idx)
        em.pop()
        em.emit("}")
    else:
        em.emit(count)
        em.elements("count", lambda e: [f"r{d}" for d in range(prefix)] + em.tile_index(e, range(prefix, rank)))
    em.pop()
    em.emit("}")
    return body.finish(em, smem=8 * THREADS, prefetch=None)
