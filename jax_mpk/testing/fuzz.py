"""Differential fuzzer: random small JAX programs of the supported primitives, jax_mpk against jax.jit.

A program (:mod:`jax_mpk.testing.programs`) is a few lines of ordinary JAX source (4-24 operations drawn from
:data:`~jax_mpk.testing.generators.GENERATORS`, one generator per primitive name, plus a generic one for any
registered elementwise rule that ``jax.lax`` exposes under the same name), over random shapes (1 and primes included) and dtypes (float32, bfloat16, float16, int32, and the bools
comparisons make), with about 6% of the inputs carrying special values (NaN, ±Inf, ±0, subnormals, 3e38), run
under random plan knobs (worker count, ``JAX_MPK_MIN_TASK_WORK``, a shuffled schedule).

Each program runs through ``jax_mpk.megakernelize`` and ``jax.jit`` (XLA with ``--xla_allow_excess_precision=false``
when this module is imported before jax starts its backend, so that XLA rounds every operation to its dtype as
jax_mpk does). A disagreement beyond the dtype's tolerance (NaN-aware: NaN and infinities must match exactly) is
re-checked against op-by-op evaluation (``jax.disable_jit()``) and a float64 line-by-line run of the same program:

* ``precision``: jax_mpk is at least as close as jax.jit to the program evaluated in float64 line by line, each
  line's result rounded to its dtype (XLA's float32 approximations of tan/sin of large arguments, accumulation
  in double, XLA:CPU flushing subnormals; see docs/float_contract.md);
* ``ill_conditioned``: otherwise, every disagreeing output lies within the spread of that float64 run repeated
  with each line's result perturbed as far as the contract leaves it open (a few ulp, and for sums the effect of
  their order, which differs between executors and XLA): amplified rounding, not a wrong result;
* ``jit_vs_opbyop``: otherwise, jax.jit disagrees with op-by-op evaluation and jax_mpk agrees with op-by-op (the
  oracle's bug, reported apart);
* ``mismatch``: anything else; ``internal_error``: an exception that is not a jax_mpk error; ``refused``: a jax_mpk
  error on a program of supported primitives; ``nondeterministic``: two calls of one plan differ bitwise.

Failures are shrunk to a minimal program, printed as a runnable snippet. Everything follows from ``--seed``::

    python -m jax_mpk.testing.fuzz --count 300 --seed 0
    python -m jax_mpk.testing.fuzz --count 500 --platform cuda --batch 8    # on a GPU machine
    python -m jax_mpk.testing.fuzz --count 2000 --platform cuda-plan       # plan for a GPU, on the CPU
    python -m jax_mpk.testing.fuzz --count 2000 --platform cpu-gpu-fusion  # run GPU-fused plans on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

# XLA keeps bf16/f16 intermediates in float32 unless told not to; jax_mpk rounds every operation to its dtype.
# The flag only takes effect if jax has not started its backend yet (op-by-op evaluation is the fallback check).
if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

# The oracles' float32 products in float32: XLA:GPU's default precision multiplies float32 on tensor cores in
# TF32 (10-bit mantissas), 1e-3 off where jax_mpk computes float32 (GPU fuzz 2026:247).
ORACLE_PRECISION = "highest"

import jax_mpk  # noqa: E402
from jax_mpk import config  # noqa: E402
from jax_mpk.api import plan_stages  # noqa: E402
from jax_mpk.errors import MegakernelError  # noqa: E402
from jax_mpk.target import Target  # noqa: E402
# The programs and their generators, re-exported: a printed repro and the tests need only `fuzz`.
from jax_mpk.testing.generators import (  # noqa: E402, F401
    GENERATORS, NOT_GENERATED, Builder, NoOperand, generate, generators, without_generator,
)
from jax_mpk.testing.programs import (  # noqa: E402, F401
    DTYPES, FLOAT64_NAMESPACE, FLOATS, GPU_FUSED, GPU_PLAN, GPU_PLAN_ARCH, GPU_PLAN_SMS, Knobs, Line, Program, Value,
    input_array, program_seed,
)

# Per output dtype: |ours - expected| <= atol + rtol * |expected| for finite values.
TOLERANCES = {"f32": (1e-4, 1e-5), "bf16": (1.6e-2, 1.6e-2), "f16": (2e-3, 2e-3), "i32": (0, 0), "pred": (0, 0)}

# ------------------------------------------------------------------------------------------------- checking


@dataclass
class Outcome:
    kind: str  # ok, precision, ill_conditioned, jit_vs_opbyop, oracle_error, and the FAILURES
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


FAILURES = ("mismatch", "internal_error", "refused", "nondeterministic", "batch_mismatch")


def _as_float64(x) -> np.ndarray:
    return np.asarray(np.asarray(x).astype(np.float64))


def _dtype_key(x) -> str:
    return next(k for k, t in DTYPES.items() if np.dtype(t) == np.dtype(np.asarray(x).dtype))


def agree(ours, expected) -> bool:
    """Equal within the dtype's tolerance; NaN where and only where expected, infinities exactly."""
    a, e = _as_float64(ours), _as_float64(expected)
    if a.shape != e.shape or np.asarray(ours).dtype != np.asarray(expected).dtype:
        return False
    nan = np.isnan(e)
    if not np.array_equal(np.isnan(a), nan):
        return False
    finite = np.isfinite(a) & np.isfinite(e)
    if not np.array_equal(a[~finite & ~nan], e[~finite & ~nan]):
        return False
    rtol, atol = TOLERANCES[_dtype_key(expected)]
    return bool(np.all(np.abs(a[finite] - e[finite]) <= atol + rtol * np.abs(e[finite])))


def _error(x, reference: np.ndarray) -> np.ndarray:
    """Elementwise distance from the float64 result (0 for matching NaN or infinity, inf for a wrong one)."""
    x = _as_float64(x)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(x - reference)
    same = (np.isnan(x) & np.isnan(reference)) | (x == reference)
    return np.where(same, 0.0, np.where(np.isnan(error), np.inf, error))


def at_least_as_close(ours, theirs, reference) -> bool:
    """Elementwise, ``ours`` is as near ``reference`` as ``theirs`` (within the dtype's tolerance); integers and
    booleans (an argmax, a comparison) must equal the reference wherever they differ from ``theirs``."""
    reference = _as_float64(reference)
    if _dtype_key(theirs) in ("i32", "pred"):
        ours, theirs = _as_float64(ours), _as_float64(theirs)
        return bool(np.all((ours == theirs) | (ours == reference)))
    rtol, atol = TOLERANCES[_dtype_key(theirs)]
    with np.errstate(invalid="ignore", over="ignore"):
        slack = atol + rtol * np.nan_to_num(np.abs(reference), posinf=0.0)
    return bool(np.all(_error(ours, reference) <= _error(theirs, reference) + slack))


def _all_agree(ours: Sequence, expected: Sequence) -> bool:
    return len(ours) == len(expected) and all(agree(a, e) for a, e in zip(ours, expected))


def _numpy(results) -> list[np.ndarray]:
    return [np.asarray(r) for r in results]


def run_megakernel(program: Program, args: Sequence[np.ndarray], platform: str) -> list[np.ndarray]:
    with program.knobs.applied(platform):
        fast = jax_mpk.megakernelize(program.function(), num_workers=program.knobs.num_workers)
        first = _numpy(fast(*args))
    second = _numpy(fast(*args))
    if any(a.tobytes() != b.tobytes() for a, b in zip(first, second)):
        raise _Nondeterministic
    return first


class _Nondeterministic(Exception):
    pass


# Lines whose result is a sum of many terms: how an executor orders that sum (double or float32, sequential,
# by tiles, as a tree) is not part of the float contract (docs/float_contract.md).
ACCUMULATING = re.compile(r"^lax\.(dot_general|cumsum|cumprod|cumlogsumexp)\(|^lax\.reduce\(.*, lax\.(add|mul), ")
# Lines whose result is a product of many terms: in another association a sub-product of the large terms can
# overflow to +-inf although the whole product fits (GPU fuzz 2026:247: a cumprod by tiles)
MULTIPLYING = re.compile(r"^lax\.cumprod\(|^lax\.reduce\(.*, lax\.mul, ")
ROUNDING_TRIALS = 16
ELEMENTWISE_ULPS = 2.0  # CUDA's and XLA's float32 functions are within a few ulp


def reference_rounded(program: Program, args: Sequence[np.ndarray], trials: int = 0) -> list[np.ndarray]:
    """The program computed in float64, each line's result rounded to its own dtype: every operation correctly
    rounded (the contract jax_mpk's executors aim for), as float64 arrays. One jitted function: the float64 ->
    dtype -> float64 round trips stay because XLA runs without excess precision (see the top of this module).

    With ``trials``, the same computed ``trials`` times with every float line's result perturbed (before its
    rounding) by a uniform random error within what the contract leaves open, each output then stacked as
    [trials, ...]: ``ELEMENTWISE_ULPS`` ulp of the result, and for a sum of n terms (a reduction, product, scan)
    sqrt(n) half-ulps of the same sum over the terms' magnitudes, the size of the differences that summation
    order makes (a float32 sum by tiles against XLA's tree; the worst case is n half-ulps); a product whose
    largest sub-product overflows is +-inf in about half of the trials. How far these trials
    spread is how far the contract lets an output move: through sin of a large argument, a comparison, or
    cancelling terms, it can be far."""

    def rounded(x, dtype: str):
        if dtype not in FLOATS:
            return x
        normal = lax.convert_element_type(lax.convert_element_type(x, DTYPES[dtype]), jnp.float64)
        # XLA:CPU flushes subnormal results of the conversion to zero: round those onto the subnormal grid here
        info = jnp.finfo(DTYPES[dtype])
        spacing = float(info.smallest_subnormal)
        return jnp.where(jnp.abs(x) < float(info.smallest_normal), jnp.round(x / spacing) * spacing, normal)

    def evaluated(line: Line, env: dict) -> list:
        """The line's results (a list, also for one) in float64 over ``env``."""
        out = eval(line.expr, dict(FLOAT64_NAMESPACE), env)  # noqa: S307 - the fuzzer's own source
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def perturbed(key, line: Line, env: dict, value: Value, index: int, result):
        eps = float(jnp.finfo(DTYPES[value.dtype]).eps)
        scale = ELEMENTWISE_ULPS * eps * jnp.abs(result)
        reads = [env[name] for name in sorted(line.reads) if name in env]
        floats = {name for name in line.reads if name in env and jnp.issubdtype(env[name].dtype, jnp.floating)}
        if ACCUMULATING.match(line.expr) and floats:
            magnitudes = {**env, **{name: jnp.abs(env[name]) for name in floats}}
            total = jnp.abs(evaluated(line, magnitudes)[index])
            terms = max([int(np.size(r)) // max(1, int(np.size(result))) for r in reads]
                        + [max(np.shape(r), default=1) for r in reads])  # fmt: skip
            scale = scale + np.sqrt(terms) * (eps / 2) * total  # sqrt(n) roundings of at most half an ulp
        noise = jax.random.uniform(key, jnp.shape(result), jnp.float64, -1.0, 1.0)
        # exact zeros keep their sign (-0 + 0 would be +0: a signed-zero difference is not rounding)
        with jax.numpy_dtype_promotion("standard"):
            result = jnp.where(jnp.isfinite(scale) & (scale > 0), result + scale * noise, result)
        if MULTIPLYING.match(line.expr) and floats:
            # the largest sub-product (every term of magnitude above 1) overflows: in about half of the trials
            # the product is +-inf as its association may make it (NaN where a zero term meets that inf)
            stretched = {**env, **{name: jnp.maximum(jnp.abs(env[name]), 1.0) for name in floats}}
            largest = evaluated(line, stretched)[index]
            overflows = (largest > float(jnp.finfo(DTYPES[value.dtype]).max)) & (noise > 0)
            infinite = jnp.where(result == 0, jnp.nan, jnp.copysign(jnp.inf, result))
            result = jnp.where(overflows, infinite, result)
        return result

    def reference(key, *wide):
        env = dict(zip((a.name for a in program.args), wide))
        for number, line in enumerate(program.lines):
            outs = evaluated(line, env)
            results = []
            for index, (value, result) in enumerate(zip(line.outs, outs)):
                if key is not None and value.dtype in FLOATS:
                    result = perturbed(jax.random.fold_in(key, 2 * number + index), line, env, value, index, result)
                results.append(rounded(result, value.dtype))
            env.update((value.name, result) for value, result in zip(line.outs, results))
        return [env[name] for name in program.outputs]

    with jax.enable_x64(True):
        wide = [x.astype(np.float64) if a.dtype in FLOATS else x for a, x in zip(program.args, args)]
        if not trials:
            return _numpy(jax.jit(lambda *w: reference(None, *w))(*wide))
        function = jax.jit(reference)
        runs = [_numpy(function(jax.random.key(t), *wide)) for t in range(trials)]
        return [np.stack(outputs) for outputs in zip(*runs)]


def within_rounding(ours, exact, trials) -> bool:
    """Elementwise, ``ours`` is no farther from the correctly rounded ``exact`` than 1.5 times the farthest of
    the perturbed ``trials`` (the margin for their finite number), plus the dtype's tolerance; integers and
    booleans equal ``exact`` or some trial."""
    exact = _as_float64(exact)
    if _dtype_key(ours) in ("i32", "pred"):
        ours, trials = _as_float64(ours), _as_float64(trials)
        return bool(np.all((ours == exact) | np.any(trials == ours, axis=0)))
    rtol, atol = TOLERANCES[_dtype_key(ours)]
    spread = np.max([_error(t, exact) for t in trials], axis=0)
    with np.errstate(invalid="ignore", over="ignore"):
        slack = atol + rtol * np.nan_to_num(np.abs(exact), posinf=0.0)
        return bool(np.all(_error(ours, exact) <= 1.5 * spread + slack))


def _precision(ours: Sequence, expected: Sequence, exact: Sequence) -> Outcome | None:
    """``precision`` when every output that disagrees with jax.jit is at least as close to correct rounding."""
    bad = [i for i, (a, e) in enumerate(zip(ours, expected)) if not agree(a, e)]
    if all(at_least_as_close(ours[i], expected[i], exact[i]) for i in bad):
        return Outcome("precision", f"outputs {bad}: jax_mpk at least as close as jax.jit to correct rounding")
    return None


def check_gpu_plan(program: Program) -> Outcome:
    """Plan one program for a 132-SM Hopper GPU on the CPU: the GPU-only fusion passes, tiling, the validator
    (read coverage included) and code generation, without compiling or running it. A GPU-only planning bug
    (a cycle between in-place updates, a dropped store) shows here without a GPU."""
    closed = jax.make_jaxpr(program.function())(*program.inputs())
    try:
        with program.knobs.applied(GPU_PLAN):
            knobs = config.load()
            plan_stages(closed, None, Target.cuda(GPU_PLAN_SMS, GPU_PLAN_ARCH, knobs), knobs)
    except Exception as exc:
        return _raised(exc)
    return Outcome("ok")


def _raised(exc: Exception) -> Outcome:
    """``refused`` for a jax_mpk error, ``internal_error`` (with where it was raised) for anything else."""
    if isinstance(exc, MegakernelError):
        return Outcome("refused", f"{type(exc).__name__}: {str(exc)[:300]}")
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return Outcome("internal_error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} "
                   f"({os.path.basename(where.filename)}:{where.lineno})")  # fmt: skip


def _ill_conditioned(ours: Sequence, expected: Sequence, exact: Sequence, trials: Sequence) -> Outcome | None:
    """``ill_conditioned`` when every output that disagrees with jax.jit lies within the rounding trials' spread."""
    bad = [i for i, (a, e) in enumerate(zip(ours, expected)) if not agree(a, e)]
    if all(within_rounding(ours[i], exact[i], trials[i]) for i in bad):
        return Outcome("ill_conditioned", f"outputs {bad}: within the spread of the reference when every line's "
                       "rounding and summation order vary as the float contract allows")  # fmt: skip
    return None


def check(program: Program, platform: str = "cpu", expected: list[np.ndarray] | None = None) -> Outcome:
    """Run one program through jax_mpk and the oracles and classify the result (``GPU_PLAN``: plan it only)."""
    if platform == GPU_PLAN:
        return check_gpu_plan(program)
    args = program.inputs()
    fn = program.function()
    try:
        with jax.default_matmul_precision(ORACLE_PRECISION):
            expected = expected if expected is not None else _numpy(jax.jit(fn)(*args))
    except Exception as exc:
        return Outcome("oracle_error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    try:
        ours = run_megakernel(program, args, platform)
    except _Nondeterministic:
        return Outcome("nondeterministic", "two calls of one plan differ bitwise")
    except Exception as exc:
        return _raised(exc)
    if _all_agree(ours, expected):
        return Outcome("ok")
    exact = reference_rounded(program, args)
    precision = _precision(ours, expected, exact)
    if precision is not None:
        return precision
    ill_conditioned = _ill_conditioned(ours, expected, exact, reference_rounded(program, args, ROUNDING_TRIALS))
    if ill_conditioned is not None:
        return ill_conditioned
    bad = [i for i, (a, e) in enumerate(zip(ours, expected)) if not agree(a, e)]
    with jax.disable_jit(), jax.default_matmul_precision(ORACLE_PRECISION):
        by_op = _numpy(fn(*args))
    if _all_agree(ours, by_op):
        return Outcome("jit_vs_opbyop", f"outputs {bad}: jax.jit disagrees with op-by-op, jax_mpk agrees")
    i = bad[0]
    return Outcome("mismatch", f"output {i} ({program.outputs[i]}): max |diff| "
                   f"{np.nanmax(_error(ours[i], _as_float64(expected[i]))):.3g}")  # fmt: skip


# ------------------------------------------------------------------------------------------------ shrinking


def _same_failure(outcome: Outcome, original: Outcome) -> bool:
    if outcome.kind != original.kind:
        return False
    return outcome.kind != "internal_error" or outcome.detail.split(":")[0] == original.detail.split(":")[0]


def _candidates(p: Program) -> Iterator[Program]:
    """Smaller variants of ``p``, most reducing first."""
    if len(p.outputs) > 1:
        for out in p.outputs:
            yield dataclasses.replace(p, outputs=(out,))
        for out in p.outputs:  # a failure may need two results (a reader of a value and its in-place update)
            yield dataclasses.replace(p, outputs=tuple(o for o in p.outputs if o != out))
    simpler = Knobs(1, 1 << 14, None)
    if p.knobs != simpler:
        yield dataclasses.replace(p, knobs=simpler)
    values = p.values()
    next_arg = 1 + max(int(v[1:]) for v in values)
    for line in p.lines:
        for out in line.outs:
            # cut: the value becomes an input (its producers die)
            fresh = Value(f"a{next_arg}", out.shape, out.dtype)
            yield dataclasses.replace(p.renamed(out.name, fresh.name), args=(*p.args, fresh))
            # bypass: read an operand of the same type instead
            for name in sorted(line.reads):
                v = values.get(name)
                if v is not None and (v.shape, v.dtype) == (out.shape, out.dtype):
                    yield p.renamed(out.name, name)


def shrink(program: Program, original: Outcome, platform: str = "cpu", budget_s: float = 120.0) -> Program:
    """A smaller program with the same kind of failure (greedy, first improvement, within ``budget_s``)."""
    deadline = time.monotonic() + budget_s
    best = program.without_dead_lines()
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for candidate in _candidates(best):
            candidate = candidate.without_dead_lines()
            if len(candidate.lines) > len(best.lines) or candidate == best or time.monotonic() > deadline:
                continue
            if _same_failure(check(candidate, platform), original):
                best, improved = candidate, True
                break
    return best


def snippet(program: Program, platform: str = "cpu") -> str:
    """A runnable script that reproduces the program's comparison."""
    args = []
    for a, x in zip(program.args, program.inputs()):
        if x.size <= 64:
            listed = np.asarray(x, np.float64 if x.dtype.kind == "f" or x.dtype == jnp.bfloat16 else x.dtype)
            args.append(f"    np.asarray({listed.tolist()!r}, {a.dtype}),")
        else:
            args.append(f"    fuzz.input_array({program.seed}, fuzz.{a!r}),")
    k = program.knobs
    if platform == GPU_PLAN:
        run = ["from jax_mpk import config",
               "from jax_mpk.api import plan_stages",
               "from jax_mpk.target import Target",
               f'plan_stages(jax.make_jaxpr(f)(*args), None, Target.cuda({GPU_PLAN_SMS}, "{GPU_PLAN_ARCH}", config.load()), '
               "config.load())"]  # fmt: skip
    else:
        run = [f"with jax.default_matmul_precision({ORACLE_PRECISION!r}): expected = jax.jit(f)(*args)",
               f"actual = jax_mpk.megakernelize(f, num_workers={k.num_workers})(*args)",
               "for e, a in zip(expected, actual):",
               "    print(np.asarray(e).tolist(), np.asarray(a).tolist(), sep='\\n')"]  # fmt: skip
    return "\n".join([
        "import os",
        f"os.environ.update({k.env(platform)!r})",
        "import jax, jax.numpy as jnp, numpy as np",
        "from jax import lax",
        "import jax_mpk",
        "from jax_mpk.testing import fuzz",
        "f32, bf16, f16, i32, pred = jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.bool_",
        "inf, nan = np.inf, np.nan",
        "",
        program.source(),
        "",
        "args = [",
        *args,
        "]",
        *run,
    ])  # fmt: skip


# ----------------------------------------------------------------------------------------------- batching


def combine(programs: Sequence[Program]) -> tuple[Program, list[list[int]]]:
    """One program running all of ``programs`` side by side (one plan, one compile: what the GPU mode runs),
    and, per program, the positions of its outputs. Names are renumbered so they do not collide."""
    args, lines, outputs, owned = [], [], [], []
    offset = 0
    for p in programs:
        shift = lambda name: f"{name[0]}{int(name[1:]) + offset}"  # noqa: E731
        relabel = lambda expr: re.sub(r"\b([av])(\d+)\b", lambda m: shift(m.group(0)), expr)  # noqa: E731
        args += [dataclasses.replace(a, name=shift(a.name)) for a in p.args]
        lines += [dataclasses.replace(ln, outs=tuple(dataclasses.replace(v, name=shift(v.name)) for v in ln.outs),
                                      expr=relabel(ln.expr))
                  for ln in p.lines]  # fmt: skip
        owned.append(list(range(len(outputs), len(outputs) + len(p.outputs))))
        outputs += [shift(o) for o in p.outputs]
        offset += 1 + max(int(v[1:]) for v in p.values())
    return Program(programs[0].seed, tuple(args), tuple(lines), tuple(outputs), programs[0].knobs), owned


def check_batch(programs: Sequence[Program], platform: str) -> list[Outcome]:
    """Run ``programs`` side by side as one jax.jit and one megakernel (one compile each); a program whose
    outputs disagree, or all of them if the batch fails, is re-checked alone, so that every failure is
    attributed to one program (``batch_mismatch``: it disagreed only next to the others)."""
    if len(programs) == 1 or platform == GPU_PLAN:
        return [check(p, platform) for p in programs]
    together, owned = combine(programs)
    args = [x for p in programs for x in p.inputs()]
    try:
        with jax.default_matmul_precision(ORACLE_PRECISION):
            expected = _numpy(jax.jit(together.function())(*args))
        ours = run_megakernel(together, args, platform)
    except Exception:
        return [check(p, platform) for p in programs]
    agreeing = [_all_agree([ours[i] for i in pos], [expected[i] for i in pos]) for pos in owned]
    exact = None if all(agreeing) else reference_rounded(together, args)  # one compile for the whole batch
    trials = None  # the rounding trials, for the whole batch too, when some program needs them
    outcomes = []
    for p, positions, agrees in zip(programs, owned, agreeing):
        if agrees:
            outcomes.append(Outcome("ok"))
            continue
        pick = lambda values: [values[i] for i in positions]  # noqa: E731
        precision = _precision(pick(ours), pick(expected), pick(exact))
        if precision is not None:
            outcomes.append(precision)
            continue
        trials = trials or reference_rounded(together, args, ROUNDING_TRIALS)
        ill_conditioned = _ill_conditioned(pick(ours), pick(expected), pick(exact), pick(trials))
        if ill_conditioned is not None:
            outcomes.append(ill_conditioned)
            continue
        alone = check(p, platform)  # a failure is attributed to the program alone (a GPU run compiles it again)
        if alone.kind == "ok":
            alone = Outcome("batch_mismatch", f"disagrees with jax.jit only in a batch of {len(programs)} programs")
        outcomes.append(alone)
    return outcomes


# --------------------------------------------------------------------------------------------------- driver


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fuzz(count: int, seed: int = 0, start: int = 0, platform: str = "cpu", batch: int = 1,
         shrink_failures: bool = True, log=print, records=None) -> dict:  # fmt: skip
    """Generate and check programs ``start .. start+count-1`` of ``seed``; return the summary. jax.jit and the
    references run on ``platform``'s device too."""
    with jax.default_device(jax.devices("gpu" if platform == "cuda" else "cpu")[0]):
        return _fuzz(count, seed, start, platform, batch, shrink_failures, log, records)


def _fuzz(count, seed, start, platform, batch, shrink_failures, log, records) -> dict:
    table = generators()
    counts, covered = Counter(), Counter()
    failures = []
    began = time.monotonic()
    indices = list(range(start, start + count))
    for first in range(0, len(indices), batch):
        chunk = indices[first : first + batch]
        programs = [generate(program_seed(seed, i), table) for i in chunk]
        for p in programs:
            covered.update({eqn.primitive.name for eqn in _equations(jax.make_jaxpr(p.function())(*p.inputs()))})
        for i, p, outcome in zip(chunk, programs, check_batch(programs, platform)):
            counts[outcome.kind] += 1
            if records is not None:
                records.write(json.dumps({"index": i, "kind": outcome.kind, "detail": outcome.detail}) + "\n")
                records.flush()
            if outcome.kind == "ok":
                continue
            log(f"[{i}] {outcome.kind}: {outcome.detail}   (replay: --seed {seed} --start {i} --count 1)")
            if outcome.failed:
                small = shrink(p, outcome, platform) if shrink_failures and outcome.kind != "batch_mismatch" else p
                log(snippet(small, platform))
                failures.append({"index": i, "kind": outcome.kind, "detail": outcome.detail,
                                 "snippet": snippet(small, platform)})  # fmt: skip
        done = first + len(chunk)
        if done % 100 < len(chunk) or done == len(indices):
            log(f"{done}/{count} programs, {time.monotonic() - began:.0f} s: {dict(counts)}")
    return {
        "jax": jax.__version__, "device": str(jax.devices("gpu" if platform == "cuda" else "cpu")[0].device_kind),
        "commit": _git_commit(), "platform": platform, "seed": seed, "start": start, "count": count,
        "batch": batch, "seconds": round(time.monotonic() - began, 1), "counts": dict(counts),
        "covered": dict(sorted(covered.items())),
        "not_covered": sorted(set(table) - set(covered)), "without_generator": without_generator(),
        "failures": failures,
    }  # fmt: skip


def _equations(closed) -> Iterator:
    """Every equation of a jaxpr, nested ones (pjit, custom_jvp) included."""
    for eqn in closed.jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    yield from _equations(sub)


def tally(paths: Sequence[str]) -> dict:
    """Outcome counts over ``--records`` files (several shards of one seed), each program counted once."""
    by_index = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                by_index[record["index"]] = record
    counts = Counter(r["kind"] for r in by_index.values())
    failures = [r for r in by_index.values() if r["kind"] in FAILURES]
    return {"programs": len(by_index), "counts": dict(counts), "failures": failures,
            "others": [r for r in by_index.values() if r["kind"] not in ("ok", "precision", "ill_conditioned")
                       and r not in failures]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first program index (replay one with --count 1)")
    parser.add_argument("--platform", choices=("cpu", "cuda", GPU_PLAN, GPU_FUSED), default="cpu",
                        help=f"{GPU_PLAN}: plan each program for a {GPU_PLAN_SMS}-SM GPU on the CPU, not running it; "
                        f"{GPU_FUSED}: the CPU executor runs each plan fused as for a GPU")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="programs per megakernel (one compile for several)")
    parser.add_argument("--no-shrink", action="store_true")
    parser.add_argument("--records", help="append one JSON line per program here")
    parser.add_argument("--summary", help="write the summary as JSON here")
    parser.add_argument("--show", action="store_true", help="print the programs' source and exit")
    parser.add_argument("--tally", nargs="+", metavar="RECORDS", help="count the outcomes in --records files")
    opts = parser.parse_args(argv)
    if opts.tally:
        print(json.dumps(tally(opts.tally), indent=1))
        return 0
    if opts.show:
        for i in range(opts.start, opts.start + opts.count):
            print(f"# program {i}\n{snippet(generate(program_seed(opts.seed, i)), opts.platform)}\n")
        return 0
    with open(opts.records, "a") if opts.records else contextlib.nullcontext() as records:
        summary = fuzz(opts.count, opts.seed, opts.start, opts.platform, opts.batch, not opts.no_shrink,
                       log=lambda m: print(m, flush=True), records=records)  # fmt: skip
    shown = {k: v for k, v in summary.items() if k != "failures"}
    print(json.dumps(shown, indent=1))
    if opts.summary:
        with open(opts.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if any(summary["counts"].get(k) for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
