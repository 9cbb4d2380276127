"""Tasks: split every kernel into tiles of its domain and derive tile-level dependencies as events.

A task writes one tile of its kernel's outputs and reads the regions its expression reaches from that tile
(propagated backwards through views, reductions and concatenations, bounded by rectangles). Dependencies
follow the buffers in kernel order: a read waits for earlier overlapping writes; a write waits for earlier
overlapping reads and writes (in-place updates). Redundant edges (implied by others) are dropped; the tasks
that depend on exactly the same set of producers share one event, which each producer signals once.

In a shard_map body every device runs this same task graph. A read of a communication buffer (COMM)
depends on the tasks that write its slots, on every device: such producers become *remote* dependencies,
grouped into remote events the same way (counters in every device's communication buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .fusion import shared_weight_dims
from .kernels import Kernel, KernelGraph, Tensor
from .layout import TensorKind
from .graph import Acc, Load, Node, Piecewise, Reduce, Reindex
from .indexmap import Rect, _reshape_rect, full_rect, rect_union, rect_volume

# Output columns of a matrix product are tiled in multiples of this, so weight rows load as whole sectors.
DOT_COLUMN_ALIGN = 16

@dataclass
class Access:
    buffer_id: int  # index into KernelGraph.buffers
    rect: Rect  # in the buffer's own shape


@dataclass
class Task:
    index: int
    kernel: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    cost: float
    reads: list[Access] = field(default_factory=list)
    writes: list[Access] = field(default_factory=list)
    deps: list[int] = field(default_factory=list)  # tasks this one must follow (transitively reduced)
    wait_event: int = -1
    wait_count: int = 0
    signals: list[int] = field(default_factory=list)
    # the same tasks on every device (reads of communication buffers)
    remote_deps: list[int] = field(default_factory=list)
    remote_wait_event: int = -1
    remote_wait_count: int = 0
    remote_signals: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        tile = ",".join(f"{a}:{b}" for a, b in zip(self.lo, self.hi))
        wait = f" wait e{self.wait_event}>={self.wait_count}" if self.wait_event >= 0 else ""
        if self.remote_wait_event >= 0:
            wait += f" wait all ranks' r{self.remote_wait_event}>={self.remote_wait_count}"
        signal = f" signal {['e%d' % e for e in self.signals]}" if self.signals else ""
        if self.remote_signals:
            signal += f" signal {['r%d' % e for e in self.remote_signals]}"
        return f"task{self.index} k{self.kernel}[{tile}]{wait}{signal}"


@dataclass
class TaskGraph:
    kernels: KernelGraph
    tasks: list[Task]
    num_events: int
    num_remote_events: int = 0

    def tasks_by_kernel(self) -> list[list[Task]]:
        """The tasks of kernel i at position i."""
        return _group_by_kernel(self.tasks, len(self.kernels.kernels))

    def __repr__(self) -> str:
        lines = [f"TaskGraph: {len(self.tasks)} tasks, {self.num_events} events"]
        if self.num_remote_events:
            lines[0] += f", {self.num_remote_events} remote events"
        for kernel, tasks in zip(self.kernels.kernels, self.tasks_by_kernel()):
            lines.append(f"  {kernel!r}")
            lines += [f"    {t!r}" for t in tasks]
        return "\n".join(lines)


def build_task_graph(graph: KernelGraph, num_workers: int, min_task_work: int = 1 << 14) -> TaskGraph:
    """Tasks of every kernel; a kernel is split into at most one task per worker, each of at least
    ``min_task_work`` (elements x estimated per-element cost)."""
    buffer_ids = {id(b): i for i, b in enumerate(graph.buffers)}
    tasks: list[Task] = []
    per_element = {k.index: _cost_per_element(k) for k in graph.kernels}
    tilings = _level_tilings(graph.kernels, per_element, num_workers, min_task_work)
    for kernel in graph.kernels:
        nodes_last_first = kernel.nodes()[::-1]
        for lo, hi in tilings[kernel.index]:
            cost = per_element[kernel.index] * math.prod(h - l for l, h in zip(lo, hi))
            task = Task(len(tasks), kernel.index, lo, hi, cost=cost)
            task.reads, task.writes = _accesses(kernel, nodes_last_first, lo, hi, buffer_ids)
            tasks.append(task)
    comm = {i for i, b in enumerate(graph.buffers) if b.kind == TensorKind.COMM}
    _derive_dependencies(tasks, [len(b.shape) for b in graph.buffers], comm)
    num_events = _assign_events(tasks, "deps", "signals", "wait_event", "wait_count")
    num_remote = _assign_events(tasks, "remote_deps", "remote_signals", "remote_wait_event", "remote_wait_count")
    return TaskGraph(graph, tasks, num_events, num_remote)


# ------------------------------------------------------------------------------------------------ tiling


def _level_tilings(kernels: list[Kernel], per_element: dict[int, float], num_workers: int,
                   min_task_work: int) -> dict[int, list[tuple[tuple, tuple]]]:
    """The tiles of every kernel. Kernels of one level run side by side: they share the workers in proportion
    to their work; then the workers their tilings leave idle (a split-K product tiles in whole slices) go,
    one kernel at a time, to the kernel with the most work per task whose tiling grows with them."""
    levels: dict[int, list[Kernel]] = {}
    for k in kernels:
        levels.setdefault(k.level, []).append(k)
    tilings: dict[int, list[tuple[tuple, tuple]]] = {}
    for level_kernels in levels.values():
        work = {k.index: per_element[k.index] * math.prod(k.domain) for k in level_kernels}
        total = sum(work.values())
        share = {i: max(1, int(num_workers * w / total)) if w else 1 for i, w in work.items()}
        tiles = {k.index: tile_domain(k, share[k.index], per_element[k.index], min_task_work) for k in level_kernels}
        while (free := num_workers - sum(len(t) for t in tiles.values())) > 0:
            for k in sorted(level_kernels, key=lambda k: -work[k.index] / max(len(tiles[k.index]), 1)):
                wider = tile_domain(k, len(tiles[k.index]) + free, per_element[k.index], min_task_work)
                if len(wider) > len(tiles[k.index]):
                    tiles[k.index] = wider
                    break
            else:
                break  # no kernel's tiling grows with the idle workers
        tilings.update(tiles)
    return tilings


def _cost_per_element(kernel: Kernel) -> float:
    cost = 0.0
    for node in kernel.output_nodes():  # a computed lhs is per row of a product, small next to its K
        if isinstance(node, Reduce):
            cost += math.prod(node.children[0].shape[len(node.shape) :])
        else:
            cost += 1
    if kernel.dot is not None:
        cost += 2 * math.prod(kernel.dot.k_shape)
    return max(cost, 1.0)


def tile_domain(kernel: Kernel, max_tiles: int, per_element: float, min_task_work: int) -> list[tuple[tuple, tuple]]:
    """Tiles as (lo, hi): single indices on leading dims, a range on one dim, whole trailing dims.
    A reduction is computed once per row of the dims it is indexed by (its shape, a prefix of the domain);
    the dims after that prefix, over which its value is broadcast, stay whole."""
    domain = kernel.domain
    if math.prod(domain) == 0:
        return []
    work = per_element * math.prod(domain)
    # At most one round of tasks per kernel (max_tiles: its share of the workers): a task has a fixed cost
    # (wait, staging, signal) of a few microseconds, so fewer and larger tiles stream weights better.
    wanted = int(min(max(work // max(min_task_work, 1), 1), max_tiles))
    reductions = [n for n in kernel.output_nodes() if isinstance(n, Reduce)]
    splittable = min([len(r.shape) for r in reductions] + [len(domain)])
    if reductions:
        # a task reduces its rows one after the other, each a chain of block-wide steps that latency, not
        # bandwidth, bounds: rows spread over the workers (the chunks of a split argmax over a vocabulary)
        wanted = max(wanted, min(math.prod(domain[:splittable]), max_tiles))
    whole, single = shared_weight_dims(kernel), set()
    if kernel.attention is not None:  # a task: all the query rows of one key/value head, whole chunks of keys
        whole = set(kernel.attention.rows_dims)
        single = set(range(len(domain) - 1)) - whole
    tiles: list[tuple[tuple, tuple]] = [((), ())]
    dim = 0
    while dim < len(domain):
        size = domain[dim]
        if dim in single:
            tiles = [(lo + (s,), hi + (s + 1,)) for lo, hi in tiles for s in range(size)]
            wanted = max(1, wanted // size)
        elif dim >= splittable or wanted <= 1 or dim in whole:
            tiles = [(lo + (0,), hi + (size,)) for lo, hi in tiles]
        elif size >= wanted or (kernel.attention is not None and dim == len(domain) - 1):
            unit = 1  # ranges as even as whole units allow: the largest tile sets the kernel's time
            if kernel.attention is not None and dim == len(domain) - 1:
                unit = kernel.attention.chunk
            elif kernel.dot is not None and dim == len(domain) - 1 and size % DOT_COLUMN_ALIGN == 0:
                unit = DOT_COLUMN_ALIGN  # whole 32-byte sectors of bf16 weights
            count = min(wanted, size // unit)
            bounds = [size // unit * i // count * unit for i in range(count)] + [size]
            tiles = [(lo + (a,), hi + (b,)) for lo, hi in tiles for a, b in zip(bounds, bounds[1:])]
            wanted = 1
        else:
            tiles = [(lo + (s,), hi + (s + 1,)) for lo, hi in tiles for s in range(size)]
            wanted = max(1, wanted // size)  # never more tiles than asked for: a second round costs a task
        dim += 1
    return tiles


# ------------------------------------------------------------------------------------------------ regions


def _accesses(kernel: Kernel, nodes_last_first: list[Node], lo, hi, buffer_ids) -> tuple[list[Access], list[Access]]:
    """What the task of ``kernel`` (whose nodes, consumers first, are ``nodes_last_first``) over the tile
    [lo, hi) reads and writes."""
    tile = tuple(zip(lo, hi))
    region: dict[int, Rect] = {}

    def need(node: Node, rect: Rect) -> None:
        if any(hi <= lo for lo, hi in rect):  # empty
            return
        region[node.uid] = rect_union(region[node.uid], rect) if node.uid in region else rect

    for out in kernel.outputs:
        need(out.node, tile)
        for _, index, _ in out.dyn:
            need(index, tile)
    dot = kernel.dot
    combined = tile + full_rect(dot.k_shape) if dot is not None else None
    if dot is not None and dot.lhs_expr is not None:
        need(dot.lhs_expr, combined)
    attention = kernel.attention
    if attention is not None:
        need(attention.score, tile)
    reads: list[Access] = []
    for node in nodes_last_first:
        rect = region.get(node.uid)
        if rect is None:
            continue
        if isinstance(node, Load):
            tensor_rect = node.map.rect_image(rect)
            tensor_rect = tuple((0, node.tensor.shape[d]) if d in node.dims else r for d, r in enumerate(tensor_rect))
            reads.append(_access(node.tensor, tensor_rect, buffer_ids))
            for child in node.children:
                need(child, rect)
        elif isinstance(node, Reindex):
            need(node.children[0], node.map.rect_image(rect))
        elif isinstance(node, Reduce):
            child = node.children[0]
            need(child, rect + full_rect(child.shape[len(node.shape) :]))
        elif isinstance(node, Piecewise):
            bounds = list(node.los) + [node.shape[node.axis]]
            for k, child in enumerate(node.children):
                a_lo, a_hi = rect[node.axis]
                part = (max(a_lo, bounds[k]) - bounds[k], min(a_hi, bounds[k + 1]) - bounds[k])
                if part[1] > part[0]:
                    need(child, rect[: node.axis] + (part,) + rect[node.axis + 1 :])
        elif not isinstance(node, Acc):
            for child in node.children:
                need(child, rect)
    if dot is not None:
        if dot.lhs_expr is None:
            reads.append(_access(dot.lhs, dot.lhs_map.rect_image(combined), buffer_ids))
        reads.append(_access(dot.rhs, dot.rhs_map.rect_image(combined), buffer_ids))
    writes = []
    if attention is not None:
        values_rect = tile[:-1] + ((0, attention.partial_out.shape[-1]),) + tile[-1:]
        reads.append(_access(attention.values, attention.values_map.rect_image(values_rect), buffer_ids))
        writes = [_access(tensor, rect, buffer_ids) for tensor, rect in attention.written_rects(tile)]
    for out in kernel.outputs:
        rect = out.map.rect_image(tile)
        dyn_dims = {d for d, _, _ in out.dyn}
        rect = tuple((0, out.tensor.shape[d]) if d in dyn_dims else r for d, r in enumerate(rect))
        writes.append(_access(out.tensor, rect, buffer_ids))
    return reads, writes


def _access(tensor: Tensor, rect: Rect, buffer_ids) -> Access:
    buffer = tensor.buffer
    if tuple(tensor.shape) != tuple(buffer.shape):
        rect = _reshape_rect(rect, tuple(tensor.shape), tuple(buffer.shape))
    return Access(buffer_ids[id(buffer)], rect)


# ------------------------------------------------------------------------------------------- dependencies


class _History:
    """Every access made so far to one buffer, as arrays, so that overlap queries are vectorized."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pending: list[tuple[int, Rect, bool]] = []
        self.lo = np.zeros((0, rank), np.int64)
        self.hi = np.zeros((0, rank), np.int64)
        self.task = np.zeros((0,), np.int64)
        self.is_write = np.zeros((0,), bool)

    def add(self, task: int, rect: Rect, is_write: bool) -> None:
        self.pending.append((task, rect, is_write))

    def commit(self) -> None:
        if not self.pending:
            return
        rects = np.array([r for _, r, _ in self.pending], np.int64).reshape(len(self.pending), self.rank, 2)
        self.lo = np.concatenate([self.lo, rects[:, :, 0]])
        self.hi = np.concatenate([self.hi, rects[:, :, 1]])
        self.task = np.concatenate([self.task, [t for t, _, _ in self.pending]])
        self.is_write = np.concatenate([self.is_write, [w for _, _, w in self.pending]])
        self.pending = []

    def overlapping(self, rect: Rect, writes_only: bool) -> np.ndarray:
        r = np.array(rect, np.int64).reshape(self.rank, 2)
        mask = np.all((self.lo < r[:, 1]) & (r[:, 0] < self.hi), axis=1)
        if writes_only:
            mask &= self.is_write
        return self.task[mask]


def _derive_dependencies(tasks: list[Task], buffer_ranks: list[int], comm: set[int] = frozenset()) -> None:
    """Tasks of one kernel never depend on each other (their writes are disjoint, and fusion keeps a kernel
    from reading what it overwrites), so each kernel queries the history of the kernels before it.
    Reads of the ``comm`` buffers make remote dependencies (not reduced: that a producer finished here says
    nothing of the other devices); a remote dependency also orders the task after the local producer."""
    history = [_History(rank) for rank in buffer_ranks]
    ancestors: list[int] = []  # bitset of every task each task transitively follows
    for kernel_tasks in _group_by_kernel(tasks, max((t.kernel for t in tasks), default=-1) + 1):
        for task in kernel_tasks:
            deps: set[int] = set()
            remote: set[int] = set()
            for access in task.reads:
                found = history[access.buffer_id].overlapping(access.rect, writes_only=True).tolist()
                (remote if access.buffer_id in comm else deps).update(found)
            for access in task.writes:
                deps.update(history[access.buffer_id].overlapping(access.rect, writes_only=False).tolist())
            implied = 0  # drop dependencies already implied by another one
            for d in deps:
                implied |= ancestors[d]
            task.deps = sorted(d for d in deps - remote if not (implied >> d) & 1)
            task.remote_deps = sorted(remote)
            bits = 0
            for d in [*task.deps, *task.remote_deps]:
                bits |= ancestors[d] | (1 << d)
            ancestors.append(bits)
        touched = set()
        for task in kernel_tasks:
            for access in task.reads:
                history[access.buffer_id].add(task.index, access.rect, False)
                touched.add(access.buffer_id)
            for access in task.writes:
                history[access.buffer_id].add(task.index, access.rect, True)
                touched.add(access.buffer_id)
        for buffer_id in touched:
            history[buffer_id].commit()


def _group_by_kernel(tasks: list[Task], num_kernels: int) -> list[list[Task]]:
    groups: list[list[Task]] = [[] for _ in range(num_kernels)]
    for task in tasks:
        groups[task.kernel].append(task)
    return groups


def _assign_events(tasks: list[Task], deps: str, signals: str, wait_event: str, wait_count: str) -> int:
    """One event per distinct dependency set (the task field ``deps``); its producers each signal it once."""
    events: dict[tuple[int, ...], int] = {}
    for task in tasks:
        key = tuple(getattr(task, deps))
        if not key:
            continue
        if key not in events:
            events[key] = len(events)
            for producer in key:
                getattr(tasks[producer], signals).append(events[key])
        setattr(task, wait_event, events[key])
        setattr(task, wait_count, len(key))
    return len(events)
