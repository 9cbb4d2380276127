"""Cold planning time of an example model's decode step, stage by stage, for a GPU target without a GPU.

Traces the step with abstract weights (no memory for them), then runs the pipeline megakernelize runs on a
cache miss: capture, fusion, tiling, scheduling, validation, serialization and CUDA code generation (nvcc is
not run: its time is apart, see toolchain.py's log line). Prints each stage's time (the jax_mpk logger) and,
with --profile, the functions that took the most time; with --fingerprint, the sha256 of the plan's words and of
the generated source (a change that should leave plans alone is checked by comparing them across commits); with
--levels, the task graph's critical structure: every kernel of the first layers with its dependency level, its
task count and its largest task's estimated work (a level of one small kernel on a few SMs leaves the chip idle:
the stacked cache's one-task key append and batch 8's extra levels were found this way). The environment's GPU
knobs apply as megakernelize applies them (Target.cuda: JAX_MPK_SPLIT_ATTENTION, JAX_MPK_STAGE_SHARED_ROWS,
JAX_MPK_STAGE_SHARED_POINTWISE, JAX_MPK_COMM_COPIES, JAX_MPK_STREAM_EVICT_FIRST, JAX_MPK_WARP_RING,
JAX_MPK_ELEMENT_LOADS_FIRST, JAX_MPK_SHARED_CODE, JAX_MPK_STATIC_TILES; JAX_MPK_TASK_FIXED_COST in scheduling).

    python benchmarks/planning.py --model qwen3-8b                 # H100/H200: 132 SMs, sm_90
    python benchmarks/planning.py --model qwen3-0.6b --profile 25
    python benchmarks/planning.py --model llama-3.2-1b --fingerprint
    python benchmarks/planning.py --model llama-3.2-1b --batch 8 --layers 2 --levels 30
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/planning.py --tp 2 --layers 2 --levels 20
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import logging
import os
import pstats
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import models  # noqa: E402

from jax_mpk import config  # noqa: E402
from jax_mpk.api import plan_stages  # noqa: E402
from jax_mpk.capture import find_shard_map  # noqa: E402
from jax_mpk.target import Target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", choices=sorted(models.PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--sms", type=int, default=132, help="the GPU's SM count (workers)")
    parser.add_argument("--arch", default="9.0", help="compute capability")
    parser.add_argument("--cache-layout", default="stacked", choices=["stacked", "per_layer"])
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N slowest functions")
    parser.add_argument("--fingerprint", action="store_true", help="print the sha256 of the words and the source")
    parser.add_argument("--layers", type=int, help="plan this many layers of the model (default: all)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor parallel over this many devices (one device's plan; CPU devices stand in)")
    parser.add_argument("--levels", type=int, default=0, metavar="N", help="print the kernels of the first N levels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = models.PRESETS[args.model]
    if args.layers:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    cpu_start = time.process_time()
    closed = trace_decode_step(cfg, args.batch, args.ctx, args.cache_layout, args.tp)
    traced, cpu_traced = time.perf_counter(), time.process_time()
    print(f"make_jaxpr: {traced - start:.2f} s ({cpu_traced - cpu_start:.2f} s CPU, {len(closed.eqns)} equations)")
    if args.profile:
        profiler.enable()
    stages = plan_for_gpu(closed, args.sms, args.arch)
    profiler.disable()
    plan = stages.plan
    # on a shared machine the CPU time is the steadier figure (planning runs on one thread)
    print(f"planning (not counting tracing and nvcc): {time.perf_counter() - traced:.2f} s "
          f"({time.process_time() - cpu_traced:.2f} s CPU) for {args.model} "
          f"batch {args.batch} ctx {args.ctx}: {plan.num_kernels} kernels, {plan.num_tasks} tasks, "
          f"{len(plan.input_specs) + len(plan.output_specs) + 1} buffers")
    if args.fingerprint:
        print(f"words sha256 {hashlib.sha256(plan.words.tobytes()).hexdigest()}")
        print(f"source sha256 {hashlib.sha256(plan.source.text.encode()).hexdigest()}")
    if args.levels:
        print_levels(stages, args.levels, cfg.layers)
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


def trace_decode_step(cfg: models.ModelConfig, batch: int, ctx: int, cache_layout: str = "stacked", tp: int = 1):
    """The jaxpr of ``cfg``'s decode step on abstract weights and cache (no memory for them); tensor parallel
    over the first ``tp`` devices when ``tp`` > 1."""
    weights, merge = models.split(models.abstract(cfg))
    cache = jax.eval_shape(lambda: models.init_cache(cfg, batch, ctx, layout=cache_layout))
    tokens, pos = jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    step = models.make_decode_step(merge) if tp == 1 else models.make_tp_decode_step(cfg, models.tp_mesh(tp))
    return jax.make_jaxpr(step)(weights, tokens, pos, cache)


def plan_for_gpu(closed, sms: int, arch: str):
    """megakernelize's pipeline on ``closed`` for a GPU of ``sms`` SMs and compute capability ``arch``, with the
    GPU knobs of the environment; its stages."""
    knobs = config.load()
    return plan_stages(closed, find_shard_map(closed), Target.cuda(sms, arch, knobs), knobs)


def print_levels(stages, first: int, layers: int) -> None:
    """Each kernel of the first ``first`` dependency levels: level, tasks, the largest task's estimated work."""
    by_kernel: dict[int, list[float]] = {}
    for task in stages.tasks.tasks:
        by_kernel.setdefault(task.kernel, []).append(task.cost)
    kernels = stages.graph.kernels
    levels = max(k.level for k in kernels) + 1
    print(f"{levels} dependency levels for {layers} layers (and the embedding and head)")
    for k in sorted(kernels, key=lambda k: (k.level, k.index)):
        if k.level >= first:
            break
        costs = by_kernel.get(k.index, [0.0])
        print(f"  level {k.level:3d}  kernel {k.index:4d}  {len(costs):4d} tasks  largest {max(costs):10.0f}  "
              f"{k.name[:56]}  {list(k.domain)}")


if __name__ == "__main__":
    main()
