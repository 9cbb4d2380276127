"""Rules for top_k, sort and the cumulative scans, composed of the op graph's existing nodes.

The CPU executor and the CUDA megakernel run them with their existing bodies (row reductions, split when
long): top_k as k rounds of (max, first position of it) over the row, each excluding what earlier rounds took
(NaN and signed zeros in jax's total order); a scan as a
reduction over a masked [n, n] view; a sort as each entry's rank (a count over an [n, n] view, stored once) and a
pick per output position (another). Scans and sorts are therefore limited to short axes (MAX_SQUARE_LENGTH).
"""

from __future__ import annotations

import math

import numpy as np

from .graph import Elementwise, Node, Piecewise, Reduce
from .indexmap import IndexMap
from .layout import NodeOp, ReduceKind
from .lowering import const, move_axes_last, reindex, rule, transpose_map

MAX_SQUARE_LENGTH = 4096


def _spread(node: Node, shape) -> Node:
    """``node`` [...] as [..., n]: constant along the new last dim."""
    rank = len(node.shape)
    matrix = [[int(r == c) for c in range(len(shape))] for r in range(rank)]
    return reindex(node, tuple(shape), IndexMap.affine(tuple(shape), node.shape, matrix))


def _node(op: str, *children: Node, shape, dtype) -> Node:
    return Elementwise(shape=tuple(shape), dtype=np.dtype(dtype), children=tuple(children), op=NodeOp[op])


def _lowest(dtype) -> float:
    dtype = np.dtype(dtype)
    return -math.inf if dtype.kind == "f" or dtype.name == "bfloat16" else float(np.iinfo(dtype).min)


def _reduce_last(x: Node, kind: ReduceKind, dtype=None) -> Node:
    return Reduce(shape=tuple(x.shape[:-1]), dtype=np.dtype(dtype or x.dtype), children=(x,), kind=kind, n_inner=1)


def _stack_last(parts: list[Node], dtype) -> Node:
    """[...] nodes as one [..., len(parts)]."""
    shaped = [reindex(p, (*p.shape, 1), IndexMap.reshape((*p.shape, 1), tuple(p.shape))) for p in parts]
    shape = (*parts[0].shape, len(parts))
    return Piecewise(shape=shape, dtype=np.dtype(dtype), children=tuple(shaped), axis=len(shape) - 1,
                     los=tuple(range(len(parts))))  # fmt: skip


@rule("top_k")
def _top_k(ctx, x, *, k, axis=-1, **_):
    """The k largest entries of each row, largest first, the lower position first among equal ones, in
    jax.lax.top_k's total order: NaN above +inf, +0 above -0. Round j takes the largest entry, in that order,
    below round j-1's (value, position): its value is a max over the row with the entries taken or passed
    replaced by -inf (NaN wins a max, and max(-0, +0) is +0), its position the first entry still allowed that
    equals that value in the total order."""
    n, last = x.shape[-1], len(x.shape) - 1
    if int(axis) % len(x.shape) != last:
        raise ctx.unsupported("top_k along another axis than the last")
    shape, boolean, i32 = tuple(x.shape), np.dtype(bool), np.dtype(np.int32)
    iota = Elementwise(shape=shape, dtype=i32, op=NodeOp.IOTA, params=(last,))
    floor = const(_lowest(x.dtype), x.dtype, shape)
    above, same = _total_order(x, shape)
    values, indices, candidates, allowed = [], [], x, const(1, boolean, shape)
    for _ in range(int(k)):
        best = _reduce_last(candidates, ReduceKind.MAX)
        v = _spread(best, shape)
        at_best = _node("AND", allowed, same(x, v), shape=shape, dtype=boolean)
        position = _reduce_last(_node("SELECT_N", at_best, const(n, i32, shape), iota, shape=shape, dtype=i32),
                                ReduceKind.MIN)  # fmt: skip
        values.append(best)
        indices.append(position)
        p = _spread(position, shape)
        tie_after = _node("AND", same(x, v), _node("GT", iota, p, shape=shape, dtype=boolean), shape=shape,
                          dtype=boolean)  # fmt: skip
        allowed = _node("OR", above(v, x), tie_after, shape=shape, dtype=boolean)
        candidates = _node("SELECT_N", allowed, floor, x, shape=shape, dtype=x.dtype)
    return [_stack_last(values, x.dtype), _stack_last(indices, i32)]


def _total_order(x: Node, shape) -> tuple:
    """``above(a, b)``: a comes strictly before b in descending total order; ``same(a, b)``: neither does.
    Floats: NaN (all alike) above +inf, +0 above -0; integers: their order."""
    boolean = np.dtype(bool)

    def node(op, *xs):
        return _node(op, *xs, shape=shape, dtype=boolean)

    if np.dtype(x.dtype).kind in "biu":
        return (lambda a, b: node("GT", a, b)), (lambda a, b: node("EQ", a, b))

    def nan(a):
        return node("NE", a, a)

    def negative_zero(a):  # 1 / -0 is -inf
        one_over = _node("DIV", const(1, x.dtype, shape), a, shape=shape, dtype=x.dtype)
        return node("AND", node("EQ", a, const(0, x.dtype, shape)), node("LT", one_over, const(0, x.dtype, shape)))

    def same_sign(a, b):
        return node("EQ", negative_zero(a), negative_zero(b))

    def above(a, b):
        zeros = node("AND", node("EQ", a, b), node("AND", negative_zero(b), node("NOT", negative_zero(a))))
        return node("OR", node("OR", node("GT", a, b), node("AND", nan(a), node("NOT", nan(b)))), zeros)

    def same(a, b):
        return node("OR", node("AND", node("EQ", a, b), same_sign(a, b)), node("AND", nan(a), nan(b)))

    return above, same


_SCANS = {"cumsum": ReduceKind.SUM, "cumprod": ReduceKind.PROD, "cummax": ReduceKind.MAX, "cummin": ReduceKind.MIN}


@rule(*_SCANS, "cumlogsumexp")
def _scan(ctx, x, *, axis, reverse=False, **_):
    """out[i] = reduce(x[j] for j <= i) along ``axis`` (j >= i reversed), as a reduction of the [.., n, n] view
    whose entries past i are the reduction's identity."""
    axis = int(axis)
    _check_square_length(ctx, x.shape[axis], "a scan")
    moved = move_axes_last(x, [axis])
    rows = tuple(moved.shape)  # [..., n]: out[..., i]
    square = (*rows, rows[-1])  # [..., i, j]
    entries, i, j = _square(moved)
    i32, boolean = np.dtype(np.int32), np.dtype(bool)
    inside = _node("GE" if reverse else "LE", j, i, shape=square, dtype=boolean)
    if ctx.primitive == "cumlogsumexp":
        if np.dtype(x.dtype).kind in "biu":
            raise ctx.unsupported(f"cumlogsumexp of {x.dtype}: logsumexp needs a floating-point operand "
                                  "(jax.jit cannot lower it either: its identity -inf has no integer value)")
        # computed in float32 at least and rounded once at the end: in bf16/f16, rounding the exponentials,
        # their sum and its logarithm each to the operand's dtype costs several ulp (fuzz 2026:337)
        wide = np.dtype(np.float32) if np.dtype(x.dtype).itemsize < 4 else np.dtype(x.dtype)
        entries = _node("CONVERT", entries, shape=square, dtype=wide) if wide != x.dtype else entries
        masked = _node("SELECT_N", inside, const(-math.inf, wide, square), entries, shape=square, dtype=wide)
        # shifted by the largest entry, or by 0 where that is not finite: -inf - -inf would be NaN where the
        # prefix is all -inf (logsumexp -inf), and +inf or NaN pass through the sum of exponentials as they are
        top = _reduce_last(masked, ReduceKind.MAX)
        finite = _node("IS_FINITE", top, shape=rows, dtype=boolean)
        shift = _node("SELECT_N", finite, const(0, wide, rows), top, shape=rows, dtype=wide)
        shifted = _node("EXP", _node("SUB", masked, _spread(shift, square), shape=square, dtype=wide),
                        shape=square, dtype=wide)  # fmt: skip
        total = _node("LOG", _reduce_last(shifted, ReduceKind.SUM), shape=rows, dtype=wide)
        result = _node("ADD", shift, total, shape=rows, dtype=wide)
        result = _node("CONVERT", result, shape=rows, dtype=x.dtype) if wide != x.dtype else result
    else:
        kind = _SCANS[ctx.primitive]
        identity = {ReduceKind.SUM: 0, ReduceKind.PROD: 1, ReduceKind.MAX: _lowest(x.dtype),
                    ReduceKind.MIN: -_lowest(x.dtype) if np.dtype(x.dtype).kind == "f" or x.dtype.name == "bfloat16"
                    else float(np.iinfo(x.dtype).max)}[kind]  # fmt: skip
        masked = _node("SELECT_N", inside, const(identity, x.dtype, square), entries, shape=square, dtype=x.dtype)
        result = _reduce_last(masked, kind)
    return _move_last_back(result, axis, ctx.out_shape)


def _check_square_length(ctx, n: int, what: str) -> None:
    if n > MAX_SQUARE_LENGTH:
        raise ctx.unsupported(f"{what} over {n} entries: jax_mpk does at most {MAX_SQUARE_LENGTH} (it reduces an "
                              "n x n view; a scan/sort task body is not written yet)")  # fmt: skip


def _square(x: Node) -> tuple[Node, Node, Node]:
    """For x [..., n]: x[..., j] as [..., i, j], and the iotas of i and j."""
    rows = tuple(x.shape)
    square = (*rows, rows[-1])
    r = len(square)
    matrix = [[int(c == a) for c in range(r)] for a in range(r - 2)] + [[int(c == r - 1) for c in range(r)]]
    i32 = np.dtype(np.int32)
    return (reindex(x, square, IndexMap.affine(square, rows, matrix)),
            Elementwise(shape=square, dtype=i32, op=NodeOp.IOTA, params=(r - 2,)),
            Elementwise(shape=square, dtype=i32, op=NodeOp.IOTA, params=(r - 1,)))  # fmt: skip


def _move_last_back(x: Node, axis: int, out_shape) -> Node:
    """The inverse of move_axes_last(x, [axis])."""
    rank = len(out_shape)
    perm = list(range(axis)) + [rank - 1] + list(range(axis, rank - 1))
    return reindex(x, out_shape, transpose_map(out_shape, perm))


@rule("sort")
def _sort(ctx, *operands, dimension, is_stable=True, num_keys=1, **_):
    """Ascending along ``dimension`` by the first operand (NaN last, equal keys in their order, -0 equal to 0),
    the other operands permuted alike: entry i goes to position rank(i) = #{j: key_j < key_i, or equal and
    j < i}, and output p picks (a max over i of) the entry whose rank is p."""
    if int(num_keys) != 1:
        raise ctx.unsupported(f"num_keys={num_keys}: jax_mpk sorts by one key operand")
    axis, boolean, i32 = int(dimension), np.dtype(bool), np.dtype(np.int32)
    _check_square_length(ctx, operands[0].shape[axis], "a sort")
    keys = move_axes_last(operands[0], [axis])
    rows = tuple(keys.shape)
    square = (*rows, rows[-1])
    key_j, i, j = _square(keys)
    key_i = _spread(keys, square)

    def node(op, *xs):
        return _node(op, *xs, shape=square, dtype=boolean)

    if np.dtype(keys.dtype).kind in "biu":
        before = node("LT", key_j, key_i)
        tie = node("EQ", key_j, key_i)
    else:  # NaN after everything, and equal to NaN
        nan_i, nan_j = node("NE", key_i, key_i), node("NE", key_j, key_j)
        before = node("OR", node("LT", key_j, key_i), node("AND", nan_i, node("NOT", nan_j)))
        tie = node("OR", node("EQ", key_j, key_i), node("AND", nan_i, nan_j))
    earlier = node("OR", before, node("AND", tie, node("LT", j, i)))
    counted = _node("CONVERT", earlier, shape=square, dtype=i32)
    rank = _reduce_last(counted, ReduceKind.SUM)  # [..., n]
    rank.store = True
    rank_at_i, p = _square(rank)[0], _square(rank)[1]  # rank of entry i (the last dim), output position p
    chosen = node("EQ", rank_at_i, p)
    outs = []
    for x in operands:
        values = _square(move_axes_last(x, [axis]))[0]
        floor = const(_lowest(x.dtype) if x.dtype != boolean else 0, x.dtype, square)
        picked = _reduce_last(_node("SELECT_N", chosen, floor, values, shape=square, dtype=x.dtype), ReduceKind.MAX)
        outs.append(_move_last_back(picked, axis, tuple(x.shape)))
    return outs
