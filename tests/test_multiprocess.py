"""One process per device (jax.distributed): a shard_map's megakernel over the CPU devices of 2 processes, whose
communication buffers are POSIX shared memory, and over the GPUs of 2 processes (CUDA IPC; needs 2 GPUs); a
process that never calls trips the watchdog; the CUDA runtime takes one GPU per process."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from jax_mpk.errors import UnsupportedPrimitiveError
from jax_mpk.processes import check_platform

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import multiprocess as example  # noqa: E402

TIMEOUT_S = 120  # a hang fails the test instead of CI


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("jax_mpk_")}


@pytest.fixture
def child_env(tmp_path, monkeypatch) -> dict[str, str]:
    """The environment of the processes: a cache of their own, so that both plan (or one loads what the other
    stored)."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path / "cache"))
    return dict(os.environ)


@pytest.mark.parametrize("devices_per_process", [1, 2])
def test_shard_map_over_processes_equals_numpy(devices_per_process, child_env):
    """examples/multiprocess.py's launcher: 2 processes, a psum of a row-parallel product and an all_gather on
    a jax.make_mesh mesh and a Mesh, 3 calls each on fresh random inputs, every process's shards checked against
    numpy in float64 by the example itself, then 3 steps of a tiny Llama tensor parallel over the processes'
    devices against the whole step on each process's own device (2 KV heads: not over 4 devices); no
    shared-memory segment is left behind."""
    before = shm_segments()
    seed = int.from_bytes(os.urandom(4), "little")
    command = [sys.executable, str(ROOT / "examples" / "multiprocess.py"), "--num-processes", "2",
               "--devices-per-process", str(devices_per_process), "--calls", "3", "--seed", str(seed),
               "--timeout", str(TIMEOUT_S)]  # fmt: skip
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert done.returncode == 0, f"seed {seed}\n{done.stdout}\n{done.stderr}"
    # 2 processes x 2 meshes x 2 functions x 3 calls (the processes' lines may interleave)
    checked = re.findall(r"process (\d): ([\w.]+): (\w+) call (\d): max error", done.stdout)
    assert len(set(checked)) == 24, done.stdout
    assert_decode_checked(done.stdout, skipped=devices_per_process > 1)
    assert shm_segments() <= before


@pytest.mark.gpu
def test_shard_map_over_gpus_of_two_processes_equals_numpy(child_env):
    """examples/multiprocess.py --platform cuda: 2 processes of one GPU each, their communication buffers mapped
    into each other through CUDA IPC; every process's shards against numpy, and the tensor-parallel decode
    against the whole step on each process's GPU, as on the CPU."""
    import jax

    if len(jax.devices("gpu")) < 2:
        pytest.skip("needs 2 GPUs")
    seed = int.from_bytes(os.urandom(4), "little")
    command = [sys.executable, str(ROOT / "examples" / "multiprocess.py"), "--platform", "cuda", "--calls", "3",
               "--seed", str(seed), "--timeout", str(TIMEOUT_S)]  # fmt: skip
    # this process (pytest) holds most of both GPUs' memory: the children allocate as they go
    env = dict(child_env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S + 10)
    assert done.returncode == 0, f"seed {seed}\n{done.stdout}\n{done.stderr}"
    checked = re.findall(r"process (\d): ([\w.]+): (\w+) call (\d): max error", done.stdout)
    assert len(set(checked)) == 24, done.stdout
    assert_decode_checked(done.stdout)


def assert_decode_checked(stdout: str, skipped: bool = False) -> None:
    """The example's tensor-parallel decode: 3 steps checked in each of the 2 processes, or skipped in both."""
    steps = set(re.findall(r"process (\d): tensor_parallel_decode step (\d): max logits error", stdout))
    if skipped:
        assert not steps and stdout.count("tensor_parallel_decode skipped") == 2, stdout
    else:
        assert len(steps) == 6, stdout


def run_without_process_1(absence: str, env: dict[str, str]) -> dict:
    """tests/multiprocess_worker.py in 2 processes, process 1 missing its call or its planning (``absence``);
    returns process 0's report. Both must exit in time with status 0, leaving no shared-memory segment."""
    before = shm_segments()
    coordinator = f"localhost:{example.free_port()}"
    worker = str(ROOT / "tests" / "multiprocess_worker.py")
    children = [subprocess.Popen([sys.executable, worker, str(i), coordinator, absence], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]  # fmt: skip
    try:
        outputs = [child.communicate(timeout=TIMEOUT_S) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert [child.returncode for child in children] == [0, 0], outputs
    assert shm_segments() <= before
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def test_a_process_that_never_calls_trips_the_watchdog(child_env):
    """Process 1 plans the megakernel (so that both map its buffers) and never calls it: process 0's call fails
    after JAX_MPK_WATCHDOG_S with DependencyTimeoutError naming rank 1, and its next call is refused at once."""
    child_env["JAX_MPK_WATCHDOG_S"] = "1"
    report = run_without_process_1("call", child_env)
    assert "first" in report, report  # the worker catches DependencyTimeoutError only
    assert "jax_mpk watchdog" in report["first"] and "remote event 0 of rank 1" in report["first"]
    assert report["seconds"] < 10
    assert "restart the processes" in report["second"]
    # unlinked once both processes had mapped it, before any call
    assert len(report["segments"]) == 1 and report["named_after_setup"] == []


def test_a_process_that_never_plans_trips_the_setup_timeout(child_env):
    child_env["JAX_MPK_SETUP_TIMEOUT_S"] = "1"
    report = run_without_process_1("plan", child_env)
    assert "JAX_MPK_SETUP_TIMEOUT_S" in report["setup"] and report["seconds"] < 10


def test_cuda_takes_one_gpu_per_process_across_processes():
    """Across processes the CUDA runtime runs one GPU per process (each maps the others' buffers through CUDA
    IPC); a process holding several of the mesh's GPUs is refused at plan time, with the fix in the message."""
    with pytest.raises(UnsupportedPrimitiveError, match="one GPU per process.*local_device_ids"):
        check_platform("cuda", [0, 1], local_devices=2)
    check_platform("cuda", [0, 1], local_devices=1)
    check_platform("cuda", [0], local_devices=4)
    check_platform("cpu", [0, 1], local_devices=2)
