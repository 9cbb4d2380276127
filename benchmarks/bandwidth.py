"""The device's read bandwidth, measured the way a decode step uses memory: a streaming read.

The floor of a memory-bound step is the bytes it must read over this bandwidth. A copy (`a * 1`) is not the
right yardstick: on an H200 XLA's copy moves 2.75–2.96 TB/s while a read reaches 4.05–4.22 TB/s, so a floor
from the copy would be ~1.45x too kind (docs/notes/cuda_megakernel.md).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def read_bandwidth(nbytes: int = 4 << 30, repeats: int = 10, reads_per_call: int = 8) -> dict[str, float]:
    """Bytes per second of streaming reads of ``nbytes`` of random data: the best of ``repeats`` timings of
    ``reads_per_call`` whole-array reductions in one jitted loop (so the host's call overhead is amortized).
    Returns the rate of XLA's reduction and, when PyTorch sees a CUDA device, of ``torch.sum`` as well, and
    under "best" the larger: the floor must use the most the memory system has been seen to deliver."""
    words = jax.random.bits(jax.random.PRNGKey(7), (nbytes // 4,), jnp.uint32)

    @jax.jit
    def reads(a):  # each iteration reads all of `a` once (the xor with the loop index fuses into the reduction)
        return jax.lax.fori_loop(0, reads_per_call, lambda i, acc: acc + jnp.sum(a ^ i.astype(jnp.uint32)),
                                 jnp.uint32(0))  # fmt: skip

    jax.block_until_ready(reads(words))
    rates = {"xla_reduce": reads_per_call * nbytes / _best_seconds(lambda: jax.block_until_ready(reads(words)), repeats)}
    del words
    torch_rate = _torch_read_bandwidth(nbytes, repeats, reads_per_call)
    if torch_rate:
        rates["torch_sum"] = torch_rate
    rates["best"] = max(rates.values())
    return rates


def _best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def _torch_read_bandwidth(nbytes: int, repeats: int, reads_per_call: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    x = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda").view(torch.float32)

    def run():
        for _ in range(reads_per_call):
            x.sum()
        torch.cuda.synchronize()

    run()
    rate = reads_per_call * nbytes / _best_seconds(run, repeats)
    del x
    torch.cuda.empty_cache()
    return rate
