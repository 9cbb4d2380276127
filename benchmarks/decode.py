"""Decode latency of the Flax NNX models in examples/: jax.jit(step) against jax_mpk.megakernelize(step).

For each model x batch x context, both variants run in this process on the default device (jax.devices()[0]):

* compile: the first call of jax.jit(step); the first call of megakernelize(step) with an empty jax_mpk cache
  (cold: trace, plan, nvcc on a GPU, load); the first call of a second megakernelize(step) on that now filled
  cache (warm: trace, then the plan and the cubin come from the cache). Each first call includes one step.
* agreement: --check-steps steps from the same random cache, positions ctx - n .. ctx - 1; the relative L2
  error of the megakernel's logits against jax.jit's on every step (tolerance: float32 1e-5, bfloat16 5e-2,
  the bf16 noise of a deep model, see docs/notes/cuda_megakernel.md) and whether the greedy tokens are equal.
  bfloat16 models also run in float32 (same weights and cache, upcast; XLA): both variants' errors against it
  are reported, and the megakernel agrees as well when its error is at most 1.5 times XLA's.
  Both variants continue from jax.jit's tokens, so that one near-tie cannot fork the comparison.
* time: --repeats rounds; in each, every variant runs --chains chains of --steps chained steps (each step feeds
  the next its tokens and donated cache; one device synchronization per chain: the latency of a decode loop whose
  host runs ahead), --chains calls of a jitted `lax.fori_loop` over --steps steps (`jax.jit_fori`,
  `megakernel_fori`: no host work between steps), and --steps steps each synchronized on its own (which adds the
  per-call host work). Every step attends over the whole context (position ctx - 1). `ms` holds the medians of the
  chained and fori forms; all samples are kept with p10/p90.
* floor: the bytes a step must read (every weight, but only the batch's rows of an untied embedding table;
  keys and values of ctx positions for every layer and sequence) over the read bandwidth measured on the same
  device in this run (benchmarks/bandwidth.py: streaming reductions over 4 GiB, best of 10; the better of XLA's
  and, when present, PyTorch's). Reported with it: % of floor and the overhead per layer,
  (step - floor) / layers.
* --tp N (or a list, --tp 1,2: every degree in one process, for a like-for-like comparison of one device
  against N): the tensor-parallel step (models.make_tp_decode_step) over the first N devices of the default
  device's platform, weights and cache placed on them once; both variants run it (the megakernel: one per
  device, with collectives inside it). The floor is then bytes per device / bandwidth
  of one device (the devices read in parallel): the weights and KV divided by N (the embedding table and the
  output head along the vocabulary), except that the norms are read whole by every device. On the CPU, N devices need
  XLA_FLAGS=--xla_force_host_platform_device_count=N (they share the host's memory bandwidth, so a CPU floor
  for N > 1 is optimistic).
* --prewarm: each megakernel of the run (the default's and every --variant's, one-device configurations) is
  planned and compiled first by a process of its own, half the CPUs' worth side by side, into the jax_mpk cache,
  while this process measures the bandwidth, makes the weights and compiles jax.jit; its megakernels then load from
  the cache (first-call times are not measured). Planning and nvcc cost ~30 s a megakernel one after another.

Results go to --out as decode_<device>.json (merged with the entries already there, so that configurations
can be run in separate processes), a Markdown table (.md) and a chart (.png, when matplotlib is installed), each
configuration as soon as it is measured (a run stopped later keeps it).

    python benchmarks/decode.py                        # GPU: the three full models; CPU: their tiny stand-ins
    python benchmarks/decode.py --models qwen3-8b --batch 1 --ctx 1024
    python benchmarks/decode.py --quick                # a smoke run: one small configuration per model
    python benchmarks/decode.py --models llama-3.2-1b --batch 1 --ctx 1024 --prewarm --variant shared:JAX_MPK_SHARED_CODE=1
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/decode.py --quick --tp 1,2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import jax_mpk  # noqa: E402
from jax_mpk.config import overridden  # noqa: E402
import models  # noqa: E402
from bandwidth import read_bandwidth  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}
FLOAT32_SLACK = 1.5  # bf16: the megakernel's logits error against float32, at most this times XLA's
QUICK = {"batch": [1], "ctx": [128], "steps": 10, "repeats": 1, "check_steps": 4}
DEFAULTS = {"batch": [1, 8], "ctx": [1024, 4096], "steps": 100, "repeats": 2, "check_steps": 8}
PREWARM_TIMEOUT_S = 900  # a --prewarm process (Qwen3-8B plans and compiles in ~1-2 minutes)


@contextlib.contextmanager
def progress(label: str, every_s: float = 10.0) -> Iterator[None]:
    """Print ``label``, then a heartbeat every ``every_s`` seconds while the body runs."""
    print(f"  {label} ...", flush=True)
    start = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            print(f"    {label}: {time.perf_counter() - start:.0f} s", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def first_call_s(fn: Callable, *args) -> float:
    """Seconds of ``fn``'s first call (compilation and one step), until its results are ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def fresh_cache(config: models.ModelConfig, batch: int, ctx: int, mesh=None, layout: str = "stacked") -> models.KVCache:
    """The same random cache every time, in ``layout`` (models.CACHE_LAYOUTS); with a TP ``mesh``, placed on it
    (each device its KV heads)."""
    cache = models.init_cache(config, batch, ctx, jax.random.PRNGKey(1), layout=layout)
    return cache if mesh is None else models.tp_shard(mesh, config, cache=cache)[1]


def chain(fn: Callable, weights, tokens, pos, cache, steps: int):
    """``steps`` chained calls (each feeds the next its tokens and donated cache), then one synchronization."""
    for _ in range(steps):
        tokens, _, cache = fn(weights, tokens, pos, cache)
    return jax.block_until_ready((tokens, cache))


def time_chained(fn: Callable, weights, tokens, pos, cache, steps: int, warmup: int):
    """Seconds per step of ``steps`` chained calls with one device synchronization at the end: the latency a
    decode loop sees when the host runs ahead."""
    tokens, cache = chain(fn, weights, tokens, pos, cache, warmup)
    start = time.perf_counter()
    tokens, cache = chain(fn, weights, tokens, pos, cache, steps)
    return (time.perf_counter() - start) / steps, tokens, cache


def fori_steps(step: Callable, steps: int) -> Callable:
    """One jitted call that runs ``steps`` decode steps in a ``lax.fori_loop`` (no host work between steps),
    with the same signature as ``step`` and the cache donated."""

    def run(weights, tokens, pos, cache):
        def body(_, carry):
            tokens, cache = carry
            tokens, _, cache = step(weights, tokens, pos, cache)
            return tokens, cache

        tokens, cache = jax.lax.fori_loop(0, steps, body, (tokens, cache))
        return tokens, None, cache

    return jax.jit(run, donate_argnums=(3,))


def time_steps(fn: Callable, weights, tokens, pos, cache, steps: int, warmup: int):
    """Seconds of each of ``steps`` chained calls, each synchronized; returns them with the final state."""
    tokens, cache = chain(fn, weights, tokens, pos, cache, warmup)
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens, _, cache = jax.block_until_ready(fn(weights, tokens, pos, cache))
        samples.append(time.perf_counter() - start)
    return samples, tokens, cache


def megakernel_first_calls(step: Callable, weights, tokens, pos, fresh: Callable, warm_too: bool,
                           prewarmed: bool = False):  # fmt: skip
    """The megakernelized step and the seconds of its first call with an empty jax_mpk cache (trace, plan,
    nvcc, load), and, with ``warm_too``, of a second wrapper's first call on that filled cache (no nvcc). With
    ``prewarmed`` (--prewarm: a process has put its plan in the jax_mpk cache) neither: its first call loads it."""
    if prewarmed:
        fast = jax_mpk.megakernelize(step, donate_argnums=(3,))
        with progress("megakernel: first call, prewarmed cache"):
            first_call_s(fast, weights, tokens, pos, fresh())
        return fast, None, None
    cache_dir = tempfile.mkdtemp(prefix="jax_mpk_cold_")
    previous = os.environ.get("JAX_MPK_CACHE_DIR")
    os.environ["JAX_MPK_CACHE_DIR"] = cache_dir
    try:
        fast = jax_mpk.megakernelize(step, donate_argnums=(3,))
        with progress("megakernel: first call, empty cache"):
            cold = first_call_s(fast, weights, tokens, pos, fresh())
        warm = None
        if warm_too:
            fast = jax_mpk.megakernelize(step, donate_argnums=(3,))
            with progress("megakernel: first call, warm cache"):
                warm = first_call_s(fast, weights, tokens, pos, fresh())
    finally:
        if previous is None:
            os.environ.pop("JAX_MPK_CACHE_DIR")
        else:
            os.environ["JAX_MPK_CACHE_DIR"] = previous
        shutil.rmtree(cache_dir, ignore_errors=True)
    return fast, cold, warm


def prewarm_one(spec: str) -> None:
    """``MODEL:BATCH:CTX:DTYPE:LAYOUT``: plan and compile the megakernel of that configuration's decode step for
    this process's knobs, on abstract weights (no memory for them), into the jax_mpk cache; the run that started
    this process then loads it instead of planning and running nvcc itself."""
    model, batch, ctx, dtype, layout = spec.split(":")
    config = dataclasses.replace(models.PRESETS[model], dtype=dtype)
    weights, merge = models.split(models.abstract(config))
    cache = jax.eval_shape(lambda: fresh_cache(config, int(batch), int(ctx), layout=layout))
    tokens, pos = jax.ShapeDtypeStruct((int(batch),), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    jax_mpk.compile(models.make_decode_step(merge), weights, tokens, pos, cache)


def start_prewarms(args) -> dict[tuple, concurrent.futures.Future]:
    """With --prewarm: a process per megakernel this run will make (every one-device configuration, the default
    and each --variant), half the CPUs' worth at a time, started now: planning and nvcc take ~30 s a megakernel,
    one after another in this process otherwise. Keyed by (model, batch, ctx, variant name or None); each
    future gives the process's exit status and the end of its error output."""
    if not args.prewarm or 1 not in args.tp:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2), thread_name_prefix="prewarm")
    started = {}
    for name in args.models:
        dtype = args.dtype or models.PRESETS[name].dtype
        for batch in args.batch:
            for ctx in args.ctx:
                for variant, knobs in [(None, {}), *args.variant.items()]:
                    env = {**os.environ, **knobs, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
                    spec = f"{name}:{batch}:{ctx}:{dtype}:{args.cache_layout}"
                    command = [sys.executable, __file__, "--prewarm-one", spec]
                    started[name, batch, ctx, variant] = pool.submit(
                        subprocess.run, command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True, timeout=PREWARM_TIMEOUT_S)  # fmt: skip
    pool.shutdown(wait=False)  # the submitted ones still run; nothing more is submitted
    return started


def await_prewarm(prewarms: dict[tuple, concurrent.futures.Future], key: tuple) -> bool:
    """Wait for the prewarm of ``key``; whether one was started. One that failed is reported, and this process
    plans that megakernel itself."""
    if key not in prewarms:
        return False
    try:
        done = prewarms.pop(key).result()
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        failure = f"exit {done.returncode}: {tail}" if done.returncode else ""
    except subprocess.TimeoutExpired:
        failure = f"no result in {PREWARM_TIMEOUT_S} s"
    if failure:
        print(f"  prewarm {key} failed ({failure}); planned here instead", flush=True)
    return True


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME:KNOB=VALUE[,KNOB=VALUE...]`` -> (name, knobs); ValueError naming what is wrong."""
    name, _, assignments = spec.partition(":")
    knobs = dict(a.split("=", 1) for a in assignments.split(",") if "=" in a)
    if not name or not knobs or len(knobs) != len(assignments.split(",")):
        raise ValueError(f"--variant {spec!r}: expected NAME:KNOB=VALUE[,KNOB=VALUE...]")
    if not all(k.startswith("JAX_MPK_") for k in knobs):
        raise ValueError(f"--variant {spec!r}: only jax_mpk's knobs (JAX_MPK_...) make a megakernel variant")
    return name, knobs


def agreement(xla: Callable, fast: Callable, weights, tokens, config: models.ModelConfig, batch: int, ctx: int,
              steps: int, mesh=None, layout: str = "stacked") -> dict[str, Any]:  # fmt: skip
    """Compare the two variants over ``steps`` steps at positions ctx - steps .. ctx - 1.

    For bfloat16 models both are also compared with a float32 run of the same weights and cache (XLA,
    float32 products): bf16 rounding of a deep model's activations alone moves the logits by a few percent,
    so the megakernel also agrees when its error against float32 is no larger than FLOAT32_SLACK times
    XLA's own."""
    # XLA's GPU default for float32 products is TF32; the megakernel computes them in float32
    precision = jax.default_matmul_precision("float32") if config.dtype == "float32" else contextlib.nullcontext()
    ref_cache, cache = fresh_cache(config, batch, ctx, mesh, layout), fresh_cache(config, batch, ctx, mesh, layout)
    exact = None
    if config.dtype != "float32":
        exact_weights = [w.astype(jnp.float32) for w in weights]
        exact_cache = jax.tree.map(lambda a: a.astype(jnp.float32), fresh_cache(config, batch, ctx, mesh, layout))
        exact = {"xla": [], "megakernel": []}
    errors, tokens_equal = [], 0
    for pos in range(ctx - steps, ctx):
        with precision:
            ref_tokens, ref_logits, ref_cache = xla(weights, tokens, jnp.int32(pos), ref_cache)
        fast_tokens, logits, cache = fast(weights, tokens, jnp.int32(pos), cache)
        errors.append(relative_error(logits, ref_logits))
        if exact is not None:
            with jax.default_matmul_precision("float32"):
                _, exact_logits, exact_cache = xla(exact_weights, tokens, jnp.int32(pos), exact_cache)
            exact["xla"].append(relative_error(ref_logits, exact_logits))
            exact["megakernel"].append(relative_error(logits, exact_logits))
        tokens_equal += bool(np.array_equal(np.asarray(fast_tokens), np.asarray(ref_tokens)))
        tokens = ref_tokens
    tolerance = TOLERANCE[config.dtype]
    agree = max(errors) <= tolerance
    result = {"steps": steps, "logits_relative_error": errors, "max_logits_relative_error": max(errors),
              "tolerance": tolerance, "steps_with_equal_tokens": tokens_equal}  # fmt: skip
    if exact is not None:
        result["relative_error_vs_float32"] = exact
        agree = agree or max(exact["megakernel"]) <= FLOAT32_SLACK * max(exact["xla"])
    result["agree"] = agree and (config.dtype != "float32" or tokens_equal == steps)
    return result


def relative_error(actual, expected) -> float:
    """Relative L2 error (inf when ``actual`` is not finite)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def stats(samples: Sequence[float]) -> dict[str, Any]:
    ms = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "samples_ms": [round(float(x), 4) for x in ms]}  # fmt: skip


def floor_bytes(config: models.ModelConfig, weights, batch: int, ctx: int, tp: int = 1) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read; tensor parallel over ``tp`` devices, those of one
    device: 1/tp of each split weight (the embedding and head along the vocabulary) and of the KV cache, every
    replicated weight (the norms) whole."""
    itemsize = jnp.dtype(config.dtype).itemsize
    split = [any(spec) for spec in models.tp_weight_specs(config)] if tp > 1 else [False] * len(weights)
    weight_bytes = sum(w.nbytes // (tp if s else 1) for w, s in zip(weights, split))
    if not config.tied:  # of the embedding table (a device's share of it) only the batch's rows are read, at most
        weight_bytes -= (config.vocab // tp - batch) * config.hidden * itemsize
    kv_bytes = 2 * config.layers * batch * ctx * config.kv_heads * config.head_dim * itemsize // tp
    return weight_bytes, kv_bytes


def run_config(model: str, config: models.ModelConfig, weights, merge, batch: int, ctx: int, args,
               bandwidth: float, mesh=None, prewarms: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Compile, check and time both variants for one configuration (tensor parallel over ``mesh`` when given:
    ``weights`` are then already placed on it, and ``merge`` is unused). ``prewarms``: start_prewarms's
    processes, awaited before each megakernel's first call (one-device configurations only)."""
    prewarms = prewarms if mesh is None and prewarms is not None else {}
    tp = 1 if mesh is None else mesh.size
    weight_bytes, kv_bytes = floor_bytes(config, weights, batch, ctx, tp)
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    per_device = " per device" if tp > 1 else ""
    print(f"  weights {weight_bytes / 1e6:.1f} MB, KV {kv_bytes / 1e6:.1f} MB{per_device}, floor {floor_ms:.3f} ms",
          flush=True)  # fmt: skip
    step = models.make_decode_step(merge) if mesh is None else models.make_tp_decode_step(config, mesh)
    fresh = lambda: fresh_cache(config, batch, ctx, mesh, args.cache_layout)  # noqa: E731
    tokens = jnp.asarray(np.random.default_rng(batch).integers(0, config.vocab, batch), jnp.int32)
    if mesh is not None:  # replicated on the mesh, as the step returns them (else the second call compiles again)
        tokens = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec()))
    pos = jnp.int32(ctx - 1)

    xla = jax.jit(step, donate_argnums=(3,))
    with progress("jax.jit: first call"):
        xla_compile = first_call_s(xla, weights, tokens, pos, fresh())
    print(f"  jax.jit: first call {xla_compile:.1f} s", flush=True)
    prewarmed = await_prewarm(prewarms, (model, batch, ctx, None))
    fast, cold, warm = megakernel_first_calls(step, weights, tokens, pos, fresh, args.compile_times, prewarmed)
    (plan,) = fast.plans.values()
    first = "from the prewarmed cache" if cold is None else f"{cold:.1f} s cold{f', {warm:.1f} s warm' if warm else ''}"
    print(f"  megakernel: first call {first}: {plan}", flush=True)

    check = agreement(xla, fast, weights, tokens, config, batch, ctx, args.check_steps, mesh, args.cache_layout)
    print(f"  agreement over {check['steps']} steps: max logits relative error "
          f"{check['max_logits_relative_error']:.2e} (tolerance {check['tolerance']:.0e}; against float32, jax.jit / "
          f"megakernel: {versus_float32(check)}), greedy tokens equal in "
          f"{check['steps_with_equal_tokens']}/{check['steps']} steps{'' if check['agree'] else '  DISAGREE'}",
          flush=True)  # fmt: skip

    variants = {"jax.jit": xla, "megakernel": fast}
    variant_agreement = {}
    for name, knobs in args.variant.items():  # the same step planned with other knobs, timed in the same rounds
        await_prewarm(prewarms, (model, batch, ctx, name))
        with overridden(knobs):
            variant = jax_mpk.megakernelize(step, donate_argnums=(3,))
            with progress(f"megakernel[{name}]: first call"):
                first_call_s(variant, weights, tokens, pos, fresh())
        variant_agreement[name] = agreement(xla, variant, weights, tokens, config, batch, ctx, args.check_steps, mesh,
                                            args.cache_layout)  # fmt: skip
        # a knob this model's plan does not react to gives the default's kernel again: timing it compares nothing
        variant_agreement[name]["same_plan_as_default"] = same = {m.key for m in variant.plans.values()} == {plan.key}
        variant_agreement[name]["plan_from_cache"] = all(m.from_cache for m in variant.plans.values())
        print(f"  megakernel[{name}] ({', '.join(f'{k}={v}' for k, v in knobs.items())}): agreement "
              f"{'yes' if variant_agreement[name]['agree'] else 'NO'}"
              f"{'; THE SAME PLAN AS THE DEFAULT: the knob changes nothing here' if same else ''}", flush=True)  # fmt: skip
        variants[f"megakernel[{name}]"] = variant
    fori = {f"{name}_fori": fori_steps(fn, args.steps) for name, fn in variants.items()}
    chained: dict[str, list[float]] = {name: [] for name in [*variants, *fori]}
    synced: dict[str, list[float]] = {name: [] for name in variants}
    cache = fresh()  # one chain of donated caches through every variant
    for name, fn in fori.items():
        with progress(f"{name}: first call"):
            tokens, _, cache = jax.block_until_ready(fn(weights, tokens, pos, cache))
    for round_ in range(args.repeats):
        for name, fn in variants.items():
            for _ in range(args.chains):
                per_step, tokens, cache = time_chained(fn, weights, tokens, pos, cache, args.steps, args.warmup)
                chained[name].append(per_step)
            for _ in range(args.chains):
                start = time.perf_counter()
                tokens, _, cache = jax.block_until_ready(fori[f"{name}_fori"](weights, tokens, pos, cache))
                chained[f"{name}_fori"].append((time.perf_counter() - start) / args.steps)
            times, tokens, cache = time_steps(fn, weights, tokens, pos, cache, args.steps, args.warmup)
            synced[name].extend(times)
        print(f"  round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{name} {np.median(v[-args.chains:]) * 1e3:.3f}" for name, v in chained.items()) + " ms/step (chained); "
            + ", ".join(f"{name} {np.median(v[-args.steps:]) * 1e3:.3f}" for name, v in synced.items())
            + " ms (each step synchronized)", flush=True)  # fmt: skip
    ms = {name: float(np.median(v)) * 1e3 for name, v in chained.items()}
    best_xla = min(ms["jax.jit"], ms["jax.jit_fori"])
    best_mk = min(ms["megakernel"], ms["megakernel_fori"])
    result = {
        "model": model, "tp": tp, "batch": batch, "ctx": ctx, "dtype": config.dtype, "layers": config.layers,
        "cache_layout": args.cache_layout,
        "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "read_bandwidth_Bps": bandwidth, "floor_ms": floor_ms,
        "ms": ms,
        "chained": {name: stats(v) for name, v in chained.items()},
        "synced": {name: stats(v) for name, v in synced.items()},
        "pct_of_floor": {name: 100 * floor_ms / v for name, v in ms.items()},
        "per_layer_overhead_us": {name: (v - floor_ms) * 1e3 / config.layers for name, v in ms.items()},
        "speedup_over_best_xla": best_xla / best_mk,
        "first_call_s": {"jax.jit": xla_compile, "megakernel_cold": cold, "megakernel_warm": warm},
        "megakernel_plan": {"kernels": plan.call_plan.num_kernels, "tasks": plan.call_plan.num_tasks,
                            "workers": plan.num_workers, "from_cache": plan.from_cache},
        "agreement": check,
    }  # fmt: skip
    if variant_agreement:
        result["variants"] = {name: {"knobs": args.variant[name], "agreement": variant_agreement[name]}
                              for name in args.variant}  # fmt: skip
    print(f"  => floor {floor_ms:.3f} ms; " + ", ".join(
        f"{name} {v:.3f} ms ({result['pct_of_floor'][name]:.0f}%)" for name, v in ms.items())
        + f"; megakernel over the better jax.jit: {result['speedup_over_best_xla']:.2f}x", flush=True)  # fmt: skip
    return result


def git_commit() -> str:
    """The commit benchmarked: $JAX_MPK_COMMIT (for a copy of the tree without .git), else git's HEAD."""
    if os.environ.get("JAX_MPK_COMMIT"):
        return os.environ["JAX_MPK_COMMIT"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def markdown(results: list[dict[str, Any]], device: str) -> str:
    runs = sorted({f"commit {r['commit']}, jax {r['jax']}" for r in results})
    lines = [
        f"Decode step, {device}; {'; '.join(runs)}. ms = ms per decode step (every sequence of the batch gets a "
        "token), median over repetitions of chained steps (one synchronization per chain); `_fori`: the steps in a "
        "`lax.fori_loop` inside one jit. floor = bytes read (weights + KV) / read bandwidth measured in the same run "
        "(a streaming reduction; tp > 1: the bytes of one device). overhead = (megakernel - floor) / layers. "
        "first calls: jax.jit, megakernel with an empty jax_mpk cache (-: planned beforehand, --prewarm).",
        "",
        "| model | tp | batch | ctx | read TB/s | floor ms | jax.jit | jax.jit_fori | megakernel | megakernel_fori | "
        "mk % floor | overhead µs/layer | mk vs better jit | first call s: jit / mk | logits err vs float32: jit / mk "
        "| equal tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms, a, first = r["ms"], r["agreement"], r["first_call_s"]
        lines.append(
            f"| {r['model']}{' (per-layer cache)' if r.get('cache_layout') == 'per_layer' else ''} | {r.get('tp', 1)} "
            f"| {r['batch']} | {r['ctx']} | {r['read_bandwidth_Bps'] / 1e12:.2f} "
            f"| {r['floor_ms']:.3f} | {ms['jax.jit']:.3f} | {ms['jax.jit_fori']:.3f} | {ms['megakernel']:.3f} "
            f"| {ms['megakernel_fori']:.3f} | {r['pct_of_floor']['megakernel']:.0f}% "
            f"| {r['per_layer_overhead_us']['megakernel']:.1f} | {r['speedup_over_best_xla']:.2f}x "
            f"| {first['jax.jit']:.1f} / {_seconds(first['megakernel_cold'])} "
            f"| {versus_float32(a)}{'' if a['agree'] else ' (DISAGREE)'} | {a['steps_with_equal_tokens']}/{a['steps']} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"  # None: not timed (--prewarm)


def versus_float32(check: dict[str, Any]) -> str:
    """The largest errors of both variants' logits against the float32 run, when there was one."""
    exact = check.get("relative_error_vs_float32")
    return f"{max(exact['xla']):.1e} / {max(exact['megakernel']):.1e}" if exact else "-"


def chart(results: list[dict[str, Any]], device: str, path: pathlib.Path) -> bool:
    """ms/token of jax.jit and the megakernel (median, p10-p90 whiskers) and the floor per configuration, one
    panel per model; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    series = [(name, lambda r, name=name: r["ms"][name], name) for name in ("jax.jit", "jax.jit_fori", "megakernel")]
    series.append(("floor", lambda r: r["floor_ms"], None))
    for ax, name in zip(axes[0], names):
        rows = [r for r in results if r["model"] == name]
        x = np.arange(len(rows))
        for i, (label, value, spread) in enumerate(series):
            heights = np.asarray([value(r) for r in rows])
            yerr = None
            if spread is not None:  # p10 .. p90
                yerr = np.abs(np.asarray([[r["chained"][spread]["p10_ms"], r["chained"][spread]["p90_ms"]]
                                          for r in rows]).T - heights)  # fmt: skip
            ax.bar(x + (i - 1.5) * 0.2, heights, width=0.2, yerr=yerr, capsize=2, label=label)
        ax.set_xticks(x, [f"{_tp_label(r)}b{r['batch']}\nctx {r['ctx']}" for r in rows])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(f"{name} ({rows[0]['dtype']})")
        ax.set_ylabel("ms / token")
    axes[0][0].legend()
    fig.suptitle(f"Decode step on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tp_label(result: dict[str, Any]) -> str:
    return f"tp{result['tp']} " if result.get("tp", 1) > 1 else ""


def write_outputs(results: list[dict[str, Any]], device: str, out: pathlib.Path) -> None:
    """Merge ``results`` into out/decode_<device>.json (a rerun of a configuration replaces it); write the
    table and the chart of all of them."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode_{device.replace(' ', '_')}"
    key = lambda r: (r["model"], r.get("tp", 1), r["batch"], r["ctx"], r["dtype"], r.get("cache_layout", "stacked"))  # noqa: E731
    merged = {}
    if stem.with_suffix(".json").exists():
        previous = json.loads(stem.with_suffix(".json").read_text())["results"]
        # entries of the format before the read-bandwidth floor (no "ms") stay in git history only
        merged = {key(r): r for r in previous if "ms" in r}
        if len(merged) < len(previous):
            print(f"dropped {len(previous) - len(merged)} entries of the old format (copy-bandwidth floor) from {stem}.json")
    merged.update({key(r): r for r in results})
    ordered = sorted(merged.values(), key=key)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "results": ordered}, indent=1))
    stem.with_suffix(".md").write_text(markdown(ordered, device))
    drawn = chart(ordered, device, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md{', .png' if drawn else ' (no chart: matplotlib is not installed)'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--models", type=lambda s: s.split(","), default=None,
                        help="comma-separated presets (default: llama-3.2-1b,qwen3-0.6b,qwen3-8b; without a GPU, "
                             "their tiny stand-ins)")  # fmt: skip
    parser.add_argument("--batch", type=ints, help=f"comma-separated batch sizes (default {DEFAULTS['batch']})")
    parser.add_argument("--ctx", type=ints, help=f"comma-separated context lengths (default {DEFAULTS['ctx']})")
    parser.add_argument("--steps", type=int, help=f"timed steps per round and variant (default {DEFAULTS['steps']})")
    parser.add_argument("--repeats", type=int, help=f"rounds per variant (default {DEFAULTS['repeats']})")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each timed chain")
    parser.add_argument("--chains", type=int, default=5, help="timed chains (and fori_loop calls) per round and variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KNOB=VALUE[,KNOB=VALUE]",
                        help="also time the megakernel planned with these knobs, in the same process and rounds as "
                             "the others (an A/B of a knob without a second run of jax.jit), as ms['megakernel[NAME]']; "
                             "its logits are checked against jax.jit's too. Repeatable")  # fmt: skip
    parser.add_argument("--compile-times", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a second megakernelize's first call on the filled cache (warm start)")
    parser.add_argument("--prewarm", action="store_true",
                        help="plan and compile every megakernel of the run (the default's and each --variant's) in "
                             "processes of their own started first, side by side, into the jax_mpk cache, so that "
                             "this process only loads them (no compile times then)")  # fmt: skip
    parser.add_argument("--prewarm-one", metavar="MODEL:BATCH:CTX:DTYPE:LAYOUT", help=argparse.SUPPRESS)
    parser.add_argument("--check-steps", type=int, help=f"agreement steps (default {DEFAULTS['check_steps']})")
    parser.add_argument("--dtype", help="override the presets' dtype (full presets: bfloat16, tiny: float32)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    parser.add_argument("--tp", type=ints, default=[1],
                        help="comma-separated tensor-parallel degrees, each over the first TP devices (default 1: one "
                             "device, no shard_map)")  # fmt: skip
    parser.add_argument("--cache-layout", default="stacked", choices=models.CACHE_LAYOUTS,
                        help="KV cache: two stacked arrays, or one array per layer for keys and for values")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.prewarm_one:  # a process of --prewarm: it reads nothing else
        return args
    args.compile_times = args.compile_times and not args.prewarm
    try:
        args.variant = dict(parse_variant(spec) for spec in args.variant)
    except ValueError as error:
        parser.error(str(error))
    for field, default in DEFAULTS.items():
        if getattr(args, field) is None:
            setattr(args, field, QUICK[field] if args.quick else default)
    defaulted = args.models is None
    if defaulted:
        full = ["llama-3.2-1b", "qwen3-0.6b", "qwen3-8b"]
        args.models = full if jnp.zeros(()).device.platform == "gpu" else [models.TINY[m] for m in full]
    unknown = [m for m in args.models if m not in models.PRESETS]
    if unknown:
        parser.error(f"unknown models {unknown}; presets: {sorted(models.PRESETS)}")
    if max(args.tp) > 1 and args.cache_layout != "stacked":
        parser.error("--tp takes the stacked cache layout")
    if min(args.tp) < 1:
        parser.error("--tp must be at least 1")
    for name in list(args.models):
        for tp in args.tp:
            try:
                models.tp_local_config(models.PRESETS[name], tp)
            except ValueError as error:
                if not defaulted:
                    parser.error(f"--tp {tp}, {name}: {error}")
                print(f"skipping {name}: {error}")  # of the default models, those that split
                args.models.remove(name)
                break
    if not args.models:
        parser.error(f"no default model splits over --tp {','.join(map(str, args.tp))}; name some with --models")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every configuration; returns their results (also written to --out)."""
    args = parse_args(argv)
    if args.prewarm_one:
        prewarm_one(args.prewarm_one)
        return []
    prewarms = start_prewarms(args)  # before anything else: they run while this process measures and compiles
    device = jnp.zeros(()).device  # the default device, where both variants run (tp = 1)
    on_gpu = device.platform == "gpu"
    meshes = {}  # tp -> its mesh (None: one device, no shard_map)
    for tp in args.tp:
        try:
            meshes[tp] = models.tp_mesh(tp, jax.devices(device.platform)) if tp > 1 else None
        except ValueError as error:
            raise SystemExit(f"--tp {tp}: {error}") from error
    print(f"device {device.device_kind}, tensor parallel {args.tp}, jax {jax.__version__}; "
          f"models {args.models}, batch {args.batch}, ctx {args.ctx}, {args.repeats} x {args.steps} steps",
          flush=True)  # fmt: skip
    rates = read_bandwidth(4 << 30 if on_gpu else 256 << 20)
    bandwidth = rates["best"]
    print("read bandwidth " + ", ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in rates.items()), flush=True)
    run = {"commit": git_commit(), "jax": jax.__version__, "device": device.device_kind,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "steps": args.steps, "repeats": args.repeats, "chains": args.chains, "warmup": args.warmup,
           "read_bandwidths_Bps": rates}  # fmt: skip
    configs = [(b, c) for b in args.batch for c in args.ctx]
    results, index, total = [], 0, len(args.models) * len(configs) * len(meshes)
    for name in args.models:
        config = models.PRESETS[name]
        config = dataclasses.replace(config, dtype=args.dtype or config.dtype)
        with progress(f"{name}: random weights"):
            whole, merge = models.split(models.create(config))
        for tp, mesh in meshes.items():
            weights = whole if mesh is None else models.tp_shard(mesh, config, whole)[0]
            for batch, ctx in configs:
                index += 1
                label = f" tp {tp}" if mesh else ""
                print(f"[{index}/{total}] {name}{label} batch {batch} ctx {ctx} ({config.dtype})", flush=True)
                results.append({**run_config(name, config, weights, merge, batch, ctx, args, bandwidth, mesh,
                                             prewarms), **run})  # fmt: skip
                # written as each configuration ends: a run cut short (a device call's time limit) keeps the ones done
                write_outputs(results[-1:], device.device_kind, args.out)
            del weights
        del whole, merge
    checks = [r["agreement"] for r in results] + [v["agreement"] for r in results for v in r.get("variants", {}).values()]
    if not all(c["agree"] for c in checks):
        raise SystemExit("the megakernel's logits disagree with jax.jit's beyond tolerance (see 'agreement')")
    return results


if __name__ == "__main__":
    main()
