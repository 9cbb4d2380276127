"""Task-body kind ``flat``: everything else: threads stride over the tile's elements (a product whose layout no
other kind takes loops over its contraction per element)."""

from __future__ import annotations

import math

import numpy as np

from ..emit import THREADS, Emitter, KernelBody, Tiling
from ..kernels import Kernel
from ..layout import dtype_code


def tiling(kernel: Kernel) -> Tiling:
    """Any cut: threads stride over whatever elements a tile holds."""
    return Tiling()


def render(body: KernelBody):
    return render_flat(body)


def render_flat(body: KernelBody):
    k = body.kernel
    em = Emitter(body, rows_prefix=None)
    rank = len(k.domain)
    em.emit(f"const index_t count = {body.tile_count(rank)};")

    def element(e: str) -> list[str]:
        idx = em.tile_index(e, range(rank))
        if k.dot is not None:
            em.acc = generic_accumulator(body, em, idx)
        return idx

    em.elements("count", element)
    return body.finish(em, smem=8 * THREADS, prefetch=None)


def generic_accumulator(body: KernelBody, em: Emitter, idx: list[str]) -> str:
    dot = body.kernel.dot
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
