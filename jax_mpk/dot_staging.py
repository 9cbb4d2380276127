"""GPU fusion pass ``rows_in_dot_staging``: a row kernel (RMSNorm, softmax, the SwiGLU product) that only a matrix
product reads is computed in that product's staging of its activation row instead of being stored; and which rows
of a weight product share the weight tile a task streams (the tiling of the ``dot`` body kind)."""

from __future__ import annotations

import math

from .graph import Node, Piecewise, Reduce, Reindex, fold_loads, topological
from .indexmap import Affine, rect_volume
from .kernels import DotSpec, Kernel, KernelOutput, Tensor
from .layout import TensorKind

ROW_STAGING_MAX_INLINE = 64  # most loads a row-staging expression's reduction may fold per element (fold_loads)
# Rows (a batch) that one task of a weight product multiplies with the weight tile it streams once.
MAX_SHARED_WEIGHT_ROWS = 8


def shared_weight_dims(kernel: Kernel, written: bool = False) -> set[int]:
    """Leading dims of a product with a weight (an operand no kernel writes) that do not index the weight:
    the rows of a batch. Tiles keep them whole, so that a task streams its weight tile once for all its rows
    (up to MAX_SHARED_WEIGHT_ROWS of them) instead of each row's task streaming it again. With ``written``, of
    any right operand (attention: the query heads of a KV head, over the cache the step appends to)."""
    dot, domain = kernel.dot, kernel.domain
    if dot is None or (dot.rhs.buffer.kind != TensorKind.INPUT and not written) or len(domain) < 2:
        return set()
    dims = set()
    for d in range(len(domain) - 1):
        probe = tuple((0, domain[i]) if i == d else (0, 1) for i in range(len(domain)))  # all of dim d
        if domain[d] > 1 and rect_volume(dot.rhs_map.rect_image(probe + ((0, 1),) * len(dot.k_shape))) == 1:
            dims.add(d)
    return dims if math.prod(domain[d] for d in dims) <= MAX_SHARED_WEIGHT_ROWS else set()


def compute_rows_in_dot_staging(kernels: list[Kernel], shared_rows: bool = False,
                                comm_reads: bool = False, shared_pointwise: bool = False) -> list[Kernel]:
    """A matrix product whose activation operand is produced by a row kernel (RMSNorm, softmax: block
    reductions over the row, then pointwise) computes that row itself while it stages the operand in shared
    memory, instead of waiting for it to be stored: one dependency level less per such pair, for the
    price of every task of the product recomputing its row (a few KB from L2). The producer keeps its
    other outputs (the residual sum) and disappears when none is left. A product whose tasks multiply several
    rows with one weight tile (a batch) computes them one after the other: only with ``shared_rows``
    (JAX_MPK_STAGE_SHARED_ROWS, off until measured: docs/notes/cuda_megakernel.md), or with ``shared_pointwise``
    for rows that need no reduction (a SwiGLU: Llama-1B b8 1.93 -> 1.78 ms with it; the norms' block reductions
    are what made the recomputation of every row cost). A row that reads a
    communication buffer (the RMSNorm after a psum) is staged only with ``comm_reads``: where every rank keeps a
    copy of every slot (Target.comm_copies), the staging reads it like the workspace."""
    def key(tensor: Tensor) -> tuple[int, int]:
        return id(tensor.buffer), tensor.version

    writer = {key(o.tensor): (k, o) for k in kernels for o in k.outputs}
    read_before = {key(t) for k in kernels for t in k.read_tensors()}
    versions_written: dict[int, set[int]] = {}
    for k in kernels:
        for o in k.outputs:
            versions_written.setdefault(id(o.tensor.buffer), set()).add(o.tensor.version)
    for b in kernels:
        dot = b.dot
        if dot is None or key(dot.lhs) not in writer:
            continue
        a, out = writer[key(dot.lhs)]
        shared = math.prod(b.domain[d] for d in shared_weight_dims(b)) > 1
        if shared and not (shared_rows or (shared_pointwise and _pointwise(out.node))):
            continue  # a task of it multiplies several rows: it would compute them one after the other
        if any(versions_written.get(id(t.buffer), {t.version}) - {t.version} for t in a.read_tensors()):
            # a reads a version that an in-place update overwrites: the product would have to run before that
            # update and, if it reads the update's result too, after it (fuzz 2026:1492: rem(x, y) . x.at[i].set(u))
            continue
        if a.dot is None and (comm_reads or not a.reads_comm()) and _stages_as_rows(out, dot, len(b.domain)):
            dot.lhs_expr = Reindex(shape=tuple(b.domain) + tuple(dot.k_shape), dtype=out.node.dtype,
                                   children=(out.node,), map=dot.lhs_map)  # fmt: skip
    # Drop only the stores this rewrite made unread. A stored value that no kernel reads as such may still be
    # needed: the base of an in-place update chain (floor(x) with a slice of it then overwritten) is read
    # through the chain's later version.
    still_read = {key(t) for k in kernels for t in k.read_tensors()}
    unread = read_before - still_read
    for a in kernels:
        a.outputs = [o for o in a.outputs if key(o.tensor) not in unread or o.tensor.buffer.kind != TensorKind.WORKSPACE]
    return [k for k in kernels if k.outputs]


def _pointwise(node: Node) -> bool:
    """Whether ``node`` is computed without any reduction (loads, views and elementwise operations). Not even a
    sum of split-K partials: Qwen3-8B b8's SwiGLU of 2 partials in the down projection's staging measured 7.785 ->
    7.989 ms (each down task read ~196 KB of float32 partials; docs/notes/cuda_megakernel.md, session 12)."""
    return not any(isinstance(n, Reduce) for n in topological([node]))


def _stages_as_rows(out: KernelOutput, dot: DotSpec, rank: int) -> bool:
    """Whether the value ``out`` stores can be computed row by row in the product's staging: stored densely
    (identity map, no dynamic offsets); read by the product along whole rows (the tensor's leading dims, all
    but as many as the contraction has, depend only on the product's row dims); and every long reduction in
    it a reduction of exactly those rows, indexed by the row itself (what the block-cooperative row code of
    codegen evaluates)."""
    tensor, k_rank = out.tensor, len(dot.k_shape)
    prefix = len(tensor.shape) - k_rank
    if not out.map.is_identity or out.dyn or prefix < 0:
        return False
    if not dot.lhs_map.is_identity:
        stages = dot.lhs_map.stages
        if len(stages) != 1 or not isinstance(stages[0], Affine):
            return False
        for r, row in enumerate(stages[0].matrix):
            varies = range(rank - 1, rank + k_rank) if r < prefix else range(rank - 1, rank)
            if any(row[c] for c in varies):
                return False
    return _rows_indexed_by_prefix(out.node, prefix)


def _rows_indexed_by_prefix(root: Node, prefix: int) -> bool:
    """Follow the index of ``root`` (dims 0..rank-1) through views the way codegen names it: a view dim that
    copies one dim keeps its identity, anything else becomes a new value (None). Long reductions must be
    reached with exactly the row dims (0..prefix-1) and reduce all the rest."""
    seen: set[tuple] = set()
    stack = [(root, tuple(range(len(root.shape))))]
    while stack:
        node, idx = stack.pop()
        if (node.uid, idx) in seen:
            continue
        seen.add((node.uid, idx))
        if isinstance(node, Reindex):
            stages = node.map.stages
            if len(stages) == 1 and isinstance(stages[0], Affine):
                stage = stages[0]
                new = []
                for row, off in zip(stage.matrix, stage.offset):
                    terms = [c for c, a in enumerate(row) if a]
                    single = len(terms) == 1 and row[terms[0]] == 1 and off == 0
                    new.append(idx[terms[0]] if single else None)
                idx = tuple(new)
            elif not node.map.is_identity:
                idx = (None,) * len(node.children[0].shape)
            stack.append((node.children[0], idx))
        elif isinstance(node, Reduce):
            child = node.children[0]
            if fold_loads(node) > ROW_STAGING_MAX_INLINE and idx != tuple(range(prefix)):
                return False
            stack.append((child, idx + (None,) * (len(child.shape) - len(node.shape))))
        elif isinstance(node, Piecewise):
            shifted = tuple(None if d == node.axis else i for d, i in enumerate(idx))
            stack.extend((c, shifted) for c in node.children)
        else:
            stack.extend((c, idx) for c in node.children)
    return True
