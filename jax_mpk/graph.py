"""The op graph: a DAG of tensor-valued nodes built from the jaxpr by the lowering rules.

Leaves are :class:`Source` nodes (function inputs and constants) and, in the body of a ``shard_map``,
:class:`Comm` buffers that the devices exchange values through. Elementwise work, views, reductions and
concatenation are light nodes that fusion may inline into a kernel; :class:`Dot` and :class:`UpdateSlice` are
heavy nodes that always become their own kernels. Kernels refer to stored tensors through :class:`Load`
(and a DOT kernel's accumulator through :class:`Acc`); those two kinds appear only after fusion.
Nodes compare by identity: the graph is a DAG of shared Python objects.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .indexmap import IndexMap, Shape
from .layout import NodeOp, ReduceKind

_ids = itertools.count()


@dataclass(eq=False, repr=False)
class Node:
    shape: Shape
    dtype: np.dtype
    children: tuple[Node, ...] = ()
    source: str = ""  # the user's source line that produced this node, for messages
    # a rule asks fusion to store this value: one that a reduction reads at other positions than its own
    # (a sort's ranks), which inlining would recompute for every position
    store: bool = False
    uid: int = field(default_factory=lambda: next(_ids))

    label = "node"

    def describe(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"%{self.uid}:{self.describe()}{list(self.shape)}:{np.dtype(self.dtype).name}"


@dataclass(eq=False, repr=False)
class Source(Node):
    """A buffer that exists before the call: function input ``index`` (consts come after the inputs)."""

    index: int = 0
    label = "source"

    def describe(self) -> str:
        return f"source{self.index}"


@dataclass(eq=False, repr=False)
class Comm(Node):
    """A communication buffer of shape [ranks, ...]: slot r lives on rank r, which alone writes it (an
    update_slice at its own rank, the only use of this leaf), and every rank reads every slot."""

    label = "comm"


@dataclass(eq=False, repr=False)
class Elementwise(Node):
    """Pointwise op over children of this node's shape (CONST and IOTA have no children)."""

    op: NodeOp = NodeOp.ADD
    params: tuple[int | float, ...] = ()

    def describe(self) -> str:
        return self.op.name.lower()


@dataclass(eq=False, repr=False)
class Reindex(Node):
    """``value(i) = child(map(i))``: transpose, broadcast, reshape, slice, squeeze ... without data movement."""

    map: IndexMap = None

    def describe(self) -> str:
        return f"reindex({self.map!r})"


@dataclass(eq=False, repr=False)
class Reduce(Node):
    """Reduce the last ``n_inner`` dims of the single child."""

    kind: ReduceKind = ReduceKind.SUM
    n_inner: int = 1

    def describe(self) -> str:
        return f"reduce_{self.kind.name.lower()}"


@dataclass(eq=False, repr=False)
class Piecewise(Node):
    """Concatenation along ``axis``: child k covers [los[k], los[k+1])."""

    axis: int = 0
    los: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"concat(axis={self.axis})"


@dataclass(eq=False, repr=False)
class DynLoad(Node):
    """``operand[map(i) + dyn]``: dynamic_slice and gather. children = (operand, *index expressions)."""

    map: IndexMap = None
    dims: tuple[int, ...] = ()
    his: tuple[int, ...] = ()

    def describe(self) -> str:
        return f"dynamic_load(dims={list(self.dims)})"


@dataclass(eq=False, repr=False)
class Dot(Node):
    """``sum_k lhs[lhs_map(i ++ k)] * rhs[rhs_map(i ++ k)]``, children = (lhs, rhs)."""

    k_shape: Shape = ()
    lhs_map: IndexMap = None
    rhs_map: IndexMap = None

    def describe(self) -> str:
        return f"dot(k={list(self.k_shape)})"


@dataclass(eq=False, repr=False)
class UpdateSlice(Node):
    """dynamic_update_slice: children = (operand, update, *scalar start indices)."""

    def describe(self) -> str:
        return "update_slice"


@dataclass(eq=False, repr=False)
class Load(Node):
    """Read of a stored tensor inside a kernel; children are the dynamic index expressions."""

    tensor: object = None  # tasks.Tensor
    map: IndexMap = None
    dims: tuple[int, ...] = ()
    his: tuple[int, ...] = ()

    def describe(self) -> str:
        dyn = f",dyn{list(self.dims)}" if self.dims else ""
        return f"load({self.tensor.name},{self.map!r}{dyn})"


@dataclass(eq=False, repr=False)
class Acc(Node):
    """The accumulator of the DOT kernel this node belongs to."""

    def describe(self) -> str:
        return "acc"


HEAVY = (Dot, UpdateSlice)
LEAVES = (Source, Comm)  # stored before any kernel runs; no kernel computes them


def topological(roots) -> list[Node]:
    """All nodes reachable from ``roots``, children before parents (iterative: graphs can be deep)."""
    order, seen = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node.uid in seen:
                continue
            if expanded:
                seen.add(node.uid)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(node.children) if child.uid not in seen)
    return order


def consumers(nodes) -> dict[int, list[Node]]:
    """uid -> nodes that use it as a child (once per use)."""
    users: dict[int, list[Node]] = {n.uid: [] for n in nodes}
    for node in nodes:
        for child in node.children:
            users[child.uid].append(node)
    return users


def substitute(root: Node, replace: dict[int, Node]) -> Node:
    """Copy of the expression DAG under ``root`` with the nodes in ``replace`` (by uid) swapped out."""
    memo: dict[int, Node] = {}
    for node in topological([root]):
        if node.uid in replace:
            memo[node.uid] = replace[node.uid]
        elif any(c.uid in memo and memo[c.uid] is not c for c in node.children):
            memo[node.uid] = clone(node, tuple(memo[c.uid] for c in node.children))
        else:
            memo[node.uid] = node
    return memo[root.uid]


def clone(node: Node, children: tuple[Node, ...]) -> Node:
    """A node like ``node`` (same op and parameters, a new uid) over ``children``."""
    fields = {k: v for k, v in vars(node).items() if k not in ("children", "uid")}
    return type(node)(children=children, **fields)


def fold_loads(node: Reduce) -> int:
    """The values one inline fold of ``node`` reads: its length times the most its nested folds read at each
    position (a per-head norm of 128 sums of 4 split-K partials reads 512). A nested reduction with no more
    values than ``node`` is read broadcast along the fold (a softmax's max inside its sum): codegen computes it
    once, before the loop."""
    rows = math.prod(node.shape)
    nested = [fold_loads(n) for n in topological([node.children[0]])
              if isinstance(n, Reduce) and math.prod(n.shape) > rows]  # fmt: skip
    return math.prod(node.children[0].shape[len(node.shape) :]) * max(nested, default=1)
