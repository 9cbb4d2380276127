"""Where a megakernel's time goes: per-task timestamps (JAX_MPK_PROFILE=1) summarized per kernel.

    python benchmarks/profile_step.py --layers 2
Prints, per kernel of the first layers: tasks, the kernel's span (first start to last end), the mean time a task
runs (start to signalled) and waits; then the whole call's span.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ["JAX_MPK_PROFILE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import jax_mpk  # noqa: E402
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--show", type=int, default=40)
    args = parser.parse_args()
    cfg = TinyConfig(layers=args.layers, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=args.ctx, batch=args.batch, dtype="bfloat16", theta=500000.0)  # fmt: skip
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, jax.random.PRNGKey(1))
    call_args = (params, jnp.arange(args.batch, dtype=jnp.int32) + 5, jnp.int32(args.ctx - 10), *cache)
    mk = jax_mpk.compile(make_decode_step(cfg), *call_args)
    for _ in range(5):
        jax.block_until_ready(mk(*call_args))
    runs = [mk.profile(*call_args) for _ in range(3)]
    times = runs[-1]
    tasks = mk.tasks.tasks
    print(f"{mk}\ncall span {times[:, 2].max():.1f} us (runs: {[round(float(r[:, 2].max()), 1) for r in runs]})")
    print(f"{'kernel':55s} {'tasks':>5s} {'first':>8s} {'last':>8s} {'span':>7s} {'run':>6s} {'wait':>6s}")
    for kernel in mk.graph.kernels[: args.show]:
        rows = np.array([t.index for t in tasks if t.kernel == kernel.index])
        if not len(rows):
            continue
        t = times[rows]
        print(f"{kernel.index:3d} {kernel.name[:50]:51s} {len(rows):5d} {t[:, 1].min():8.1f} {t[:, 2].max():8.1f} "
              f"{t[:, 2].max() - t[:, 1].min():7.1f} {np.mean(t[:, 2] - t[:, 1]):6.2f} {np.mean(t[:, 1] - t[:, 0]):6.2f}")


if __name__ == "__main__":
    main()
