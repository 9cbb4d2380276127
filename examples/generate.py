"""Greedy generation: prefill a prompt with plain XLA, then decode with the megakernelized decode step.

The decode step is the Flax model's own code (examples/models.py) wrapped in ``jax_mpk.megakernelize``: one
custom call per generated token. Without a GPU, a full-size preset is replaced by its tiny stand-in (``--full``
keeps it); weights are random unless ``--checkpoint`` names a local Hugging Face checkpoint directory.

``--tp N`` runs the model tensor parallel over the first N devices of the default device's platform
(models.make_tp_decode_step: heads and MLP features split across them, jax.lax.psum after the row-parallel
projections), prefill and decode alike; the megakernel is then one per device, the devices exchanging their
partial sums through its collectives (GPUs: peer memory; CPU: host memory). On the CPU, N devices need
XLA_FLAGS=--xla_force_host_platform_device_count=N.

    python examples/generate.py --model qwen3-0.6b
    python examples/generate.py --checkpoint ~/models/Qwen3-0.6B --prompt-tokens 9707,11,1879 --check
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/generate.py --tp 2 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import jax_mpk
import models


@dataclasses.dataclass
class Decoded:
    """Greedy tokens [steps, batch] of one decode loop and its timings."""

    tokens: np.ndarray
    first_call_s: float  # the first step, compilation included
    steps_s: float  # the other steps

    @property
    def tokens_per_s(self) -> float:
        steps, batch = self.tokens.shape
        return batch * (steps - 1) / self.steps_s


def decode(step, weights: models.Weights, tokens: jax.Array, pos: int, cache: models.KVCache, steps: int) -> Decoded:
    """Run ``steps`` greedy steps from ``tokens`` at ``pos``, each feeding the next its tokens and cache."""
    start = time.perf_counter()
    tokens, _, cache = step(weights, tokens, jnp.int32(pos), cache)
    out = [jax.block_until_ready(tokens)]
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, steps):
        tokens, _, cache = step(weights, tokens, jnp.int32(pos + i), cache)
        out.append(tokens)
    jax.block_until_ready(out)
    return Decoded(np.stack([np.asarray(t) for t in out]), first, time.perf_counter() - start)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(models.PRESETS))
    parser.add_argument("--checkpoint", help="local Hugging Face checkpoint directory (replaces --model)")
    parser.add_argument("--full", action="store_true", help="keep a full-size preset also without a GPU")
    parser.add_argument("--dtype", help="weights and activations (default: the preset's or checkpoint's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16, help="length of a random prompt")
    parser.add_argument("--prompt-tokens", help="comma-separated prompt token ids (replaces the random prompt)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the random weights and prompt")
    parser.add_argument("--check", action="store_true", help="also decode with jax.jit and compare the tokens")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel over the first TP devices (default 1)")
    args = parser.parse_args(argv)
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3 (one from the prefill, one compiling step, one timed)")
    if args.tp < 1:
        parser.error("--tp must be at least 1")
    if args.checkpoint and not checkpoint.is_checkpoint(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: not a directory with config.json and *.safetensors files")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Generate; returns the greedy tokens [batch, new_tokens] of the megakernel (and of jax.jit with
    ``--check``)."""
    args = parse_args(argv)
    device = jnp.zeros(()).device  # the default device, where the model runs
    if args.checkpoint:
        model = checkpoint.load(args.checkpoint, args.dtype)
        name = args.checkpoint
    else:
        name = args.model
        if device.platform != "gpu" and not args.full and name in models.TINY:
            name = models.TINY[name]
            print(f"no GPU: running {name}, the tiny stand-in for {args.model} (--full keeps the full size)")
        config = models.PRESETS[name]
        model = models.create(dataclasses.replace(config, dtype=args.dtype or config.dtype), args.seed)
    config = model.config
    print(f"{name}: {config}")
    mesh = None
    if args.tp > 1:
        try:
            mesh = models.tp_mesh(args.tp, jax.devices(device.platform))
            local = models.tp_local_config(config, args.tp)
        except ValueError as error:
            raise SystemExit(f"--tp {args.tp}: {error}") from error
        print(f"tensor parallel over {args.tp} devices, each: {local.heads} query heads, {local.kv_heads} KV "
              f"heads, {local.mlp} MLP features, {local.vocab} of the vocabulary")  # fmt: skip
    print(f"device: {f'{args.tp} x ' if mesh else ''}{device.device_kind}, jax {jax.__version__}")

    if args.prompt_tokens:
        prompt = np.tile(np.asarray([int(t) for t in args.prompt_tokens.split(",")], np.int32), (args.batch, 1))
    else:
        prompt = np.random.default_rng(args.seed).integers(0, config.vocab, (args.batch, args.prompt_len), np.int32)
    prompt_len = prompt.shape[1]
    max_seq = prompt_len + args.new_tokens
    weights, merge = models.split(model)
    if mesh is None:
        prefill, step = models.make_prefill(merge), models.make_decode_step(merge)
    else:  # the global weights and cache, each device holding its share
        prefill, step = models.make_tp_prefill(config, mesh), models.make_tp_decode_step(config, mesh)
        weights, _ = models.tp_shard(mesh, config, weights)
        del model, merge
    prefill = jax.jit(prefill, donate_argnums=(3,))
    variants = {"megakernel": jax_mpk.megakernelize(step, donate_argnums=(3,))}
    if args.check:
        variants["jax.jit"] = jax.jit(step, donate_argnums=(3,))

    results = {}
    for variant, fn in variants.items():
        start = time.perf_counter()
        cache = models.init_cache(config, args.batch, max_seq)
        if mesh is not None:
            _, cache = models.tp_shard(mesh, config, cache=cache)
        first, _, cache = prefill(weights, jnp.asarray(prompt), jnp.int32(0), cache)
        jax.block_until_ready(first)
        compiling = " (compilation included)" if not results else ""
        print(f"[{variant}] prefill of {prompt_len} tokens with jax.jit{compiling}: {time.perf_counter() - start:.2f} s")
        decoded = decode(fn, weights, first, prompt_len, cache, args.new_tokens - 1)
        results[variant] = np.concatenate([np.asarray(first)[None], decoded.tokens]).T
        print(f"[{variant}] first decode call (compilation included) {decoded.first_call_s:.2f} s, then "
              f"{decoded.tokens_per_s:.1f} tokens/s ({args.batch} x {args.new_tokens - 2} tokens)")  # fmt: skip
    for b, row in enumerate(results["megakernel"]):
        print(f"sequence {b}: {' '.join(map(str, row))}")
    if args.check:
        differ = np.flatnonzero(np.any(results["megakernel"] != results["jax.jit"], axis=0))
        if differ.size:
            print(f"greedy tokens of the megakernel and jax.jit differ from token {differ[0]} on")
        else:
            print(f"greedy tokens of the megakernel and jax.jit agree on all {args.new_tokens} tokens")
    return results


if __name__ == "__main__":
    main()
