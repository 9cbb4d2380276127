"""Per-call host overhead: a step with many small array arguments (a decode step's weights), called from Python.

The step does almost no work (a pointwise chain over all its arguments, 16 elements each), so the time per
call is what dispatching it costs: flattening and checking the arguments, launching, and the tiny computation.
Measured in one process on the default device, for

* ``jax.jit(step)``;
* ``jax_mpk.megakernelize(step)`` (a jax.jit around the custom call);
* ``jax_mpk.compile(step, ...)``, the Megakernel object called directly;
* the generate-loop pattern: ``lax.fori_loop`` of the megakernelized step inside one ``jax.jit``, which pays
  the per-call cost once for ``--loop`` steps (reported per step).

Two ways of calling: synchronous (each call waited for) and pipelined (``--calls`` calls chained through the
step's output, waited for at the end). Median over ``--repeats`` rounds, in microseconds per call; written to
``--out`` as ``host_overhead_<device>.json`` and ``.md``.

    python benchmarks/host_overhead.py                   # 600 arguments
    python benchmarks/host_overhead.py --args 300 --calls 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax_mpk  # noqa: E402
from decode import git_commit  # noqa: E402


def step(weights: list[jax.Array], x: jax.Array) -> jax.Array:
    """Every weight enters the result, as in a model: summed pairwise (a tree, which XLA and jax_mpk fuse)."""
    while len(weights) > 1:
        weights = [a + b for a, b in zip(weights[::2], weights[1::2])] + weights[len(weights) - len(weights) % 2 :]
    return jnp.tanh(x * weights[0] * 1e-3 + 0.5)


def generate(step_fn, steps: int):
    """The whole decode loop in one jax.jit: the step's per-call host work is paid once per ``steps``."""

    def loop(weights, x):
        return jax.lax.fori_loop(0, steps, lambda _, x: step_fn(weights, x), x)

    return jax.jit(loop)


def per_call_us(fn, weights, x, calls: int, synchronous: bool) -> float:
    start = time.perf_counter()
    if synchronous:
        for _ in range(calls):
            x = jax.block_until_ready(fn(weights, x))
    else:
        for _ in range(calls):
            x = fn(weights, x)
        jax.block_until_ready(x)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args", type=int, default=600, help="array arguments of the step")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per variant and mode")
    parser.add_argument("--loop", type=int, default=100, help="steps per call of the fori_loop variant")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.uniform(0.5, 1.0, 16).astype(np.float32)) for _ in range(args.args - 1)]
    x = jnp.asarray(rng.uniform(-1, 1, 16).astype(np.float32))
    fast = jax_mpk.megakernelize(step)
    variants = {
        "jax.jit": jax.jit(step),
        "megakernelize": fast,
        "Megakernel (jax_mpk.compile)": jax_mpk.compile(step, weights, x),
    }
    loops = {"jax.jit in fori_loop": generate(step, args.loop), "megakernelize in fori_loop": generate(fast, args.loop)}
    expected = np.asarray(variants["jax.jit"](weights, x))
    for name, fn in variants.items():  # warm: compiled, and equal
        np.testing.assert_allclose(np.asarray(fn(weights, x)), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, fn in loops.items():
        jax.block_until_ready(fn(weights, x))

    device = jnp.zeros(()).device
    print(f"{args.args} arguments, device {device.device_kind}, jax {jax.__version__}; us per call, median of "
          f"{args.repeats} rounds of {args.calls} calls")
    results = {}
    for mode in ("synchronous", "pipelined"):
        for name, fn in variants.items():
            rounds = [per_call_us(fn, weights, x, args.calls, mode == "synchronous") for _ in range(args.repeats)]
            results[f"{name}, {mode}"] = float(np.median(rounds))
        for name, fn in loops.items():  # per step of the loop
            calls = max(1, args.calls // args.loop)
            rounds = [per_call_us(fn, weights, x, calls, mode == "synchronous") / args.loop
                      for _ in range(args.repeats)]  # fmt: skip
            results[f"{name}, {mode} (per step)"] = float(np.median(rounds))
    for name, us in results.items():
        print(f"  {name:55s} {us:9.1f}")
    record = {"device": device.device_kind, "jax": jax.__version__, "commit": git_commit(), "args": args.args,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "us_per_call": results}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_overhead_{device.device_kind.replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {stem}.json, .md")
    return record


def markdown(record: dict) -> str:
    lines = [
        f"Per-call host overhead, {record['device']}, jax {record['jax']}, commit {record['commit']} "
        f"({record['date']}): a step with {record['args']} small array arguments, µs per call (median of rounds); "
        "the fori_loop variants per step of the loop.",
        "",
        "| variant | µs per call |",
        "|---|---|",
    ]
    lines += [f"| {name} | {us:.1f} |" for name, us in record["us_per_call"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
