"""Per-SM timelines of one megakernel call, as a Chrome/Perfetto trace (https://ui.perfetto.dev).

A profiled plan (``JAX_MPK_PROFILE=1``) records, for every task, when its worker began waiting for the task's
dependencies, when it started running it, the phases its body marks, and when it had signalled.
:func:`chrome_trace` turns those times into one track per worker (an SM on the GPU) with a slice per task,
named by its kernel, its phases as slices inside it, and the wait before it as a slice of its own, so that the
gaps where a worker (and the memory system) idles are visible.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from .layout import PROFILE_STAMPS


# A task's run, phase by phase, where its body stamps them: (name, from, to), positions in layout.PROFILE_STAMPS
PHASES = tuple((name, PROFILE_STAMPS.index(first), PROFILE_STAMPS.index(last)) for name, first, last in (
    ("stage", "start", "staged"), ("product", "staged", "computed"), ("epilogue", "computed", "body_end"),
    ("signal", "body_end", "signalled")))  # fmt: skip
_TASK_TIMES = [PROFILE_STAMPS.index(n) for n in ("wait", "start", "signalled")]


def task_times(stamps: np.ndarray) -> np.ndarray:
    """Every task's (wait, start, end) from its stamps (``[..., len(layout.PROFILE_STAMPS)]``)."""
    return stamps[..., _TASK_TIMES]


def chrome_trace(times_us: np.ndarray, workers: Sequence[Sequence[int]], task_kernels: Sequence[int],
                 kernel_names: Sequence[str], title: str | Sequence[str] = "megakernel",
                 sms: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """The Trace Event Format document of one call.

    ``times_us[t] = (wait, start, end)`` of task ``t`` in microseconds, or every stamp of
    ``layout.PROFILE_STAMPS`` (``Megakernel.profile(phases=True)``; a NaN for a phase the body does not mark),
    which adds the phases as slices inside the task's; ``workers[w]`` lists the tasks worker ``w`` ran, in
    order; ``task_kernels[t]`` is the kernel of task ``t``, named ``kernel_names[k]``. Several devices running
    the same plan (a shard_map): ``times_us[r, t]`` and a title per device, one process each. ``sms[r, w]``, when
    given, names the physical SM worker ``w`` ran on (``Megakernel.profile_sms``).
    """
    per_device = times_us[None] if times_us.ndim == 2 else times_us
    titles = [title] if isinstance(title, str) else list(title)
    assert len(titles) == len(per_device), (len(titles), per_device.shape)
    stamps = per_device.shape[-1] == len(PROFILE_STAMPS)
    events: list[dict[str, Any]] = []
    for pid, (device_stamps, name) in enumerate(zip(per_device, titles)):
        times = task_times(device_stamps) if stamps else device_stamps
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}})
        for worker, tasks in enumerate(workers):
            track = f"worker {worker} (SM {int(sms[pid][worker])})" if sms is not None else f"SM {worker}"
            events.append({"ph": "M", "pid": pid, "tid": worker, "name": "thread_name", "args": {"name": track}})
            for task in tasks:
                wait, start, end = (float(x) for x in times[task])
                kernel = task_kernels[task]
                label = f"k{kernel} {kernel_names[kernel]}"
                args = {"task": int(task), "kernel": int(kernel)}
                if start > wait:
                    events.append({"ph": "X", "pid": pid, "tid": worker, "name": "wait", "cat": "wait", "ts": wait,
                                   "dur": start - wait, "args": {**args, "for": label}})  # fmt: skip
                events.append({"ph": "X", "pid": pid, "tid": worker, "name": label, "cat": "run", "ts": start,
                               "dur": max(end - start, 0.0), "args": args})  # fmt: skip
                for phase, first, last in PHASES if stamps else ():
                    begin, finish = device_stamps[task, first], device_stamps[task, last]
                    if not (np.isnan(begin) or np.isnan(finish)):
                        events.append({"ph": "X", "pid": pid, "tid": worker, "name": phase, "cat": "phase",
                                       "ts": float(begin), "dur": max(float(finish - begin), 0.0), "args": args})  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def save(trace: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(trace, f)



def clock_offsets(stamps_us: np.ndarray, remote_deps: Sequence[Sequence[int]]) -> np.ndarray:
    """Each device's global timer minus device 0's (µs), from the devices' stamps of one call
    (``[devices, tasks, len(PROFILE_STAMPS)]``) and each task's producers on the other devices: the GPUs' timers
    are not synchronized (2.8 ms apart on a 2x H200), but a task that waited for another device's task started
    after that task's body ended (its signal comes after), whatever the timers say. For device d, each wait of a
    task on d for device 0 bounds the offset from above, each wait of a task on device 0 for d from below; the
    estimate is the middle of what the tightest bounds leave (0 where the waits do not bound it from both
    sides)."""
    start, body_end = PROFILE_STAMPS.index("start"), PROFILE_STAMPS.index("body_end")
    offsets = np.zeros(stamps_us.shape[0])
    waiting = [(task, deps) for task, deps in enumerate(remote_deps) if deps]
    if not waiting:
        return offsets
    for d in range(1, stamps_us.shape[0]):
        upper = min(stamps_us[d, t, start] - max(stamps_us[0, p, body_end] for p in deps) for t, deps in waiting)
        lower = max(max(stamps_us[d, p, body_end] for p in deps) - stamps_us[0, t, start] for t, deps in waiting)
        if lower <= upper:
            offsets[d] = (lower + upper) / 2
    return offsets


def dependency_hops(times_us: np.ndarray, task_deps: Sequence[Sequence[int]]) -> np.ndarray:
    """For every task that was already waiting when its last dependency signalled (or began to wait at that
    moment): how long after that signal it started running (µs). This is the cost of one dependency hop (the
    producer's fence and counter add, the consumer's poll seeing it, its barrier), measured on the real
    schedule."""
    hops = []
    for task, deps in enumerate(task_deps):
        if not deps:
            continue
        ready = max(times_us[d, 2] for d in deps)
        wait, start, _ = times_us[task]
        if wait <= ready:
            hops.append(start - ready)
    return np.asarray(hops)
