"""A tiny Llama/Qwen3-style decode step, megakernelized, equals jax.jit over several steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_model_outputs_close, assert_trees_close
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens

import jax_mpk


@pytest.mark.parametrize(
    "cfg",
    [
        TinyConfig(),
        TinyConfig(qk_norm=True, batch=2, heads=4, kv_heads=1),
        TinyConfig(dtype="bfloat16", layers=1, batch=3),
    ],
    ids=["llama", "qwen3-qknorm-b2", "bf16-b3"],
)
def test_decode_steps_match_jit(cfg, rng):
    seed = int(rng.integers(1 << 30))
    params = init_params(cfg, jax.random.PRNGKey(seed))
    cache_k, cache_v = init_cache(cfg, jax.random.PRNGKey(seed + 1))
    step = make_decode_step(cfg)
    reference = jax.jit(step)
    fast = jax_mpk.megakernelize(step)
    tokens = random_tokens(cfg, seed)
    ref_state = fast_state = (tokens, cache_k, cache_v)
    for pos in range(4):
        ref_tokens, ref_logits, ref_k, ref_v = reference(params, ref_state[0], jnp.int32(pos), *ref_state[1:])
        tokens_, logits, k, v = fast(params, fast_state[0], jnp.int32(pos), *fast_state[1:])
        assert_model_outputs_close((logits, k, v), (ref_logits, ref_k, ref_v), cfg.dtype)
        if cfg.dtype == "float32":
            np.testing.assert_array_equal(tokens_, ref_tokens)
        # both continue from the reference's tokens so that a near-tie in bf16 cannot fork the runs
        ref_state = (ref_tokens, ref_k, ref_v)
        fast_state = (ref_tokens, k, v)
    assert len(fast.plans) == 1  # one trace for all steps


def test_kv_cache_is_updated_in_place_with_donation():
    cfg = TinyConfig(layers=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache_k, cache_v = init_cache(cfg, jax.random.PRNGKey(1))
    step = make_decode_step(cfg)
    fast = jax_mpk.megakernelize(step, donate_argnums=(3, 4))
    expected = jax.jit(step)(params, random_tokens(cfg, 0), jnp.int32(2), cache_k, cache_v)
    out = fast(params, random_tokens(cfg, 0), jnp.int32(2), cache_k, cache_v)
    (megakernel,) = fast.plans.values()
    n_params = len(jax.tree_util.tree_leaves(params))
    # the caches (flat arguments after params, tokens and pos) alias results 2 and 3
    assert megakernel.graph.aliases == {n_params + 2: 2, n_params + 3: 3}
    assert cache_k.is_deleted() and cache_v.is_deleted()  # donated: XLA reused their buffers
    assert_trees_close(out, expected)


def test_inside_jit_and_retrace_on_new_shape(rng):
    def f(x, w):
        return jax.nn.relu(x @ w).sum(axis=-1)

    fast = jax_mpk.megakernelize(f)
    outer = jax.jit(lambda x, w: fast(x, w) * 2)
    for shape in [(2, 8), (2, 8), (3, 8)]:
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
        assert_trees_close(outer(x, w), jax.jit(lambda x, w: f(x, w) * 2)(x, w))
        assert_trees_close(fast(x, w), jax.jit(f)(x, w))
    assert len(fast.plans) == 2  # (2, 8) traced once, (3, 8) once


def test_pytrees_in_and_out(rng):
    def f(tree):
        return {"sum": tree["a"] + tree["b"][0], "pair": (tree["b"][1] * 2, tree["a"].max())}

    tree = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), jnp.asarray(rng.normal(size=(2,)), jnp.float32)]}
    fast = jax_mpk.megakernelize(f)
    assert_trees_close(fast(tree), jax.jit(f)(tree))
    assert jax.tree_util.tree_structure(fast(tree)) == jax.tree_util.tree_structure(f(tree))


def test_one_custom_call_replaces_the_function():
    cfg = TinyConfig(layers=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, jax.random.PRNGKey(1))
    fast = jax_mpk.megakernelize(make_decode_step(cfg))
    hlo = jax.jit(fast).lower(params, random_tokens(cfg, 0), jnp.int32(0), *cache).as_text()
    assert hlo.count("jax_mpk_megakernel") == 1
    assert "dot_general" not in hlo and "stablehlo.dot" not in hlo
