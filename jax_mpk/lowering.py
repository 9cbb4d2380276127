"""Lowering rules: one registry from jaxpr primitive name to a function that builds op-graph nodes.

A rule gets a frozen :class:`RuleContext` (avals, source line), the input nodes and the equation's params,
and returns the output node(s). Adding a primitive is one ``@rule`` here and one test; an elementwise op is one
entry in ``scalar_ops.py`` instead. The rules of ``jax.random``'s threefry primitives (``prng.py``) and of top_k,
sort and the scans (``ordering.py``) register in the same registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UnsupportedPrimitiveError
from .graph import Comm, Dot, DynLoad, Elementwise, Node, Piecewise, Reduce, Reindex, UpdateSlice
from .indexmap import IndexMap
from .layout import DTYPES, DType, NodeOp, ReduceKind
from .scalar_ops import BY_NAME as SCALAR_OP_BY_NAME
from .scalar_ops import SCALAR_OPS, ScalarOp


@dataclass(frozen=True)
class Mesh:
    """The devices a ``shard_map`` body runs on, as the collective rules see them."""

    axis_sizes: tuple[tuple[str, int], ...]  # the mesh's axes, major to minor
    rank: Node  # int32 scalar: this device's row-major position in the mesh

    @property
    def num_ranks(self) -> int:
        return math.prod(size for _, size in self.axis_sizes)


@dataclass(frozen=True)
class RuleContext:
    primitive: str
    in_avals: tuple
    out_avals: tuple
    source: str
    mesh: Mesh | None = None  # inside a shard_map body

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.out_avals[0].shape)

    @property
    def out_dtype(self) -> np.dtype:
        return np.dtype(self.out_avals[0].dtype)

    def unsupported(self, detail: str) -> UnsupportedPrimitiveError:
        return UnsupportedPrimitiveError(self.primitive, self.source, detail)


Rule = Callable[..., "Node | list[Node]"]
RULES: dict[str, Rule] = {}


def rule(*names: str):
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def supported_primitives() -> list[str]:
    return sorted(RULES)


# ---------------------------------------------------------------------------------------------- helpers


def const(value, dtype, shape=(), source: str = "") -> Node:
    node = Elementwise(shape=(), dtype=np.dtype(dtype), op=NodeOp.CONST, params=(float(value),), source=source)
    return broadcast_to(node, tuple(shape))


def broadcast_to(node: Node, shape: tuple[int, ...]) -> Node:
    """Numpy-style broadcast of ``node`` to ``shape`` (lax ops accept scalars and size-1 dims)."""
    shape = tuple(shape)
    if tuple(node.shape) == shape:
        return node
    lead = len(shape) - len(node.shape)
    matrix = [[0] * len(shape) for _ in node.shape]
    for d, size in enumerate(node.shape):
        if size == shape[lead + d]:
            matrix[d][lead + d] = 1
        elif size != 1:
            raise ValueError(f"cannot broadcast {node.shape} to {shape}")
    return reindex(node, shape, IndexMap.affine(shape, node.shape, matrix))


def reindex(node: Node, shape, index_map: IndexMap) -> Node:
    if index_map.is_identity and tuple(shape) == tuple(node.shape):
        return node
    if isinstance(node, Reindex):  # fold view-of-view into one map
        return Reindex(
            shape=tuple(shape), dtype=node.dtype, children=node.children, map=index_map.then(node.map), source=node.source
        )
    return Reindex(shape=tuple(shape), dtype=node.dtype, children=(node,), map=index_map, source=node.source)


def transpose_map(out_shape, perm) -> IndexMap:
    """Map for ``y = transpose(x, perm)``: y index -> x index (x dim perm[d] is y dim d)."""
    rank = len(perm)
    matrix = [[0] * rank for _ in range(rank)]
    for d, p in enumerate(perm):
        matrix[p][d] = 1
    in_shape = [0] * rank
    for d, p in enumerate(perm):
        in_shape[p] = out_shape[d]
    return IndexMap.affine(out_shape, in_shape, matrix)


def constant_value(node: Node):
    """The Python value of a scalar constant node, or None."""
    if isinstance(node, Elementwise) and node.op == NodeOp.CONST and node.shape == ():
        return node.params[0]
    return None


# -------------------------------------------------------------------------------------------- elementwise

# Scalar integer/bool arithmetic on constants is folded so that static indices stay static.
_FOLD = {NodeOp[op.name]: op.fold for op in SCALAR_OPS if op.fold is not None}


def elementwise(ctx: RuleContext, op: NodeOp, *inputs: Node, params=()) -> Node:
    shape, dtype = ctx.out_shape, ctx.out_dtype
    values = [constant_value(x) for x in inputs]
    if shape == () and op in _FOLD and all(v is not None for v in values) and dtype.kind in "biu":
        folded = _FOLD[op](*[np.asarray(v).astype(x.dtype) for v, x in zip(values, inputs)])
        return const(np.asarray(folded).astype(dtype).item(), dtype, source=ctx.source)
    children = tuple(broadcast_to(x, shape) for x in inputs)
    return Elementwise(shape=shape, dtype=dtype, children=children, op=op, params=params, source=ctx.source)


def _scalar_rule(op: ScalarOp) -> Rule:
    node_op = NodeOp[op.name]
    accepted = {np.dtype(DTYPES[DType[name]].numpy_name) for name in op.operand_dtypes}

    def lower(ctx, *xs, **_):
        dtype = np.dtype(ctx.in_avals[0].dtype)
        if dtype not in accepted:
            raise ctx.unsupported(f"on {dtype.name} operands: jax_mpk defines it on "
                                  f"{', '.join(op.operand_dtypes).lower()}")  # fmt: skip
        return elementwise(ctx, node_op, *xs)

    return lower


for _op in SCALAR_OPS:
    rule(*_op.primitives)(_scalar_rule(_op))


@rule("bitcast_convert_type")
def _bitcast_convert_type(ctx, x, *, new_dtype, **_):
    """Same width only: one scalar op per result dtype (BITCAST_TO_<dtype>)."""
    out = np.dtype(new_dtype)
    if out == np.dtype(x.dtype):
        return x
    name = next((f"BITCAST_TO_{d.name}" for d, info in DTYPES.items() if np.dtype(info.numpy_name) == out), None)
    if name not in SCALAR_OP_BY_NAME or out.itemsize != np.dtype(x.dtype).itemsize:
        raise ctx.unsupported(f"a bitcast from {np.dtype(x.dtype).name} to {out.name}: jax_mpk bitcasts between "
                              "f32, i32 and u32, and between i8 and u8")  # fmt: skip
    return _scalar_rule(SCALAR_OP_BY_NAME[name])(ctx, x)


# pvary: check_vma's marking only. The sharding and layout annotations change where a value lives, never the
# value: the plan is one device's computation (a shard_map body, or the whole function on every device).
@rule("stop_gradient", "copy", "copy_p", "optimization_barrier", "pvary", "reshard", "sharding_constraint",
      "mesh_cast", "layout_constraint", "shard_alike")  # fmt: skip
def _identity(ctx, *xs, **_):
    return list(xs) if len(ctx.out_avals) > 1 else xs[0]


@rule("convert_element_type")
def _convert(ctx, x, **_):
    if np.dtype(x.dtype) == ctx.out_dtype:
        return x
    value = constant_value(x)
    if value is not None:
        return const(np.asarray(value).astype(x.dtype).astype(ctx.out_dtype).item(), ctx.out_dtype, source=ctx.source)
    return elementwise(ctx, NodeOp.CONVERT, x)


@rule("integer_pow")
def _integer_pow(ctx, x, *, y, **_):
    return elementwise(ctx, NodeOp.INTEGER_POW, x, params=(int(y),))


@rule("round")
def _round(ctx, x, *, rounding_method=0, **_):
    return elementwise(ctx, NodeOp.ROUND, x, params=(int(rounding_method),))


@rule("select_n")
def _select_n(ctx, pred, *cases, **_):
    index = constant_value(pred)
    if index is not None:
        return broadcast_to(cases[int(index)], ctx.out_shape)
    return elementwise(ctx, NodeOp.SELECT_N, pred, *cases)


@rule("clamp")
def _clamp(ctx, lo, x, hi, **_):
    return elementwise(ctx, NodeOp.CLAMP, lo, x, hi)


@rule("iota")
def _iota(ctx, *, dimension, **_):
    return Elementwise(
        shape=ctx.out_shape, dtype=ctx.out_dtype, op=NodeOp.IOTA, params=(int(dimension),), source=ctx.source
    )


# ------------------------------------------------------------------------------------------------ views


@rule("broadcast_in_dim")
def _broadcast_in_dim(ctx, x, *, shape, broadcast_dimensions, **_):
    matrix = [[0] * len(shape) for _ in x.shape]
    for k, d in enumerate(broadcast_dimensions):
        if x.shape[k] != 1 or shape[d] == 1:
            matrix[k][d] = 1
    return reindex(x, shape, IndexMap.affine(shape, x.shape, matrix))


@rule("reshape")
def _reshape(ctx, x, *, new_sizes, dimensions=None, **_):
    if dimensions is not None and tuple(dimensions) != tuple(range(len(x.shape))):
        x = reindex(x, [x.shape[d] for d in dimensions], transpose_map([x.shape[d] for d in dimensions], dimensions))
    return reindex(x, new_sizes, IndexMap.reshape(tuple(new_sizes), tuple(x.shape)))


@rule("squeeze")
def _squeeze(ctx, x, *, dimensions, **_):
    return reindex(x, ctx.out_shape, IndexMap.reshape(ctx.out_shape, tuple(x.shape)))


@rule("expand_dims")
def _expand_dims(ctx, x, **_):
    return reindex(x, ctx.out_shape, IndexMap.reshape(ctx.out_shape, tuple(x.shape)))


@rule("transpose")
def _transpose(ctx, x, *, permutation, **_):
    return reindex(x, ctx.out_shape, transpose_map(ctx.out_shape, permutation))


@rule("slice")
def _slice(ctx, x, *, start_indices, limit_indices, strides=None, **_):
    strides = strides or (1,) * len(x.shape)
    matrix = [[s if r == c else 0 for c in range(len(x.shape))] for r, s in enumerate(strides)]
    return reindex(x, ctx.out_shape, IndexMap.affine(ctx.out_shape, x.shape, matrix, start_indices))


@rule("rev")
def _rev(ctx, x, *, dimensions, **_):
    rank = len(x.shape)
    matrix = [[(-1 if r in dimensions else 1) if r == c else 0 for c in range(rank)] for r in range(rank)]
    offset = [x.shape[r] - 1 if r in dimensions else 0 for r in range(rank)]
    return reindex(x, ctx.out_shape, IndexMap.affine(ctx.out_shape, x.shape, matrix, offset))


@rule("split")
def _split(ctx, x, *, sizes, axis, **_):
    outs, start = [], 0
    for size, aval in zip(sizes, ctx.out_avals):
        offset = [start if d == axis else 0 for d in range(len(x.shape))]
        identity = [[int(r == c) for c in range(len(x.shape))] for r in range(len(x.shape))]
        outs.append(reindex(x, aval.shape, IndexMap.affine(aval.shape, x.shape, identity, offset)))
        start += size
    return outs


@rule("unstack")
def _unstack(ctx, x, *, axis, **_):
    """Every index of ``axis`` as an array without it (jax 0.11's threefry expansion uses it)."""
    axis = int(axis)
    keep = [d for d in range(len(x.shape)) if d != axis]
    outs = []
    for i, aval in enumerate(ctx.out_avals):  # out index o -> x index: o's dims around the fixed i
        matrix = [[int(keep[c] == r) for c in range(len(keep))] for r in range(len(x.shape))]
        offset = [i if d == axis else 0 for d in range(len(x.shape))]
        outs.append(reindex(x, aval.shape, IndexMap.affine(aval.shape, x.shape, matrix, offset)))
    return outs


@rule("concatenate")
def _concatenate(ctx, *xs, dimension, **_):
    los, start = [], 0
    for x in xs:
        los.append(start)
        start += x.shape[dimension]
    return Piecewise(
        shape=ctx.out_shape, dtype=ctx.out_dtype, children=tuple(xs), axis=int(dimension), los=tuple(los), source=ctx.source
    )


@rule("stack")
def _stack(ctx, *xs, axis, **_):
    """Concatenation of the operands, each with a new dim of size 1 at ``axis``."""
    axis = int(axis)
    parts = []
    for x in xs:
        shape = (*x.shape[:axis], 1, *x.shape[axis:])
        parts.append(reindex(x, shape, IndexMap.reshape(shape, tuple(x.shape))))
    return Piecewise(shape=ctx.out_shape, dtype=ctx.out_dtype, children=tuple(parts), axis=axis,
                     los=tuple(range(len(xs))), source=ctx.source)  # fmt: skip


# ------------------------------------------------------------------------------------------- reductions

_REDUCE = {
    "reduce_sum": ReduceKind.SUM, "reduce_max": ReduceKind.MAX, "reduce_min": ReduceKind.MIN,
    "reduce_prod": ReduceKind.PROD, "reduce_and": ReduceKind.AND, "reduce_or": ReduceKind.OR,
    "argmax": ReduceKind.ARGMAX, "argmin": ReduceKind.ARGMIN,
}  # fmt: skip


def move_axes_last(x: Node, axes) -> Node:
    axes = sorted(int(a) % max(len(x.shape), 1) for a in axes)
    perm = [d for d in range(len(x.shape)) if d not in axes] + axes
    if perm == list(range(len(x.shape))):
        return x
    return reindex(x, [x.shape[d] for d in perm], transpose_map([x.shape[d] for d in perm], perm))


@rule(*_REDUCE)
def _reduce(ctx, x, *, axes, **_):
    if not axes:
        return x
    return Reduce(
        shape=ctx.out_shape,
        dtype=ctx.out_dtype,
        children=(move_axes_last(x, axes),),
        kind=_REDUCE[ctx.primitive],
        n_inner=len(axes),
        source=ctx.source,
    )


# ------------------------------------------------------------------------------------------- contraction


@rule("dot_general")
def _dot_general(ctx, lhs, rhs, *, dimension_numbers, **_):
    """A Dot over (batch, lhs free, rhs free): the last dims are the product's columns, which a task tiles and
    streams its second operand along. When the first operand has more free elements (einsum may put the KV
    cache first: ``bsgd,btgrd->bgsrt``), the operands are swapped so that the long side becomes the
    columns, and the result is a transposing view of that product."""
    (lc, rc), (lb, rb) = dimension_numbers
    lhs_free, rhs_free = _free_dims(lhs, lc, lb), _free_dims(rhs, rc, rb)
    if math.prod(lhs.shape[d] for d in lhs_free) > math.prod(rhs.shape[d] for d in rhs_free):
        n_batch = len(lb)
        swapped_shape = (
            tuple(ctx.out_shape[:n_batch])
            + tuple(rhs.shape[d] for d in rhs_free)
            + tuple(lhs.shape[d] for d in lhs_free)
        )
        product = _dot(ctx, rhs, lhs, (rc, lc), (rb, lb), swapped_shape)
        # out = transpose(product): out dims (batch, lhs free, rhs free) are product dims perm
        perm = list(range(n_batch)) + [n_batch + len(rhs_free) + i for i in range(len(lhs_free))]
        perm += [n_batch + j for j in range(len(rhs_free))]
        view = transpose_map(ctx.out_shape, perm)
        return Reindex(shape=ctx.out_shape, dtype=ctx.out_dtype, children=(product,), map=view, source=ctx.source)
    return _dot(ctx, lhs, rhs, (lc, rc), (lb, rb), ctx.out_shape)


def _free_dims(operand: Node, contracting, batch) -> list[int]:
    return [d for d in range(len(operand.shape)) if d not in contracting and d not in batch]


def _dot(ctx, lhs, rhs, contracting, batch, out_shape) -> Node:
    """out[batch, lhs free, rhs free] = sum over k of lhs * rhs, each operand read through a map from
    ``out_shape + k_shape``. A float product is a Dot (the matrix-product bodies); an integer one is the sum of
    the elementwise products over that [..., k] view (the reduction bodies), because both executors' product
    bodies accumulate in floating point (float32 on the GPU: exact only below 2^24) where XLA wraps int32."""
    (lc, rc), (lb, rb) = contracting, batch
    lhs_free, rhs_free = _free_dims(lhs, lc, lb), _free_dims(rhs, rc, rb)
    k_shape = tuple(lhs.shape[d] for d in lc)
    combined = tuple(out_shape) + k_shape
    n_batch, n_lhs_free = len(lb), len(lhs_free)

    def operand_map(shape, batch, free, contract, free_start):
        matrix = [[0] * len(combined) for _ in shape]
        for i, d in enumerate(batch):
            matrix[d][i] = 1
        for j, d in enumerate(free):
            matrix[d][free_start + j] = 1
        for t, d in enumerate(contract):
            matrix[d][len(out_shape) + t] = 1
        return IndexMap.affine(combined, shape, matrix)

    lhs_map = operand_map(lhs.shape, lb, lhs_free, lc, n_batch)
    rhs_map = operand_map(rhs.shape, rb, rhs_free, rc, n_batch + n_lhs_free)
    if np.dtype(ctx.out_dtype).kind in "iu":
        def widened(x: Node) -> Node:  # preferred_element_type may be wider than the operands
            if np.dtype(x.dtype) == ctx.out_dtype:
                return x
            return Elementwise(shape=x.shape, dtype=ctx.out_dtype, op=NodeOp.CONVERT, children=(x,), source=ctx.source)

        products = Elementwise(shape=combined, dtype=ctx.out_dtype, op=NodeOp.MUL, source=ctx.source,
                               children=(reindex(widened(lhs), combined, lhs_map),
                                         reindex(widened(rhs), combined, rhs_map)))  # fmt: skip
        return Reduce(shape=tuple(out_shape), dtype=ctx.out_dtype, children=(products,), kind=ReduceKind.SUM,
                      n_inner=len(k_shape), source=ctx.source)  # fmt: skip
    return Dot(
        shape=out_shape,
        dtype=ctx.out_dtype,
        children=(lhs, rhs),
        k_shape=k_shape,
        lhs_map=lhs_map,
        rhs_map=rhs_map,
        source=ctx.source,
    )


# ---------------------------------------------------------------------------------------- dynamic access


def _dynamic_load(ctx, operand: Node, map_: IndexMap, starts: dict[int, Node], his: dict[int, int]) -> Node:
    """operand[map(i) + clamp(starts)], folding constant starts into the map."""
    offset = [0] * len(operand.shape)
    dims, index_nodes = [], []
    for dim, start in starts.items():
        value = constant_value(start)
        if value is not None:
            offset[dim] = min(max(int(value), 0), his[dim])
        else:
            dims.append(dim)
            index_nodes.append(broadcast_to(start, ctx.out_shape) if start.shape == () else start)
    rank = len(operand.shape)
    shift = IndexMap.affine(operand.shape, operand.shape, [[int(r == c) for c in range(rank)] for r in range(rank)], offset)
    return DynLoad(
        shape=ctx.out_shape,
        dtype=operand.dtype,
        children=(operand, *index_nodes),
        map=map_.then(shift),
        dims=tuple(dims),
        his=tuple(his[d] for d in dims),
        source=ctx.source,
    )


@rule("dynamic_slice")
def _dynamic_slice(ctx, operand, *starts, slice_sizes, **_):
    rank = len(operand.shape)
    identity = IndexMap.affine(ctx.out_shape, operand.shape, [[int(r == c) for c in range(rank)] for r in range(rank)])
    his = {d: operand.shape[d] - slice_sizes[d] for d in range(rank)}
    return _dynamic_load(ctx, operand, identity, dict(enumerate(starts)), his)


@rule("dynamic_update_slice")
def _dynamic_update_slice(ctx, operand, update, *starts, **_):
    return UpdateSlice(
        shape=ctx.out_shape, dtype=ctx.out_dtype, children=(operand, update, *starts), source=ctx.source
    )


@rule("gather")
def _gather(ctx, operand, indices, *, dimension_numbers, slice_sizes, mode, fill_value=None, **_):
    dn = dimension_numbers
    row_gather = (
        tuple(dn.start_index_map) == (0,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(slice_sizes) == (1, *operand.shape[1:])
        and indices.shape[-1:] == (1,)
        and tuple(dn.offset_dims) == tuple(range(len(indices.shape) - 1, len(ctx.out_shape)))
    )
    if not row_gather:
        raise ctx.unsupported(f"only row gathers (x[idx] along axis 0) are supported, got {dn}")
    n_batch = len(indices.shape) - 1
    out_shape = ctx.out_shape
    operand_matrix = [[0] * len(out_shape) for _ in operand.shape]
    for d in range(1, len(operand.shape)):
        operand_matrix[d][n_batch + d - 1] = 1
    index_matrix = [[0] * len(out_shape) for _ in indices.shape]
    for d in range(n_batch):
        index_matrix[d][d] = 1
    index = reindex(indices, out_shape, IndexMap.affine(out_shape, indices.shape, index_matrix))
    loaded = _dynamic_load(
        ctx, operand, IndexMap.affine(out_shape, operand.shape, operand_matrix), {0: index}, {0: operand.shape[0] - 1}
    )
    if "FILL" not in str(mode).upper():
        return loaded
    return _fill_out_of_bounds(ctx, loaded, index, operand.shape[0], fill_value)


def _fill_out_of_bounds(ctx, loaded: Node, index: Node, size: int, fill_value) -> Node:
    dtype = ctx.out_dtype
    if fill_value is None:
        if dtype.kind == "f" or dtype.name == "bfloat16":
            fill_value = math.nan
        elif dtype.kind == "i":
            fill_value = np.iinfo(dtype).min
        elif dtype.kind == "u":
            fill_value = np.iinfo(dtype).max
        else:
            fill_value = True
    shape = ctx.out_shape
    boolean = np.dtype(bool)
    index_dtype = np.dtype(index.dtype)
    above = Elementwise(shape=shape, dtype=boolean, children=(index, const(-1, index_dtype, shape)), op=NodeOp.GT)
    below = Elementwise(shape=shape, dtype=boolean, children=(index, const(size, index_dtype, shape)), op=NodeOp.LT)
    inside = Elementwise(shape=shape, dtype=boolean, children=(above, below), op=NodeOp.AND)
    return Elementwise(
        shape=shape, dtype=dtype, children=(inside, const(fill_value, dtype, shape), loaded), op=NodeOp.SELECT_N
    )


# ------------------------------------------------------------------------------------------- collectives
# Inside a shard_map body every device runs the same graph on its shards. A collective stores each
# device's operand in its slot of a communication buffer (Comm) and reads the slots of all devices; the
# runtime makes a read of another device's slot wait until that device has written it.


def _mesh_ranks(ctx: RuleContext, axes, axis_index_groups=None) -> int:
    """The number of devices a collective over ``axes`` spans: the whole mesh (the supported case)."""
    if ctx.mesh is None:
        raise ctx.unsupported("a collective outside a shard_map body")
    if axis_index_groups is not None:
        raise ctx.unsupported("axis_index_groups")
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    mesh_names = [name for name, _ in ctx.mesh.axis_sizes]
    if sorted(names) != sorted(mesh_names):
        raise ctx.unsupported(f"a collective over axes {list(names)} of the mesh axes {mesh_names}: jax_mpk "
                              "runs collectives over all of a mesh's axes")  # fmt: skip
    return ctx.mesh.num_ranks


def _all_slots(ctx: RuleContext, x: Node, ranks: int) -> Node:
    """[ranks, *x.shape]: every device's ``x``, through a communication buffer."""
    slots = Comm(shape=(ranks, *x.shape), dtype=x.dtype, source=ctx.source)
    update = reindex(x, (1, *x.shape), IndexMap.reshape((1, *x.shape), tuple(x.shape)))
    starts = [ctx.mesh.rank] + [const(0, np.int32) for _ in x.shape]
    return UpdateSlice(shape=slots.shape, dtype=x.dtype, children=(slots, update, *starts), source=ctx.source)


def _sum_slots(ctx: RuleContext, x: Node, ranks: int) -> Node:
    stacked = move_axes_last(_all_slots(ctx, x, ranks), [0])
    return Reduce(shape=tuple(x.shape), dtype=x.dtype, children=(stacked,), kind=ReduceKind.SUM, n_inner=1,
                  source=ctx.source)  # fmt: skip


@rule("psum", "psum_invariant")
def _psum(ctx, *xs, axes, axis_index_groups=None, **_):
    ranks = _mesh_ranks(ctx, axes, axis_index_groups)
    outs = [_sum_slots(ctx, x, ranks) for x in xs]
    return outs if len(ctx.out_avals) > 1 else outs[0]


@rule("all_gather")
def _all_gather(ctx, x, *, all_gather_dimension, axis_name, axis_index_groups=None, tiled=False, **_):
    ranks = _mesh_ranks(ctx, axis_name, axis_index_groups)
    d = int(all_gather_dimension)
    perm = list(range(1, d + 1)) + [0] + list(range(d + 1, len(x.shape) + 1))  # the device dim moves to d
    stacked = _all_slots(ctx, x, ranks)
    moved_shape = [stacked.shape[p] for p in perm]
    moved = reindex(stacked, moved_shape, transpose_map(moved_shape, perm))
    return reindex(moved, ctx.out_shape, IndexMap.reshape(ctx.out_shape, tuple(moved_shape)))


@rule("reduce_scatter")
def _reduce_scatter(ctx, x, *, scatter_dimension, axis_name, axis_index_groups=None, tiled=False, **_):
    """psum_scatter: the sum over devices, of which this device keeps block ``rank`` along the dimension."""
    ranks = _mesh_ranks(ctx, axis_name, axis_index_groups)
    d = int(scatter_dimension)
    total = _sum_slots(ctx, x, ranks)
    block = x.shape[d] // ranks
    blocked_shape = (*x.shape[:d], ranks, block, *x.shape[d + 1 :])
    blocked = reindex(total, blocked_shape, IndexMap.reshape(blocked_shape, tuple(x.shape)))
    # out index -> blocked index: the block dim (tiled) or nothing (untiled, block 1) at d, the device dim
    # d at the rank
    out_rank, skip = len(ctx.out_shape), 1 if tiled else 2
    matrix = [[0] * out_rank for _ in blocked_shape]
    for j in range(out_rank):
        matrix[j if j < d else j + skip][j] = 1
    pick = IndexMap.affine(ctx.out_shape, blocked_shape, matrix)
    return _dynamic_load(ctx, blocked, pick, {d: ctx.mesh.rank}, {d: ranks - 1})


@rule("axis_index")
def _axis_index(ctx, *, axis_name, **_):
    if ctx.mesh is None:
        raise ctx.unsupported("axis_index outside a shard_map body")
    sizes = dict(ctx.mesh.axis_sizes)
    if axis_name not in sizes:
        raise ctx.unsupported(f"axis {axis_name!r} is not an axis of the mesh {list(sizes)}")
    names = [name for name, _ in ctx.mesh.axis_sizes]
    stride = math.prod(sizes[n] for n in names[names.index(axis_name) + 1 :])
    position = ctx.mesh.rank
    if stride > 1:
        position = elementwise(ctx, NodeOp.DIV, position, const(stride, np.int32))
    if sizes[axis_name] < ctx.mesh.num_ranks // stride:
        position = elementwise(ctx, NodeOp.REM, position, const(sizes[axis_name], np.int32))
    return position
