"""Per-SM traces (jax_mpk.trace) from per-task times, checked on a simulated run of a real plan's schedule."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import jax_mpk
from jax_mpk.layout import PROFILE_STAMPS
from jax_mpk.trace import chrome_trace, clock_offsets, dependency_hops, save


def _simulate(mk, hop_us: float, run_us: float) -> np.ndarray:
    """[wait, start, end] per task for the plan's schedule: each worker runs its list in order, a task starts
    ``hop_us`` after its last dependency ended (or when its worker is free, if later)."""
    tasks = mk.tasks.tasks
    times = np.full((len(tasks), 3), np.nan)
    position = [0] * len(mk.schedule.workers)
    free = [0.0] * len(mk.schedule.workers)
    remaining = sum(len(w) for w in mk.schedule.workers)
    while remaining:
        for w, order in enumerate(mk.schedule.workers):
            if position[w] == len(order):
                continue
            task = tasks[order[position[w]]]
            if any(np.isnan(times[d, 2]) for d in task.deps):
                continue
            ready = max((times[d, 2] + hop_us for d in task.deps), default=0.0)
            start = max(free[w], ready)
            times[task.index] = (free[w], start, start + run_us)
            free[w] = start + run_us
            position[w] += 1
            remaining -= 1
    return times


def test_trace_has_a_track_per_worker_and_recovers_the_hop(tmp_path):
    def fn(x, w):
        h = jnp.tanh(x @ w)
        return h / jnp.sum(h * h, axis=-1, keepdims=True)

    x = jax.random.normal(jax.random.PRNGKey(0), (4, 96))
    w = jax.random.normal(jax.random.PRNGKey(1), (96, 80))
    mk = jax_mpk.compile(fn, x, w, num_workers=3)
    times = _simulate(mk, hop_us=1.5, run_us=2.0)
    trace = chrome_trace(times, mk.schedule.workers, [t.kernel for t in mk.tasks.tasks],
                         [k.name for k in mk.graph.kernels], "test")  # fmt: skip
    path = tmp_path / "trace.json"
    save(trace, str(path))
    events = json.loads(path.read_text())["traceEvents"]
    runs = [e for e in events if e.get("cat") == "run"]
    assert sorted(e["args"]["task"] for e in runs) == list(range(len(mk.tasks.tasks)))
    assert {e["tid"] for e in runs} == {w for w, order in enumerate(mk.schedule.workers) if order}
    for e in runs:  # each slice sits on the worker whose list holds its task, named by its kernel
        assert e["args"]["task"] in mk.schedule.workers[e["tid"]]
        assert e["name"].endswith(mk.graph.kernels[e["args"]["kernel"]].name)
    waits = [e for e in events if e.get("cat") == "wait"]
    assert waits and all(e["dur"] > 0 for e in waits)
    hops = dependency_hops(times, [t.deps for t in mk.tasks.tasks])
    assert len(hops) and np.all(hops >= 1.5 - 1e-9)
    assert np.median(hops) == 1.5  # tasks that waited started exactly one hop after their last dependency
    # with the physical SM of each worker (Megakernel.profile_sms), the tracks say which SM ran them
    named = chrome_trace(times, mk.schedule.workers, [t.kernel for t in mk.tasks.tasks],
                         [k.name for k in mk.graph.kernels], "test", np.array([[7, 3, 5]]))  # fmt: skip
    tracks = {e["tid"]: e["args"]["name"] for e in named["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == {0: "worker 0 (SM 7)", 1: "worker 1 (SM 3)", 2: "worker 2 (SM 5)"}


def test_trace_of_several_devices_has_a_process_per_device(tmp_path):
    """A shard_map's profile holds one [task, (wait, start, end)] array per device: one process per device, each
    with its workers' tracks and its own times."""
    mk = jax_mpk.compile(lambda x: jnp.tanh(x) * 2, jnp.ones((64, 64)), num_workers=2)
    times = np.stack([_simulate(mk, hop_us=1.0, run_us=2.0), _simulate(mk, hop_us=1.0, run_us=3.0) + 0.5])
    trace = chrome_trace(times, mk.schedule.workers, [t.kernel for t in mk.tasks.tasks],
                         [k.name for k in mk.graph.kernels], ["device 0", "device 1"])  # fmt: skip
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {0: "device 0", 1: "device 1"}
    for pid in (0, 1):
        runs = [e for e in events if e.get("cat") == "run" and e["pid"] == pid]
        assert sorted(e["args"]["task"] for e in runs) == list(range(len(mk.tasks.tasks)))
        assert {e["dur"] for e in runs} == {2.0 + pid}


def test_trace_shows_the_phases_a_body_marks():
    """Every stamp of layout.PROFILE_STAMPS: the task's slice, and inside it a slice per phase the body marked
    (none where the stamps are NaN: a body without phases)."""
    mk = jax_mpk.compile(lambda x: jnp.tanh(x) * 2, jnp.ones((64, 64)), num_workers=2)
    n = len(mk.tasks.tasks)
    stamps = np.tile(np.array([0.0, 1.0, 2.0, 4.0, 4.5, 5.0]), (n, 1))
    stamps[0, 2:4] = np.nan  # task 0 marks no staging or product
    trace = chrome_trace(stamps, mk.schedule.workers, [t.kernel for t in mk.tasks.tasks],
                         [k.name for k in mk.graph.kernels])  # fmt: skip
    phases = [e for e in trace["traceEvents"] if e.get("cat") == "phase"]
    assert {(e["name"], e["ts"], e["dur"]) for e in phases if e["args"]["task"] == 1} == {
        ("stage", 1.0, 1.0), ("product", 2.0, 2.0), ("epilogue", 4.0, 0.5), ("signal", 4.5, 0.5)}
    assert {e["name"] for e in phases if e["args"]["task"] == 0} == {"signal"}
    runs = [e for e in trace["traceEvents"] if e.get("cat") == "run"]
    assert {(e["ts"], e["dur"]) for e in runs} == {(1.0, 4.0)}


def test_clock_offsets_put_the_devices_on_one_timer_by_their_remote_waits():
    """Two devices whose timers are 2800 us apart, each running a producer (task 0) and a task that waits for
    both devices' producers (task 1): the waits bound the offset from both sides ([2799, 2802.5] here), and the
    estimate is their middle; without waits for another device, 0."""
    start, body_end = PROFILE_STAMPS.index("start"), PROFILE_STAMPS.index("body_end")
    true = np.zeros((2, 2, len(PROFILE_STAMPS)))
    true[0, 0, body_end], true[1, 0, body_end] = 10.0, 11.0  # the producers' bodies end
    true[0, 1, start], true[1, 1, start] = 12.0, 12.5  # the waiting tasks start after both
    stamps = true.copy()
    stamps[1] += 2800.0
    (offset,) = clock_offsets(stamps, [[], [0]])[1:]
    assert 2799.0 <= offset <= 2802.5 and offset == (2799.0 + 2802.5) / 2
    assert clock_offsets(stamps, [[], []]).tolist() == [0.0, 0.0]

