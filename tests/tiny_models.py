"""A Llama/Qwen3-style decode step written plainly in JAX, with tiny sizes, for the equality tests."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class TinyConfig:
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mlp: int = 96
    vocab: int = 160
    max_seq: int = 24
    batch: int = 1
    qk_norm: bool = False  # Qwen3
    theta: float = 10000.0
    dtype: str = "float32"


def init_params(cfg: TinyConfig, key) -> dict:
    keys = iter(jax.random.split(key, 16))
    dt = jnp.dtype(cfg.dtype)

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-2] ** -0.5
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dt)

    params = {
        "embed": w(cfg.vocab, cfg.hidden, scale=1.0),
        "wq": w(cfg.layers, cfg.hidden, cfg.heads * cfg.head_dim),
        "wk": w(cfg.layers, cfg.hidden, cfg.kv_heads * cfg.head_dim),
        "wv": w(cfg.layers, cfg.hidden, cfg.kv_heads * cfg.head_dim),
        "wo": w(cfg.layers, cfg.heads * cfg.head_dim, cfg.hidden),
        "w_gate": w(cfg.layers, cfg.hidden, cfg.mlp),
        "w_up": w(cfg.layers, cfg.hidden, cfg.mlp),
        "w_down": w(cfg.layers, cfg.mlp, cfg.hidden),
        "attn_norm": (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.layers, cfg.hidden))).astype(dt),
        "mlp_norm": (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.layers, cfg.hidden))).astype(dt),
        "final_norm": (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.hidden,))).astype(dt),
    }
    if cfg.qk_norm:
        params["q_norm"] = (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.layers, cfg.head_dim))).astype(dt)
        params["k_norm"] = (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.layers, cfg.head_dim))).astype(dt)
    return params


def init_cache(cfg: TinyConfig, key) -> tuple[jax.Array, jax.Array]:
    shape = (cfg.layers, cfg.batch, cfg.max_seq, cfg.kv_heads, cfg.head_dim)
    k1, k2 = jax.random.split(key)
    dt = jnp.dtype(cfg.dtype)
    return jax.random.normal(k1, shape).astype(dt), jax.random.normal(k2, shape).astype(dt)


def rms_norm(x, weight, eps=1e-6):
    xf = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale).astype(x.dtype) * weight


def rope(x, pos, theta):
    """Rotate-half RoPE for one position; x: [batch, heads, head_dim]."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = pos.astype(jnp.float32) * freqs
    cos, sin = jnp.cos(angle).astype(x.dtype), jnp.sin(angle).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.concatenate([cos, cos]) + rotated * jnp.concatenate([sin, sin])


def make_decode_step(cfg: TinyConfig, tp_axis: str | None = None):
    """With ``tp_axis``, the step of one device of a tensor-parallel group (inside shard_map, on its shards of
    TP_SPECS): its heads and MLP columns, the partial sums of the O and down projections added up by psum."""
    rep = cfg.heads // cfg.kv_heads

    def all_devices(x):
        return jax.lax.psum(x, tp_axis) if tp_axis else x

    def step(params, tokens, pos, cache_k, cache_v):
        b = tokens.shape[0]
        heads, kv_heads = params["wq"].shape[-1] // cfg.head_dim, params["wk"].shape[-1] // cfg.head_dim
        h = params["embed"][tokens]  # [b, hidden]
        for layer in range(cfg.layers):
            x = rms_norm(h, params["attn_norm"][layer])
            q = (x @ params["wq"][layer]).reshape(b, heads, cfg.head_dim)
            k = (x @ params["wk"][layer]).reshape(b, kv_heads, cfg.head_dim)
            v = (x @ params["wv"][layer]).reshape(b, kv_heads, cfg.head_dim)
            if cfg.qk_norm:
                q = rms_norm(q, params["q_norm"][layer])
                k = rms_norm(k, params["k_norm"][layer])
            q, k = rope(q, pos, cfg.theta), rope(k, pos, cfg.theta)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None, :, None], (layer, 0, pos, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None, :, None], (layer, 0, pos, 0, 0))
            keys, values = cache_k[layer], cache_v[layer]  # [b, seq, kv, d]
            qg = q.reshape(b, kv_heads, rep, cfg.head_dim)
            scores = jnp.einsum("bgrd,bsgd->bgrs", qg, keys).astype(jnp.float32) * cfg.head_dim**-0.5
            mask = jnp.arange(cfg.max_seq) <= pos
            scores = jnp.where(mask, scores, -1e30)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            attn = jnp.einsum("bgrs,bsgd->bgrd", probs, values).reshape(b, heads * cfg.head_dim)
            h = h + all_devices(attn @ params["wo"][layer])
            x = rms_norm(h, params["mlp_norm"][layer])
            gated = jax.nn.silu(x @ params["w_gate"][layer]) * (x @ params["w_up"][layer])
            h = h + all_devices(gated @ params["w_down"][layer])
        logits = (rms_norm(h, params["final_norm"]) @ params["embed"].T).astype(jnp.float32)
        next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return next_tokens, logits, cache_k, cache_v

    return step


def tp_specs(params: dict, axis: str) -> dict:
    """How make_decode_step(cfg, axis) shards the weights: Q/K/V and gate/up by output column (whole heads),
    O and down by input row; the rest replicated."""
    from jax.sharding import PartitionSpec as P

    by_column, by_row = {"wq", "wk", "wv", "w_gate", "w_up"}, {"wo", "w_down"}
    return {name: P(None, None, axis) if name in by_column else P(None, axis, None) if name in by_row else P()
            for name in params}  # fmt: skip


def random_tokens(cfg: TinyConfig, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, size=(cfg.batch,)), dtype=jnp.int32)
