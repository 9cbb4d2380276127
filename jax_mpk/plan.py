"""Serialize a scheduled task graph into the flat int64 plan that the C++ runtime reads.

The word order is specified in docs/plan_format.md; every code comes from :mod:`jax_mpk.layout`.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from .kernels import Kernel, KernelOutput, Tensor
from .graph import Acc, Elementwise, Load, Node, Piecewise, Reduce, Reindex
from .indexmap import IndexMap
from .layout import (
    COMPUTED_OPERAND, HEADER_WORDS, MAGIC, MAX_RANK, TASK_WORDS, VERSION, Header, NodeOp, Platform, TaskField,
    dtype_code,
)  # fmt: skip
from .schedule import Schedule
from .tasks import TaskGraph


def double_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


class _Interner:
    """Numbers equal records (maps, tensors) once each."""

    def __init__(self):
        self.index: dict[tuple, int] = {}
        self.records: list[list[int]] = []

    def __call__(self, record: list[int]) -> int:
        key = tuple(record)
        if key not in self.index:
            self.index[key] = len(self.records)
            self.records.append(record)
        return self.index[key]


def serialize(graph: TaskGraph, sched: Schedule, platform: Platform = Platform.CPU) -> np.ndarray:
    kg = graph.kernels
    maps, tensors = _Interner(), _Interner()

    def tensor_id(tensor: Tensor) -> int:
        b = tensor.buffer
        return tensors([int(b.kind), int(b.index), int(dtype_code(b.dtype)), len(tensor.shape), *tensor.shape])

    def map_id(index_map: IndexMap) -> int:
        assert len(index_map.in_shape) <= MAX_RANK and len(index_map.out_shape) <= MAX_RANK
        return maps(index_map.to_words())

    kernel_words: list[int] = []
    for kernel in kg.kernels:
        kernel_words += _kernel_words(kernel, tensor_id, map_id)

    words = [0] * HEADER_WORDS
    header = {
        Header.MAGIC: MAGIC, Header.VERSION: VERSION, Header.PLATFORM: int(platform),
        Header.NUM_INPUTS: len(kg.input_specs), Header.NUM_OUTPUTS: len(kg.output_specs),
        Header.WORKSPACE_BYTES: kg.workspace_bytes, Header.NUM_TENSORS: len(tensors.records),
        Header.NUM_MAPS: len(maps.records), Header.NUM_KERNELS: len(kg.kernels), Header.NUM_TASKS: len(graph.tasks),
        Header.NUM_EVENTS: graph.num_events, Header.NUM_WORKERS: len(sched.workers),
        Header.NUM_ALIASES: len(kg.aliases), Header.NUM_RANKS: kg.num_ranks, Header.COMM_BYTES: kg.comm_bytes,
        Header.NUM_REMOTE_EVENTS: graph.num_remote_events, Header.RANK_INPUT: kg.rank_input,
    }  # fmt: skip
    for field, value in header.items():
        words[field] = int(value)
    for shape, dtype in kg.input_specs + kg.output_specs:
        words += [int(dtype_code(dtype)), len(shape), *shape]
    for i, j in sorted(kg.aliases.items()):
        words += [i, j]
    for record in tensors.records:
        words += record
    for record in maps.records:
        words += record
    words += kernel_words
    records, signals, remote_signals = task_records(graph.tasks)
    for record in records:
        words += record
    words += [len(signals), *signals]
    words += [len(remote_signals), *remote_signals]
    for worker in sched.workers:
        words += [len(worker), *worker]
    return np.asarray(words, dtype=np.int64)


def task_records(tasks) -> tuple[list[list[int]], list[int], list[int]]:
    """Each task's fixed record (layout.TaskField) and the signal lists the records index (events, remote
    events): the layout of the plan's task section and of the generated megakernel's task table alike."""
    records, signals, remote_signals = [], [], []
    for task in tasks:
        record = [0] * TASK_WORDS
        record[TaskField.KERNEL] = task.kernel
        record[TaskField.WAIT_EVENT] = task.wait_event
        record[TaskField.WAIT_COUNT] = task.wait_count
        record[TaskField.SIGNAL_BEGIN] = len(signals)
        record[TaskField.SIGNAL_COUNT] = len(task.signals)
        record[TaskField.LO : TaskField.LO + len(task.lo)] = task.lo
        record[TaskField.HI : TaskField.HI + len(task.hi)] = task.hi
        record[TaskField.REMOTE_WAIT_EVENT] = task.remote_wait_event
        record[TaskField.REMOTE_WAIT_COUNT] = task.remote_wait_count
        record[TaskField.REMOTE_SIGNAL_BEGIN] = len(remote_signals)
        record[TaskField.REMOTE_SIGNAL_COUNT] = len(task.remote_signals)
        signals += task.signals
        remote_signals += task.remote_signals
        records.append(record)
    return records, signals, remote_signals


def plan_key(words: np.ndarray, source: str = "") -> str:
    """The name a plan is registered under in the extension, which keeps one loaded kernel per name: the task words
    and, for a CUDA plan, its generated source. A knob that only codegen reads (JAX_MPK_STREAM_EVICT_FIRST) changes
    the source and not the words; keyed by the words alone, a variant planned in the same process ran the kernel
    loaded first (session 12 found a same-process A/B that timed one kernel twice)."""
    digest = hashlib.sha256(words.tobytes())
    if source:
        digest.update(source.encode())
    return digest.hexdigest()[:32]


def _kernel_words(kernel: Kernel, tensor_id, map_id) -> list[int]:
    words = [int(kernel.kind), len(kernel.domain), *kernel.domain]
    nodes = kernel.nodes()
    position = {n.uid: i for i, n in enumerate(nodes)}
    if kernel.dot is not None:
        d = kernel.dot
        lhs = [tensor_id(d.lhs), map_id(d.lhs_map)] if d.lhs_expr is None else [COMPUTED_OPERAND, position[d.lhs_expr.uid]]
        words += [len(d.k_shape), *d.k_shape, *lhs, tensor_id(d.rhs), map_id(d.rhs_map)]
        words += [int(dtype_code(d.acc_dtype))]
    words.append(len(nodes))
    for node in nodes:
        op, params = _node_op_params(node, tensor_id, map_id)
        words += [int(op), int(dtype_code(node.dtype)), len(node.shape), *node.shape]
        words += [len(node.children), *(position[c.uid] for c in node.children)]
        words += [len(params), *params]
    words.append(len(kernel.outputs))
    for out in kernel.outputs:
        words += _output_words(out, position, tensor_id, map_id)
    if kernel.attention is not None:  # GPU plans only: their words are the plan's identity, no reader parses them
        a = kernel.attention
        words += [position[a.score.uid], tensor_id(a.values), map_id(a.values_map), a.chunk, len(a.rows_dims), *a.rows_dims]
        words += [tensor_id(t) for t in a.partials()]
    return words


def _output_words(out: KernelOutput, position, tensor_id, map_id) -> list[int]:
    words = [position[out.node.uid], tensor_id(out.tensor), map_id(out.map), len(out.dyn)]
    for dim, node, hi in out.dyn:
        words += [dim, position[node.uid], hi]
    return words


def _node_op_params(node: Node, tensor_id, map_id) -> tuple[NodeOp, list[int]]:
    if isinstance(node, Load):
        return NodeOp.LOAD, [tensor_id(node.tensor), map_id(node.map), len(node.dims), *node.dims, *node.his]
    if isinstance(node, Reindex):
        return NodeOp.REINDEX, [map_id(node.map)]
    if isinstance(node, Reduce):
        return NodeOp.REDUCE, [int(node.kind), node.n_inner]
    if isinstance(node, Piecewise):
        return NodeOp.PIECEWISE, [node.axis, *node.los]
    if isinstance(node, Acc):
        return NodeOp.ACC, []
    assert isinstance(node, Elementwise), node
    if node.op == NodeOp.CONST:
        return node.op, [double_bits(node.params[0])]
    return node.op, [int(p) for p in node.params]
