"""The differential fuzzer's fixed CI budget, the fuzzer checked against planted bugs, and the minimal repros of
every failure class it found (issue 16) as regression tests."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from jax_mpk.testing import fuzz  # first: asks XLA for no excess precision before jax starts its backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import assert_trees_close, check_against_jit, random_array  # noqa: E402
from jax import lax  # noqa: E402

import jax_mpk  # noqa: E402
from jax_mpk import lowering  # noqa: E402

# 96 programs in batches of 8: about 60 s of CPU time (measured: 0.6 s a program, nearly all of it XLA
# compiling the jax.jit oracle, about 0.05 s per operation).
CI_PROGRAMS, CI_SEED = 96, 16
CI_GPU_PLANS = 64  # planning only: about 0.2 s a program
CI_GPU_FUSED = 48  # the CPU executor running GPU-fused plans


def test_fixed_budget_of_random_programs_equals_jax_jit():
    summary = fuzz.fuzz(CI_PROGRAMS, seed=CI_SEED, batch=8, log=print)
    failures = "\n\n".join(f"[{f['index']}] {f['kind']}: {f['detail']}\n{f['snippet']}" for f in summary["failures"])
    assert not any(summary["counts"].get(kind) for kind in fuzz.FAILURES), failures
    assert summary["counts"].get("ok", 0) >= 0.8 * CI_PROGRAMS, summary["counts"]
    # the budget reaches most generators (collectives need a shard_map and are listed apart)
    assert len(summary["covered"]) >= 0.9 * len(fuzz.generators()), summary["not_covered"]


def test_fixed_budget_of_random_programs_plans_for_the_gpu():
    """The same programs planned for a 132-SM GPU on the CPU (the GPU-only fusion passes, the validator with its
    read-coverage check, code generation): 2,650 of seed 2026 found one GPU-only planning bug (2026:1492)."""
    summary = fuzz.fuzz(CI_GPU_PLANS, seed=CI_SEED, platform=fuzz.GPU_PLAN, log=print)
    failures = "\n\n".join(f"[{f['index']}] {f['kind']}: {f['detail']}\n{f['snippet']}" for f in summary["failures"])
    assert summary["counts"] == {"ok": CI_GPU_PLANS}, failures


def test_fixed_budget_of_random_programs_runs_gpu_fused_on_the_cpu():
    """The GPU's fusion (rows computed in product staging, split-K products, its epilogue rules) run by the CPU
    executor (JAX_MPK_GPU_FUSION=1): what the GPU computes, checked without a GPU."""
    summary = fuzz.fuzz(CI_GPU_FUSED, seed=CI_SEED + 1, platform=fuzz.GPU_FUSED, batch=8, log=print)
    failures = "\n\n".join(f"[{f['index']}] {f['kind']}: {f['detail']}\n{f['snippet']}" for f in summary["failures"])
    assert not any(summary["counts"].get(kind) for kind in fuzz.FAILURES), failures


def test_programs_and_inputs_follow_from_the_seed():
    a, b = fuzz.generate(fuzz.program_seed(7, 3)), fuzz.generate(fuzz.program_seed(7, 3))
    assert a == b and a.source() == b.source()
    assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a.inputs(), b.inputs()))
    assert fuzz.generate(fuzz.program_seed(7, 4)) != a
    assert all(4 <= len(fuzz.generate(fuzz.program_seed(1, i)).lines) <= 24 for i in range(20))


def test_every_supported_primitive_has_a_generator_or_a_reason(monkeypatch):
    missing = fuzz.without_generator()
    assert set(missing) <= set(fuzz.NOT_GENERATED), missing
    # a newly registered elementwise rule is fuzzed at once through the generic generator
    monkeypatch.setitem(lowering.RULES, "nextafter", lowering.RULES["add"])
    assert "nextafter" in fuzz.generators() and "nextafter" not in fuzz.GENERATORS


def test_nan_aware_comparison():
    nan, inf = np.nan, np.inf
    assert fuzz.agree(np.float32([1, nan, inf]), np.float32([1 + 1e-6, nan, inf]))
    assert not fuzz.agree(np.float32([nan]), np.float32([1]))
    assert not fuzz.agree(np.float32([inf]), np.float32([-inf]))
    assert not fuzz.agree(np.float32([1]), np.float32([1.01]))
    assert not fuzz.agree(np.int32([3]), np.int32([4]))
    assert not fuzz.agree(np.float32([1]), np.float16([1]))  # dtypes must match too


def test_a_planted_bug_is_found_and_shrunk_to_its_line(monkeypatch):
    """Corrupt what jax_mpk returns for programs that compute a tangent: the fuzzer reports a mismatch and
    shrinks the program to the tangent alone (so the fuzzer can fail)."""
    honest = fuzz.run_megakernel

    def corrupted(program, args, platform):
        results = honest(program, args, platform)
        if "lax.tan(" not in program.source():
            return results
        return [r + np.ones((), r.dtype) if r.dtype.kind == "f" or r.dtype == jnp.bfloat16 else r for r in results]

    monkeypatch.setattr(fuzz, "run_megakernel", corrupted)
    program = next(p for p in map(fuzz.generate, range(200)) if "lax.tan(" in p.source() and len(p.lines) > 4)
    outcome = fuzz.check(program)
    assert outcome.kind == "mismatch", outcome
    small = fuzz.shrink(program, outcome, budget_s=30)
    assert len(small.lines) < len(program.lines) and "lax.tan(" in small.source()
    assert len(small.outputs) == 1
    snippet = fuzz.snippet(small)
    assert "jax_mpk.megakernelize(f" in snippet and "def f(" in snippet
    compile(snippet, "<snippet>", "exec")  # runnable Python


# ------------------------------------------------------------------------- regression: the failure classes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_product_with_epilogue_also_returned_as_a_view(rng, dtype):
    """`(a @ b) * 2` read by another elementwise expression and returned through a view: the product must be
    stored, not absorbed into one kernel's epilogue (was `unstored heavy node %N:dot`)."""
    a, b, c = (random_array(rng, s, dtype) for s in [(5, 7), (7, 3), (5, 3)])

    def fn(a, b, c):
        m = (a @ b) * 2
        # c / (1 + m * m), not c / m: a product near 0 would make the quotient ill-conditioned (seed 1430159848)
        return m + 1, c / (1 + m * m), jnp.exp(m), m.T, m[0], m[::-1], m.reshape(-1), jnp.broadcast_to(m, (2, 5, 3))

    check_against_jit(fn, a, b, c, num_workers=3)


def test_slice_from_zero_then_reshape(rng):
    """A slice starting at 0 followed by a reshape that merges dimensions (was IndexError in _reshape_groups,
    and 'cannot lower primitive split' for jnp.split)."""
    x = random_array(rng, (6, 4), jnp.float32)
    check_against_jit(lambda x: (x[:2].reshape(-1), x[:, :2].reshape(-1), x[:3, 1:].reshape(9)), x)
    check_against_jit(lambda x: [p.reshape(-1) * 2 for p in jnp.split(x, 3)], x)
    check_against_jit(lambda x: jnp.split(x.reshape(2, 3, 4), [1], axis=1), x)


def test_max_and_min_order_negative_zero_below_positive_zero():
    """XLA orders -0 < +0 in max/min; visible through 1/x and relu."""
    zeros = np.float32([0.0, -0.0, 0.0, -0.0])
    other = np.float32([-0.0, 0.0, 0.0, -0.0])
    rng = np.random.default_rng()
    perm = rng.permutation(4)
    x, y = jnp.asarray(zeros[perm]), jnp.asarray(other[perm])

    def fn(x, y):
        both = jnp.concatenate([x[None], y[None]])
        return (1 / jnp.maximum(x, y), 1 / jnp.minimum(x, y), 1 / jax.nn.relu(x), 1 / jnp.max(both, 0),
                1 / jnp.min(both, 0), 1 / jnp.clip(x, y, 1.0))  # fmt: skip

    expected, actual = jax.jit(fn)(x, y), jax_mpk.megakernelize(fn)(x, y)
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))  # +inf vs -inf: the sign of the zero


def test_a_chain_of_1000_fused_elementwise_operations(rng):
    """No RecursionError (the expression builder and the CUDA renderer iterate)."""

    def fn(x):
        for i in range(1000):
            x = jnp.sin(x) * 1.01 + 0.1 if i % 2 else jnp.tanh(x) - 0.2
        return x

    x = random_array(rng, (4, 8), jnp.float32)
    mk = jax_mpk.compile(fn, x)
    assert len(mk.graph.kernels) == 1
    assert_trees_close(mk(x), jax.jit(fn)(x))
    from jax_mpk.codegen import generate

    assert "ops::tanh(" in generate(mk.tasks, mk.schedule, None).text


@pytest.mark.parametrize(
    "name, value",
    [("JAX_MPK_NUM_WORKERS", "0"), ("JAX_MPK_NUM_WORKERS", "abc"), ("JAX_MPK_WATCHDOG_S", "0"),
     ("JAX_MPK_WATCHDOG_S", "nan"), ("JAX_MPK_MIN_TASK_WORK", "-3"), ("JAX_MPK_VALIDATE", "yes"),
     ("JAX_MPK_PLATFORM", "tpu"), ("JAX_MPK_SCHEDULE_SEED", "x"), ("JAX_MPK_TASK_FIXED_COST", "-1"),
     ("JAX_MPK_TASK_FIXED_COST", "nan"), ("JAX_MPK_STREAM_EVICT_FIRST", "2"), ("JAX_MPK_WARP_RING", "on"),
     ("JAX_MPK_STAGE_SHARED_POINTWISE", "yes"), ("JAX_MPK_ELEMENT_LOADS_FIRST", "yes"),
     ("JAX_MPK_SHARED_CODE", "2"), ("JAX_MPK_STATIC_TILES", "x"),
     ("JAX_MPK_STAGING_LOADS_FIRST", "2"), ("JAX_MPK_ROWS_LOADS_FIRST", "yes"),
     ("JAX_MPK_VECTOR_PARTIALS", "2"), ("JAX_MPK_ATTENTION_WARPS", "on"),
     ("JAX_MPK_SCORE_LOADS_FIRST", "2")],
)  # fmt: skip
def test_invalid_knobs_are_refused_at_trace_time_naming_variable_and_value(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    fast = jax_mpk.megakernelize(lambda x: x * 2)
    with pytest.raises(jax_mpk.InvalidArgumentError, match=f"{name}='{value}'"):
        fast(jnp.ones(3))


def test_num_workers_argument_is_checked():
    with pytest.raises(jax_mpk.InvalidArgumentError, match="num_workers=0"):
        jax_mpk.megakernelize(lambda x: x, num_workers=0)


def test_shuffled_schedule_knob_gives_the_same_results(monkeypatch, rng):
    x, w = random_array(rng, (8, 16), jnp.float32), random_array(rng, (16, 32), jnp.float32)
    fn = lambda x, w: jax.nn.softmax(jnp.tanh(x @ w), -1).sum(0)  # noqa: E731
    baseline = jax_mpk.compile(fn, x, w, num_workers=3)
    monkeypatch.setenv("JAX_MPK_SCHEDULE_SEED", "5")
    shuffled = jax_mpk.compile(fn, x, w, num_workers=3)
    assert shuffled.schedule.workers != baseline.schedule.workers
    np.testing.assert_array_equal(np.asarray(shuffled(x, w)), np.asarray(baseline(x, w)))


def test_keyword_arguments_are_traced_like_jax_jit(rng):
    x, y = random_array(rng, (3, 4), jnp.float32), random_array(rng, (3, 4), jnp.float32)

    def fn(x, scale=None, *, shift):
        return x * scale["s"] + shift

    fast = jax_mpk.megakernelize(fn)
    expected = jax.jit(fn)(x, scale={"s": y}, shift=y)
    assert_trees_close(fast(x, scale={"s": y}, shift=y), expected)
    assert_trees_close(fast(x, {"s": y}, shift=y), expected)
    mk = jax_mpk.compile(fn, x, scale={"s": y}, shift=y)
    assert_trees_close(mk(x, scale={"s": y}, shift=y), expected)
    with pytest.raises(jax_mpk.SignatureMismatchError, match=r"kwargs\['shift'\]"):
        mk(x, scale={"s": y}, shift=y[:2])


def test_donate_argnums_is_checked_like_jax_jit():
    def fn(cache, x):
        return cache + x

    for bad in [(2,), (-3,), 5]:
        with pytest.raises(jax_mpk.InvalidArgumentError, match="accepts only 2 positional arguments"):
            jax_mpk.megakernelize(fn, donate_argnums=bad)
        with pytest.raises(ValueError):  # jax.jit refuses the same
            jax.jit(fn, donate_argnums=bad)
    with pytest.raises(jax_mpk.InvalidArgumentError, match="integers"):
        jax_mpk.megakernelize(fn, donate_argnums=("cache",))
    fast = jax_mpk.megakernelize(fn, donate_argnums=-2)  # negative counts from the end, as in jax.jit
    cache = jnp.ones(4)
    np.testing.assert_array_equal(np.asarray(fast(cache, jnp.ones(4))), np.full(4, 2.0))
    variadic = jax_mpk.megakernelize(lambda *a: a[0] * 2, donate_argnums=(1,))
    with pytest.raises(jax_mpk.InvalidArgumentError, match="only 1 positional"):
        variadic(jnp.ones(2))


@pytest.mark.gpu
def test_fuzz_budget_on_the_cuda_megakernel():
    """The same kind of programs through the CUDA megakernel, 8 programs per megakernel (one nvcc compile)."""
    summary = fuzz.fuzz(32, seed=CI_SEED, platform="cuda", batch=8, log=print)
    failures = "\n\n".join(f"[{f['index']}] {f['kind']}: {f['detail']}\n{f['snippet']}" for f in summary["failures"])
    assert not any(summary["counts"].get(kind) for kind in fuzz.FAILURES), failures


def test_in_place_update_merged_into_its_consumer_waits_for_readers_of_the_old_value(rng):
    """A whole-size dynamic_update_slice of a stored value, merged into the kernel that reads its result,
    writes in place as that kernel's second output: the readers of the old value must still run first (fuzz
    program 2026:1013; tanh read the updated buffer)."""
    x, u = random_array(rng, (17,), jnp.float32, 0.5, 2.0), random_array(rng, (17,), jnp.float32)

    def fn(x, u):
        v = jnp.log(x)
        w = lax.dynamic_update_slice(v, u, (0,))
        return jnp.round(v), jnp.tanh(v), jnp.floor(w)

    for workers in (1, 3):
        check_against_jit(fn, x, u, num_workers=workers)


def _sums_of_negative_zeros():
    def fn(x, y):
        return lax.rsqrt(jnp.sum(x, axis=1)), 1 / jnp.sum(y, axis=1), 1 / jnp.sum(y[:, :1], axis=1)

    return fn, np.float16([[-0.0], [3.0], [-0.0], [0.0]]), np.full((4, 3), -0.0, np.float32)


def test_sum_over_one_element_keeps_a_negative_zero():
    """XLA turns a sum over a length-1 axis into the element itself (no +0 added): -0 stays -0, visible
    through rsqrt (fuzz program 2026:9821). Longer sums of -0 are +0, as XLA adds its +0 initial value. The
    CUDA megakernel's sums over one element start from -0 too (tested on the GPU below; here, its source)."""
    fn, x, y = _sums_of_negative_zeros()
    expected, actual = jax.jit(fn)(x, y), jax_mpk.megakernelize(fn)(x, y)
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    from jax_mpk.capture import capture
    from jax_mpk.codegen import generate
    from jax_mpk.fusion import fuse
    from jax_mpk.schedule import schedule
    from jax_mpk.target import Target
    from jax_mpk.tasks import build_task_graph

    tasks = build_task_graph(fuse(capture(jax.make_jaxpr(fn)(x, y)), Target("cuda", 132)), 132)
    text = generate(tasks, schedule(tasks, 132)).text
    assert text.count("= -0.0f;") == 2 and text.count("Sum<float>::init()") == 1, text


@pytest.mark.gpu
def test_sum_over_one_element_keeps_a_negative_zero_on_the_gpu():
    fn, x, y = _sums_of_negative_zeros()
    expected, actual = jax.jit(fn)(x, y), jax_mpk.megakernelize(fn)(x, y)
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_product_over_one_contraction_element_keeps_a_negative_zero():
    """XLA turns a dot_general with one contraction element into a multiply: -2 * +0 is -0, visible through
    rsqrt as -inf (CPU fuzz 2026:3985). The CPU executor starts that one-term sum from -0; sums of two or more
    -0 products are +0 in XLA and here. (The CUDA product bodies start every sum from +0: float contract.)"""

    def fn(a, b, c, d):
        return lax.rsqrt(a @ b), 1 / (c @ d)

    a, b = np.float32([[-2.0], [3.0]]), np.float32([[0.0, -0.0, 1.5]])
    c, d = np.float32([[-2.0, 1.0]]), np.float32([[0.0], [-0.0]])
    expected, actual = jax.jit(fn)(a, b, c, d), jax_mpk.megakernelize(fn)(a, b, c, d)
    for e, x in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(e))
    assert np.isneginf(np.asarray(actual[0])[0, 0]) and np.asarray(actual[1])[0, 0] == np.inf


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")
def test_integer_abs_reaches_ptxas_without_abs_s32(tmp_path):
    """ptxas (CUDA 13.0) may take abs.s32's result to be non-negative; abs(INT32_MIN) is INT32_MIN, and a rem of
    it then lost its sign in one of two binaries holding the same device code (GPU fuzz 2026:312-319, 2 for -2;
    the SASS in docs/notes/fuzz.md). The integer abs negates through an opaque step instead."""
    from jax_mpk.toolchain import arch_flags, include_dir, nvcc

    source = tmp_path / "abs.cu"
    source.write_text(
        '#include "jax_mpk/scalar_ops.h"\n'
        "__global__ void rem_of_abs(const int* a, const int* b, int* out) {\n"
        "  out[threadIdx.x] = jax_mpk::ops::rem(jax_mpk::ops::abs_(a[threadIdx.x]), b[threadIdx.x]);\n}\n"
    )
    ptx = tmp_path / "abs.ptx"
    subprocess.run([nvcc(), "-ptx", "-std=c++17", "-O3", *arch_flags("9.0"), f"-I{include_dir()}", "-o", str(ptx),
                    str(source)], check=True, capture_output=True)  # fmt: skip
    text = ptx.read_text()
    assert "rem.s32" in text and "abs.s32" not in text, text


@pytest.mark.gpu
def test_rem_of_the_abs_of_int32_min_in_gpu_fuzz_batch_2026_312():
    """The batch where the megakernel gave rem(abs(INT32_MIN), 18) = 2 (XLA: -2)."""
    table = fuzz.generators()
    programs = [fuzz.generate(fuzz.program_seed(2026, i), table) for i in range(312, 320)]
    outcomes = fuzz.check_batch(programs, "cuda")
    assert not [o for o in outcomes if o.failed], outcomes


def test_cumlogsumexp_is_only_generated_for_floats_and_refused_for_integers():
    """jax.jit cannot lower cumlogsumexp of an int32 (OverflowError converting its identity -inf to an
    integer): 12 of 420 GPU programs of seed 2026 were such lines and ended as `oracle_error`. The generator
    gives it float operands only, and jax_mpk refuses an integer operand instead of inventing a meaning."""
    b = fuzz.Builder(np.random.default_rng(0))
    b.arg((3, 4), "i32")
    with pytest.raises(fuzz.NoOperand):
        fuzz.GENERATORS["cumlogsumexp"](b)
    assert fuzz.GENERATORS["cumsum"](b).startswith("lax.cumsum(a0, axis=")  # the other scans take integers
    b.arg((5,), "f32")
    assert fuzz.GENERATORS["cumlogsumexp"](b).startswith("lax.cumlogsumexp(a1, axis=0, reverse=")
    x = np.int32([[3, -1, 2], [0, 5, -7]])
    with pytest.raises(OverflowError):  # the oracle's own failure, on every jax version seen (0.10.2, 0.11.2)
        jax.jit(lax.cumlogsumexp)(x)
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="cumlogsumexp of int32"):
        jax_mpk.megakernelize(lax.cumlogsumexp)(x)
    # the float scans along any axis, either direction, with infinities and NaN in the input
    y = np.float32([[1.0, -np.inf, 2.0], [np.inf, 0.5, np.nan], [-3.0, 4.0, -np.inf]])
    for axis in (0, 1):
        for reverse in (False, True):
            check_against_jit(lambda y: [s(y, axis=axis, reverse=reverse) for s in
                                         (lax.cumsum, lax.cummax, lax.cummin, lax.cumlogsumexp)], y)


def _integer_products(a, b, c):
    """int32 products whose sums wrap around (XLA's int32 arithmetic), in the layouts the GPU fuzz runs met
    (2026:83, 262, 268): a batched einsum, a transposed operand, and int8 operands widened to int32."""
    return (jnp.einsum("ikj,kl->ijl", a, b), a[0].T @ b,
            lax.dot_general(c, c.T, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))  # fmt: skip


def _integer_product_operands(rng):
    wide = lambda shape: rng.integers(-(2**31), 2**31, size=shape, dtype=np.int64).astype(np.int32)  # noqa: E731
    return wide((5, 7, 3)), wide((7, 4)), rng.integers(-128, 128, size=(3, 5)).astype(np.int8)


def test_integer_products_wrap_like_xla_and_never_use_the_float_product_bodies(rng):
    """The GPU's product bodies accumulate in float32, so int32 products were exact only below 2^24 (|diff| up to
    4.3e9 on the H200). An integer dot_general is now the integer sum of the products over a [..., k] view,
    run by the reduction bodies of both executors."""
    args = _integer_product_operands(rng)
    for workers in (1, 3):
        expected, actual = jax.jit(_integer_products)(*args), jax_mpk.megakernelize(_integer_products,
                                                                                    num_workers=workers)(*args)
        for e, a in zip(expected, actual):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    from jax_mpk.capture import capture
    from jax_mpk.graph import Dot

    captured = capture(jax.make_jaxpr(_integer_products)(*args))
    seen, stack = set(), list(captured.outputs)
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            assert not isinstance(node, Dot), node
            stack.extend(node.children)


def _exact_integer_products(a, b, c):
    """``_integer_products`` in int64 NumPy, wrapped to int32 at the end (what two's-complement sums give)."""
    a, b, c = (np.asarray(v, np.int64) for v in (a, b, c))
    return [r.astype(np.int32) for r in (np.einsum("ikj,kl->ijl", a, b), a[0].T @ b, c @ c.T)]


@pytest.mark.gpu
def test_integer_products_are_exact_on_the_gpu(rng):
    """Against exact integer arithmetic, not jax.jit: on the H200 (jax 0.11.2) XLA returned twice the exact value
    for every element of the int8 ``c @ c.T`` with an int32 result; the megakernel returned the exact one."""
    args = _integer_product_operands(rng)
    actual = jax_mpk.megakernelize(_integer_products)(*args)
    for e, a in zip(_exact_integer_products(*args), actual):
        np.testing.assert_array_equal(np.asarray(a), e)


def _gpu_like_sum_then_sine():
    """GPU fuzz program 2026:260 reduced: sin of a float32 sum of 992 terms near 609, where one ulp of the sum
    (6.1e-5) is 6.1e-5 of the sine. The GPU sums in float32 by tiles, XLA in its own order, the CPU executor in
    double: the sine differs by more than float32's tolerance without anyone being wrong."""
    a = fuzz.Value("a2", (31, 32), "f32")  # the input's values follow from the seed and the argument's name
    lines = (fuzz.Line((fuzz.Value("v1", (31, 32), "f32"),), "lax.expm1(a2)"),
             fuzz.Line((fuzz.Value("v2", (), "f32"),), "lax.reduce(v1, np.array(0, f32)[()], lax.add, (0, 1))"),
             fuzz.Line((fuzz.Value("v3", (), "f32"),), "lax.sin(v2)"))  # fmt: skip
    return fuzz.Program(63190909, (a,), lines, ("v3",), fuzz.Knobs(1, 1 << 14, None))


@pytest.mark.parametrize("error,kind", [(0.0, "ill_conditioned"), (1e-2, "mismatch")])
def test_amplified_summation_order_is_told_apart_from_a_wrong_result(monkeypatch, error, kind):
    """Emulate the GPU: the float32 sum one ulp from jax.jit's (a different summation order, as on the H200), then
    the sine. The fuzzer classifies it `ill_conditioned`, not `mismatch`; the same result off by 1e-2 (160 ulp of
    the sum; sqrt(992) half-ulps of the sum of the terms' magnitudes, 1100, is 2e-3) stays a mismatch. The ulp is
    taken from jax.jit's own sum, away from the exact one (closer would be `precision`): whether an in-order
    float32 sum lands there depends on the numpy and XLA builds (with numpy 2.4 and jaxlib 0.10.2 it equals XLA's)."""
    program = _gpu_like_sum_then_sine()
    (x,) = program.inputs()
    xla_sum = np.float32(jax.jit(lambda a: jnp.sum(jnp.expm1(a)))(x))
    exact_sum = np.sum(np.expm1(x.astype(np.float64)))

    def float32_one_ulp_off(program, args, platform):
        total = np.nextafter(xla_sum, np.float32(np.inf if xla_sum >= exact_sum else -np.inf))
        return [np.float32(np.sin(np.float64(total)) + error)]

    monkeypatch.setattr(fuzz, "run_megakernel", float32_one_ulp_off)
    expected = np.asarray(jax.jit(program.function())(x)[0])
    assert not fuzz.agree(float32_one_ulp_off(program, [x], "cpu")[0], expected)  # the case the GPU run met
    assert fuzz.check(program).kind == kind


def test_cancelling_infinities_of_float32_sums_are_ill_conditioned_not_mismatches():
    """CPU fuzz program 2026:104 reduced: a float32 cumsum of a row holding -3e38 and later +3e38. XLA's tree
    loses the small terms on one side of the cancellation, the CPU executor's sequential double sum on the
    other (float64 line by line agrees with neither): not determined by the contract, and classified so."""
    x = fuzz.Value("a0", (13, 1, 31), "f32")
    line = fuzz.Line((fuzz.Value("v1", (13, 1, 31), "f32"),), "lax.cumsum(a0, axis=2, reverse=False)")
    program = fuzz.Program(1223321572, (x,), (line,), ("v1",), fuzz.Knobs(1, 1 << 14, None))
    assert np.sum(np.abs(program.inputs()[0]) > 1e38) >= 2
    assert fuzz.check(program).kind == "ill_conditioned"


@pytest.mark.parametrize("position,kind", [(4, "ill_conditioned"), (1, "mismatch")])
def test_a_product_that_overflows_in_another_association_is_told_apart_from_a_wrong_one(monkeypatch, position,
                                                                                         kind):
    """GPU fuzz program 2026:247 reduced: a float32 cumprod that stays finite in XLA's order, one of whose
    entries the GPU (a product by tiles) returned as inf. Entry 4 (1e25 * 1e-20 * 1e25 * 1e-20 * 1e25) has a
    sub-product of its terms, 1e75, beyond float32: another association may overflow, `ill_conditioned`. Entry 1
    (1e25 * 1e-20) has none: inf there is a `mismatch`."""
    x = fuzz.Value("a0", (1, 8), "f32")
    line = fuzz.Line((fuzz.Value("v1", (1, 8), "f32"),), "lax.cumprod(a0, axis=1, reverse=False)")
    program = fuzz.Program(1, (x,), (line,), ("v1",), fuzz.Knobs(1, 1 << 14, None))
    terms = np.tile(np.float32([1e20, 1e-20]), 4)[None]
    monkeypatch.setattr(fuzz.Program, "inputs", lambda self: [terms])
    expected = np.asarray(jax.jit(program.function())(terms)[0])
    assert np.all(np.isfinite(expected))

    def overflowing_at(program, args, platform):
        ours = expected.copy()
        ours[0, position] = np.inf
        return [ours]

    monkeypatch.setattr(fuzz, "run_megakernel", overflowing_at)
    assert fuzz.check(program).kind == kind


@pytest.mark.gpu
def test_sorted_rows_with_nan_then_argmin_on_the_gpu():
    """GPU fuzz program 2026:456 (|diff| 3 in argmin of sorted sqrt(tan(x)) rows of float16): the sorted rows
    equal jax.jit's, the argmin is the first NaN of each row (XLA:GPU may give a later one: see below), and the
    whole program is no failure."""
    program = fuzz.generate(fuzz.program_seed(2026, 456))
    x = next(a for a, v in zip(program.inputs(), program.args) if v.name == "a1")

    def chain(x):
        rows = lax.sort(lax.sqrt(lax.tan(x)))
        return rows, lax.argmin(rows, 1, jnp.int32)

    (expected_rows, _), (rows, first) = jax.jit(chain)(x), jax_mpk.megakernelize(chain)(x)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(expected_rows))
    reference_lax = fuzz.FLOAT64_NAMESPACE["lax"]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(reference_lax.argmin(rows, 1, jnp.int32)))
    assert not fuzz.check(program, "cuda").failed


def test_reference_arg_reductions_take_the_first_of_several_nans():
    """GPU fuzz 2026:456: argmin of sorted float16 rows ending in several NaNs. jax's arg-reducer keeps the NaN
    that arrives as its first operand, so XLA:GPU's tree returns any of them (3 places off), where jax_mpk and
    XLA:CPU give the first. The reference decides NaN rows itself, whatever order the reduction takes."""
    x = jnp.asarray([[1.0, np.nan, 2.0, np.nan], [3.0, 1.0, 2.0, 0.5]], jnp.float32)

    def last_nan_first(x, axis, index_dtype):  # an arg-reduction combining from the end, like a GPU tree may
        n = x.shape[axis]
        return n - 1 - lax.argmin(lax.rev(x, (axis,)), axis, index_dtype)

    reference_lax = fuzz.FLOAT64_NAMESPACE["lax"]
    assert last_nan_first(x, 1, jnp.int32).tolist()[0] == 3
    assert reference_lax._first_nan_or(last_nan_first, x, 1, jnp.int32).tolist() == [1, 3]
    assert reference_lax.argmax(x, 1, jnp.int32).tolist() == [1, 0] and reference_lax.add is lax.add
    # the program's comparison: jax.jit giving the last NaN (as on the H200) is not held against jax_mpk
    values = fuzz.Value("a0", (2, 4), "f32")
    line = fuzz.Line((fuzz.Value("v1", (2,), "i32"),), "lax.argmin(a0, 1, i32)")
    program = fuzz.Program(0, (values,), (line,), ("v1",), fuzz.Knobs(1, 1 << 14, None))
    (reference,) = fuzz.reference_rounded(program, [np.asarray(x)])
    ours = np.asarray(jax_mpk.megakernelize(lambda a: lax.argmin(a, 1, jnp.int32))(x))
    assert ours.tolist() == reference.tolist() == [1, 3]
    assert fuzz.at_least_as_close(ours, np.asarray(last_nan_first(x, 1, jnp.int32)), reference)


def test_reference_max_and_min_reductions_propagate_nan():
    """CPU fuzz 2026:587: XLA:CPU (jaxlib 0.10.2) drops a row's NaN when it reduces the last axis of a
    [32, 17, 32] array with min or max (jax.jit and op-by-op alike, so op-by-op cannot expose it). jax_mpk gives
    NaN, as XLA's semantics say; so does the fuzzer's reference, which the comparison then trusts."""
    x = np.zeros((32, 17, 32), np.float32)
    x[0, 3, 15], x[0, 3, 7] = np.nan, -np.inf
    values = fuzz.Value("a0", x.shape, "f32")
    reductions = {"v1": "lax.reduce(a0, np.array(inf, f32)[()], lax.min, (2,))",
                  "v2": "lax.reduce(a0, np.array(-inf, f32)[()], lax.max, (2,))"}  # fmt: skip
    lines = tuple(fuzz.Line((fuzz.Value(name, (32, 17), "f32"),), expr) for name, expr in reductions.items())
    program = fuzz.Program(0, (values,), lines, ("v1", "v2"), fuzz.Knobs(1, 1 << 14, None))
    ours = [np.asarray(r) for r in jax_mpk.megakernelize(program.function())(x)]
    for result, reference in zip(ours, fuzz.reference_rounded(program, [x])):
        assert np.isnan(result[0, 3]) and np.isnan(reference[0, 3])
        np.testing.assert_array_equal(np.isnan(result), np.isnan(reference))


def test_rounding_trials_keep_signed_zeros():
    """The perturbed reference must not turn -0 into +0 (-0 + 0 is +0): a wrong sign of zero, seen through 1/x,
    stays a mismatch instead of passing as rounding."""
    x = fuzz.Value("a0", (4,), "f32")
    lines = (fuzz.Line((fuzz.Value("v1", (4,), "f32"),), "lax.neg(a0)"),
             fuzz.Line((fuzz.Value("v2", (4,), "f32"),), "lax.div(f32(1), v1)"))  # fmt: skip
    program = fuzz.Program(0, (x,), lines, ("v2",), fuzz.Knobs(1, 1 << 14, None))
    zeros = [np.zeros(4, np.float32)]
    (trials,) = fuzz.reference_rounded(program, zeros, fuzz.ROUNDING_TRIALS)
    assert np.all(trials == -np.inf)
    assert not fuzz.within_rounding(np.full(4, np.inf, np.float32), np.full(4, -np.inf), trials)


def _top_k_with_nan_and_signed_zeros():
    x = np.float32([[1, np.nan, 3, np.nan, -np.inf, 0.0, -0.0, np.inf], [0.0, -0.0, 0.0, -0.0, 2, 2, 1, 1],
                    [-np.inf] * 8])  # fmt: skip
    return (lambda x: (lax.top_k(x, 8), lax.top_k(x, 3))), x


def _assert_bitwise_equal(actual, expected):
    """Equal bits (signed zeros included), NaN where NaN (payloads are not part of the contract)."""
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        nan = np.isnan(e) if e.dtype.kind == "f" else np.zeros(e.shape, bool)
        np.testing.assert_array_equal(np.isnan(a) if a.dtype.kind == "f" else nan, nan)
        np.testing.assert_array_equal(a[~nan].view(np.uint8), e[~nan].view(np.uint8))


def test_top_k_orders_nan_first_and_positive_zero_above_negative_zero():
    """top_k had no generator (the generic one cannot call it); with one, rows holding NaN came out wrong
    (NaN, then -inf at position 8, past the row) and -0 counted as +0. jax orders NaN above +inf and +0 above
    -0, the lower position first among equal entries."""
    fn, x = _top_k_with_nan_and_signed_zeros()
    _assert_bitwise_equal(jax_mpk.megakernelize(fn)(x), jax.jit(fn)(x))


def test_top_k_puts_every_nan_first_whatever_its_sign_bit():
    """XLA's top_k orders by its total order, where a NaN with the sign bit set comes last; x86 makes such
    NaNs (pow of a negative base: the CI budget's program 16:30 after top_k got a generator). The sign of a NaN
    is not part of the contract: jax_mpk puts every NaN first, and so does the fuzzer's reference."""
    x = np.float32([1, 3, 2])
    x[0] = np.negative(np.float32(np.nan))
    values = fuzz.Value("a0", (3,), "f32")
    line = fuzz.Line((fuzz.Value("v1", (3,), "f32"), fuzz.Value("v2", (3,), "i32")), "lax.top_k(a0, 3)", True)
    program = fuzz.Program(0, (values,), (line,), ("v1", "v2"), fuzz.Knobs(1, 1 << 14, None))
    ours = [np.asarray(r) for r in jax_mpk.megakernelize(program.function())(x)]
    reference = fuzz.reference_rounded(program, [x])
    assert ours[1].tolist() == reference[1].tolist() == [0, 1, 2] and np.isnan(ours[0][0])
    theirs = [np.asarray(r) for r in jax.jit(program.function())(x)]
    assert all(fuzz.at_least_as_close(o, t, r) for o, t, r in zip(ours, theirs, reference))


@pytest.mark.gpu
def test_top_k_orders_nan_first_and_positive_zero_above_negative_zero_on_the_gpu():
    fn, x = _top_k_with_nan_and_signed_zeros()
    _assert_bitwise_equal(jax_mpk.megakernelize(fn)(x), jax.jit(fn)(x))
