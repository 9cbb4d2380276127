"""Schedule: give every worker (an SM on the GPU, a thread on the CPU) an ordered list of tasks.

Tasks are taken in one global topological order and each goes to the worker that can start it first
(list scheduling with the tasks' estimated costs). Every worker's list is then a subsequence of one
topological order, which is what makes the static schedule deadlock-free: the earliest unfinished task
of the global order always has its dependencies done and nothing unfinished ahead of it on its worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .tasks import TaskGraph


@dataclass
class Schedule:
    workers: list[list[int]]  # per worker: task indices in execution order

    def __repr__(self) -> str:
        lines = [f"Schedule: {len(self.workers)} workers"]
        lines += [f"  worker{w}: {tasks}" for w, tasks in enumerate(self.workers)]
        return "\n".join(lines)


def schedule(graph: TaskGraph, num_workers: int) -> Schedule:
    free_at = np.zeros(num_workers)
    finish = [0.0] * len(graph.tasks)
    workers: list[list[int]] = [[] for _ in range(num_workers)]
    for task in graph.tasks:  # tasks are created in a topological order
        ready = max((finish[d] for d in task.deps), default=0.0)
        # among the workers that can start it as early, the one idle longest: the estimate lacks a task's fixed
        # cost (a few microseconds), so a worker that has just finished a tiny task is in fact still busy with it
        starts = np.maximum(free_at, ready)
        earliest = np.flatnonzero(starts == starts.min())
        worker = int(earliest[free_at[earliest].argmin()])  # argmin: the first of equals
        finish[task.index] = float(starts[worker] + task.cost)
        free_at[worker] = finish[task.index]
        workers[worker].append(task.index)
    return Schedule(workers)


def shuffled_schedule(graph: TaskGraph, num_workers: int, seed: int) -> Schedule:
    """A random topological order dealt to random workers: as deadlock-free as :func:`schedule` (every list is
    a subsequence of one topological order) but a different interleaving; tests and the fuzzer use it
    (``JAX_MPK_SCHEDULE_SEED``) to show that results do not depend on the schedule."""
    rnd = random.Random(seed)
    waiting = [len(t.deps) for t in graph.tasks]
    followers: list[list[int]] = [[] for _ in graph.tasks]
    for t in graph.tasks:
        for d in t.deps:
            followers[d].append(t.index)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    workers: list[list[int]] = [[] for _ in range(num_workers)]
    while ready:
        task = ready.pop(rnd.randrange(len(ready)))
        workers[rnd.randrange(num_workers)].append(task)
        for f in followers[task]:
            waiting[f] -= 1
            if waiting[f] == 0:
                ready.append(f)
    return Schedule(workers)
