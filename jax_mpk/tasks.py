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
from dataclasses import dataclass, field, replace

import numpy as np

from . import bodies
from .emit import THREADS, Tiling, is_row_reduction
from .kernels import Kernel, KernelGraph, Tensor
from .layout import TensorKind
from .graph import Acc, Load, Node, Piecewise, Reduce, Reindex
from .indexmap import reshape_rects, overlapping_pairs

@dataclass
class Accesses:
    """What the tasks of one kernel read, or write, of one buffer through one load, operand or output: task
    ``tasks[i]`` accesses the rectangle [lo[i], hi[i]) of buffer ``buffer_id``, in the buffer's own shape (arrays,
    one row per task: the planner derives a kernel's accesses and dependencies for all its tiles at once)."""

    kernel: int
    buffer_id: int  # index into KernelGraph.buffers
    is_write: bool
    tasks: np.ndarray  # int64 [n]
    lo: np.ndarray  # int64 [n, rank]
    hi: np.ndarray


@dataclass
class Task:
    index: int
    kernel: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    cost: float
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
    accesses: list[Accesses] = field(default_factory=list)  # kernel by kernel
    # split attention: kernel index -> its first merge counter (one event per group of tasks that share query
    # rows; the task that brings it to the group's task count merges the group's chunks)
    merge_counters: dict[int, int] = field(default_factory=dict)

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
    """Tasks of every kernel; a kernel is split into at most one task per worker (more where its body kind caps
    a tile's width: ``Tiling.max_last``), each of at least ``min_task_work`` (elements x estimated per-element
    cost)."""
    buffer_ids = {id(b): i for i, b in enumerate(graph.buffers)}
    tasks: list[Task] = []
    accesses: list[Accesses] = []
    per_element = {k.index: _cost_per_element(k) for k in graph.kernels}
    # the CUDA bodies give a pointwise kernel's elements to the block's threads, one each per pass
    threads = THREADS if graph.target is not None and graph.target.platform == "cuda" else 0
    tilings = _level_tilings(graph.kernels, per_element, num_workers, min_task_work, threads)
    for kernel in graph.kernels:
        tiles = tilings[kernel.index]
        first = len(tasks)
        for lo, hi in tiles:
            cost = per_element[kernel.index] * math.prod(h - l for l, h in zip(lo, hi))
            tasks.append(Task(len(tasks), kernel.index, lo, hi, cost=cost))
        if tiles:
            accesses += _kernel_accesses(kernel, tiles, first, buffer_ids)
    comm = {i for i, b in enumerate(graph.buffers) if b.kind == TensorKind.COMM}
    _derive_dependencies(tasks, accesses, [len(b.shape) for b in graph.buffers], comm)
    num_events = _assign_events(tasks, "deps", "signals", "wait_event", "wait_count")
    num_remote = _assign_events(tasks, "remote_deps", "remote_signals", "remote_wait_event", "remote_wait_count")
    merge_counters = {}
    for kernel in graph.kernels:
        if kernel.attention is not None:
            merge_counters[kernel.index] = num_events
            num_events += kernel.attention.groups(kernel.domain)
    return TaskGraph(graph, tasks, num_events, num_remote, accesses, merge_counters)


# ------------------------------------------------------------------------------------------------ tiling


def _level_tilings(kernels: list[Kernel], per_element: dict[int, float], num_workers: int,
                   min_task_work: int, threads: int = 0) -> dict[int, list[tuple[tuple, tuple]]]:
    """The tiles of every kernel. Kernels of one level run side by side: they share the workers in proportion
    to their work; then the workers their tilings leave idle (a split-K product tiles in whole slices) go,
    one kernel at a time, to the kernel with the most work per task whose tiling grows with them. ``threads``
    (> 0): a pointwise kernel's tasks hold at most that many elements where the workers allow (tile_domain)."""
    levels: dict[int, list[Kernel]] = {}
    for k in kernels:
        levels.setdefault(k.level, []).append(k)
    tilings: dict[int, list[tuple[tuple, tuple]]] = {}
    for level_kernels in levels.values():
        work = {k.index: per_element[k.index] * math.prod(k.domain) for k in level_kernels}
        total = sum(work.values())
        share = {i: max(1, int(num_workers * w / total)) if w else 1 for i, w in work.items()}
        # each kind's rule once per kernel (the rows kind's renders the kernel to find its rows)
        rules = {k.index: bodies.tiling(k) for k in level_kernels}
        tiles = {k.index: tile_domain(k, rules[k.index], share[k.index], per_element[k.index], min_task_work,
                                      threads) for k in level_kernels}  # fmt: skip
        while (free := num_workers - sum(len(t) for t in tiles.values())) > 0:
            for k in sorted(level_kernels, key=lambda k: -work[k.index] / max(len(tiles[k.index]), 1)):
                wider = tile_domain(k, rules[k.index], len(tiles[k.index]) + free, per_element[k.index], min_task_work,
                                    threads)  # fmt: skip
                if len(wider) > len(tiles[k.index]):
                    tiles[k.index] = wider
                    break
            else:
                break  # no kernel's tiling grows with the idle workers
        _relieve_busiest(level_kernels, tiles, rules, per_element, num_workers, min_task_work, threads)
        tilings.update(tiles)
    return tilings


def _relieve_busiest(level_kernels: list[Kernel], tiles: dict, rules: dict, per_element: dict, num_workers: int,
                     min_task_work: int, threads: int = 0) -> None:
    """A level lasts as long as its largest task. While the kernel with the largest task can take its next tiling
    only with workers another kernel gives up, and that lowers the level's largest task, move them (Qwen3-8B's
    Q/K/V: V's split-K tiles, in steps of 8, were left at 16 tasks of 4.2 M work next to Q's 92 of 3.2 M; now V
    24 and Q 84 of 3.7 M). Each tiling stays one that tile_domain makes."""

    def largest(k: Kernel, kernel_tiles=None) -> float:
        return per_element[k.index] * max((math.prod(h - l for l, h in zip(lo, hi))
                                           for lo, hi in (kernel_tiles or tiles[k.index])), default=0)  # fmt: skip

    for _ in range(4 * len(level_kernels)):  # each move lowers the busiest task: a few suffice
        busiest = max(level_kernels, key=largest)
        n, free = len(tiles[busiest.index]), num_workers - sum(len(t) for t in tiles.values())
        grown = next((t for m in range(n + 1, num_workers + 1)
                      if len(t := tile_domain(busiest, rules[busiest.index], m, per_element[busiest.index],
                                              min_task_work, threads)) > n), None)  # fmt: skip
        if grown is None or len(grown) > num_workers:
            return
        need = len(grown) - n - max(free, 0)
        for donor in sorted((k for k in level_kernels if k is not busiest), key=largest):
            left = len(tiles[donor.index]) - need
            if left < 1:
                continue
            fewer = tile_domain(donor, rules[donor.index], left, per_element[donor.index], min_task_work, threads)
            if len(fewer) <= left and max(largest(donor, fewer), largest(busiest, grown)) < largest(busiest):
                tiles[donor.index], tiles[busiest.index] = fewer, grown
                break
        else:
            return


def _cost_per_element(kernel: Kernel) -> float:
    cost = 0.0
    for node in kernel.output_nodes():  # a computed lhs is per row of a product, small next to its K
        if isinstance(node, Reduce):
            cost += math.prod(node.children[0].shape[len(node.shape) :])
        else:
            cost += 1
    if kernel.dot is not None:
        # a split-attention kernel does both of attention's products per (query row, key): q . k and p . v (costed
        # as one, the scheduler stacked two of Qwen3-8B b8's attention tasks on one SM in 14 places)
        products = 2 if kernel.attention is not None else 1
        cost += products * 2 * math.prod(kernel.dot.k_shape)
    return max(cost, 1.0)


def tile_domain(kernel: Kernel, rule: Tiling, max_tiles: int, per_element: float,
                min_task_work: int, threads: int = 0) -> list[tuple[tuple, tuple]]:
    """Tiles as (lo, hi): single indices on leading dims, a range on one dim, whole trailing dims, within
    ``rule``, that of the body kind that takes the kernel (``bodies.tiling``: dims kept whole or single, the unit
    of the last dim's ranges). A reduction indexed by a prefix of the domain (its shape is that prefix) is
    computed once per row of those dims; the dims after that prefix, over which its value is broadcast, stay
    whole. A reduction of another shape (reached through a reshape, as a cache append's normalized key heads in
    a [layer, batch, position, head, dim] update are) leaves the tiles to the kind's rule: the rows kind keeps
    whole the dims after those it is read at. ``threads`` (> 0): a kernel without products or row reductions gets
    at least one task per ``threads`` elements (within ``max_tiles``), however little its work: a thread's second
    element waits for its first one's loads (a store between them may alias them), a memory round trip more on
    the dependency chain (Llama-1B's queries, 2048 RoPE'd elements on 3 tasks: ~0.5 us a layer)."""
    domain = kernel.domain
    if math.prod(domain) == 0:
        return []
    if rule.whole_if_busy:
        held = tile_domain(kernel, replace(rule, whole=rule.whole | rule.whole_if_busy, whole_if_busy=frozenset()),
                           max_tiles, per_element, min_task_work, threads)  # fmt: skip
        if 2 * len(held) >= max_tiles:
            return held
        rule = replace(rule, whole_if_busy=frozenset())
    work = per_element * math.prod(domain)
    # At most one round of tasks per kernel (max_tiles: its share of the workers), unless the kind caps the
    # last dim's ranges: a task has a fixed cost (wait, staging, signal) of a few microseconds, so fewer and
    # larger tiles stream weights better.
    wanted = int(min(max(work // max(min_task_work, 1), 1), max_tiles))
    reductions = [n for n in kernel.output_nodes() if isinstance(n, Reduce) and n.shape == domain[: len(n.shape)]]
    if threads and kernel.dot is None and not any(is_row_reduction(n) for n in kernel.nodes()):
        wanted = max(wanted, min(-(-math.prod(domain) // threads), max_tiles))
    splittable = min([len(r.shape) for r in reductions] + [len(domain)])
    if reductions:
        # a task reduces its rows one after the other, each a chain of block-wide steps that latency, not
        # bandwidth, bounds: rows spread over the workers (the chunks of a split argmax over a vocabulary)
        wanted = max(wanted, min(math.prod(domain[:splittable]), max_tiles))
    last = len(domain) - 1
    tiles: list[tuple[tuple, tuple]] = [((), ())]
    dim = 0
    while dim < len(domain):
        size = domain[dim]
        unit = rule.last_unit if dim == last else 1
        # ranges of at most max_last, in whole units
        narrowed = -(-(size // unit) // max(rule.max_last // unit, 1)) if dim == last and rule.max_last else 1
        if dim in rule.single:
            tiles = [(lo + (s,), hi + (s + 1,)) for lo, hi in tiles for s in range(size)]
            wanted = max(1, wanted // size)
        elif narrowed <= 1 and (dim >= splittable or wanted <= 1 or dim in rule.whole):
            tiles = [(lo + (0,), hi + (size,)) for lo, hi in tiles]
        elif size >= wanted or (rule.split_last and dim == last) or narrowed > 1:
            # ranges as even as whole units allow: the largest tile sets the kernel's time
            count = max(min(wanted, size // unit), narrowed)
            bounds = [size // unit * i // count * unit for i in range(count)] + [size]
            tiles = [(lo + (a,), hi + (b,)) for lo, hi in tiles for a, b in zip(bounds, bounds[1:])]
            wanted = 1
        else:
            tiles = [(lo + (s,), hi + (s + 1,)) for lo, hi in tiles for s in range(size)]
            wanted = max(1, wanted // size)  # never more tiles than asked for: a second round costs a task
        dim += 1
    return tiles


# ------------------------------------------------------------------------------------------------ regions


def _kernel_accesses(kernel: Kernel, tiles: list[tuple[tuple, tuple]], first_task: int, buffer_ids) -> list[Accesses]:
    """What the tasks of ``kernel`` over ``tiles`` (numbered from ``first_task``) read and write. The region of
    every node that a tile needs is propagated from the outputs back to the loads, for all tiles at once:
    per node, whether each tile needs it at all (``present``) and the bounding rect of what it needs."""
    n = len(tiles)
    task_ids = np.arange(first_task, first_task + n, dtype=np.int64)
    tile_lo = np.array([lo for lo, _ in tiles], np.int64).reshape(n, len(kernel.domain))
    tile_hi = np.array([hi for _, hi in tiles], np.int64).reshape(n, len(kernel.domain))
    everywhere = np.ones(n, bool)
    region: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # node uid -> present, lo, hi

    def need(node: Node, present: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        present = present & np.all(hi > lo, axis=1)  # an empty rect needs nothing
        if node.uid in region:  # the union of what the node's consumers need
            had, had_lo, had_hi = region[node.uid]
            both = (had & present)[:, None]
            lo = np.where(both, np.minimum(had_lo, lo), np.where(had[:, None], had_lo, lo))
            hi = np.where(both, np.maximum(had_hi, hi), np.where(had[:, None], had_hi, hi))
            present = had | present
        region[node.uid] = (present, lo, hi)

    def widened(lo: np.ndarray, hi: np.ndarray, whole: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The rects with the trailing dims ``whole`` appended in full."""
        return (np.concatenate([lo, np.zeros((n, len(whole)), np.int64)], axis=1),
                np.concatenate([hi, np.broadcast_to(np.array(whole, np.int64), (n, len(whole)))], axis=1))  # fmt: skip

    for out in kernel.outputs:
        need(out.node, everywhere, tile_lo, tile_hi)
        for _, index, _ in out.dyn:
            need(index, everywhere, tile_lo, tile_hi)
    dot = kernel.dot
    if dot is not None:
        combined = widened(tile_lo, tile_hi, tuple(dot.k_shape))
        if dot.lhs_expr is not None:
            need(dot.lhs_expr, everywhere, *combined)
    attention = kernel.attention
    if attention is not None:
        need(attention.score, everywhere, tile_lo, tile_hi)
    result: list[Accesses] = []

    def access(tensor: Tensor, is_write: bool, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        buffer = tensor.buffer
        if tuple(tensor.shape) != tuple(buffer.shape):
            lo, hi = reshape_rects(lo, hi, tuple(tensor.shape), tuple(buffer.shape))
        result.append(Accesses(kernel.index, buffer_ids[id(buffer)], is_write, task_ids[rows], lo[rows], hi[rows]))

    for node in kernel.nodes()[::-1]:  # consumers first: a node's region is complete when it is reached
        if node.uid not in region:
            continue
        present, lo, hi = region[node.uid]
        if isinstance(node, Load):
            tensor_lo, tensor_hi = node.map.rect_images(lo, hi)
            for d in node.dims:  # a dynamic offset may reach the whole dim
                tensor_lo[:, d], tensor_hi[:, d] = 0, node.tensor.shape[d]
            access(node.tensor, False, present, tensor_lo, tensor_hi)
            for child in node.children:
                need(child, present, lo, hi)
        elif isinstance(node, Reindex):
            need(node.children[0], present, *node.map.rect_images(lo, hi))
        elif isinstance(node, Reduce):
            child = node.children[0]
            need(child, present, *widened(lo, hi, tuple(child.shape[len(node.shape) :])))
        elif isinstance(node, Piecewise):
            bounds = list(node.los) + [node.shape[node.axis]]
            for k, child in enumerate(node.children):
                part_lo, part_hi = lo.copy(), hi.copy()
                part_lo[:, node.axis] = np.maximum(lo[:, node.axis], bounds[k]) - bounds[k]
                part_hi[:, node.axis] = np.minimum(hi[:, node.axis], bounds[k + 1]) - bounds[k]
                need(child, present, part_lo, part_hi)
        elif not isinstance(node, Acc):
            for child in node.children:
                need(child, present, lo, hi)
    if dot is not None:
        if dot.lhs_expr is None:
            access(dot.lhs, False, everywhere, *dot.lhs_map.rect_images(*combined))
        access(dot.rhs, False, everywhere, *dot.rhs_map.rect_images(*combined))
    if attention is not None:
        head_dim = attention.partial_out.shape[-1]
        values_lo = np.concatenate([tile_lo[:, :-1], np.zeros((n, 1), np.int64), tile_lo[:, -1:]], axis=1)
        values_hi = np.concatenate([tile_hi[:, :-1], np.full((n, 1), head_dim, np.int64), tile_hi[:, -1:]], axis=1)
        access(attention.values, False, everywhere, *attention.values_map.rect_images(values_lo, values_hi))
        for tensor, lo, hi in attention.written_rects(tile_lo, tile_hi):  # every task may be its group's merger
            access(tensor, True, everywhere, lo, hi)
    for out in kernel.outputs:
        lo, hi = out.map.rect_images(tile_lo, tile_hi)
        for d, _, _ in out.dyn:
            lo[:, d], hi[:, d] = 0, out.tensor.shape[d]
        access(out.tensor, True, everywhere, lo, hi)
    return result


# ------------------------------------------------------------------------------------------- dependencies


class _History:
    """Every access made so far to one buffer (by the kernels before the current one), as arrays, and those
    that wrote apart: a kernel's accesses are matched against them all at once."""

    def __init__(self, rank: int):
        empty = (np.zeros(0, np.int64), np.zeros((0, rank), np.int64), np.zeros((0, rank), np.int64))
        self.all = self.writes = empty  # (tasks, lo, hi)
        self.pending: list[Accesses] = []

    def commit(self) -> None:
        """Adds the pending accesses (a kernel's, once every one of them has been matched)."""
        def joined(old, blocks):
            if not blocks:
                return old
            return tuple(np.concatenate([o, *(getattr(b, f) for b in blocks)]) for o, f in zip(old, ("tasks", "lo", "hi")))

        self.all = joined(self.all, self.pending)
        self.writes = joined(self.writes, [b for b in self.pending if b.is_write])
        self.pending = []

    def overlapping(self, block: Accesses) -> tuple[np.ndarray, np.ndarray]:
        """(task, earlier task) for every earlier access that ``block``'s accesses must follow: the writes a
        read overlaps; the reads and writes a write overlaps."""
        tasks, lo, hi = self.all if block.is_write else self.writes
        rows, cols = overlapping_pairs(block.lo, block.hi, lo, hi)
        return block.tasks[rows], tasks[cols]


def _derive_dependencies(tasks: list[Task], accesses: list[Accesses], buffer_ranks: list[int],
                         comm: set[int] = frozenset()) -> None:  # fmt: skip
    """Tasks of one kernel never depend on each other (their writes are disjoint, and fusion keeps a kernel
    from reading what it overwrites), so each kernel queries the history of the kernels before it.
    Reads of the ``comm`` buffers make remote dependencies (not reduced: that a producer finished here says
    nothing of the other devices); a remote dependency also orders the task after the local producer.
    Tasks that found the same producers keep the same ones (a product's tiles all read the whole row the
    tiles of a norm wrote): each distinct set is reduced once."""
    history = [_History(rank) for rank in buffer_ranks]
    ancestors: list[int] = []  # bitset of every task each task transitively follows
    reduced: dict[tuple, tuple[list[int], list[int], int]] = {}  # producers found -> deps, remote deps, ancestors
    blocks_of: dict[int, list[Accesses]] = {}
    for block in accesses:
        blocks_of.setdefault(block.kernel, []).append(block)
    for kernel_tasks in _group_by_kernel(tasks, max((t.kernel for t in tasks), default=-1) + 1):
        if not kernel_tasks:
            continue
        blocks = blocks_of.get(kernel_tasks[0].kernel, [])
        local, remote = [], []
        for block in blocks:
            (remote if not block.is_write and block.buffer_id in comm else local).append(history[block.buffer_id].overlapping(block))
        local_of, remote_of = _producers_by_task(local, len(tasks)), _producers_by_task(remote, len(tasks))
        for task in kernel_tasks:
            found = (local_of.get(task.index, ()), remote_of.get(task.index, ()))
            if found not in reduced:
                reduced[found] = _transitively_reduced(*found, ancestors)
            deps, remote_deps, bits = reduced[found]
            task.deps, task.remote_deps = list(deps), list(remote_deps)
            ancestors.append(bits)
        for block in blocks:
            history[block.buffer_id].pending.append(block)
        for buffer_id in {block.buffer_id for block in blocks}:
            history[buffer_id].commit()


def _producers_by_task(pairs: list[tuple[np.ndarray, np.ndarray]], num_tasks: int) -> dict[int, tuple[int, ...]]:
    """task -> its distinct producers, ascending, from (task, producer) arrays."""
    keys = np.sort(np.concatenate([np.zeros(0, np.int64)] + [t * num_tasks + p for t, p in pairs]))
    if not keys.size:
        return {}
    keys = keys[np.diff(keys, prepend=-1) != 0]  # distinct (sorting beats np.unique's hashing here)
    consumers, producers = (keys // num_tasks).tolist(), (keys % num_tasks).tolist()
    starts = [0, *(np.flatnonzero(np.diff(keys // num_tasks)) + 1).tolist(), len(keys)]
    return {consumers[a]: tuple(producers[a:b]) for a, b in zip(starts, starts[1:])}


def _transitively_reduced(found: tuple[int, ...], remote: tuple[int, ...], ancestors: list[int]) -> tuple[list[int], list[int], int]:
    """The local dependencies that no other one implies, the remote ones, and the bitset of every task they
    follow."""
    implied = 0
    for d in found:
        implied |= ancestors[d]
    deps = [d for d in found if d not in remote and not (implied >> d) & 1]
    bits = 0
    for d in [*deps, *remote]:
        bits |= ancestors[d] | (1 << d)
    return deps, list(remote), bits


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
