"""What one task and one dependency level cost in the megakernel, apart from the bytes they move.

Two step functions, each timed as chained calls (one sync per chain) and profiled (JAX_MPK_PROFILE=1):
* chain: N products of a [1, 64] row with a 64 x 64 float32 matrix, each reading the previous one's result:
  N dependency levels of ONE tiny task each (16 KB of matrix). (time(N=64) - time(N=16)) / 48 is what a level
  costs when nothing else runs: the hop, the task's fixed cost, its two memory round trips (row, matrix).
* wide: one product of a [1, 512] row with a 512 x (132 * 64) bfloat16 matrix: one task per SM, 64 KB each,
  how long a task runs when it moves little, in a level where every SM has one.
The profile gives per-task run time (start to signalled) and its phases (the row staged, the product computed,
the body's end, signalled: where the tiny task's ~2.5 us go), the hop (a task's start after its last dependency
signalled) and the wait. Prints a table and, with --out, writes JSON.

    python benchmarks/task_cost.py --out /tmp/task_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mpk
from jax_mpk.trace import PHASES, dependency_hops, task_times


def chain(n: int):
    def step(x, ws):
        for i in range(n):
            x = jnp.tanh(x @ ws[i])
        return x

    return step


def wide(x, w):
    return x @ w


def chained_ms(fn, args, steps: int = 100, chains: int = 5) -> list[float]:
    """Per-call milliseconds of ``steps`` back-to-back calls, one sync per chain."""
    out = fn(*args)
    jax.block_until_ready(out)
    result = []
    for _ in range(chains):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        result.append((time.perf_counter() - start) / steps * 1e3)
    return result


def task_stats(fn, args) -> dict:
    """Median task run time, hop and wait (us) from one profiled call (JAX_MPK_PROFILE=1 plans only)."""
    os.environ["JAX_MPK_PROFILE"] = "1"
    try:
        mk = jax_mpk.compile(fn, *args)
    finally:
        del os.environ["JAX_MPK_PROFILE"]
    stamps = mk.profile(*args, phases=True)
    times = task_times(stamps)
    hops = dependency_hops(times, [t.deps for t in mk.tasks.tasks])
    phases = {}  # a task's run, phase by phase (medians; the product bodies mark staged and computed)
    for name, first, last in PHASES:
        spans = stamps[:, last] - stamps[:, first]
        phases[f"{name}_us"] = float(np.nanmedian(spans)) if not np.isnan(spans).all() else None
    return {
        "tasks": len(mk.tasks.tasks),
        "run_us": float(np.median(times[:, 2] - times[:, 1])),
        "wait_us": float(np.median(times[:, 1] - times[:, 0])),
        "hop_us": float(np.median(hops)) if len(hops) else None,
        "span_us": float(times[:, 2].max()),
        "phases": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "commit": os.environ.get("JAX_MPK_COMMIT", "unknown"), "chain": {}, "wide": {}}  # fmt: skip
    x = jnp.asarray(rng.standard_normal((1, 64)), jnp.float32)
    for n in (16, 64):
        ws = jnp.asarray(rng.standard_normal((n, 64, 64)) / 8, jnp.float32)
        fast = jax_mpk.megakernelize(chain(n))
        ms = chained_ms(fast, (x, ws))
        entry = {"ms": float(np.median(ms)), "spread_ms": [float(min(ms)), float(max(ms))]}
        if on_gpu:
            entry.update(task_stats(chain(n), (x, ws)))
        results["chain"][n] = entry
        print(f"chain of {n} levels: {entry}", flush=True)
    per_level = (results["chain"][64]["ms"] - results["chain"][16]["ms"]) / 48 * 1e3
    results["per_level_us"] = per_level
    print(f"=> one level of one tiny task: {per_level:.2f} us")
    if on_gpu:
        xw = jnp.asarray(rng.standard_normal((1, 512)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((512, 132 * 64)) / 16, jnp.bfloat16)
        fast = jax_mpk.megakernelize(wide)
        ms = chained_ms(fast, (xw, w))
        results["wide"] = {"ms": float(np.median(ms)), **task_stats(wide, (xw, w))}
        print(f"wide (one level, one task per SM, {w.nbytes / 132 / 1024:.0f} KB each): {results['wide']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
