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

import numpy as np

from .errors import InvalidTaskGraphError
from .indexmap import rect_volume, rects_overlap
from .layout import TensorKind
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
    donated_results = set(graph.kernels.aliases.values())
    for buffer_id, buffer in enumerate(graph.kernels.buffers):
        writes, reads = writes_of.get(buffer_id, []), reads_of.get(buffer_id, [])
        name = buffer.name
        read_write_pairs = _overlapping_pairs(reads, writes)
        starts_unwritten = buffer.kind == TensorKind.WORKSPACE or (
            buffer.kind == TensorKind.OUTPUT and buffer.index not in donated_results
        )
        if starts_unwritten:
            _check_reads_are_written(reads, writes, read_write_pairs, name)
        for r, w in read_write_pairs:
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


def _check_reads_are_written(reads: list[tuple], writes: list[tuple], pairs: list[tuple[int, int]], name: str) -> None:
    """Every read rect is covered by the writes of earlier kernels that overlap it. Usually one earlier kernel's
    tiles (disjoint: _check_partitions) cover it alone, which summed intersection volumes show; otherwise (an
    in-place update over a base, a concatenation) the rect is cut along every overlapping write's edges and each
    cell looked up."""
    if not reads:
        return
    rank = len(reads[0][2])
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    read_kernel = np.asarray([k for _, k, _ in reads], np.int64)
    write_kernel = np.asarray([k for _, k, _ in writes], np.int64).reshape(-1)
    pairs = pairs[write_kernel[pairs[:, 1]] < read_kernel[pairs[:, 0]]] if len(pairs) else pairs
    read_rects = np.asarray([rect for _, _, rect in reads], np.int64).reshape(len(reads), rank, 2)
    volumes = np.prod(read_rects[:, :, 1] - read_rects[:, :, 0], axis=1)
    covered = volumes == 0
    if len(pairs):
        write_rects = np.asarray([rect for _, _, rect in writes], np.int64).reshape(len(writes), rank, 2)
        a, b = read_rects[pairs[:, 0]], write_rects[pairs[:, 1]]
        overlap = np.prod(np.minimum(a[:, :, 1], b[:, :, 1]) - np.maximum(a[:, :, 0], b[:, :, 0]), axis=1)
        # per (read, writing kernel): the kernel's tiles are disjoint, so their overlaps add up
        kernels = int(write_kernel.max()) + 1
        groups, group_of = np.unique(pairs[:, 0] * kernels + write_kernel[pairs[:, 1]], return_inverse=True)
        per_kernel = np.bincount(group_of.reshape(-1), weights=overlap, minlength=len(groups))
        read_of_group = groups // kernels
        covered[read_of_group[per_kernel == volumes[read_of_group]]] = True
    writes_over: dict[int, list[int]] = {}
    for r, w in pairs[~covered[pairs[:, 0]]].tolist() if len(pairs) else []:
        writes_over.setdefault(r, []).append(w)
    for r in np.flatnonzero(~covered).tolist():
        rect = reads[r][2]
        if not _rect_is_covered(rect, [writes[w][2] for w in writes_over.get(r, [])]):
            raise InvalidTaskGraphError(
                f"task{reads[r][0]} reads {name}{list(rect)}, which no task of an earlier kernel (wholly) writes: "
                "it would read what the previous call left there"
            )


def _rect_is_covered(rect, others) -> bool:
    """Whether the union of ``others`` contains ``rect`` (cut along all their edges inside it)."""
    cuts = [sorted({lo, hi, *(min(max(c, lo), hi) for o in others for c in o[d])}) for d, (lo, hi) in enumerate(rect)]
    cells = np.zeros([len(c) - 1 for c in cuts], bool)
    for other in others:
        cells[tuple(slice(np.searchsorted(c, max(lo, o_lo)), np.searchsorted(c, min(hi, o_hi)))
                    for c, (lo, hi), (o_lo, o_hi) in zip(cuts, rect, other))] = True  # fmt: skip
    return bool(cells.all())


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
