"""A megakernel takes thousands of buffers (operands + results): models passed as one array per weight and per
layer of a KV cache have more than the 480 that fit in the classic 4 KB parameter block."""

from __future__ import annotations

import os
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close
from test_cuda_executor import run_with_command_buffers

import jax_mpk
from jax_mpk.capture import capture
from jax_mpk.codegen import generate
from jax_mpk.fusion import fuse
from jax_mpk.schedule import schedule
from jax_mpk.tasks import build_task_graph
from jax_mpk.target import Target
from jax_mpk.toolchain import compile_cubin

ARRAYS = 1000  # operands; as many results, and the workspace: 2001 buffers


def many_buffers(xs):
    """Every result reads two operands, so a mixed-up address shows in two results."""
    return [x * (i % 7 + 1) - xs[(i + 1) % len(xs)] for i, x in enumerate(xs)]


def _operands(seed: int, count: int = ARRAYS) -> list:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.uniform(-2, 2, size=(5,)).astype(np.float32)) for _ in range(count)]


def test_cpu_executor_takes_2001_buffers():
    xs = _operands(0)
    fast = jax_mpk.megakernelize(many_buffers)
    assert_trees_close(fast(xs), jax.jit(many_buffers)(xs))
    (plan,) = fast.plans.values()
    assert len(plan.graph.input_specs) + len(plan.graph.output_specs) + 1 == 2 * ARRAYS + 1
    ys = _operands(1)  # other values at other addresses, same plan
    assert_trees_close(fast(ys), jax.jit(many_buffers)(ys))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")
def test_megakernel_with_2001_buffers_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _operands(0)]
    graph = fuse(capture(jax.make_jaxpr(many_buffers)(avals)), Target("cuda", 132))
    tasks = build_task_graph(graph, 132)
    source = generate(tasks, schedule(tasks, 132))
    # the kernel's parameter is sized for the plan: 2001 addresses after MegakernelParams (~16 KB, over 4 KB)
    assert f"using Params = KernelParams<{2 * ARRAYS + 1}>;" in source.text
    assert "p.buffers[0]" in source.text and f"p.buffers[{2 * ARRAYS - 1}]" in source.text  # last result
    assert len(compile_cubin(source.text, "9.0")) > 10_000


@pytest.mark.gpu
def test_gpu_megakernel_with_2001_buffers_matches_jit():
    xs = _operands(0)
    fast = jax_mpk.megakernelize(many_buffers)
    assert_trees_close(fast(xs), jax.jit(many_buffers)(xs))
    ys = _operands(1)
    assert_trees_close(fast(ys), jax.jit(many_buffers)(ys))
    fast.check_errors()


GRAPH_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
import jax_mpk
from test_buffers import _operands, many_buffers
fast = jax_mpk.megakernelize(many_buffers)
step = jax.jit(lambda xs: [y + 1 for y in fast(xs)])  # more than one op: XLA makes a command buffer
expect = jax.jit(lambda xs: [y + 1 for y in many_buffers(xs)])
kept = []
for seed in range(4):  # new operands at new addresses: replays must read them, not the captured ones
    xs = _operands(seed)
    got = step(xs)
    for a, b in zip(got, expect(xs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
    kept.append((xs, got))
fast.check_errors()
print("MANY BUFFERS IN A CUDA GRAPH OK")
"""


@pytest.mark.gpu
def test_gpu_2001_buffers_through_cuda_graph_replays():
    """XLA captures the call into a CUDA graph and re-captures it when addresses change; the 16 KB
    parameter block is part of the captured launch."""
    script = textwrap.dedent(GRAPH_SCRIPT.format(tests=os.path.dirname(__file__)))
    done, log = run_with_command_buffers(script, timeout=600, JAX_MPK_PLATFORM="cuda")
    assert done.returncode == 0 and "MANY BUFFERS IN A CUDA GRAPH OK" in done.stdout, log[-6000:]
    assert "Execute command buffer" in log, log[-6000:]
