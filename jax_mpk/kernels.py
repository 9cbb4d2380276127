"""The kernel graph: what fusion produces and every later stage reads.

A kernel computes its outputs over a rectangular domain; tasks.py cuts the domain into tiles. Its values are
expression DAGs of graph.py nodes over loads of stored tensors (versions of buffers); a product kernel
(``dot``) also has an accumulator, and a split-attention kernel (``attention``) a body of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .graph import Load, Node, topological
from .indexmap import IndexMap, Reshape, Shape
from .layout import KernelKind, TensorKind
from .target import Target

WORKSPACE_ALIGN = 256


@dataclass(eq=False)
class Buffer:
    kind: TensorKind
    index: int  # operand number, result number, or workspace byte offset
    shape: Shape
    dtype: np.dtype
    name: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(eq=False)
class Tensor:
    """One version of a buffer's contents, seen with ``shape`` (a row-major reinterpretation)."""

    buffer: Buffer
    shape: Shape
    version: int  # uid of the node whose value this is

    @property
    def name(self) -> str:
        suffix = "" if tuple(self.shape) == tuple(self.buffer.shape) else f"{list(self.shape)}"
        return f"{self.buffer.name}@{self.version}{suffix}"

    def viewed_as(self, shape: Shape) -> Tensor:
        return Tensor(self.buffer, tuple(shape), self.version)


@dataclass(eq=False)
class KernelOutput:
    node: Node
    tensor: Tensor
    map: IndexMap  # domain index -> tensor index
    dyn: tuple[tuple[int, Node, int], ...] = ()  # (tensor dim, index node, clamp hi)


@dataclass(eq=False)
class DotSpec:
    k_shape: Shape
    lhs: Tensor
    lhs_map: IndexMap  # domain index ++ contraction index -> lhs index
    rhs: Tensor
    rhs_map: IndexMap
    acc_dtype: np.dtype
    # The lhs computed, not loaded: an expression over domain ++ k (a Reindex through lhs_map of the
    # expression that used to produce ``lhs``), e.g. an RMSNorm or a softmax that each task recomputes
    # for its row while staging it. ``lhs`` is then not stored by any kernel. GPU plans only.
    lhs_expr: Node | None = None


@dataclass(eq=False)
class AttentionSpec:
    """A softmax-weighted sum of values computed along chunks of keys (flash-decoding), for one dependency level
    instead of two (scores, then softmax and values) and work for every SM at batch 1.

    The kernel's ``dot`` is the scores' product q . K over its domain ``rows ++ (key,)``. A task takes whole
    chunks of keys with all the rows of ``rows_dims`` (a group of query rows) and writes, per row and chunk, the
    largest score m, the sum of exp(score - m), and the sum of exp(score - m) * value; the group's last task to
    finish (a counter per group) merges its chunks into ``output``."""

    score: Node  # the softmax's input at (rows, key), an expression of the product's accumulator (Acc)
    output: Tensor  # rows ++ (d,): the attention's result, written by the last task of each group of query rows
    values: Tensor
    values_map: IndexMap  # rows ++ (d, key) -> values index
    chunk: int  # keys per chunk; divides the key count
    rows_dims: tuple[int, ...]  # domain dims that index neither keys nor values: a task takes them whole
    partial_out: Tensor  # rows ++ (chunks, d), float32
    partial_max: Tensor  # rows ++ (chunks,), float32
    partial_sum: Tensor  # rows ++ (chunks,), float32

    def partials(self) -> list[Tensor]:
        return [self.partial_out, self.partial_max, self.partial_sum]

    def group_dims(self, domain: Shape) -> list[int]:
        """The row dims that tell groups of query rows apart (the batch, the key/value head)."""
        return [d for d in range(len(domain) - 1) if d not in self.rows_dims]

    def groups(self, domain: Shape) -> int:
        return math.prod(domain[d] for d in self.group_dims(domain))

    def written_rects(self, tile_lo: np.ndarray, tile_hi: np.ndarray) -> list[tuple[Tensor, np.ndarray, np.ndarray]]:
        """What the tasks over tiles [tile_lo, tile_hi) (one row each, over rows ++ (key,)) write, as (tensor, lo,
        hi) rows: their chunks of every partial, and their rows of the output (whichever of a group's tasks ends
        last writes them, so a reader waits for all)."""
        rows_lo, rows_hi = tile_lo[:, :-1], tile_hi[:, :-1]
        chunks_lo, chunks_hi = tile_lo[:, -1:] // self.chunk, -(-tile_hi[:, -1:] // self.chunk)
        head_dim = np.broadcast_to(np.array([[self.partial_out.shape[-1]]], np.int64), chunks_lo.shape)
        out_lo = np.concatenate([rows_lo, chunks_lo, np.zeros_like(chunks_lo)], axis=1)
        out_hi = np.concatenate([rows_hi, chunks_hi, head_dim], axis=1)
        per_row_lo, per_row_hi = np.concatenate([rows_lo, chunks_lo], axis=1), np.concatenate([rows_hi, chunks_hi], axis=1)
        result_lo = np.concatenate([rows_lo, np.zeros_like(chunks_lo)], axis=1)
        result_hi = np.concatenate([rows_hi, head_dim], axis=1)
        return [(self.partial_out, out_lo, out_hi), (self.partial_max, per_row_lo, per_row_hi),
                (self.partial_sum, per_row_lo, per_row_hi), (self.output, result_lo, result_hi)]  # fmt: skip


@dataclass(eq=False)
class Kernel:
    name: str
    domain: Shape
    outputs: list[KernelOutput]
    dot: DotSpec | None = None
    source: str = ""
    index: int = -1
    level: int = 0  # longest chain of kernels before this one: kernels of one level can run together
    attention: AttentionSpec | None = None  # then ``dot`` is its scores' product and ``outputs`` is empty

    @property
    def kind(self) -> KernelKind:
        return KernelKind.DOT if self.dot is not None else KernelKind.FUSED

    def nodes(self) -> list[Node]:
        """Every expression node, the computed lhs of a product included."""
        lhs = [self.dot.lhs_expr] if self.dot is not None and self.dot.lhs_expr is not None else []
        score = [self.attention.score] if self.attention is not None else []
        return topological(self._output_roots() + lhs + score)

    def output_nodes(self) -> list[Node]:
        """The nodes evaluated per element of the domain (the outputs and their dynamic offsets)."""
        return topological(self._output_roots())

    def _output_roots(self) -> list[Node]:
        return [o.node for o in self.outputs] + [n for o in self.outputs for _, n, _ in o.dyn]

    def read_tensors(self) -> list[Tensor]:
        tensors = [n.tensor for n in self.nodes() if isinstance(n, Load)]
        if self.dot is not None:
            tensors += [self.dot.rhs] if self.dot.lhs_expr is not None else [self.dot.lhs, self.dot.rhs]
        if self.attention is not None:
            tensors.append(self.attention.values)
        return tensors

    def written_tensors(self) -> list[Tensor]:
        attention = [self.attention.output, *self.attention.partials()] if self.attention is not None else []
        return [o.tensor for o in self.outputs] + attention

    def reads_comm(self) -> bool:
        """Whether it reads a communication buffer (element by element unless every rank keeps a copy of every
        slot: Target.comm_copies)."""
        return any(t.buffer.kind == TensorKind.COMM for t in self.read_tensors())

    def __repr__(self) -> str:
        outs = ", ".join(t.name for t in self.written_tensors())
        reads = ", ".join(sorted({t.name for t in self.read_tensors()}))
        return f"kernel{self.index} {self.name} domain={list(self.domain)} -> {outs}  reads [{reads}]"


@dataclass
class KernelGraph:
    kernels: list[Kernel]
    buffers: list[Buffer]
    input_specs: list[tuple[Shape, np.dtype]]  # arguments then consts
    output_specs: list[tuple[Shape, np.dtype]]
    aliases: dict[int, int] = field(default_factory=dict)  # input index -> output index
    workspace_bytes: int = 0
    num_ranks: int = 1  # devices running the graph together (a shard_map body)
    comm_bytes: int = 0  # one rank's share of the communication buffers (TensorKind.COMM)
    rank_input: int = -1  # the input holding the device's rank, when num_ranks > 1
    target: Target | None = None  # what it was fused for (None: the CPU executor, target-neutral fusion only)

    def __repr__(self) -> str:
        lines = [f"KernelGraph: {len(self.kernels)} kernels, workspace {self.workspace_bytes} B, aliases {self.aliases}"]
        if self.num_ranks > 1:
            lines[0] += f", {self.num_ranks} ranks, comm {self.comm_bytes} B per rank (input {self.rank_input}: rank)"
        lines += [f"  {k!r}" for k in self.kernels]
        return "\n".join(lines)


def make_load(tensor: Tensor, map_: IndexMap, dtype) -> Load:
    """Load through ``map_``; a trailing reshape is absorbed by viewing the (dense) tensor in the shape
    the reshape starts from, so that common reshapes cost no index arithmetic."""
    stages = map_.stages
    while stages and isinstance(stages[-1], Reshape):
        stages = stages[:-1]
        tensor = tensor.viewed_as(stages[-1].out_shape if stages else map_.in_shape)
    return Load(shape=map_.in_shape, dtype=dtype, tensor=tensor, map=IndexMap(map_.in_shape, stages))
