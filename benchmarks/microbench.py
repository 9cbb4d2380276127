"""Pieces of a decode step, each as its own megakernel against jax.jit in the same process.

Used to see where a step's time goes: per-kernel-type cost and the cost of one dependency level.
    python benchmarks/microbench.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mpk


def median_ms(fn, *args, iters: int = 200) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(20):
        out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return float(np.median(samples))


def main() -> None:
    key = iter(jax.random.split(jax.random.PRNGKey(0), 32))
    bf = jnp.bfloat16

    def rnd(*shape, dtype=bf, scale=0.05):
        return (jax.random.normal(next(key), shape, jnp.float32) * scale).astype(dtype)

    x = rnd(1, 2048, scale=1.0)
    cases = {
        "gemv 2048x2048": (lambda x, w: x @ w, (x, rnd(2048, 2048)), 2048 * 2048 * 2),
        "gemv 2048x8192": (lambda x, w: x @ w, (x, rnd(2048, 8192)), 2048 * 8192 * 2),
        "gemv 8192x2048": (lambda x, w: x @ w, (rnd(1, 8192, scale=1.0), rnd(8192, 2048)), 8192 * 2048 * 2),
        "lm head 2048x128256 (rows)": (lambda x, e: x @ e.T, (x, rnd(128256, 2048)), 128256 * 2048 * 2),
        "rms norm 2048": (lambda x, w: x * jax.lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2, -1, keepdims=True) + 1e-6).astype(bf) * w,
                          (x, rnd(2048, scale=1.0)), 2048 * 4),
        "attention ctx1024": (
            lambda q, k, v: jnp.einsum("bgrs,bsgd->bgrd", jax.nn.softmax(
                jnp.einsum("bgrd,bsgd->bgrs", q, k).astype(jnp.float32) * 0.125, axis=-1).astype(bf), v),
            (rnd(1, 8, 4, 64, scale=1.0), rnd(1, 1024, 8, 64, scale=1.0), rnd(1, 1024, 8, 64, scale=1.0)),
            2 * 1024 * 8 * 64 * 2,
        ),
    }

    def chain(levels):  # dependency levels of one task each (a reduction, then its use): the cost of a level
        def fn(x):
            for _ in range(levels):
                x = x + jnp.sum(x) * 1e-3
            return x

        return fn

    cases["16 dependent levels, 64 wide"] = (chain(16), (rnd(1, 64, dtype=jnp.float32),), 0)
    cases["64 dependent levels, 64 wide"] = (chain(64), (rnd(1, 64, dtype=jnp.float32),), 0)
    cases["64 dependent levels, 2048 wide"] = (chain(64), (rnd(1, 2048, dtype=jnp.float32),), 0)
    print(f"{'case':32s} {'jax.jit':>9s} {'mk':>9s}  {'mk GB/s':>8s}")
    for name, (fn, args, nbytes) in cases.items():
        xla = median_ms(jax.jit(fn), *args)
        mk = median_ms(jax_mpk.megakernelize(fn), *args)
        rate = f"{nbytes / mk / 1e6:8.0f}" if nbytes else ""
        print(f"{name:32s} {xla:9.4f} {mk:9.4f}  {rate}", flush=True)


if __name__ == "__main__":
    main()
