"""The task-graph validator: checks a plan's own encoding (events, not the dependency lists it came from).

1. Every kernel's tiles partition its domain.
2. Every event (and remote event) is signalled exactly as often as its waiters expect.
3. Every read follows every earlier overlapping write of its buffer (kernel order defines "earlier"),
   every later overlapping write follows the read, and no tile reads what another tile of its kernel writes.
4. Tasks of different kernels that write overlapping regions are ordered.
5. The per-worker lists run to completion (no deadlock) when simulated with the event protocol.

Every rank of a multi-rank plan runs the same lists, so one simulated rank stands for all of them, and a
wait on a remote event (the producers on every rank) orders a task after its local producers too.
"""

from __future__ import annotations

import math
from collections import Counter

from .errors import InvalidTaskGraphError
import numpy as np

from .indexmap import rect_volume, rects_overlap
from .schedule import Schedule
from .tasks import TaskGraph


def validate(graph: TaskGraph, sched: Schedule) -> None:
    tasks = graph.tasks
    _check_partitions(graph)
    signallers = _signallers(graph, "signals", "wait_event", "wait_count", "event")
    remote_signallers = _signallers(graph, "remote_signals", "remote_wait_event", "remote_wait_count", "remote event")
    ancestors = _ancestors(graph, signallers, remote_signallers)

    def follows(later: int, earlier: int) -> bool:
        return bool((ancestors[later] >> earlier) & 1)

    writes_of: dict[int, list[tuple]] = {}  # buffer -> (task, kernel, rect) of every write, and of every read
    reads_of: dict[int, list[tuple]] = {}
    for t in tasks:
        for a in t.writes:
            writes_of.setdefault(a.buffer_id, []).append((t.index, t.kernel, a.rect))
        for a in t.reads:
            reads_of.setdefault(a.buffer_id, []).append((t.index, t.kernel, a.rect))
    for buffer_id in range(len(graph.kernels.buffers)):
        writes, reads = writes_of.get(buffer_id, []), reads_of.get(buffer_id, [])
        name = graph.kernels.buffers[buffer_id].name
        for r, w in _overlapping_pairs(reads, writes):
            (r_task, r_kernel, r_rect), (w_task, w_kernel, w_rect) = reads[r], writes[w]
            if w_task != r_task:
                if w_kernel < r_kernel and not follows(r_task, w_task):
                    raise InvalidTaskGraphError(
                        f"task{r_task} reads {name}{list(r_rect)} without waiting for task{w_task}, which writes it"
                    )
                if w_kernel == r_kernel:
                    raise InvalidTaskGraphError(
                        f"task{r_task} reads {name}{list(r_rect)}, which task{w_task} of the same kernel writes"
                    )
                if w_kernel > r_kernel and not follows(w_task, r_task):
                    raise InvalidTaskGraphError(
                        f"task{w_task} overwrites {name}{list(w_rect)} before task{r_task} has read it"
                    )
        for a, b in _overlapping_pairs(writes, writes):
            (a_task, a_kernel, _), (b_task, b_kernel, _) = writes[a], writes[b]
            if a < b and a_kernel != b_kernel and not (follows(a_task, b_task) or follows(b_task, a_task)):
                raise InvalidTaskGraphError(f"task{a_task} and task{b_task} race writing {name}")
    _check_schedule(graph, sched)


def _overlapping_pairs(first: list[tuple], second: list[tuple]) -> list[tuple[int, int]]:
    """(i, j) for every rect first[i][2] that overlaps second[j][2] (vectorized: a model's activations are
    written by a hundred tiles and read by a hundred, in every layer)."""
    if not first or not second:
        return []
    rank = len(first[0][2])
    a = np.asarray([rect for _, _, rect in first], np.int64).reshape(len(first), rank, 2)
    b = np.asarray([rect for _, _, rect in second], np.int64).reshape(len(second), rank, 2)
    pairs = []
    for start in range(0, len(a), 1024):  # bounded memory: 1024 x len(second) x rank
        chunk = a[start : start + 1024, None]
        overlap = np.all((chunk[..., 0] < b[None, :, :, 1]) & (b[None, :, :, 0] < chunk[..., 1]), axis=-1)
        rows, cols = np.nonzero(overlap)
        pairs += zip((rows + start).tolist(), cols.tolist())
    return pairs


def _check_partitions(graph: TaskGraph) -> None:
    for kernel, tasks in zip(graph.kernels.kernels, graph.tasks_by_kernel()):
        tiles = [tuple(zip(t.lo, t.hi)) for t in tasks]
        if sum(rect_volume(t) for t in tiles) != math.prod(kernel.domain):
            raise InvalidTaskGraphError(f"the tiles of kernel{kernel.index} do not cover its domain exactly")
        for i, a in enumerate(tiles):
            for b in tiles[i + 1 :]:
                if rects_overlap(a, b):
                    raise InvalidTaskGraphError(f"two tiles of kernel{kernel.index} overlap: {a} and {b}")


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


def _ancestors(graph: TaskGraph, signallers: dict[int, list[int]], remote_signallers: dict[int, list[int]]) -> list[int]:
    """Bitset of transitive predecessors per task, following events; raises on a cycle."""
    tasks = graph.tasks
    preds = [
        (signallers.get(t.wait_event, []) if t.wait_event >= 0 else [])
        + (remote_signallers.get(t.remote_wait_event, []) if t.remote_wait_event >= 0 else [])
        for t in tasks
    ]
    result: list[int | None] = [None] * len(tasks)
    state = [0] * len(tasks)  # 0 new, 1 on stack, 2 done
    for start in range(len(tasks)):
        stack = [start]
        while stack:
            node = stack[-1]
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
                bits = 0
                for p in preds[node]:
                    bits |= result[p] | (1 << p)
                result[node] = bits
                state[node] = 2
    return result


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
