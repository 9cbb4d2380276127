"""Warm start: the first call of an already planned decode step in a new process, against jax.make_jaxpr of it.

Every measurement runs in a fresh Python process (nothing cached in memory), all on one JAX_MPK_CACHE_DIR:

1. ``cold``: ``megakernelize(step)``'s first call with an empty cache (tracing, planning, on a GPU nvcc);
2. ``trace``: ``jax.make_jaxpr(step)`` alone, the reference (jax's own cost of looking at the step);
3. ``warm``: ``megakernelize(step)``'s first call with the plan on disk, then its second call (one step's run,
   which the first call includes). Issue 13's criterion: warm first call <= make_jaxpr + 1 s.

The step is an example model's (``examples/models.py``) with random weights, run on the default backend (the CPU
executor here, the CUDA megakernel on a GPU). With ``--plan-only`` nothing runs and no weights are made: the
step is planned for a GPU target (``--sms``, ``--arch``) and the cold and warm processes take its plan through
the lookup a first call makes (trace, cache key, load; planning on a miss), so the warm figure leaves out what
only a GPU does (nvcc's cache, loading the cubin, XLA compiling the call, the run). Each process's stage times
(the ``jax_mpk`` logger) are reported with its figures.

    python benchmarks/warm_start.py --model qwen3-8b                 # on the GPU: the real first call
    python benchmarks/warm_start.py --model qwen3-8b --plan-only     # anywhere: the H100/H200 plan, not run
    python benchmarks/warm_start.py --model qwen3-tiny               # CPU executor, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402

ROLES = ("cold", "trace", "warm")
_STAGE = re.compile(r"jax_mpk: (.+) took ([0-9.]+) s")


class _StageTimes(logging.Handler):
    """Collects the stage times the jax_mpk logger reports."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _STAGE.fullmatch(record.getMessage())
        if match:
            self.seconds[match[1]] = self.seconds.get(match[1], 0.0) + float(match[2])


def _step_arguments(args, concrete: bool):
    """The decode step and its arguments: random weights and cache, or (``concrete`` false) their shapes."""
    cfg = models.PRESETS[args.model]
    weights, merge = models.split(models.create(cfg) if concrete else models.abstract(cfg))
    make_cache = lambda: models.init_cache(cfg, args.batch, args.ctx, jax.random.PRNGKey(1), layout=args.cache_layout)  # noqa: E731
    if concrete:
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, args.batch), jnp.int32)
        return models.make_decode_step(merge), (weights, tokens, jnp.int32(args.ctx - 1), make_cache())
    tokens, pos = jax.ShapeDtypeStruct((args.batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    return models.make_decode_step(merge), (weights, tokens, pos, jax.eval_shape(make_cache))


def _child(role: str, args) -> dict:
    """One measurement, in this (fresh) process."""
    import jax_mpk
    from jax_mpk import api, config
    from jax_mpk.capture import find_shard_map
    from jax_mpk.target import Target

    times = _StageTimes()
    logger = logging.getLogger("jax_mpk")
    logger.addHandler(times)
    logger.setLevel(logging.INFO)
    step, step_args = _step_arguments(args, concrete=role != "trace" and not args.plan_only)
    result: dict = {"role": role}
    start = time.perf_counter()
    if role == "trace":
        jax.make_jaxpr(step)(*step_args)
        result["make_jaxpr_s"] = time.perf_counter() - start
    elif args.plan_only:  # what a first call does up to registering the plan, for a GPU target
        flat, in_tree = jax.tree_util.tree_flatten((step_args, {}))
        specs = tuple(api._ArgSpec.of(x) for x in flat)
        closed, _ = api.trace_signature(step, in_tree, specs)
        plan, stages = api.cached_plan(closed, find_shard_map(closed), repr(specs),
                                       Target("cuda", args.sms, args.arch), config.load())  # fmt: skip
        result.update(first_call_s=time.perf_counter() - start, from_cache=stages is None, plan=plan.key)
    else:
        fast = jax_mpk.megakernelize(step, donate_argnums=(3,))
        tokens, logits, cache = jax.block_until_ready(fast(*step_args))
        result["first_call_s"] = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(fast(step_args[0], tokens, step_args[2], cache))
        result["second_call_s"] = time.perf_counter() - start
        (megakernel,) = fast.plans.values()
        result.update(from_cache=megakernel.from_cache, plan=megakernel.key, tokens=np.asarray(tokens).tolist(),
                      logits_sum=float(np.asarray(logits, np.float64).sum()))  # fmt: skip
    result["stages_s"] = times.seconds
    return result


def _run_child(role: str, argv: list[str], cache_dir: str) -> dict:
    env = {**os.environ, "JAX_MPK_CACHE_DIR": cache_dir}
    done = subprocess.run([sys.executable, __file__, *argv, "--child", role], env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"the {role} process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b", choices=sorted(models.PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--cache-layout", default="stacked", choices=models.CACHE_LAYOUTS)
    parser.add_argument("--plan-only", action="store_true", help="plan for a GPU target without running")
    parser.add_argument("--sms", type=int, default=132, help="--plan-only: the GPU's SM count")
    parser.add_argument("--arch", default="9.0", help="--plan-only: its compute capability")
    parser.add_argument("--cache-dir", help="JAX_MPK_CACHE_DIR of the three processes (default: a new empty one)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the record as JSON here (a directory)")
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the three processes; returns (and prints, and with --out writes) the record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return {}
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="jax_mpk_warm_start_")
    runs = {role: _run_child(role, argv, cache_dir) for role in ROLES}
    from decode import git_commit  # noqa: E402  (benchmarks/decode.py: $JAX_MPK_COMMIT or git's HEAD)

    device = "plan for a GPU target" if args.plan_only else jnp.zeros(()).device.device_kind
    record = {"model": args.model, "batch": args.batch, "ctx": args.ctx, "cache_layout": args.cache_layout,
              "plan_only": args.plan_only, "device": device, "jax": jax.__version__, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **runs,
              "warm_minus_make_jaxpr_s": runs["warm"]["first_call_s"] - runs["trace"]["make_jaxpr_s"]}  # fmt: skip
    cold, warm = runs["cold"], runs["warm"]
    print(f"{args.model} batch {args.batch} ctx {args.ctx} ({args.cache_layout} cache), {device}, jax {jax.__version__}")
    print(f"  cold first call  {cold['first_call_s']:7.2f} s  (plan from the cache: {cold['from_cache']})")
    print(f"  jax.make_jaxpr   {runs['trace']['make_jaxpr_s']:7.2f} s")
    print(f"  warm first call  {warm['first_call_s']:7.2f} s  (plan from the cache: {warm['from_cache']}; "
          f"{record['warm_minus_make_jaxpr_s']:+.2f} s against make_jaxpr)")
    if "second_call_s" in warm:
        print(f"  warm second call {warm['second_call_s']:7.2f} s")
    for role in ("cold", "warm"):
        print(f"  {role} stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[role]["stages_s"].items()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"warm_start_{args.model}_{'plan_only' if args.plan_only else device.replace(' ', '_')}.json"
        (args.out / name).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out / name}")
    return record


if __name__ == "__main__":
    main()
