"""One process per device: a shard_map with collectives, megakernelized, over the devices of several processes.

    python examples/multiprocess.py                       # spawns 2 processes of one CPU device each, waits
    python examples/multiprocess.py --num-processes 4 --devices-per-process 2
    python examples/multiprocess.py --platform cuda       # 2 processes of one GPU each (GPU i in process i)
    python examples/multiprocess.py --process-id 0 --num-processes 2 --coordinator localhost:1234   # one by hand

Every process calls ``jax.distributed.initialize`` and runs the same program; each runs only its own devices'
ranks of the megakernel, whose communication buffers all of them map: POSIX shared memory on the CPU, each
GPU's buffer through CUDA IPC on the GPU (one GPU per process). Two functions (a
row-parallel product summed with psum, and an all_gather), on a mesh made by ``jax.make_mesh`` and one made by
``jax.sharding.Mesh``, are called several times on fresh random inputs; each process checks the shards it holds
against numpy in float64 and exits with an error if one differs. Then a tiny Llama's decode step, tensor
parallel over the processes' devices, is checked step by step against the whole step on each process's own device.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_mpk


def initialize(process_id: int, num_processes: int, coordinator: str, devices_per_process: int = 1,
               platform: str = "cpu") -> None:  # fmt: skip
    """This process's part of a run on CPU devices, or on GPU ``process_id`` (before jax uses any device)."""
    if platform == "cuda":
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=[process_id])  # fmt: skip
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices_per_process)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def meshes() -> dict[str, jax.sharding.Mesh]:
    """Every device of the run on one axis "x", in process order, as both ways of making a mesh give it."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return {
        "jax.make_mesh": jax.make_mesh((len(devices),), ("x",), devices=devices),
        "jax.sharding.Mesh": jax.sharding.Mesh(np.array(devices), ("x",)),
    }


def global_array(mesh: jax.sharding.Mesh, spec: P, value: np.ndarray) -> jax.Array:
    """``value`` (the same in every process) placed on ``mesh``: each process supplies its devices' shards."""
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])


def row_parallel_product(mesh: jax.sharding.Mesh):
    """x @ w with the contraction split over the devices: each multiplies its slices, psum adds the partials."""
    in_specs = (P(None, "x"), P("x", None))
    fn = jax.shard_map(lambda x, w: jax.lax.psum(x @ w, "x"), mesh=mesh, in_specs=in_specs, out_specs=P())
    return fn, in_specs


def gather_of_sines(mesh: jax.sharding.Mesh):
    """sin(x), each device computing its columns, gathered on every device."""
    body = lambda x: jax.lax.all_gather(jnp.sin(x), "x", axis=1, tiled=True)  # noqa: E731
    fn = jax.shard_map(body, mesh=mesh, in_specs=P(None, "x"), out_specs=P(), check_vma=False)
    return fn, (P(None, "x"),)


def check_shards(result: jax.Array, expected: np.ndarray) -> float:
    """The largest error of the shards this process holds against ``expected``; raises if one is not close."""
    worst = 0.0
    for shard in result.addressable_shards:
        actual, reference = np.asarray(shard.data, np.float64), expected[shard.index]
        np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        worst = max(worst, float(np.abs(actual - reference).max()))
    return worst


def run(calls: int, seed: int) -> None:
    """Both functions on both meshes, ``calls`` times each on fresh inputs (the same in every process)."""
    rng = np.random.default_rng(seed)
    me, n = jax.process_index(), len(jax.devices())
    for mesh_name, mesh in meshes().items():
        cases = [
            (row_parallel_product, lambda: (rng.uniform(-2, 2, (3, 8 * n)), rng.uniform(-2, 2, (8 * n, 20))),
             lambda x, w: x @ w),
            (gather_of_sines, lambda: (rng.uniform(-2, 2, (4, 2 * n)),), np.sin),
        ]  # fmt: skip
        for make, make_inputs, reference in cases:
            fn, in_specs = make(mesh)
            fast = jax_mpk.megakernelize(fn)
            for call in range(calls):
                values = make_inputs()
                args = [global_array(mesh, spec, v.astype(np.float32)) for v, spec in zip(values, in_specs)]
                # the float32 inputs, in float64
                expected = reference(*(np.asarray(v.astype(np.float32), np.float64) for v in values))
                error = check_shards(fast(*args), expected)
                print(f"process {me}: {mesh_name}: {make.__name__} call {call}: max error {error:.1e}", flush=True)
            fast.check_errors()
    tensor_parallel_decode(meshes()["jax.make_mesh"], calls, seed)


def tensor_parallel_decode(mesh: jax.sharding.Mesh, steps: int, seed: int) -> None:
    """The tiny Llama of examples/models.py split over the mesh's devices (models.make_tp_decode_step),
    megakernelized, against the same model's whole step jitted on this process's own device: the next tokens
    equal and the logits close, step after step (each side feeding back its own cache)."""
    import models

    cfg = models.PRESETS["llama-tiny"]
    me = jax.process_index()
    if cfg.kv_heads % mesh.size:
        print(f"process {me}: tensor_parallel_decode skipped: {cfg.kv_heads} KV heads over {mesh.size} devices")
        return
    weights, merge = models.split(models.create(cfg, seed))
    cache = models.init_cache(cfg, batch=1, max_seq=32, key=jax.random.PRNGKey(seed))
    host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731  (the same in every process)
    (axis,) = mesh.axis_names
    tp_weights = [global_array(mesh, s, w) for w, s in zip(host(weights), models.tp_weight_specs(cfg, axis))]
    tp_cache = models.KVCache(*(global_array(mesh, s, c) for c, s in zip(host(cache), models.tp_cache_spec(axis))))
    whole, split = jax.jit(models.make_decode_step(merge)), jax_mpk.megakernelize(models.make_tp_decode_step(cfg, mesh))
    tokens = np.array([seed % cfg.vocab], np.int32)
    for step in range(steps):
        pos = np.int32(3 + step)
        with jax.default_matmul_precision("float32"):
            next_tokens, logits, cache = whole(weights, jnp.asarray(tokens), jnp.asarray(pos), cache)
        tp_tokens, tp_logits, tp_cache = split(tp_weights, global_array(mesh, P(), tokens), global_array(mesh, P(), pos),
                                               tp_cache)  # fmt: skip
        expected = np.asarray(logits, np.float64)
        error = check_shards(tp_logits, expected)
        assert all(np.array_equal(np.asarray(s.data), np.asarray(next_tokens)) for s in tp_tokens.addressable_shards)
        print(f"process {me}: tensor_parallel_decode step {step}: max logits error {error:.1e}", flush=True)
        tokens = np.asarray(next_tokens)
    split.check_errors()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, calls: int, seed: int, timeout_s: float,
           platform: str = "cpu") -> int:  # fmt: skip
    """Run every process of the example on this machine; the first nonzero exit status, or 0."""
    coordinator = f"localhost:{free_port()}"
    env = dict(os.environ)
    # each process's device count is set by initialize(); a forced one in XLA_FLAGS would override it
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))  # fmt: skip
    children = [
        subprocess.Popen([sys.executable, __file__, "--process-id", str(i), "--num-processes", str(num_processes),
                          "--coordinator", coordinator, "--devices-per-process", str(devices_per_process),
                          "--calls", str(calls), "--seed", str(seed), "--platform", platform], env=env)
        for i in range(num_processes)
    ]  # fmt: skip
    status, deadline = 0, time.monotonic() + timeout_s
    for child in children:
        try:
            code = child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"process {child.args[3]} did not finish within {timeout_s} s", file=sys.stderr)
            code = 1
        status = status or code
    for child in children:  # after a failure the others may wait for it
        if child.poll() is None:
            child.kill()
            child.wait()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, help="run this process only (default: launch them all)")
    parser.add_argument("--coordinator", default="localhost:12355", help="host:port of process 0")
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the launcher waits for a process")
    parser.add_argument("--platform", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one GPU per process (--devices-per-process must be 1)")
    args = parser.parse_args()
    if args.platform == "cuda" and args.devices_per_process != 1:
        parser.error("--platform cuda runs one GPU per process")
    if args.process_id is None:
        return launch(args.num_processes, args.devices_per_process, args.calls, args.seed, args.timeout, args.platform)
    initialize(args.process_id, args.num_processes, args.coordinator, args.devices_per_process, args.platform)
    run(args.calls, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
