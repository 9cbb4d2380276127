"""GPU fusion pass ``head_epilogues``: the per-head work after a projection (RoPE, QK-norm, the KV-cache append,
the queries split attention stores) done by the projection's own tasks, on their accumulators in shared memory.

A decode step's Q, K and V projections are split along K on the GPU (few rows: fusion._split_narrow_products), so
their partial sums must be added up before RoPE can rotate a head: the appends and the queries run one dependency
level after the projections, a level of 1-3 small tasks whose loads of the partials are a chain of L2 round trips
(~4 us of every Llama-1B layer's ~60, docs/notes/cuda_megakernel.md). With this pass (JAX_MPK_HEAD_EPILOGUES) such
a projection is not split (fusion asks ``feeds_head_epilogue`` first), and the one kernel that reads its result
(the append, the queries) becomes its epilogue: the product's tiles hold whole heads (``Kernel.column_block``),
and the epilogue reads the accumulators of its head at other columns (rotate-half) and reduces over them (QK-norm).
The price: a projection's tasks are whole heads (Llama-1B: 32 + 8 + 8 tasks of 256 KB instead of 128 of ~100 KB),
so the level streams on fewer SMs.
"""

from __future__ import annotations

import math

import numpy as np

from .graph import Acc, Dot, Elementwise, Load, Node, Piecewise, Reduce, Reindex, UpdateSlice, substitute, topological
from .indexmap import Affine, IndexMap
from .kernels import Kernel, KernelOutput
from .layout import NodeOp, TensorKind

MAX_REDUCTION = 256  # the longest reduction a head epilogue does per element (QK-norm over a head: 64-256)
MAX_BLOCK = 512  # the widest head a tile holds (the tensor-core dot's widest column tile, bodies.dot.MMA_MAX_COLUMNS)
MAX_CLOSURE = 256  # nodes between a projection and the values it feeds that feeds_head_epilogue walks at most
# The most weight bytes a whole head's tile may stream: an unsplit projection runs one task a head, on as many SMs
# as it has heads, each at ~35 GB/s (~7 us for 256 KB: Llama-1B and Qwen3-0.6B); Qwen3-8B's 1 MB heads would take
# ~30 us where its split level takes ~15.
MAX_HEAD_TILE_BYTES = 256 * 1024


def feeds_head_epilogue(dot: Dot, users: dict[int, list[Node]], results: set[int]) -> bool:
    """Whether every value computed from ``dot`` leaves the graph only as the value of a dynamic update (the cache
    append) or as the left operand of another product (the queries of attention's scores), through views,
    pointwise work, concatenations and short reductions (RoPE, QK-norm) and never as a result: the product whose
    consumer ``absorb_head_epilogues`` can make its epilogue. Its direct users are views of it, one of which
    views its last dim as heads (``[..., heads, head_dim]``; the others may be slices of that, RoPE's halves),
    and a head's weight tile is at most MAX_HEAD_TILE_BYTES."""
    columns, first_users = dot.shape[-1], users.get(dot.uid, ())
    head_dims = {u.shape[-1] for u in first_users
                 if isinstance(u, Reindex) and len(u.shape) >= 2 and u.shape[-2] * u.shape[-1] == columns}
    if not first_users or len(head_dims) != 1 or not all(isinstance(u, Reindex) for u in first_users):
        return False
    (head_dim,) = head_dims
    weight_bytes = math.prod(dot.k_shape) * head_dim * np.dtype(dot.children[1].dtype).itemsize
    if head_dim < 16 or head_dim == columns or weight_bytes > MAX_HEAD_TILE_BYTES:
        return False
    stack, seen = [dot], {dot.uid}
    while stack:
        node = stack.pop()
        if node.uid in results:
            return False
        for user in users.get(node.uid, ()):
            if node is not dot and isinstance(user, UpdateSlice) and user.children[1] is node:
                continue
            if node is not dot and isinstance(user, Dot) and user.children[0] is node:
                continue
            if isinstance(user, Reduce) and math.prod(user.children[0].shape[len(user.shape):]) > MAX_REDUCTION:
                return False
            if not isinstance(user, (Reindex, Elementwise, Piecewise, Reduce)):
                return False
            if user.uid not in seen:
                seen.add(user.uid)
                stack.append(user)
                if len(seen) > MAX_CLOSURE:
                    return False
    return True


def absorb_head_epilogues(kernels: list[Kernel]) -> list[Kernel]:
    """Each unsplit product kernel whose stored result one kernel alone reads, a pointwise kernel of as many
    elements (the append, the queries), computes that kernel's output itself, element for element in row-major
    order, from its accumulators, when every element reads only accumulators of its own row and head (checked on
    the first and last rows: ``_column_block``). The product's tiles then hold whole heads and the reader goes."""
    writer = {o.tensor.version: k for k in kernels for o in k.outputs}
    readers: dict[int, list[Kernel]] = {}
    for k in kernels:
        for version in {t.version for t in k.read_tensors()}:
            readers.setdefault(version, []).append(k)
    removed: set[int] = set()
    blocks: dict[tuple, int | None] = {}  # a layer's kernels repeat: the check once per structure
    for u in kernels:
        if u.dot is not None or u.attention is not None or len(u.outputs) != 1:
            continue
        loads = [n for n in u.nodes() if isinstance(n, Load)]
        products = {n.tensor.version for n in loads if getattr(writer.get(n.tensor.version), "dot", None) is not None}
        if len(products) != 1:
            continue
        version = products.pop()
        a = writer[version]
        if id(a) in removed or not _plain_product(a) or readers.get(version) != [u]:
            continue
        if math.prod(a.domain) != math.prod(u.domain) or any(n.dims for n in loads if n.tensor.version == version):
            continue
        out = u.outputs[0]
        if not all(isinstance(x, Reindex) and tuple(x.children[0].shape) == () for _, x, _ in out.dyn):
            continue
        node = _over_product(a, u, version)
        key = _structure(node)
        if key not in blocks:
            blocks[key] = _column_block(node, tuple(a.domain))
        if blocks[key] is None:
            continue
        as_u = IndexMap.reshape(tuple(a.domain), tuple(u.domain))  # A's element -> U's, row-major
        dyn = tuple((d, Reindex(shape=tuple(a.domain), dtype=x.dtype, children=x.children,
                                map=IndexMap.affine(tuple(a.domain), (), [])), hi) for d, x, hi in out.dyn)  # fmt: skip
        a.outputs = [KernelOutput(node, out.tensor, as_u.then(out.map), dyn)]
        a.column_block = blocks[key]
        a.name = f"{a.name}|{u.name}"
        removed.add(id(u))
    return [k for k in kernels if id(k) not in removed]


def _plain_product(kernel: Kernel) -> bool:
    """A product over one contraction dim that stores its accumulators as they are into the workspace."""
    if kernel.dot is None or kernel.attention is not None or len(kernel.outputs) != 1 or len(kernel.dot.k_shape) != 1:
        return False
    out = kernel.outputs[0]
    return (isinstance(out.node, Acc) and out.map.is_identity and not out.dyn
            and out.tensor.buffer.kind == TensorKind.WORKSPACE)  # fmt: skip


def _over_product(a: Kernel, u: Kernel, version: int) -> Node:
    """U's output value over A's domain (row-major), its loads of A's result read from A's accumulators
    rounded to the stored type as the store did."""
    stored = a.outputs[0].tensor
    acc = Acc(shape=tuple(a.domain), dtype=a.dot.acc_dtype)
    rounded = Elementwise(shape=tuple(a.domain), dtype=stored.buffer.dtype, children=(acc,), op=NodeOp.CONVERT)
    replace = {}
    for load in (n for n in u.nodes() if isinstance(n, Load) and n.tensor.version == version):
        value = Reindex(shape=tuple(load.shape), dtype=stored.buffer.dtype, children=(rounded,), map=load.map)
        if np.dtype(load.dtype) != np.dtype(stored.buffer.dtype):
            value = Elementwise(shape=tuple(load.shape), dtype=load.dtype, children=(value,), op=NodeOp.CONVERT)
        replace[load.uid] = value
    value = substitute(u.outputs[0].node, replace)
    return Reindex(shape=tuple(a.domain), dtype=value.dtype, children=(value,),
                   map=IndexMap.reshape(tuple(a.domain), tuple(u.domain)))  # fmt: skip


def _structure(node: Node) -> tuple:
    """What decides where ``node`` reads the accumulators: its nodes' kinds, shapes and index maps (the tensors
    it loads left out: every layer's append has the same structure over other buffers)."""
    order = topological([node])
    position = {n.uid: i for i, n in enumerate(order)}
    words = []
    for n in order:
        params = ()
        if isinstance(n, Reindex):
            params = tuple(n.map.to_words())
        elif isinstance(n, Piecewise):
            params = (n.axis, *n.los)
        elif isinstance(n, Reduce):
            params = (n.n_inner,)
        words.append((type(n).__name__, tuple(n.shape), params, tuple(position[c.uid] for c in n.children)))
    return tuple(words)


def _column_block(node: Node, domain: tuple[int, ...]) -> int | None:
    """The narrowest block of the last dim (whole 16-column units dividing it, at most MAX_BLOCK) such that every
    element of the first and last rows of ``domain`` reads accumulators of its own row and block only; None if
    there is none."""
    columns = domain[-1] if domain else 0
    rows = [tuple(0 for _ in domain[:-1]), tuple(n - 1 for n in domain[:-1])]
    element = np.array([row + (c,) for row in dict.fromkeys(rows) for c in range(columns)], np.int64)
    owner, read = _acc_reads(node, element, np.arange(len(element)))
    if not len(read):
        return None
    if not (read[:, :-1] == element[owner, :-1]).all():
        return None
    for block in range(16, min(columns, MAX_BLOCK) + 1, 16):
        if columns % block == 0 and (read[:, -1] // block == element[owner, -1] // block).all():
            return block
    return None


def _acc_reads(node: Node, index: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, accumulator index) of every accumulator read computing ``node`` at ``index`` ([n, rank]) for the
    elements ``owner`` ([n]) stand for: the walk of the emitter's, over all elements at once."""
    if isinstance(node, Acc):
        return owner, index
    if isinstance(node, Reindex):
        return _acc_reads(node.children[0], _apply(node.map, index), owner)
    if isinstance(node, Piecewise):
        bounds = list(node.los) + [node.shape[node.axis]]
        parts = []
        for k, child in enumerate(node.children):
            inside = (index[:, node.axis] >= bounds[k]) & (index[:, node.axis] < bounds[k + 1])
            shifted = index[inside].copy()
            shifted[:, node.axis] -= bounds[k]
            parts.append(_acc_reads(child, shifted, owner[inside]))
        return _joined(parts, index.shape[1])
    children = node.children
    if isinstance(node, Reduce):
        inner = tuple(children[0].shape[len(node.shape):])
        positions = np.array(np.unravel_index(np.arange(math.prod(inner)), inner), np.int64).T.reshape(-1, len(inner))
        index = np.concatenate([np.repeat(index, len(positions), axis=0), np.tile(positions, (len(index), 1))], axis=1)
        owner = np.repeat(owner, len(positions))
    return _joined([_acc_reads(c, index, owner) for c in children], None)


def _joined(parts, rank) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, rank or 0), np.int64)
    return np.concatenate([o for o, _ in parts]), np.concatenate([r for _, r in parts])


def _apply(index_map: IndexMap, index: np.ndarray) -> np.ndarray:
    """``index_map.apply`` of every row of ``index``."""
    shape = index_map.in_shape
    for stage in index_map.stages:
        if isinstance(stage, Affine):
            matrix = np.array(stage.matrix, np.int64).reshape(len(stage.out_shape), index.shape[1])
            index = index @ matrix.T + np.array(stage.offset, np.int64).reshape(len(stage.out_shape))
        else:
            flat = np.ravel_multi_index(tuple(index.T), shape) if len(shape) else np.zeros(len(index), np.int64)
            index = np.array(np.unravel_index(flat, stage.out_shape), np.int64).T.reshape(len(index), -1)
        shape = stage.out_shape
    return index
