"""Decode-step latency: jax.jit(step) against jax_mpk.megakernelize(step), in one process, on one GPU.

The step is a Llama-3.2-1B-shaped decode step in bf16 with random weights (tests/tiny_models.py), batch 1,
KV cache of --ctx positions. Each variant is warmed up, then timed as R repetitions of N chained steps (each
step feeds the next its cache, donated), with device synchronization at the end of each repetition; we
report the median and spread of the per-step time. The floor is the bytes a step must read (weights + KV)
over the read bandwidth measured on the same GPU (benchmarks/bandwidth.py).

    python benchmarks/decode_step.py --layers 16 --ctx 1024 --out benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax_mpk  # noqa: E402
from bandwidth import read_bandwidth  # noqa: E402
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step  # noqa: E402


def time_steps(step, params, cache, tokens, pos, steps: int, repeats: int) -> list[float]:
    """Per-step seconds for each repetition of ``steps`` chained calls."""
    for _ in range(3):  # warm-up (first loops in a fresh process run slower)
        for _ in range(steps):
            tokens, _, *cache = step(params, tokens, pos, *cache)
        jax.block_until_ready(cache)
    per_step = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            tokens, _, *cache = step(params, tokens, pos, *cache)
        jax.block_until_ready((tokens, cache))
        per_step.append((time.perf_counter() - start) / steps)
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant, interleaved, each with a fresh cache")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    cfg = TinyConfig(layers=args.layers, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=args.ctx, dtype="bfloat16", theta=500000.0)  # fmt: skip
    device = jax.devices()[0]
    print(f"device {device.device_kind}, jax {jax.__version__}, {cfg}", flush=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    pos = jnp.int32(args.ctx - 24)
    tokens = jnp.asarray([17], jnp.int32)
    step = make_decode_step(cfg)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    kv_bytes = 2 * cfg.layers * cfg.batch * cfg.max_seq * cfg.kv_heads * cfg.head_dim * 2
    bandwidth = read_bandwidth()["best"]
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    print(f"weights {weight_bytes / 1e9:.3f} GB, KV {kv_bytes / 1e6:.1f} MB, read bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"floor {floor_s * 1e3:.3f} ms", flush=True)

    results = {}
    xla = jax.jit(step, donate_argnums=(3, 4))
    start = time.perf_counter()
    fast = jax_mpk.megakernelize(step, donate_argnums=(3, 4))
    jax.block_until_ready(fast(params, tokens, pos, *init_cache(cfg, jax.random.PRNGKey(1))))
    cold = time.perf_counter() - start
    (megakernel,) = fast.plans.values()
    print(f"megakernel: {megakernel} (first call {cold:.1f} s)", flush=True)
    # agreement on one step before timing
    cache = init_cache(cfg, jax.random.PRNGKey(1))
    expected = xla(params, tokens, pos, *[jnp.copy(c) for c in cache])
    actual = fast(params, tokens, pos, *[jnp.copy(c) for c in cache])
    logits_error = float(jnp.linalg.norm(actual[1] - expected[1]) / jnp.linalg.norm(expected[1]))
    print(f"logits relative error vs jax.jit: {logits_error:.2e}", flush=True)
    for round_ in range(args.rounds):  # the variants take turns
        for name, fn in (("jax.jit", xla), ("megakernel", fast)):
            cache = init_cache(cfg, jax.random.PRNGKey(1))
            times = time_steps(fn, params, cache, tokens, pos, args.steps, args.repeats)
            results.setdefault(name, []).extend(times)
            print(f"  round {round_} {name:10s} median {np.median(times) * 1e3:.3f} ms/step "
                  f"[{min(times) * 1e3:.3f}, {max(times) * 1e3:.3f}]", flush=True)

    # $JAX_MPK_COMMIT first: a copy of the tree on a GPU machine may carry a stale .git
    commit = os.environ.get("JAX_MPK_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    summary = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "commit": commit or "unknown",
        "config": {"layers": cfg.layers, "ctx": cfg.max_seq, "batch": cfg.batch, "dtype": cfg.dtype},
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "read_bandwidth_Bps": bandwidth,
        "floor_ms": floor_s * 1e3,
        "megakernel": {"kernels": len(megakernel.graph.kernels), "tasks": len(megakernel.tasks.tasks),
                       "first_call_s": cold, "logits_relative_error": logits_error},  # fmt: skip
        "ms_per_step": {name: {"median": float(np.median(t)) * 1e3, "min": min(t) * 1e3, "max": max(t) * 1e3,
                               "samples": [x * 1e3 for x in t]} for name, t in results.items()},  # fmt: skip
    }
    table = ["| variant | median ms/step | min | max | % of floor speed |", "|---|---|---|---|---|"]
    for name, t in results.items():
        med = float(np.median(t))
        table.append(f"| {name} | {med * 1e3:.3f} | {min(t) * 1e3:.3f} | {max(t) * 1e3:.3f} | {100 * floor_s / med:.0f}% |")
    table.append(f"| floor (bytes / read bandwidth) | {floor_s * 1e3:.3f} | | | 100% |")
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"decode_step_{device.device_kind.replace(' ', '_')}_L{cfg.layers}_ctx{cfg.max_seq}"
        (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2))
        (args.out / f"{stem}.md").write_text(
            f"Device {device.device_kind}, jax {jax.__version__}, commit {summary['commit']}, "
            f"Llama-3.2-1B-shaped step ({cfg.layers} layers, bf16, batch 1, ctx {cfg.max_seq}).\n\n"
            + "\n".join(table) + "\n"
        )


if __name__ == "__main__":
    main()
