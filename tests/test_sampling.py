"""Sampling inside the step: jax.random with a key passed in, top_k, the cumsum family, and a decode loop that
samples (temperature, top-k, top-p, categorical) with the same tokens as jax.jit for the same keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_against_jit, random_array
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step

import jax_mpk
from jax_mpk.layout import NodeOp


def _key(rng) -> jax.Array:
    return jax.random.PRNGKey(int(rng.integers(0, 2**31)))


def test_random_draws_equal_jit_for_the_same_key(rng):
    logits = random_array(rng, (3, 37), "float32", -3, 3)

    def f(key, logits):
        typed = jax.random.wrap_key_data(key)  # typed keys made inside the step work too
        return (jax.random.categorical(key, logits), jax.random.bits(key, (5, 3)), jax.random.uniform(typed, (2, 7)),
                jax.random.normal(key, (11,)), jax.random.split(key, 3), jax.random.fold_in(key, 7),
                jax.random.key_data(jax.random.fold_in(typed, 3)))  # fmt: skip

    check_against_jit(f, _key(rng), logits)


def test_views_of_typed_key_arrays_are_refused():
    split_then_index = lambda k: jax.random.key_data(jax.random.split(jax.random.wrap_key_data(k))[1])  # noqa: E731
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="typed PRNG keys"):
        jax_mpk.megakernelize(split_then_index)(jax.random.PRNGKey(0))


@pytest.mark.parametrize("shape,k", [((3, 37), 5), ((2, 3, 9), 9), ((1, 152_000), 4)])
def test_top_k(shape, k, rng):
    x = random_array(rng, shape, "float32", -4, 4)
    x = x.at[..., 1].set(x[..., 0])  # a tie: the lower position comes first
    if shape[-1] > k + 3:
        x = x.at[0, ..., -3:].set(-jnp.inf)  # -inf entries are taken in position order once the rest is gone
    check_against_jit(lambda x: jax.lax.top_k(x, k), x)


def test_top_k_of_ints_and_of_a_row_with_only_minus_infinity(rng):
    check_against_jit(lambda x: jax.lax.top_k(x, 6), random_array(rng, (4, 13), "int32", -5, 5))
    check_against_jit(lambda x: jax.lax.top_k(x, 3), jnp.full((2, 5), -jnp.inf, jnp.float32))


@pytest.mark.parametrize("name", ["cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"])
@pytest.mark.parametrize("axis,reverse", [(0, False), (1, True), (2, False)])
def test_scans(name, axis, reverse, rng):
    fn = getattr(jax.lax, name)
    x = random_array(rng, (3, 7, 5), "float32", 0.5 if name == "cumprod" else -2, 1.5 if name == "cumprod" else 2)
    check_against_jit(lambda x: fn(x, axis=axis, reverse=reverse), x)


def test_integer_cumsum_and_jnp_cumsum(rng):
    check_against_jit(lambda x: (jnp.cumsum(x, axis=1), jnp.cumsum(x)), random_array(rng, (4, 9), "int32", -9, 9))


@pytest.mark.parametrize("dtype", ["float32", "int32", "bfloat16"])
def test_sort_and_argsort(dtype, rng):
    x = random_array(rng, (3, 41), dtype, -9, 9)  # few distinct values: many ties, kept in their order
    if dtype == "float32":
        x = x.at[1, 3].set(jnp.nan).at[2, 7].set(-jnp.inf)  # NaN sorts last

    def f(x):
        return (jnp.sort(x, axis=1), jnp.argsort(x, axis=1), jnp.sort(x, axis=0, descending=True),
                jax.lax.sort_key_val(x.T, jnp.arange(x.size, dtype=jnp.int32).reshape(x.T.shape), dimension=0))  # fmt: skip

    check_against_jit(f, x)


def test_sort_stores_the_ranks_once():
    """Each entry's rank is computed once and stored; the kernel picking the outputs reads it (inlining it there
    would recount a row for every (position, entry) pair)."""
    kernels = jax_mpk.compile(lambda x: jnp.sort(x, axis=1), jnp.ones((3, 50))).graph.kernels
    assert len(kernels) == 2
    assert all(node.op != NodeOp.LT for node in kernels[1].nodes() if hasattr(node, "op"))


def test_sort_with_several_keys_is_refused():
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="num_keys=2"):
        jax_mpk.megakernelize(lambda a, b: jax.lax.sort((a, b), num_keys=2))(jnp.ones(4), jnp.ones(4))


def test_a_long_scan_is_refused():
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="scan over 5000 entries"):
        jax_mpk.megakernelize(lambda x: jnp.cumsum(x, -1))(jnp.ones((2, 5000), jnp.float32))


def sample(logits, key, temperature=0.7, top_k=8, top_p=0.9):
    """Temperature, top-k, top-p (nucleus) and a categorical draw; the key for the next step."""
    key, draw = jax.random.split(key)
    values, indices = jax.lax.top_k(logits / temperature, top_k)
    probs = jax.nn.softmax(values, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest prefix holding top_p of the mass
    choice = jax.random.categorical(draw, jnp.where(keep, values, -jnp.inf), axis=-1)
    token = jnp.sum(jnp.where(jnp.arange(top_k) == choice[:, None], indices, 0), axis=-1).astype(jnp.int32)
    return token, key


def _sampling_step(cfg):
    decode = make_decode_step(cfg)

    def step(params, tokens, pos, cache_k, cache_v, key):
        _, logits, cache_k, cache_v = decode(params, tokens, pos, cache_k, cache_v)
        tokens, key = sample(logits, key)
        return tokens, cache_k, cache_v, key

    return step


def _generate(step, params, cache, key, steps, batch):
    tokens, out = jnp.arange(1, batch + 1, dtype=jnp.int32), []
    for pos in range(steps):
        tokens, *cache, key = step(params, tokens, jnp.int32(pos), *cache, key)
        out.append(np.asarray(tokens))
    return np.stack(out)


def _check_sampled_decode(cfg, steps, rng):
    step = _sampling_step(cfg)
    # a model whose draws vary, so that equal tokens are not a greedy loop in disguise: a tiny random model's
    # distribution is sometimes so peaked that top-p keeps one token at every step (seed 2289958474: all 2s)
    for _ in range(8):
        params, cache, key = init_params(cfg, _key(rng)), init_cache(cfg, _key(rng)), _key(rng)
        expected = _generate(jax.jit(step), params, cache, key, steps, cfg.batch)
        if len(np.unique(expected)) > 1:
            break
    assert len(np.unique(expected)) > 1, "8 random models in a row sampled one token: is sampling greedy?"
    actual = _generate(jax_mpk.megakernelize(step), params, cache, key, steps, cfg.batch)
    np.testing.assert_array_equal(actual, expected)


def test_sampled_decode_equals_jit(rng):
    _check_sampled_decode(TinyConfig(batch=2), steps=6, rng=rng)


@pytest.mark.gpu
def test_sampled_decode_equals_jit_on_gpu(rng):
    _check_sampled_decode(TinyConfig(batch=2, vocab=1024), steps=8, rng=rng)


def _gpu_cases(rng):
    logits = random_array(rng, (2, 151_936), "float32", -8, 8)
    small = random_array(rng, (3, 37), "float32", -3, 3)
    return {
        "random": (lambda k, x: (jax.random.categorical(k, x), jax.random.bits(k, (5, 3)), jax.random.split(k, 3)),
                   _key(rng), small),
        "top_k_vocabulary": (lambda x: jax.lax.top_k(x, 8), logits),
        "sampling_vocabulary": (sample, logits, _key(rng)),
        "scans": (lambda x: (jnp.cumsum(x, 1), jax.lax.cummax(x, 0, reverse=True), jax.lax.cumlogsumexp(x, 1)), small),
        "sort": (lambda x: (jnp.sort(x, 1), jnp.argsort(x, 0)), small),
        "bits_and_special": (lambda x: (jax.scipy.special.erfc(x), jax.scipy.special.erfinv(x / 4),
                                        jax.lax.population_count(jax.lax.bitcast_convert_type(x, jnp.uint32)),
                                        jax.lax.shift_right_arithmetic(jax.lax.bitcast_convert_type(x, jnp.int32),
                                                                       jnp.int32(7))), small),
    }  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["random", "top_k_vocabulary", "sampling_vocabulary", "scans", "sort", "bits_and_special"]
)
def test_sampling_primitives_on_gpu(name, rng):
    fn, *args = _gpu_cases(rng)[name]
    check_against_jit(fn, *args)
