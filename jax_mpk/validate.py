"""The task-graph validator: checks a plan's own encoding (events, not the dependency lists it came from).

1. Every kernel's tiles partition its domain.
2. Every event (and remote event) is signalled exactly as often as its waiters expect.
3. Every read follows every earlier overlapping write of its buffer (kernel order defines "earlier"),
   every later overlapping write follows the read, and no tile reads what another tile of its kernel writes.
4. Tasks of different kernels that write overlapping regions are ordered.
4b. Every element a task reads from the workspace (or from a result that is not a donated operand) was
    written before it by a task of an earlier kernel: nothing reads memory this call has not written
    (a dropped kernel would leave the previous call's values there).
5. The per-worker lists run to completion (no deadlock) when simulated with the event protocol.

Every rank of a multi-rank plan runs the same lists, so one simulated rank stands for all of them, and a
wait on a remote event (the producers on every rank) orders a task after its local producers too.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import numpy as np

from .errors import InvalidTaskGraphError
from .indexmap import overlapping_pairs
from .layout import TensorKind
from .schedule import Schedule
from .tasks import TaskGraph


def validate(graph: TaskGraph, sched: Schedule) -> None:
    tasks = graph.tasks
    _check_partitions(graph)
    signallers = _signallers(graph, "signals", "wait_event", "wait_count", "event")
    remote_signallers = _signallers(graph, "remote_signals", "remote_wait_event", "remote_wait_count", "remote event")
    ancestors = _Ancestors(graph, signallers, remote_signallers)
    kernel_of = np.array([t.kernel for t in tasks], np.int64)
    orderings = _Orderings()

    def rect(blocks: _Stacked, i: int) -> list:
        return list(zip(blocks.lo[i].tolist(), blocks.hi[i].tolist()))

    donated_results = set(graph.kernels.aliases.values())
    by_buffer: dict[int, tuple[list, list]] = {}  # buffer -> the accesses that read it, and those that write it
    for block in graph.accesses:
        by_buffer.setdefault(block.buffer_id, ([], []))[block.is_write].append(block)
    for buffer_id, (read_blocks, write_blocks) in sorted(by_buffer.items()):
        name = graph.kernels.buffers[buffer_id].name
        rank = len(graph.kernels.buffers[buffer_id].shape)
        reads, writes = _Stacked(read_blocks, rank), _Stacked(write_blocks, rank)
        r, w = overlapping_pairs(reads.lo, reads.hi, writes.lo, writes.hi)
        buffer = graph.kernels.buffers[buffer_id]
        if buffer.kind == TensorKind.WORKSPACE or (buffer.kind == TensorKind.OUTPUT and buffer.index not in donated_results):
            _check_reads_are_written(reads, writes, r, w, kernel_of, name)  # these start unwritten
        r_task, w_task = reads.tasks[r], writes.tasks[w]
        r_kernel, w_kernel = kernel_of[r_task], kernel_of[w_task]
        other = r_task != w_task
        for i in np.flatnonzero(other & (w_kernel == r_kernel))[:1]:
            raise InvalidTaskGraphError(
                f"task{r_task[i]} reads {name}{rect(reads, r[i])}, which task{w_task[i]} of the same kernel writes"
            )
        earlier = np.flatnonzero(other & (w_kernel < r_kernel))
        orderings.require(r_task[earlier], w_task[earlier], lambda k, name=name, reads=reads, r=r[earlier], w=w_task[earlier], t=r_task[earlier]:
                          f"task{t[k]} reads {name}{rect(reads, r[k])} without waiting for task{w[k]}, which writes it")  # fmt: skip
        later = np.flatnonzero(other & (w_kernel > r_kernel))
        orderings.require(w_task[later], r_task[later], lambda k, name=name, writes=writes, w=w[later], t=w_task[later], r=r_task[later]:
                          f"task{t[k]} overwrites {name}{rect(writes, w[k])} before task{r[k]} has read it")  # fmt: skip
        a, b = overlapping_pairs(writes.lo, writes.hi, writes.lo, writes.hi)
        a_task, b_task = writes.tasks[a], writes.tasks[b]
        pairs = np.flatnonzero((a < b) & (kernel_of[a_task] != kernel_of[b_task]))
        orderings.require(a_task[pairs], b_task[pairs], lambda k, name=name, a=a_task[pairs], b=b_task[pairs]:
                          f"task{a[k]} and task{b[k]} race writing {name}", either_way=True)  # fmt: skip
    orderings.check(ancestors)
    _check_schedule(graph, sched)


def _check_reads_are_written(reads: _Stacked, writes: _Stacked, r: np.ndarray, w: np.ndarray, kernel_of: np.ndarray,
                             name: str) -> None:
    """Every read rect is covered by the writes of earlier kernels that overlap it (pairs r[i], w[i]). Usually one
    earlier kernel's tiles (disjoint: _check_partitions) cover it alone, which summed intersection volumes show;
    otherwise (an in-place update over a base, a concatenation) the rect is cut along every overlapping write's
    edges and each cell looked up."""
    if not len(reads.tasks):
        return
    read_kernel, write_kernel = kernel_of[reads.tasks], kernel_of[writes.tasks]
    earlier = write_kernel[w] < read_kernel[r]
    r, w = r[earlier], w[earlier]
    volumes = np.prod(reads.hi - reads.lo, axis=1)
    covered = volumes == 0
    if len(r):
        overlap = np.prod(np.minimum(reads.hi[r], writes.hi[w]) - np.maximum(reads.lo[r], writes.lo[w]), axis=1)
        # per (read, writing kernel): the kernel's tiles are disjoint, so their overlaps add up
        kernels = int(write_kernel.max()) + 1
        groups, group_of = np.unique(r * kernels + write_kernel[w], return_inverse=True)
        per_kernel = np.bincount(group_of.reshape(-1), weights=overlap, minlength=len(groups))
        read_of_group = groups // kernels
        covered[read_of_group[per_kernel == volumes[read_of_group]]] = True
    writes_over: dict[int, list[int]] = {}
    uncovered = ~covered[r]
    for ri, wi in zip(r[uncovered].tolist(), w[uncovered].tolist()):
        writes_over.setdefault(ri, []).append(wi)

    def rect(blocks: _Stacked, i: int) -> list:
        return list(zip(blocks.lo[i].tolist(), blocks.hi[i].tolist()))

    for ri in np.flatnonzero(~covered).tolist():
        if not _rect_is_covered(rect(reads, ri), [rect(writes, wi) for wi in writes_over.get(ri, [])]):
            raise InvalidTaskGraphError(
                f"task{reads.tasks[ri]} reads {name}{rect(reads, ri)}, which no task of an earlier kernel (wholly) "
                "writes: it would read what the previous call left there"
            )


def _rect_is_covered(rect, others) -> bool:
    """Whether the union of ``others`` contains ``rect`` (cut along all their edges inside it)."""
    cuts = [sorted({lo, hi, *(min(max(c, lo), hi) for o in others for c in o[d])}) for d, (lo, hi) in enumerate(rect)]
    cells = np.zeros([len(c) - 1 for c in cuts], bool)
    for other in others:
        cells[tuple(slice(np.searchsorted(c, max(lo, o_lo)), np.searchsorted(c, min(hi, o_hi)))
                    for c, (lo, hi), (o_lo, o_hi) in zip(cuts, rect, other))] = True  # fmt: skip
    return bool(cells.all())


class _Stacked:
    """The accesses of several blocks to one buffer, as one set of arrays."""

    def __init__(self, blocks: list, rank: int):
        self.tasks = np.concatenate([np.zeros(0, np.int64)] + [b.tasks for b in blocks])
        self.lo = np.concatenate([np.zeros((0, rank), np.int64)] + [b.lo for b in blocks])
        self.hi = np.concatenate([np.zeros((0, rank), np.int64)] + [b.hi for b in blocks])


class _Ancestors:
    """Bitset of transitive predecessors per task, following events; raises on a cycle. Tasks that wait for
    the same events have the same predecessors: one bitset per distinct (event, remote event)."""

    def __init__(self, graph: TaskGraph, signallers: dict[int, list[int]], remote_signallers: dict[int, list[int]]):
        tasks = graph.tasks
        preds = [
            (signallers.get(t.wait_event, []) if t.wait_event >= 0 else [])
            + (remote_signallers.get(t.remote_wait_event, []) if t.remote_wait_event >= 0 else [])
            for t in tasks
        ]
        waits = [(t.wait_event, t.remote_wait_event) for t in tasks]
        key_of: dict[tuple[int, int], int] = {}  # (event, remote event) -> position in self.bits
        self.bits: list[int] = []
        key = [0] * len(tasks)  # task -> position in self.bits
        state = [0] * len(tasks)  # 0 new, 1 on stack, 2 done
        for start in range(len(tasks)):
            stack = [start]
            while stack:
                node = stack[-1]
                if state[node] == 0 and waits[node] in key_of:
                    # its predecessors are another task's, all done without reaching it: no cycle through it
                    key[node], state[node] = key_of[waits[node]], 2
                    stack.pop()
                    continue
                if state[node] == 0:
                    state[node] = 1
                    for p in preds[node]:
                        if state[p] == 1:
                            raise InvalidTaskGraphError(f"dependency cycle through task{p} and task{node}")
                        if state[p] == 0:
                            stack.append(p)
                    continue
                stack.pop()
                if state[node] == 1:
                    if waits[node] not in key_of:
                        bits = 0
                        for p in preds[node]:
                            bits |= self.bits[key[p]] | (1 << p)
                        key_of[waits[node]] = len(self.bits)
                        self.bits.append(bits)
                    key[node] = key_of[waits[node]]
                    state[node] = 2
        self.key = np.array(key, np.int64)

    def follows(self, later: np.ndarray, earlier: np.ndarray) -> np.ndarray:
        """Whether task later[i] transitively follows task earlier[i], for every i: each predecessor bitset
        involved is turned into bytes once and its bits picked with numpy."""
        result = np.zeros(len(later), bool)
        num_bytes = (len(self.key) + 7) // 8
        keys = self.key[later]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.diff(sorted_keys, prepend=-1))
        for begin, end in zip(starts.tolist(), [*starts[1:].tolist(), len(order)]):
            packed = np.frombuffer(self.bits[int(sorted_keys[begin])].to_bytes(num_bytes, "little"), np.uint8)
            rows = order[begin:end]
            result[rows] = (packed[earlier[rows] >> 3] >> (earlier[rows] & 7)) & 1
        return result


class _Orderings:
    """Pairs of tasks that the events must order, collected over the whole plan and looked up together."""

    def __init__(self):
        self.checks: list[tuple[np.ndarray, np.ndarray, Callable[[int], str], bool]] = []

    def require(self, later: np.ndarray, earlier: np.ndarray, describe: Callable[[int], str], either_way: bool = False):
        """later[k] must follow earlier[k] (or, ``either_way``, one of them the other); ``describe(k)`` says
        what breaks when it does not."""
        self.checks.append((later, earlier, describe, either_way))

    def check(self, ancestors: _Ancestors) -> None:
        """Raises for the first unordered pair of the first check that has one."""
        laters = [c[0] for c in self.checks] + [c[1] for c in self.checks if c[3]]
        earliers = [c[1] for c in self.checks] + [c[0] for c in self.checks if c[3]]
        ordered = ancestors.follows(np.concatenate([np.zeros(0, np.int64), *laters]),
                                    np.concatenate([np.zeros(0, np.int64), *earliers]))  # fmt: skip
        forward, backward = [], []
        offset = 0
        for later, *_ in self.checks:
            forward.append(ordered[offset : offset + len(later)])
            offset += len(later)
        for later, _, _, either_way in self.checks:
            if either_way:
                backward.append(ordered[offset : offset + len(later)])
                offset += len(later)
        backward_of = iter(backward)
        for (later, _, describe, either_way), fine in zip(self.checks, forward):
            if either_way:
                fine = fine | next(backward_of)
            for k in np.flatnonzero(~fine)[:1]:
                raise InvalidTaskGraphError(describe(int(k)))


def _check_partitions(graph: TaskGraph) -> None:
    for kernel, tasks in zip(graph.kernels.kernels, graph.tasks_by_kernel()):
        rank = len(kernel.domain)
        lo = np.array([t.lo for t in tasks], np.int64).reshape(len(tasks), rank)
        hi = np.array([t.hi for t in tasks], np.int64).reshape(len(tasks), rank)
        if int(np.prod(np.maximum(hi - lo, 0), axis=1).sum()) != math.prod(kernel.domain):
            raise InvalidTaskGraphError(f"the tiles of kernel{kernel.index} do not cover its domain exactly")
        a, b = overlapping_pairs(lo, hi, lo, hi)
        for i in np.flatnonzero(a < b)[:1]:
            first, second = (tuple(zip(lo[t].tolist(), hi[t].tolist())) for t in (a[i], b[i]))
            raise InvalidTaskGraphError(f"two tiles of kernel{kernel.index} overlap: {first} and {second}")


def _signallers(graph: TaskGraph, signals: str, wait_event: str, wait_count: str, what: str) -> dict[int, list[int]]:
    """event -> the tasks that signal it (the task fields named), checked against every waiter's count."""
    signallers: dict[int, list[int]] = {}
    for task in graph.tasks:
        for event in getattr(task, signals):
            signallers.setdefault(event, []).append(task.index)
    for task in graph.tasks:
        event, count = getattr(task, wait_event), getattr(task, wait_count)
        if event >= 0 and len(signallers.get(event, [])) != count:
            raise InvalidTaskGraphError(
                f"{task!r} waits for {count} signals of {what} {event}, which {len(signallers.get(event, []))} "
                "tasks signal"
            )
    return signallers


def _check_schedule(graph: TaskGraph, sched: Schedule) -> None:
    listed = Counter(i for worker in sched.workers for i in worker)
    if sorted(listed) != list(range(len(graph.tasks))) or any(c != 1 for c in listed.values()):
        raise InvalidTaskGraphError("the schedule does not list every task exactly once")
    counters: Counter = Counter()
    remote_counters: Counter = Counter()
    heads = [0] * len(sched.workers)
    done = 0
    progress = True
    while progress:
        progress = False
        for w, worker in enumerate(sched.workers):
            while heads[w] < len(worker):
                task = graph.tasks[worker[heads[w]]]
                if task.wait_event >= 0 and counters[task.wait_event] < task.wait_count:
                    break
                if task.remote_wait_event >= 0 and remote_counters[task.remote_wait_event] < task.remote_wait_count:
                    break
                counters.update(task.signals)
                remote_counters.update(task.remote_signals)
                heads[w] += 1
                done += 1
                progress = True
    if done != len(graph.tasks):
        stuck = [f"worker{w} at task{worker[heads[w]]}" for w, worker in enumerate(sched.workers) if heads[w] < len(worker)]
        raise InvalidTaskGraphError("the schedule deadlocks: " + ", ".join(stuck))
