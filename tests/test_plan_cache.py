"""Warm start: a plan is cached on disk, and a new process that traces the same step loads it instead of
planning again."""

from __future__ import annotations

import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_array

import jax_mpk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import warm_start  # noqa: E402  (benchmarks/warm_start.py: cold, trace and warm processes on one cache)


def _warm_start(tmp_path, *argv: str) -> dict:
    record = warm_start.main(["--model", "qwen3-tiny", "--ctx", "64", "--cache-dir", str(tmp_path), *argv])
    assert not record["cold"]["from_cache"] and record["warm"]["from_cache"]
    assert record["cold"]["plan"] == record["warm"]["plan"]
    assert "capture" in record["cold"]["stages_s"] and "capture" not in record["warm"]["stages_s"]  # not planned
    assert len(list((tmp_path / "plans").glob("*.pkl"))) == 1
    return record


def test_a_new_process_loads_the_plan_without_planning(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MPK_PLATFORM", "cpu")
    record = _warm_start(tmp_path)
    cold, warm = record["cold"], record["warm"]
    assert warm["tokens"] == cold["tokens"] and warm["logits_sum"] == cold["logits_sum"]  # one plan, one result
    assert record["warm_minus_make_jaxpr_s"] < 1.0  # issue 13: at most 1 s more than jax.make_jaxpr


def test_a_gpu_plan_is_loaded_without_planning_on_any_machine(tmp_path):
    """--plan-only: the plan of a GPU target, traced and looked up as a first call does, without a GPU."""
    record = _warm_start(tmp_path, "--plan-only", "--sms", "8")
    assert "code generation" in record["cold"]["stages_s"]
    assert record["warm_minus_make_jaxpr_s"] < 1.0


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
def test_gpu_warm_start_costs_little_more_than_tracing(tmp_path, monkeypatch):
    """On the GPU the cached plan also skips code generation; the cubin comes from nvcc's cache."""
    monkeypatch.setenv("JAX_MPK_PLATFORM", "cuda")
    record = _warm_start(tmp_path)
    assert record["warm"]["tokens"] == record["cold"]["tokens"]
    assert record["warm_minus_make_jaxpr_s"] < 1.0
