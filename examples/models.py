"""Llama-3 and Qwen3 decoders as Flax NNX modules, with a KV cache, for decoding with jax_mpk.

The model is ordinary Flax code: ``Decoder(config, rngs=...)`` holds the weights; ``decoder(tokens, pos,
cache)`` runs ``T`` tokens per sequence at positions ``pos .. pos + T - 1`` against a KV cache and returns
float32 logits and the updated cache. :func:`make_decode_step` turns a decoder into the pure function of one
greedy decode step, ``step(weights, tokens, pos, cache) -> (next_tokens, logits, cache)``, which is what
``jax.jit`` or ``jax_mpk.megakernelize`` compiles (``weights`` is the flat list :func:`split` gives);
:func:`make_prefill` does the same for a prompt.

The KV cache holds keys and values either as a pair of arrays ``[layers, batch, max_seq, kv_heads, head_dim]``
(``layout="stacked"``, the default) or as one array ``[batch, max_seq, kv_heads, head_dim]`` per layer for each
(``layout="per_layer"``, as most public implementations keep it); a step writes its keys and values with
``dynamic_update_slice`` at ``pos`` and attends over the whole cache with positions after the query masked
out, so its cost does not depend on ``pos``.

Tensor parallelism (Megatron style, over a 1-D mesh axis): :func:`make_tp_decode_step` runs the same model
as ``jax.shard_map`` over ``tp`` devices. Each device holds its share of the query and KV heads (column-parallel
q/k/v projections, the KV cache split along its kv_heads axis) and of the MLP's intermediate features
(column-parallel gate/up); the row-parallel o_proj and down_proj give partial sums that ``jax.lax.psum``
adds up. The embedding table and the output head are split along the vocabulary (vocab-parallel): a device looks
up the tokens in its rows only (zeros for the others', a psum adds the devices' rows), and computes the logits of
its share of the vocabulary, which ``jax.lax.all_gather`` puts together; the norms are replicated. The
per-device model is the ordinary :class:`Decoder` of a smaller config (:func:`tp_local_config`) whose
``tp_axis`` makes it sum or gather its outputs over the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
    # Tensor parallelism: the shard_map axis over which attention and MLP sum their (partial) outputs and the
    # vocabulary's shares are put together; set by tp_local_config on the per-device config, whose heads,
    # kv_heads, mlp and vocab are then the device's share.
    tp_axis: str | None = None

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
    """Keys and values of every layer: two arrays [layers, batch, max_seq, kv_heads, head_dim] (stacked), or
    two tuples of one array [batch, max_seq, kv_heads, head_dim] per layer (per_layer)."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    def layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """The keys and values [batch, max_seq, kv_heads, head_dim] of one layer."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, pos: jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache with ``k`` and ``v`` [batch, T, kv_heads, head_dim] written at ``pos`` of ``layer``."""
        if isinstance(self.k, tuple):
            start = (0, pos, 0, 0)
            return KVCache(*(
                tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start) if i == layer else c
                      for i, c in enumerate(old))
                for old, new in ((self.k, k), (self.v, v))
            ))  # fmt: skip
        start = (layer, 0, pos, 0, 0)
        return KVCache(jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start),
                       jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start))  # fmt: skip


CACHE_LAYOUTS = ("stacked", "per_layer")


def init_cache(config: ModelConfig, batch: int, max_seq: int, key: jax.Array | None = None,
               layout: str = "stacked") -> KVCache:  # fmt: skip
    """An empty (zero) cache, or one filled with standard normal values when ``key`` is given, in ``layout``
    (:data:`CACHE_LAYOUTS`; the values do not depend on it)."""
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout {layout!r} is not one of {CACHE_LAYOUTS}")
    shape = (config.layers, batch, max_seq, config.kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    if key is None:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    else:
        k_key, v_key = jax.random.split(key)
        k, v = jax.random.normal(k_key, shape, dtype), jax.random.normal(v_key, shape, dtype)
    return KVCache(k, v) if layout == "stacked" else per_layer(KVCache(k, v))


def per_layer(cache: KVCache) -> KVCache:
    """A stacked cache as one array per layer (the same values)."""
    return KVCache(tuple(cache.k), tuple(cache.v))


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
        cache = cache.write(layer, pos, k, v)
        keys, values = cache.layer(layer)  # [b, max_seq, kv_heads, head_dim]
        groups = q.reshape(b, t, c.kv_heads, c.heads // c.kv_heads, c.head_dim)
        scores = jnp.einsum("btgrd,bsgd->bgrts", groups, keys).astype(jnp.float32) * c.head_dim**-0.5
        visible = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, :] <= positions[:, None]  # [T, max_seq]
        probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1).astype(values.dtype)
        out = jnp.einsum("bgrts,bsgd->btgrd", probs, values).reshape(b, t, c.heads * c.head_dim)
        out = self.o_proj(out)
        if c.tp_axis is not None:  # this device's heads' share of the projection
            out = jax.lax.psum(out, c.tp_axis)
        return out, cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.tp_axis = config.tp_axis
        self.gate_proj = _linear(config.hidden, config.mlp, config, rngs)
        self.up_proj = _linear(config.hidden, config.mlp, config, rngs)
        self.down_proj = _linear(config.mlp, config.hidden, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.tp_axis is not None:  # this device's intermediate features' share
            out = jax.lax.psum(out, self.tp_axis)
        return out


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
        axis = self.config.tp_axis
        if axis is None:
            h = self.embed(tokens)
        else:  # this device's rows of the table are tokens [rank * vocab, (rank + 1) * vocab)
            local = tokens - jax.lax.axis_index(axis) * self.config.vocab
            mine = (local >= 0) & (local < self.config.vocab)
            h = jax.lax.psum(jnp.where(mine[..., None], self.embed(jnp.where(mine, local, 0)), 0), axis)
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, pos, cache, i)
        return self.norm(h), cache

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head: float32 logits [..., vocab] of hidden states [..., hidden]."""
        logits = (self.embed.attend(h) if self.lm_head is None else self.lm_head(h)).astype(jnp.float32)
        if self.config.tp_axis is not None:  # this device's share of the vocabulary
            logits = jax.lax.all_gather(logits, self.config.tp_axis, axis=logits.ndim - 1, tiled=True)
        return logits

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


# ----------------------------------------------------------------------------------------- tensor parallelism
TP_AXIS = "tp"
# The layers whose output features (columns of the [in, out] kernel) are split across devices (the untied
# head's are the vocabulary), and those whose input features (rows) are; the embedding table is split along the
# vocabulary too, every other weight (the norms) is replicated.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis :data:`TP_AXIS`) of the first ``tp`` of ``devices`` (default ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1:
        raise ValueError(f"tensor parallelism needs tp >= 1, got {tp}")
    if len(devices) < tp:
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f"; on the CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={tp} (before jax starts) "
                    "for that many CPU devices")
        raise ValueError(f"tp={tp} needs {tp} devices, but only {len(devices)} are present{hint}")
    return Mesh(np.asarray(devices[:tp]), (TP_AXIS,))


def tp_local_config(config: ModelConfig, tp: int, axis: str = TP_AXIS) -> ModelConfig:
    """The config of one device's share of ``config`` split ``tp`` ways: heads / tp query heads, kv_heads / tp
    KV heads, mlp / tp intermediate features, vocab / tp rows of the embedding and logits, outputs summed or
    gathered over ``axis``."""
    if config.tp_axis is not None:
        raise ValueError(f"the config is already one device's share (tp_axis={config.tp_axis!r})")
    if tp < 1:
        raise ValueError(f"tensor parallelism needs tp >= 1, got {tp}")
    split = ("heads", "kv_heads", "mlp", "vocab")
    uneven = [f"{name}={getattr(config, name)}" for name in split if getattr(config, name) % tp]
    if uneven:
        raise ValueError(f"tensor parallelism over {tp} devices needs heads, kv_heads, mlp and vocab divisible by "
                         f"{tp}; this model has {', '.join(uneven)}")  # fmt: skip
    return dataclasses.replace(config, **{name: getattr(config, name) // tp for name in split}, tp_axis=axis)


def _weight_spec(path: tuple, axis: str) -> PartitionSpec:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if "embedding" in names:  # [vocab, hidden]: vocab-parallel
        return PartitionSpec(axis, None)
    if "kernel" in names:
        layer = names[names.index("kernel") - 1]
        if layer in COLUMN_PARALLEL:
            return PartitionSpec(None, axis)  # nnx.Linear's kernel is [in, out]
        if layer in ROW_PARALLEL:
            return PartitionSpec(axis, None)
    return PartitionSpec()


def tp_weight_specs(config: ModelConfig, axis: str = TP_AXIS) -> list[PartitionSpec]:
    """The PartitionSpec of every weight of :func:`split`'s flat list, in its order."""
    _, state = nnx.split(abstract(config))
    return [_weight_spec(path, axis) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def tp_cache_spec(axis: str = TP_AXIS) -> KVCache:
    """The PartitionSpecs of the KV cache: split along its kv_heads axis."""
    spec = PartitionSpec(None, None, None, axis, None)
    return KVCache(spec, spec)


def tp_shard(mesh: Mesh, config: ModelConfig, weights: Weights | None = None, cache: KVCache | None = None):
    """``weights`` and ``cache`` (global arrays) placed on ``mesh`` as the TP step takes them: each device
    holds only its share. Returns the pair (None where not given)."""
    axis = mesh.axis_names[0]
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    if weights is not None:
        weights = [place(w, s) for w, s in zip(weights, tp_weight_specs(config, axis))]
    if cache is not None:
        cache = KVCache(*(place(c, s) for c, s in zip(cache, tp_cache_spec(axis))))
    return weights, cache


def _tensor_parallel(make: Callable[[Callable[[Weights], Decoder]], DecodeStep], config: ModelConfig,
                     mesh: Mesh) -> DecodeStep:  # fmt: skip
    if len(mesh.axis_names) != 1:
        raise ValueError(f"tensor parallelism takes a 1-D mesh, got axes {mesh.axis_names}")
    (axis,) = mesh.axis_names
    local = tp_local_config(config, mesh.shape[axis], axis)
    _, merge_local = split(abstract(local))
    replicated = PartitionSpec()
    in_specs = (tp_weight_specs(config, axis), replicated, replicated, tp_cache_spec(axis))
    out_specs = (replicated, replicated, tp_cache_spec(axis))
    # check_vma=False: the logits, all-gathered over the vocabulary, and the tokens taken from them are the same on
    # every device, which jax's replication check does not infer through all_gather
    return jax.shard_map(make(merge_local), mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def make_tp_decode_step(config: ModelConfig, mesh: Mesh) -> DecodeStep:
    """:func:`make_decode_step` of the model ``config`` describes, tensor parallel over the 1-D ``mesh``:
    ``step(weights, tokens, pos, cache) -> (next_tokens, logits, cache)`` with the same global (full-size)
    weights (:func:`split`'s list) and cache; inside, one ``jax.shard_map`` whose body is the decode step of
    each device's share (:func:`tp_local_config`). :func:`tp_shard` places the arguments on the mesh ahead."""
    return _tensor_parallel(make_decode_step, config, mesh)


def make_tp_prefill(config: ModelConfig, mesh: Mesh) -> DecodeStep:
    """:func:`make_prefill`, tensor parallel over ``mesh`` like :func:`make_tp_decode_step`."""
    return _tensor_parallel(make_prefill, config, mesh)
