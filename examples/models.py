"""Llama-3 and Qwen3 decoders as Flax NNX modules, with a KV cache, for decoding with jax_mpk.

The model is ordinary Flax code: ``Decoder(config, rngs=...)`` holds the weights; ``decoder(tokens, pos,
cache)`` runs ``T`` tokens per sequence at positions ``pos .. pos + T - 1`` against a KV cache and returns
float32 logits and the updated cache. :func:`make_decode_step` turns a decoder into the pure function of one
greedy decode step, ``step(weights, tokens, pos, cache) -> (next_tokens, logits, cache)``, which is what
``jax.jit`` or ``jax_mpk.megakernelize`` compiles (``weights`` is the flat list :func:`split` gives);
:func:`make_prefill` does the same for a prompt.

The KV cache is a pair of arrays ``[layers, batch, max_seq, kv_heads, head_dim]``; a step writes its keys
and values with ``dynamic_update_slice`` at ``pos`` and attends over the whole cache with positions after
the query masked out, so its cost does not depend on ``pos``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3's RoPE frequency scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth
    ramp in between."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder (:mod:`checkpoint` reads it from a Hugging Face ``config.json``)."""

    family: str  # "llama" or "qwen3"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    tied: bool  # the output head is the transposed embedding table
    qk_norm: bool  # Qwen3: RMSNorm over each query and key head before RoPE
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None = None
    norm_eps: float = 1e-6
    dtype: str = "bfloat16"  # of the weights, the activations and the KV cache

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not split into {self.kv_heads} KV groups")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")


PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, mlp=8192,
        tied=True, qk_norm=False, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(), norm_eps=1e-5,
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, mlp=3072,
        tied=True, qk_norm=True, rope_theta=1e6,
    ),
    "qwen3-8b": ModelConfig(
        family="qwen3", vocab=151936, hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288,
        tied=False, qk_norm=True, rope_theta=1e6,
    ),
    # Tiny counterparts with the same structure (GQA ratio, head-to-hidden ratio, tying, QK-norm, RoPE
    # scaling) for CPU runs and tests.
    "llama-tiny": ModelConfig(
        family="llama", vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128,
        tied=True, qk_norm=False, rope_theta=500000.0, rope_scaling=Llama3RopeScaling(), norm_eps=1e-5,
        dtype="float32",
    ),
    "qwen3-tiny": ModelConfig(
        family="qwen3", vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, mlp=96,
        tied=True, qk_norm=True, rope_theta=1e6, dtype="float32",
    ),
    "qwen3-tiny-untied": ModelConfig(
        family="qwen3", vocab=256, hidden=64, layers=2, heads=4, kv_heads=1, head_dim=32, mlp=128,
        tied=False, qk_norm=True, rope_theta=1e6, dtype="float32",
    ),
}  # fmt: skip

# The tiny preset that stands in for each full one on a machine without a GPU.
TINY: dict[str, str] = {"llama-3.2-1b": "llama-tiny", "qwen3-0.6b": "qwen3-tiny", "qwen3-8b": "qwen3-tiny-untied"}


@functools.cache
def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Llama3RopeScaling | None) -> np.ndarray:
    """The ``head_dim / 2`` rotation frequencies of RoPE (float32), with Llama 3 scaling when given."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None:
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = scaling.original_max_position / scaling.low_freq_factor
        high_freq_wavelength = scaling.original_max_position / scaling.high_freq_factor
        # 0 at the low-frequency end of the ramp (fully scaled), 1 at the high-frequency end (kept)
        ramp = (scaling.original_max_position / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - ramp) * inv_freq / scaling.factor + ramp * inv_freq
        inv_freq = np.where(
            wavelength > low_freq_wavelength,
            inv_freq / scaling.factor,
            np.where(wavelength < high_freq_wavelength, inv_freq, blended),
        )
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. ``x``: [batch, T, heads, head_dim]; ``positions``: [T] (int32)."""
    angle = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
    cos = jnp.cos(jnp.concatenate([angle, angle], axis=-1)).astype(x.dtype)[None, :, None, :]
    sin = jnp.sin(jnp.concatenate([angle, angle], axis=-1)).astype(x.dtype)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class KVCache(NamedTuple):
    """Keys and values of every layer: two arrays [layers, batch, max_seq, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, batch: int, max_seq: int, key: jax.Array | None = None) -> KVCache:
    """An empty (zero) cache, or one filled with standard normal values when ``key`` is given."""
    shape = (config.layers, batch, max_seq, config.kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    if key is None:
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    k_key, v_key = jax.random.split(key)
    return KVCache(jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, the statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...]


def _linear(in_features: int, out_features: int, config: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=False, param_dtype=jnp.dtype(config.dtype), rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (and Qwen3's QK-norm) over the layer's slice of the KV cache."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = _linear(c.hidden, c.heads * c.head_dim, c, rngs)
        self.k_proj = _linear(c.hidden, c.kv_heads * c.head_dim, c, rngs)
        self.v_proj = _linear(c.hidden, c.kv_heads * c.head_dim, c, rngs)
        self.o_proj = _linear(c.heads * c.head_dim, c.hidden, c, rngs)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps, c.dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps, c.dtype) if c.qk_norm else None

    def __call__(self, x: jax.Array, pos: jax.Array, cache: KVCache, layer: int) -> tuple[jax.Array, KVCache]:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.kv_heads, c.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = pos + jnp.arange(t, dtype=jnp.int32)
        inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        start = (layer, 0, pos, 0, 0)
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start),
            jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start),
        )
        keys, values = cache.k[layer], cache.v[layer]  # [b, max_seq, kv_heads, head_dim]
        groups = q.reshape(b, t, c.kv_heads, c.heads // c.kv_heads, c.head_dim)
        scores = jnp.einsum("btgrd,bsgd->bgrts", groups, keys).astype(jnp.float32) * c.head_dim**-0.5
        visible = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, :] <= positions[:, None]  # [T, max_seq]
        probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1).astype(values.dtype)
        out = jnp.einsum("bgrts,bsgd->btgrd", probs, values).reshape(b, t, c.heads * c.head_dim)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(config.hidden, config.mlp, config, rngs)
        self.up_proj = _linear(config.hidden, config.mlp, config, rngs)
        self.down_proj = _linear(config.mlp, config.hidden, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps, config.dtype)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps, config.dtype)
        self.mlp = MLP(config, rngs)

    def __call__(self, h: jax.Array, pos: jax.Array, cache: KVCache, layer: int) -> tuple[jax.Array, KVCache]:
        attn, cache = self.attn(self.attn_norm(h), pos, cache, layer)
        h = h + attn
        return h + self.mlp(self.mlp_norm(h)), cache


class Decoder(nnx.Module):
    """Token embedding, the decoder layers, the final norm and the output head (tied or not)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed = nnx.Embed(config.vocab, config.hidden, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.layers)])
        self.norm = RMSNorm(config.hidden, config.norm_eps, config.dtype)
        self.lm_head = None if config.tied else _linear(config.hidden, config.vocab, config, rngs)

    def hidden_states(self, tokens: jax.Array, pos: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``tokens`` [batch, T] at positions ``pos ..`` -> final-normed hidden states [batch, T, hidden], new
        cache."""
        h = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, pos, cache, i)
        return self.norm(h), cache

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head: float32 logits [..., vocab] of hidden states [..., hidden]."""
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, pos: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``tokens`` [batch, T] at positions ``pos ..`` -> float32 logits [batch, T, vocab], new cache."""
        h, cache = self.hidden_states(tokens, pos, cache)
        return self.logits(h), cache


def create(config: ModelConfig, seed: int = 0) -> Decoder:
    """A decoder with random weights (initialized in one compiled program, also for large models)."""
    return nnx.jit(lambda: Decoder(config, rngs=nnx.Rngs(seed)))()


def abstract(config: ModelConfig) -> Decoder:
    """A decoder whose weights are shapes only, to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


Weights = list[jax.Array]
DecodeStep = Callable[[Weights, jax.Array, jax.Array, KVCache], tuple[jax.Array, jax.Array, KVCache]]


def split(model: Decoder) -> tuple[Weights, Callable[[Weights], Decoder]]:
    """The model's weights as a flat list, and the function that rebuilds the module from such a list (inside
    a trace). A flat list of arrays is the cheapest argument to dispatch a compiled step with: a few hundred
    nested Flax variables cost several times more Python work per call than the same arrays in a list."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return leaves, lambda weights: nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, weights))


def make_decode_step(merge: Callable[[Weights], Decoder]) -> DecodeStep:
    """``step(weights, tokens [batch], pos, cache) -> (next_tokens [batch], logits [batch, vocab], cache)``:
    one greedy decode step of the decoder that ``merge`` (from :func:`split`) rebuilds."""

    def decode_step(weights: Weights, tokens: jax.Array, pos: jax.Array, cache: KVCache):
        model = merge(weights)
        h, cache = model.hidden_states(tokens[:, None], pos, cache)
        # the head on [batch, hidden] rather than [batch, 1, hidden]: jax_mpk then fuses the float32 cast
        # into the head's matrix product (a view between a product and its consumer stops that fusion)
        logits = model.logits(h[:, 0])
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache

    return decode_step


def make_prefill(merge: Callable[[Weights], Decoder]) -> DecodeStep:
    """``prefill(weights, prompt [batch, T], pos, cache) -> (next_tokens [batch], last logits, cache)``: the
    prompt's keys and values written at ``pos .. pos + T - 1``, and the greedy token that follows it."""

    def prefill(weights: Weights, prompt: jax.Array, pos: jax.Array, cache: KVCache):
        model = merge(weights)
        h, cache = model.hidden_states(prompt, pos, cache)
        logits = model.logits(h[:, -1])  # only the last position's: the head is the largest product
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache

    return prefill
