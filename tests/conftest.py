"""Shared helpers: compare a megakernelized function with jax.jit on fresh random inputs."""

from __future__ import annotations

import os
import sys

# Four CPU devices (before jax starts) for the collective tests, which shard_map over 2 or 4 of them; every
# other test runs on the first, as it would by default. XLA without excess precision rounds every operation to
# its dtype, as jax_mpk does (the fuzzer's reference relies on it; see docs/float_contract.md).
for flag in ("--xla_force_host_platform_device_count=4", "--xla_allow_excess_precision=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# Split every kernel into as many tasks as the workers allow, so that tile-level dependencies are exercised
# even at test sizes; validate every graph the tests build.
os.environ.setdefault("JAX_MPK_MIN_TASK_WORK", "1")
os.environ.setdefault("JAX_MPK_VALIDATE", "1")
os.environ.setdefault("JAX_MPK_WATCHDOG_S", "20")

import jax_mpk  # noqa: E402

TOLERANCES = {
    np.dtype("float32"): dict(rtol=2e-5, atol=2e-5),
    np.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
    np.dtype("float16"): dict(rtol=2e-3, atol=2e-3),
}


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def platform_of_test(request, monkeypatch):
    """Tests without the `gpu` mark exercise the CPU executor, also on a machine with a GPU."""
    if "gpu" in request.keywords:
        monkeypatch.setenv("JAX_MPK_PLATFORM", "cuda")
        yield
        return
    monkeypatch.setenv("JAX_MPK_PLATFORM", "cpu")
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def random_array(rng: np.random.Generator, shape, dtype, low=-2.0, high=2.0):
    dtype = np.dtype(dtype)
    if dtype == np.dtype(bool):
        return jnp.asarray(rng.random(shape) < 0.5)
    if dtype.kind in "iu":
        return jnp.asarray(rng.integers(int(low), int(high) + 1, size=shape).astype(dtype))
    return jnp.asarray(rng.uniform(low, high, size=shape).astype(np.float32)).astype(dtype)


# Whole-model comparisons in low precision: rounding differences compound over layers, so compare the
# relative error of each tensor as a whole (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
MODEL_RELATIVE_ERROR = {np.dtype("float32"): 1e-5, np.dtype(jnp.bfloat16): 1e-2, np.dtype("float16"): 3e-3}


def assert_model_outputs_close(actual, expected, dtype):
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        a64, e64 = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert np.all(np.isfinite(a64)), "non-finite values in the megakernel's output"
        error = np.linalg.norm(a64 - e64) / max(np.linalg.norm(e64), 1e-30)
        assert error < MODEL_RELATIVE_ERROR[np.dtype(dtype)], f"relative error {error:.2e} for {dtype}"


def assert_trees_close(actual, expected, dtype=None):
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        tol = TOLERANCES.get(np.dtype(dtype or e.dtype), dict(rtol=0, atol=0))
        if np.dtype(e.dtype).kind in "biu":
            chex.assert_trees_all_equal(a, e)
        else:
            chex.assert_trees_all_close(
                np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64), **tol
            )


def check_against_jit(fn, *args, dtype=None, num_workers=None):
    """megakernelize(fn)(*args) equals jax.jit(fn)(*args); returns the megakernelized callable."""
    expected = jax.jit(fn)(*args)
    fast = jax_mpk.megakernelize(fn, num_workers=num_workers)
    actual = fast(*args)
    assert_trees_close(actual, expected, dtype)
    return fast


@pytest.fixture
def rng():
    # fresh inputs on every run; the seed is printed so that a failure can be replayed
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)
