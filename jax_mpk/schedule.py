"""Schedule: give every worker (an SM on the GPU, a thread on the CPU) an ordered list of tasks.

Tasks are taken in one global topological order and each goes to the worker that can start it first
(list scheduling with the tasks' estimated costs). Every worker's list is then a subsequence of one
topological order, which is what makes the static schedule deadlock-free: the earliest unfinished task
of the global order always has its dependencies done and nothing unfinished ahead of it on its worker.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from .indexmap import linear_form
from .layout import TensorKind
from .tasks import TaskGraph

# A task's fixed cost (wait, staging, barriers, signal: ~4 us measured, benchmarks/task_cost.py) as the bytes a
# product task streams in that time at an SM's share of HBM (~30 GB/s on an H200)
FIXED_COST_WEIGHT_BYTES = 120 * 1024


@dataclass
class Schedule:
    workers: list[list[int]]  # per worker: task indices in execution order

    def __repr__(self) -> str:
        lines = [f"Schedule: {len(self.workers)} workers"]
        lines += [f"  worker{w}: {tasks}" for w, tasks in enumerate(self.workers)]
        return "\n".join(lines)


def schedule(graph: TaskGraph, num_workers: int, fixed_cost: float = 0.0) -> Schedule:
    """List scheduling with each task's estimated cost plus ``fixed_cost`` (``fixed_task_cost``, or 0)."""
    free_at = np.zeros(num_workers)
    finish = [0.0] * len(graph.tasks)
    workers: list[list[int]] = [[] for _ in range(num_workers)]
    for task in graph.tasks:  # tasks are created in a topological order
        ready = max((finish[d] for d in task.deps), default=0.0)
        # among the workers that can start it as early, the one idle longest: without a fixed cost the estimate
        # lacks a task's few microseconds, so a worker that has just finished a tiny task is in fact still busy
        starts = np.maximum(free_at, ready)
        earliest = np.flatnonzero(starts == starts.min())
        worker = int(earliest[free_at[earliest].argmin()])  # argmin: the first of equals
        finish[task.index] = float(starts[worker] + task.cost + fixed_cost)
        free_at[worker] = finish[task.index]
        workers[worker].append(task.index)
    return Schedule(workers)


def fixed_task_cost(graph: TaskGraph) -> float:
    """A task's fixed cost in the graph's cost units: what its products cost per byte of weight (their costs count
    work, which grows with the rows that share a weight, their time the weight's bytes) times
    FIXED_COST_WEIGHT_BYTES. 0 without products of weights. Costed without it, a few-microsecond task looks free,
    and the list scheduler queues the next small task of a level behind it rather than on an idle SM (Qwen3-8B
    b8: its V append behind its K append, ~7 us a layer)."""
    cost = weight_bytes = 0.0
    for kernel, tasks in zip(graph.kernels.kernels, graph.tasks_by_kernel()):
        dot = kernel.dot
        if dot is None or kernel.attention is not None or dot.rhs.buffer.kind != TensorKind.INPUT:
            continue
        form = linear_form(dot.rhs_map, dot.rhs.shape)
        if form is None:
            continue
        # the weight elements it reads: its contraction over the domain dims the weight varies along (the columns,
        # the split-K parts; not the rows that share it, nor the other layers of a stacked weight)
        varying = [n for n, coef in zip(kernel.domain, form[1]) if coef]
        weight_bytes += math.prod(varying) * math.prod(dot.k_shape) * np.dtype(dot.rhs.buffer.dtype).itemsize
        cost += sum(t.cost for t in tasks)
    return cost / weight_bytes * FIXED_COST_WEIGHT_BYTES if weight_bytes else 0.0


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
