"""Warm start: a plan is cached on disk, and a new process that traces the same step loads it instead of
planning again."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_array

import jax_mpk

STEP_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
import jax_mpk
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens

cfg = TinyConfig(layers=4)
params = init_params(cfg, jax.random.PRNGKey(0))
cache = init_cache(cfg, jax.random.PRNGKey(1))
args = (params, random_tokens(cfg, 0), jnp.int32(5), *cache)
step = make_decode_step(cfg)
start = time.perf_counter()
jax.make_jaxpr(step)(*args)
trace_s = time.perf_counter() - start
start = time.perf_counter()
fast = jax_mpk.megakernelize(step)
out = jax.block_until_ready(fast(*args))
first_call_s = time.perf_counter() - start
(plan,) = fast.plans.values()
print(json.dumps(dict(from_cache=plan.from_cache, key=plan.key, make_jaxpr_s=trace_s, first_call_s=first_call_s,
                      logits=np.asarray(out[1]).tolist())))
"""


def _run_step(cache_dir: pathlib.Path, **env) -> dict:
    environ = {**os.environ, "JAX_MPK_CACHE_DIR": str(cache_dir), "JAX_MPK_PLATFORM": "cpu", **env}
    script = STEP_SCRIPT.format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_loads_the_plan_without_planning(tmp_path):
    cold = _run_step(tmp_path)
    warm = _run_step(tmp_path)
    for name, run in [("cold", cold), ("warm", warm)]:
        print(f"{name}: make_jaxpr {run['make_jaxpr_s']:.2f} s, first call {run['first_call_s']:.2f} s, "
              f"from the cache: {run['from_cache']}")
    assert not cold["from_cache"] and warm["from_cache"] and cold["key"] == warm["key"]
    np.testing.assert_array_equal(np.asarray(warm["logits"]), np.asarray(cold["logits"]))
    assert len(list((tmp_path / "plans").glob("*.pkl"))) == 1


def test_the_key_follows_the_function_the_signature_and_the_knobs(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    scale = np.float32(rng.uniform(1, 2))
    f = lambda x: jnp.tanh(x) * scale  # noqa: E731
    x = random_array(rng, (4, 6), "float32")
    first = jax_mpk.compile(f, x)
    again = jax_mpk.compile(f, x)
    assert not first.from_cache and again.from_cache and again.key == first.key
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(jax.jit(f)(x)), rtol=1e-6)
    assert len(again.tasks.tasks) == first.call_plan.num_tasks  # the stages, computed again when looked at
    table = np.asarray(rng.uniform(size=(4, 6)), np.float32)  # closed-over constants count by their contents
    assert not jax_mpk.compile(lambda x: x * table, x).from_cache
    assert jax_mpk.compile(lambda x: x * table.copy(), x).from_cache
    assert not jax_mpk.compile(lambda x: x * (table + 1), x).from_cache
    assert not jax_mpk.compile(f, random_array(rng, (4, 7), "float32")).from_cache
    assert not jax_mpk.compile(f, x, num_workers=3).from_cache
    monkeypatch.setenv("JAX_MPK_FORCE_COMPILE", "1")
    assert not jax_mpk.compile(f, x).from_cache
    monkeypatch.setenv("JAX_MPK_FORCE_COMPILE", "0")
    monkeypatch.setenv("JAX_MPK_MIN_TASK_WORK", "4096")
    assert not jax_mpk.compile(f, x).from_cache


def test_an_unreadable_plan_is_planned_again(tmp_path, monkeypatch, rng, caplog):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    x = random_array(rng, (3, 5), "float32")
    jax_mpk.compile(jnp.sin, x)
    (path,) = (tmp_path / "plans").glob("*.pkl")
    path.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="jax_mpk"):
        again = jax_mpk.compile(jnp.sin, x)
    assert not again.from_cache and "unreadable cached plan" in caplog.text
    np.testing.assert_allclose(np.asarray(again(x)), np.sin(np.asarray(x)), rtol=1e-6)
    assert jax_mpk.compile(jnp.sin, x).from_cache  # rewritten


def test_stages_are_logged_with_their_time(tmp_path, monkeypatch, rng, caplog):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="jax_mpk"):
        jax_mpk.compile(lambda x: jnp.exp(x) @ x.T, random_array(rng, (3, 5), "float32"))
    for stage in ["tracing", "capture", "fusion", "tiling", "scheduling", "validation", "serialization"]:
        assert f"jax_mpk: {stage} took" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jax_mpk"):  # quiet by default
        jax_mpk.compile(lambda x: jnp.exp(x) @ x.T, random_array(rng, (3, 6), "float32"))
    assert caplog.text == ""


@pytest.mark.gpu
def test_gpu_warm_start_costs_little_more_than_tracing(tmp_path):
    """On the GPU the cached plan also skips code generation; the cubin comes from nvcc's cache."""
    cold = _run_step(tmp_path, JAX_MPK_PLATFORM="cuda")
    warm = _run_step(tmp_path, JAX_MPK_PLATFORM="cuda")
    print(f"GPU cold first call {cold['first_call_s']:.2f} s; warm {warm['first_call_s']:.2f} s "
          f"(make_jaxpr {warm['make_jaxpr_s']:.2f} s)")
    assert warm["from_cache"] and warm["first_call_s"] < warm["make_jaxpr_s"] + 1.0
