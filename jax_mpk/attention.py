"""Flash-decoding: a product of softmax-normalized scores with values, computed in chunks of keys.

Fusion leaves attention as two product kernels: the scores (q . K, over rows ++ (key,)) and the values' product,
whose staging recomputes the softmax of its row over all keys. That is two dependency levels, the second with
one row of work per task. This GPU pass rewrites such a pair, wherever the second product's operand is a
softmax along its contraction of values that only the first product stores, into ONE kernel
(kernels.AttentionSpec) whose tasks each take a chunk of keys and write, per row, the chunk's largest score m,
l = sum exp(score - m) and o = sum exp(score - m) * value. The last task of a group of query rows to finish
(a counter per group) merges the group's chunks into the values' product's own output:

    M = max_j m_j,    out = sum_j exp(m_j - M) o_j / sum_j exp(m_j - M) l_j

which is the softmax-weighted sum exactly (for any per-row reference subtracted inside the user's exp), with
the probabilities rounded to the values' type before the normalization where the unsplit form rounds them
after it (docs/float_contract.md). Both products run on tensor cores (ffi/include/jax_mpk/tasks/attention.cuh).
Its readers are unchanged. On by default on CUDA (JAX_MPK_SPLIT_ATTENTION=0: the two products).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .graph import Acc, Elementwise, Load, Node, Reduce, Reindex, substitute, topological
from .indexmap import IndexMap, linear_form
from .kernels import AttentionSpec, DotSpec, Kernel, KernelOutput, Tensor
from .bodies.attention import shared_memory_bytes as attention_smem_bytes
from .layout import NodeOp, ReduceKind, TensorKind

MIN_CHUNK = 32  # keys per task at least: fewer would not cover the task's fixed cost
MAX_ROWS = 8  # query rows per task (the query heads that share one key/value head): the mma's 8 columns
VECTOR = 8  # keys and values are copied 16 bytes (8 two-byte elements) at a time
MMA_STEP = 16  # keys per mma tile and head elements per mma step (attention.cuh: m16n8k16)
MAX_HEAD_DIM = 256

NewTensor = Callable[[tuple, np.dtype, str], Tensor]


def split_attention(kernels: list[Kernel], num_workers: int, shared_memory_bytes: int,
                    new_tensor: NewTensor) -> list[Kernel]:
    """``kernels`` with every scores/values product pair that matches replaced by one split-attention kernel
    (at the scores' position) that writes what the values' product wrote. A chunk's keys and values sit in
    shared memory together (``shared_memory_bytes`` a task), so that all of its bytes are in flight at once."""

    def key(tensor: Tensor) -> tuple[int, int]:
        return id(tensor.buffer), tensor.version

    writer = {key(t): k for k in kernels for t in k.written_tensors()}
    readers: dict[tuple[int, int], list[Kernel]] = {}
    for k in kernels:
        for t in k.read_tensors():
            listed = readers.setdefault(key(t), [])
            if not any(r is k for r in listed):
                listed.append(k)
    replaced: dict[int, list[Kernel]] = {}  # id(scores kernel) -> the kernels that take its place
    dropped: set[int] = set()
    for values_product in kernels:
        match = _match(values_product, writer, readers)
        if match is None:
            continue
        scores_product, qk, probs_kernel, score, rows_dims = match
        rows, head_dim = tuple(values_product.domain[:-1]), values_product.domain[-1]
        keys = scores_product.domain[-1]
        row_count = math.prod(rows[d] for d in rows_dims)
        chunk = _chunk(keys, math.prod(rows) // row_count, num_workers,
                       lambda c: attention_smem_bytes(row_count, head_dim, c) <= shared_memory_bytes)  # fmt: skip
        if chunk is None:
            continue
        chunks = keys // chunk
        f32 = np.dtype("float32")
        name = f"a{values_product.outputs[0].tensor.version}"
        spec = AttentionSpec(
            score=score, output=values_product.outputs[0].tensor, values=values_product.dot.rhs,
            values_map=values_product.dot.rhs_map, chunk=chunk, rows_dims=rows_dims, partial_out=new_tensor(rows + (chunks, head_dim), f32, f"{name}o"),
            partial_max=new_tensor(rows + (chunks,), f32, f"{name}m"), partial_sum=new_tensor(rows + (chunks,), f32, f"{name}l"),
        )  # fmt: skip
        attention = Kernel(
            name="attention", domain=rows + (keys,), outputs=[], dot=qk,
            source=values_product.source or scores_product.source, attention=spec,
        )  # fmt: skip
        queries = _store_queries_beside(attention, writer, new_tensor)
        replaced[id(scores_product)] = [attention] if queries is None else [queries, attention]
        dropped.update({id(values_product), id(probs_kernel)})
    return [new for k in kernels if id(k) not in dropped for new in replaced.get(id(k), [k])]


def _store_queries_beside(attention: Kernel, writer, new_tensor: NewTensor) -> Kernel | None:
    """When the attention's query rows are computed (RoPE, QK-norm of the Q projection's split-K partials) and
    the attention waits anyway for a later level than their inputs (the K/V cache append), a kernel of that
    level computes them once and stores them, and the attention's tasks load them: each task would otherwise
    recompute its rows after its wait, a chain of dependent memory round trips on the critical path (~5 us of
    a 10 us task), and the 16 tasks of a KV head all the same rows. Returns that kernel, or None."""
    dot = attention.dot
    if dot.lhs_expr is None:
        return None

    def latest(tensors) -> int:
        return max((writer[(id(t.buffer), t.version)].level for t in tensors if (id(t.buffer), t.version) in writer), default=-1)

    value = dot.lhs_expr.children[0]
    query_inputs = [n.tensor for n in topological([value]) if isinstance(n, Load)]
    others = [dot.rhs, attention.attention.values] + [n.tensor for n in topological([attention.attention.score]) if isinstance(n, Load)]
    if latest(others) <= latest(query_inputs):
        return None  # storing them would add a dependency level
    tensor = new_tensor(tuple(value.shape), np.dtype(value.dtype), f"q{value.uid}")
    dot.lhs, dot.lhs_map, dot.lhs_expr = tensor, dot.lhs_expr.map, None
    return Kernel(name="queries", domain=tuple(value.shape),
                  outputs=[KernelOutput(value, tensor, IndexMap.identity(value.shape))], source=attention.source)  # fmt: skip


def _chunk(keys: int, row_groups: int, num_workers: int, fits: Callable[[int], bool]) -> int | None:
    """Keys per chunk: enough chunks that the row groups times the chunks occupy the workers, each chunk at least
    MIN_CHUNK (or all the keys), whole mma tiles, dividing the key count (so every chunk is whole) and small
    enough that ``fits(chunk)`` (shared memory); None when no such chunk exists (a key count that is not a
    multiple of 16)."""
    wanted = max(1, num_workers // max(row_groups, 1))
    divisors = [c for c in range(min(MIN_CHUNK, keys), keys + 1) if keys % c == 0 and c % MMA_STEP == 0 and fits(c)]
    if not divisors:
        return None
    target = min(max(-(-keys // wanted), MIN_CHUNK), max(divisors))
    return min(divisors, key=lambda c: (abs(c - target), -c))


def _match(values_product: Kernel, writer, readers):
    """(scores product, its product over the values' rows, softmax kernel or None, score expression, rows dims)
    when ``values_product`` multiplies values by a softmax along its contraction (computed while staged, or
    stored by a kernel of its own that only it reads) of a value that a scores product alone stores; else None."""
    dot = values_product.dot
    if (dot is None or values_product.attention is not None or len(dot.k_shape) != 1 or len(values_product.outputs) != 1
            or len(values_product.domain) < 2):  # rows ++ (head dim,): a vector's dot has no rows
        return None
    out = values_product.outputs[0]
    if not isinstance(out.node, Acc) or not out.map.is_identity or out.dyn or tuple(out.tensor.shape) != tuple(values_product.domain):
        return None
    rows, head_dim, keys = tuple(values_product.domain[:-1]), values_product.domain[-1], dot.k_shape[0]
    probs_kernel = None  # the softmax's own kernel, when the product loads it rather than computing it
    if dot.lhs_expr is not None:
        probs, probs_map = dot.lhs_expr.children[0], dot.lhs_expr.map
    else:
        probs_kernel, probs_map = writer.get((id(dot.lhs.buffer), dot.lhs.version)), dot.lhs_map
        if probs_kernel is None or probs_kernel.dot is not None or len(probs_kernel.outputs) != 1:
            return None
        stored = probs_kernel.outputs[0]
        if (not stored.map.is_identity or stored.dyn or stored.tensor.buffer.kind != TensorKind.WORKSPACE
                or tuple(dot.lhs.shape) != tuple(stored.tensor.buffer.shape)
                or readers.get((id(dot.lhs.buffer), dot.lhs.version)) != [values_product]):  # fmt: skip
            return None
        probs = stored.node
    if tuple(probs.shape) != rows + (keys,) or probs_map.to_words() != _drop_axis(rows + (head_dim, keys), len(rows)).to_words():
        return None
    x = _softmax_input(probs)
    if x is None:
        return None
    loads = [n for n in topological([x]) if isinstance(n, Load)]
    scores = [n for n in loads if (id(n.tensor.buffer), n.tensor.version) in writer
              and writer[(id(n.tensor.buffer), n.tensor.version)].dot is not None]  # fmt: skip
    if len(scores) != 1 or scores[0].dims or not _in_own_order(scores[0].map, scores[0].tensor.shape):
        return None
    scores_load = scores[0]
    scores_key = (id(scores_load.tensor.buffer), scores_load.tensor.version)
    scores_product = writer[scores_key]
    qk = scores_product.dot
    if (
        scores_product.attention is not None or len(scores_product.outputs) != 1
        or not isinstance(scores_product.outputs[0].node, Acc) or not scores_product.outputs[0].map.is_identity
        or scores_product.outputs[0].dyn or _non_unit(scores_product.domain) != _non_unit(rows + (keys,))
        or tuple(qk.k_shape) != (head_dim,) or readers.get(scores_key) != [probs_kernel or values_product]
        or scores_load.tensor.buffer.kind != TensorKind.WORKSPACE
    ):  # fmt: skip
        return None
    qk, acc = _over_rows(qk, scores_product.outputs[0].node, tuple(scores_product.domain), rows + (keys,))
    rows_dims = _rows_dims(qk, dot, rows, head_dim, keys)
    if rows_dims is None:
        return None
    score = substitute(x, {scores_load.uid: acc})
    return scores_product, qk, probs_kernel, score, rows_dims


def _non_unit(shape) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _in_own_order(index_map: IndexMap, tensor_shape) -> bool:
    """Whether ``index_map`` reads a dense tensor of ``tensor_shape`` at the row-major position of its own index
    (the identity, or a view that only moves length-1 axes: a decode step's one query position sits between
    the heads in the scores and after them in the values' product)."""
    form = linear_form(index_map, tensor_shape)
    in_shape = tuple(index_map.in_shape)
    if form is None or form[0] != 0 or math.prod(in_shape) != math.prod(tensor_shape):
        return False
    own = [math.prod(in_shape[d + 1 :]) for d in range(len(in_shape))]
    return all(c == o for c, o, n in zip(form[1], own, in_shape) if n != 1)


def _over_rows(qk: DotSpec, acc: Acc, domain: tuple, rows_keys: tuple) -> tuple[DotSpec, Acc]:
    """The scores' product over the values' product's rows ++ (key,), ``domain`` with its length-1 axes moved
    there (the attention kernel takes one domain for both), and its accumulator over that domain."""
    if domain == rows_keys:
        return qk, acc
    relabel = IndexMap.reshape(rows_keys + tuple(qk.k_shape), domain + tuple(qk.k_shape))
    lhs_expr = qk.lhs_expr
    if lhs_expr is not None:  # a Reindex of the computed queries through lhs_map (see DotSpec)
        lhs_expr = Reindex(shape=relabel.in_shape, dtype=lhs_expr.dtype, children=lhs_expr.children,
                           source=lhs_expr.source, map=relabel.then(lhs_expr.map))  # fmt: skip
    over_rows = DotSpec(qk.k_shape, qk.lhs, relabel.then(qk.lhs_map), qk.rhs, relabel.then(qk.rhs_map), qk.acc_dtype, lhs_expr)
    return over_rows, Acc(shape=rows_keys, dtype=acc.dtype, source=acc.source)


def _softmax_input(probs: Node) -> Node | None:
    """x when ``probs`` = [convert](e / broadcast(sum(e, last axis))) with e = exp(x) or exp(x - a value
    broadcast along the last axis); else None."""
    node = probs
    if isinstance(node, Elementwise) and node.op == NodeOp.CONVERT:
        node = node.children[0]
    if not (isinstance(node, Elementwise) and node.op == NodeOp.DIV):
        return None
    e, total = node.children
    if not _broadcast_along_last(total):
        return None
    total = total.children[0]
    if not (isinstance(total, Reduce) and total.kind == ReduceKind.SUM and total.n_inner == 1 and total.children[0] is e):
        return None
    if not (isinstance(e, Elementwise) and e.op == NodeOp.EXP):
        return None
    x = e.children[0]
    if isinstance(x, Elementwise) and x.op == NodeOp.SUB and _broadcast_along_last(x.children[1]):
        x = x.children[0]
    return x if tuple(x.shape) == tuple(probs.shape) else None


def _broadcast_along_last(node: Node) -> bool:
    shape = tuple(node.shape)
    return (
        isinstance(node, Reindex) and len(node.children[0].shape) == len(shape) - 1
        and node.map.to_words() == _drop_axis(shape, len(shape) - 1).to_words()
    )  # fmt: skip


def _drop_axis(shape: tuple, axis: int) -> IndexMap:
    """The map from ``shape`` to ``shape`` without ``axis`` that forgets that axis."""
    out = shape[:axis] + shape[axis + 1 :]
    matrix = [[1 if c == (r if r < axis else r + 1) else 0 for c in range(len(shape))] for r in range(len(out))]
    return IndexMap.affine(shape, out, matrix)


def _rows_dims(qk, pv, rows: tuple, head_dim: int, keys: int) -> tuple[int, ...] | None:
    """The row dims that index neither keys nor values (one task takes them whole and reads its chunk of keys
    and values once for all of them), when both are two-byte tensors read along whole 16-byte vectors of the
    head dim at 16-byte aligned offsets, the queries are of their type, the head dim is whole mma steps and the
    task's rows fit the body; else None."""
    if qk.rhs.buffer.dtype != pv.rhs.buffer.dtype or np.dtype(qk.rhs.buffer.dtype).itemsize != 2:
        return None
    # the queries enter the scores' mma in the keys' type: only when that is their own (no rounding added)
    if np.dtype(qk.lhs_expr.dtype if qk.lhs_expr is not None else qk.lhs.buffer.dtype) != np.dtype(qk.rhs.buffer.dtype):
        return None
    if head_dim % MMA_STEP or head_dim > MAX_HEAD_DIM:
        return None
    key_form = linear_form(qk.rhs_map, qk.rhs.shape)  # over rows ++ (key, d)
    value_form = linear_form(pv.rhs_map, pv.rhs.shape)  # over rows ++ (d, key)
    if key_form is None or value_form is None:
        return None
    (key_const, key_coefs), (value_const, value_coefs) = key_form, value_form
    if key_coefs[-1] != 1 or value_coefs[len(rows)] != 1:
        return None
    strided = key_coefs[:-1] + value_coefs[: len(rows)] + value_coefs[len(rows) + 1 :]
    if key_const % VECTOR or value_const % VECTOR or any(c % VECTOR for c in strided):
        return None
    dims = tuple(d for d in range(len(rows)) if rows[d] > 1 and key_coefs[d] == 0 and value_coefs[d] == 0)
    row_count = math.prod(rows[d] for d in dims)
    return dims if row_count <= MAX_ROWS else None
