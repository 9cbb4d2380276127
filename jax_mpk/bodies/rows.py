"""Task-body kind ``rows``: kernels with reductions over trailing dims (RMSNorm, softmax, argmax) and no product:
per row of the tile, the block reduces cooperatively (``tasks/reduce.cuh``), then every thread produces a share of
the row's outputs."""

from __future__ import annotations

from ..emit import THREADS, Emitter, KernelBody, NotRowForm, Tiling, is_row_reduction, tile_count, tile_size
from ..kernels import Kernel


def tiling(kernel: Kernel) -> Tiling | None:
    """No rule of its own: flat's generic cut, in which ``tasks.tile_domain`` keeps the dims after a row
    reduction's rows whole."""
    return None


def render(body: KernelBody):
    """This kind's rendering of the body's kernel, or None when it has a product, no long reduction, or one read
    at an index that is not its row."""
    if body.kernel.dot is not None or not any(is_row_reduction(n) for n in body.kernel.nodes()):
        return None
    try:
        return render_rows(body)
    except NotRowForm:
        body.forget_pointers()
        return None


def render_rows(body: KernelBody):
    k = body.kernel
    reduces = [n for n in k.nodes() if is_row_reduction(n)]
    prefix = len(reduces[0].shape)
    if any(len(r.shape) != prefix for r in reduces) or prefix > len(k.domain):
        raise NotRowForm
    rank = len(k.domain)
    em = Emitter(body, rows_prefix=[f"r{d}" for d in range(prefix)])
    em.emit(f"const index_t rows = {tile_count(prefix)};")
    em.emit("for (index_t row = 0; row < rows; ++row) {")
    em.push()
    rows_idx = em.tile_index("row", range(prefix))
    for d, name in enumerate(rows_idx):
        em.emit(f"const index_t r{d} = {name};")
    for r in reduces:
        em.row_reduction(r, [f"r{d}" for d in range(prefix)])
    trailing = [tile_size(d) for d in range(prefix, rank)]
    em.emit(f"const index_t count = {' * '.join(trailing) if trailing else '1'};")
    em.elements("count", lambda e: [f"r{d}" for d in range(prefix)] + em.tile_index(e, range(prefix, rank)))
    em.pop()
    em.emit("}")
    return body.finish(em, smem=8 * THREADS, prefetch=None)
