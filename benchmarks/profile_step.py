"""Where a megakernel's time goes: per-task timestamps (JAX_MPK_PROFILE=1) per kernel, the dependency hop, and a
per-SM trace of one call.

    python benchmarks/profile_step.py --layers 2                          # tests/tiny_models.py, Llama-3.2-1B shape
    python benchmarks/profile_step.py --model qwen3-0.6b --layers 4 --trace /tmp/q.json --png /tmp/q.png
    python benchmarks/profile_step.py --model qwen3-8b --tp 2 --trace /tmp/tp.json      # a table per device

Prints, per kernel of the first layers: tasks, the kernel's span (first start to last end), the mean time a task
runs (start to signalled) and waits, and its run split into phases (product bodies: staging, the product, the
epilogue; every body: the release fence and signal); the dependency hop (a task's start after its last
dependency signalled, over every task that was already waiting: median and p90); then the whole call's span. ``--trace`` writes a
Chrome/Perfetto JSON trace (one track per SM; https://ui.perfetto.dev), ``--png`` a picture of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys

os.environ["JAX_MPK_PROFILE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))
import jax_mpk  # noqa: E402
from jax_mpk.layout import PROFILE_STAMPS  # noqa: E402
from jax_mpk.trace import PHASES, dependency_hops, task_times  # noqa: E402


def tiny_models_step(layers: int, ctx: int, batch: int):
    from tiny_models import TinyConfig, init_cache, init_params, make_decode_step

    cfg = TinyConfig(layers=layers, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=ctx, batch=batch, dtype="bfloat16", theta=500000.0)  # fmt: skip
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, jax.random.PRNGKey(1))
    return make_decode_step(cfg), (params, jnp.arange(batch, dtype=jnp.int32) + 5, jnp.int32(ctx - 10), *cache)


def flax_step(name: str, layers: int, ctx: int, batch: int, tp: int = 1):
    """A preset's decode step; with ``tp`` > 1, tensor parallel over the first ``tp`` devices (one shard_map)."""
    import models

    config = dataclasses.replace(models.PRESETS[name], layers=layers)
    weights, merge = models.split(models.create(config))
    cache = models.init_cache(config, batch, ctx, jax.random.PRNGKey(1))
    tokens = jnp.arange(batch, dtype=jnp.int32) + 5
    if tp == 1:
        return models.make_decode_step(merge), (weights, tokens, jnp.int32(ctx - 1), cache)
    if len(jax.devices()) < tp:
        raise SystemExit(f"--tp {tp} needs {tp} devices, this machine has {len(jax.devices())}")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:tp]), ("tp",))
    weights, cache = models.tp_shard(mesh, config, weights, cache)
    return models.make_tp_decode_step(config, mesh), (weights, tokens, jnp.int32(ctx - 1), cache)


def kernel_kind(label: str) -> str:
    """A colour class for a trace slice named "k<index> <kernel name>"."""
    name = label.split(" ", 1)[1]
    for kind in ("dot", "update_slice", "reduce"):
        if name.startswith(kind) or f"|{kind}" in name or f"+{kind}" in name:
            return kind
    return "other"


def render(trace_path: str, png_path: str, title: str) -> None:
    """A picture of a trace: one row per SM, a bar per task (colour per kernel kind), waits left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in json.load(open(trace_path))["traceEvents"]
              if e.get("ph") == "X" and e["cat"] == "run" and e["pid"] == 0]  # fmt: skip
    colours = {"dot": "tab:blue", "update_slice": "tab:green", "reduce": "tab:orange", "other": "tab:gray"}
    bars: dict[tuple[str, int], list] = {}
    for e in events:
        bars.setdefault((kernel_kind(e["name"]), e["tid"]), []).append((e["ts"], e["dur"]))
    fig, ax = plt.subplots(figsize=(16, 7))
    labelled = set()
    for (kind, worker), spans in sorted(bars.items()):
        ax.broken_barh(spans, (worker - 0.4, 0.8), color=colours[kind], label=None if kind in labelled else kind)
        labelled.add(kind)
    ax.set_xlabel("µs from the first wait")
    ax.set_ylabel("SM")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-llama-1b",
                        help="a preset of examples/models.py, or tiny-llama-1b (tests/tiny_models.py, the default)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor parallel over this many devices (a preset of examples/models.py): a table per "
                             "device, and a process per device in the trace")  # fmt: skip
    parser.add_argument("--show", type=int, default=40)
    parser.add_argument("--trace", help="write a Chrome/Perfetto trace of the last profiled call here")
    parser.add_argument("--png", help="and a picture of it here")
    args = parser.parse_args()
    if args.model == "tiny-llama-1b":
        if args.tp != 1:
            parser.error("--tp needs a preset of examples/models.py (--model)")
        step, call_args = tiny_models_step(args.layers, args.ctx, args.batch)
    else:
        step, call_args = flax_step(args.model, args.layers, args.ctx, args.batch, args.tp)
    mk = jax_mpk.compile(step, *call_args)
    for _ in range(5):
        jax.block_until_ready(mk(*call_args))
    if args.tp > 1:  # profile() logs how far each device's timer was moved onto device 0's
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = [mk.profile(*call_args, trace=args.trace, phases=True) for _ in range(3)]
    runs = [r if args.tp > 1 else r[None] for r in runs]
    for rank in range(len(runs[-1])):
        if args.tp > 1:
            print(f"--- device {rank}")
        summarize(mk, runs[-1][rank], [r[rank] for r in runs], args.show, mk.profile_sms[rank])
    if args.trace and args.png:
        tp = f", tp {args.tp} (device 0)" if args.tp > 1 else ""
        render(args.trace, args.png, f"{args.model}, {args.layers} layers, batch {args.batch}, ctx {args.ctx}{tp}: {mk}")
        print(f"wrote {args.trace} and {args.png}")


def summarize(mk, stamps: np.ndarray, runs: list[np.ndarray], show: int, sms: np.ndarray) -> None:
    """The call's span, the dependency hop and the per-kernel table of one device's profile (``stamps``: every
    stamp of layout.PROFILE_STAMPS per task). A task's run splits into its phases where its body marks them:
    staging (start to staged), the product (staged to computed), the epilogue (to the body's end) and the
    release fence and signal (to signalled). Then the workers whose product phases are the slowest against the
    median task of the same kernel, with the physical SM each ran on (``sms``): slow SMs that are the same
    physical ones in every call would be a property of the chip a schedule could plan for."""
    tasks = mk.tasks.tasks
    start, staged, body_end, signalled = (PROFILE_STAMPS.index(n) for n in ("start", "staged", "body_end", "signalled"))
    times = task_times(stamps)
    print(f"{mk}\ncall span {times[:, 2].max():.1f} us (runs: {[round(float(task_times(r)[:, 2].max()), 1) for r in runs]})")
    hops = dependency_hops(times, [t.deps for t in tasks])
    if len(hops):
        print(f"dependency hop (start after the last dependency signalled, {len(hops)} waiting tasks): median "
              f"{np.median(hops):.2f} us, p10 {np.percentile(hops, 10):.2f}, p90 {np.percentile(hops, 90):.2f}")
    phases = " ".join(f"{name[:5]:>5s}" for name, _, _ in PHASES)
    print(f"{'kernel':55s} {'tasks':>5s} {'first':>8s} {'last':>8s} {'span':>7s} {'run':>6s} {'wait':>6s}  {phases}")
    for kernel in mk.graph.kernels[:show]:
        rows = np.array([t.index for t in tasks if t.kernel == kernel.index])
        if not len(rows):
            continue
        t, s = times[rows], stamps[rows]
        if np.isnan(s[:, staged]).any():  # the body does not mark its phases: the whole body, then the signal
            split = f"{'':11s} {np.mean(s[:, body_end] - s[:, start]):5.1f} {np.mean(s[:, signalled] - s[:, body_end]):5.1f}"
        else:
            split = " ".join(f"{np.mean(s[:, last] - s[:, first]):5.1f}" for _, first, last in PHASES)
        print(f"{kernel.index:3d} {kernel.name[:50]:51s} {len(rows):5d} {t[:, 1].min():8.1f} {t[:, 2].max():8.1f} "
              f"{t[:, 2].max() - t[:, 1].min():7.1f} {np.mean(t[:, 2] - t[:, 1]):6.2f} {np.mean(t[:, 1] - t[:, 0]):6.2f}  {split}")

    slowest_workers(mk, stamps, sms)


def slowest_workers(mk, stamps: np.ndarray, sms: np.ndarray, count: int = 8, min_tasks: int = 64) -> None:
    """The ``count`` workers whose product phases (staged to computed) take longest relative to their kernel's
    median, over the kernels of at least ``min_tasks`` tasks (a level of products: the same work on every SM), with
    the planned work of their tasks relative to their kernels' medians: a slow worker with an average plan is slow
    for when it starts or where it runs, not for what it reads (session 13: the same workers were slowest in two
    processes, on other physical SMs each time, with planned work 0.94-1.00)."""
    staged, computed = PROFILE_STAMPS.index("staged"), PROFILE_STAMPS.index("computed")
    worker_of = {task: w for w, order in enumerate(mk.schedule.workers) for task in order}
    ratios: dict[int, list[float]] = {}
    planned: dict[int, list[float]] = {}
    for tasks in mk.tasks.tasks_by_kernel():
        product = np.array([stamps[t.index, computed] - stamps[t.index, staged] for t in tasks])
        if len(tasks) < min_tasks or np.isnan(product).any():
            continue
        median, median_cost = np.median(product), np.median([t.cost for t in tasks])
        for t, p in zip(tasks, product):
            ratios.setdefault(worker_of[t.index], []).append(p / median)
            planned.setdefault(worker_of[t.index], []).append(t.cost / median_cost)
    if ratios:
        mean = sorted(((np.mean(r), w) for w, r in ratios.items()), reverse=True)[:count]
        print("slowest workers in the products (mean product phase / its kernel's median, and planned work / its "
              "kernel's median; worker (physical SM)): "
              + ", ".join(f"{w} ({int(sms[w])}): {m:.2f} (plan {np.mean(planned[w]):.2f})" for m, w in mean))


if __name__ == "__main__":
    main()
