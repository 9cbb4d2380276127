"""Renders the CUDA megakernel source of the Llama-3.2-1B-shaped decode step (``tests/tiny_models.py``) for an
H100-sized target, without a GPU, as ``tests/test_codegen.py`` does, and prints its sha256.

Used to check that a refactoring leaves the generated source unchanged: run it on two commits and compare.
``--out FILE`` also writes the source (to diff it when the hashes differ).
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import TinyConfig, init_cache, init_params, make_decode_step  # noqa: E402

from jax_mpk.capture import capture  # noqa: E402
from jax_mpk.codegen import generate  # noqa: E402
from jax_mpk.fusion import fuse  # noqa: E402
from jax_mpk.schedule import schedule  # noqa: E402
from jax_mpk.tasks import build_task_graph  # noqa: E402
from jax_mpk.target import Target  # noqa: E402

H100_SMS = 132


def llama_1b_source() -> str:
    cfg = TinyConfig(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=1024, dtype="bfloat16", theta=500000.0)  # fmt: skip
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: init_cache(cfg, jax.random.PRNGKey(1)))
    tokens, pos = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    graph = fuse(capture(jax.make_jaxpr(make_decode_step(cfg))(params, tokens, pos, *cache)), Target("cuda", H100_SMS))
    tasks = build_task_graph(graph, H100_SMS)
    return generate(tasks, schedule(tasks, H100_SMS)).text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, help="also write the source here")
    args = parser.parse_args()
    text = llama_1b_source()
    if args.out:
        args.out.write_text(text)
    print(hashlib.sha256(text.encode()).hexdigest())


if __name__ == "__main__":
    main()
