"""The CUDA handler's host side, with hand-written kernels that use only runtime/params.h.

Registration is checked everywhere the extension has the CUDA backend; the rest needs a CUDA GPU and nvcc.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_mpk import runtime

ROOT = pathlib.Path(__file__).resolve().parent.parent
N = 4096

needs_cuda_build = pytest.mark.skipif(not runtime.has_cuda(), reason="extension built without CUDA")


def _gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def _skip_without_gpu():
    if not runtime.has_cuda():
        pytest.skip("extension built without CUDA")
    if not _gpu_devices():
        pytest.skip("no CUDA GPU")
    if _nvcc() is None:
        pytest.skip("no nvcc")

KERNELS = textwrap.dedent(
    r"""
    #include "jax_mpk/runtime/params.h"
    using namespace jax_mpk;
    typedef unsigned long long u64;

    __device__ u64 load_acquire(const u64* a) {
      u64 v;
      asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(a) : "memory");
      return v;
    }
    __device__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

    __device__ void report(const MegakernelParams& p, int code, int event, u64 counter, u64 target) {
      if (atomicCAS(&p.control->abort, 0, 1) == 0) {
        volatile ErrorRecord* r = p.error;
        r->task = 7; r->kernel = 3; r->event = event; r->cta = blockIdx.x; r->counter = counter; r->target = target;
        __threadfence_system();
        r->code = code;
        __threadfence_system();
      }
    }

    __device__ u64 begin(const MegakernelParams& p) {
      __shared__ u64 epoch;
      if (threadIdx.x == 0) epoch = load_acquire((const u64*)&p.control->epoch) + 1;
      __syncthreads();
      return epoch;
    }

    __device__ void finish(const MegakernelParams& p, u64 epoch) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        u64 done = atomicAdd((u64*)&p.control->ctas_done, 1ull) + 1;
        if (done == (u64)gridDim.x * epoch) atomicExch((u64*)&p.control->epoch, epoch);
      }
    }

    // Thread 0: waits until counter[event] >= target; false on watchdog or abort.
    __device__ bool wait(const MegakernelParams& p, int event, u64 target) {
      const u64 start = now_ns();
      while (true) {
        const u64 value = load_acquire((const u64*)p.counters + event);
        if (value >= target) return true;
        if (*(volatile int*)&p.control->abort) return false;
        if (now_ns() - start > (u64)p.watchdog_ns) { report(p, 1, event, value, target); return false; }
        __nanosleep(100);
      }
    }

    // y = x + epoch (buffers 0 and 1 may be one buffer); every CTA signals event 0 and CTA 0 waits for all of
    // them, which needs every CTA resident at once; seen = {CTAs seen, epoch}. Touches all dynamic smem.
    extern "C" __global__ void add_epoch(const KernelParams<3> p) {
      extern __shared__ float smem[];
      const u64 epoch = begin(p);
      const float* x = (const float*)p.buffers[0];
      float* y = (float*)p.buffers[1];
      int* seen = (int*)p.buffers[2];
      for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < N; i += gridDim.x * blockDim.x) {
        smem[threadIdx.x] = x[i] + (float)epoch;
        y[i] = smem[threadIdx.x];
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd((u64*)p.counters, 1ull);
        if (blockIdx.x == 0 && wait(p, 0, (u64)gridDim.x * epoch)) {
          seen[0] = gridDim.x;
          seen[1] = (int)epoch;
        }
      }
      finish(p, epoch);
    }

    // Waits on an event that never fires.
    extern "C" __global__ void hang(const KernelParams<3> p) {
      const u64 epoch = begin(p);
      if (threadIdx.x == 0) wait(p, 1, 1ull << 60);
      finish(p, epoch);
    }

    extern "C" __global__ void out_of_range(const KernelParams<3> p) {
      const u64 epoch = begin(p);
      if (threadIdx.x == 0 && blockIdx.x == 0) report(p, 2, 5, 100, 64);
      finish(p, epoch);
    }

    extern "C" __global__ void bad_signature(float* x) { x[0] = 1.0f; }
    extern "C" __global__ void too_few_buffers(const KernelParams<2> p) {}
    """
)


@functools.cache
def _cubin() -> bytes:
    major, minor = str(_gpu_devices()[0].compute_capability).split(".")
    build = ROOT / "build" / "test_cuda_executor"
    build.mkdir(parents=True, exist_ok=True)
    source = build / "kernels.cu"
    source.write_text(KERNELS)
    cubin = build / "kernels.cubin"
    subprocess.run(
        [_nvcc(), "-cubin", f"-arch=sm_{major}{minor}", "-std=c++17", f"-DN={N}", f"-I{ROOT / 'ffi' / 'include'}",
         "-o", str(cubin), str(source)],
        check=True,
    )
    return cubin.read_bytes()


def _register(key, kernel, *, image=None, threads=128, smem_bytes=64 * 1024, aliases=(), **kwargs):
    runtime.register_cuda_plan(
        key, _cubin() if image is None else image, kernel, num_events=2, threads=threads, smem_bytes=smem_bytes,
        arg_bytes=[4 * N], ret_bytes=[4 * N, 8], aliases=aliases, **kwargs)


def _call(key, *, watchdog_ms=2000, aliases=None, n=N):
    runtime.extension()
    call = jax.ffi.ffi_call(
        runtime.TARGET,
        [jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)],
        input_output_aliases=aliases,
    )
    return lambda x: call(x, plan_key=key, watchdog_ms=np.int64(watchdog_ms))


# --- registration (no GPU needed) ---


@needs_cuda_build
def test_register_is_lazy_and_validates():
    runtime.register_cuda_plan("reg-junk", b"not a cubin", "k", num_events=1, threads=32, smem_bytes=0,
                               arg_bytes=[8], ret_bytes=[8, 1], aliases={0: 0})
    assert runtime.extension().has_cuda_plan("reg-junk")
    assert runtime.check_cuda_error("reg-junk", 0) is None  # never ran there
    with pytest.raises(KeyError, match="not registered"):
        runtime.check_cuda_error("reg-unknown", 0)
    bad = [dict(threads=0), dict(threads=1025), dict(smem_bytes=-1), dict(num_events=-1), dict(num_ctas=-1),
           dict(aliases={0: 1}), dict(arg_bytes=[4]),
           dict(arg_bytes=[1] * 2100, ret_bytes=[1] * 2100)]  # more than the 4073 kMaxBuffers
    for change in bad:
        args = dict(num_events=1, threads=32, smem_bytes=0, arg_bytes=[8], ret_bytes=[8, 1], aliases={0: 0})
        args.update(change)
        with pytest.raises(ValueError, match="register_cuda_plan"):
            runtime.register_cuda_plan("reg-bad", b"x", "k", **args)
    with pytest.raises(ValueError, match="empty"):
        runtime.register_cuda_plan("reg-bad", b"", "k", num_events=0, threads=32, smem_bytes=0, arg_bytes=[],
                                   ret_bytes=[])


@needs_cuda_build
def test_ranks_of_other_processes_register_and_their_exchange_refuses_bad_input():
    """A plan whose ranks run in several processes lists -1 for the others' ranks; the exchange of communication
    buffers (export_cuda_comm / import_cuda_comm, CUDA IPC) refuses, before touching a GPU: a plan without such
    ranks, a device that runs none, a rank this process runs, a malformed handle."""
    ext = runtime.extension()
    plan = dict(num_events=1, threads=32, smem_bytes=0, arg_bytes=[8], ret_bytes=[8, 1], comm_bytes=64,
                num_remote_events=2)  # fmt: skip
    runtime.register_cuda_plan("ipc-two", b"x", "k", rank_devices=[0, -1], **plan)
    runtime.register_cuda_plan("ipc-local", b"x", "k", rank_devices=[0, 1], **plan)
    for devices in ([-1, -1], [0, -2], [1, 1, -1]):
        with pytest.raises(ValueError, match="register_cuda_plan"):
            runtime.register_cuda_plan("ipc-bad", b"x", "k", rank_devices=devices, **plan)
    with pytest.raises(ValueError, match="no rank in another process"):
        ext.export_cuda_comm("ipc-local", 0)
    with pytest.raises(ValueError, match="not registered"):
        ext.import_cuda_comm("ipc-unknown", 0, 1, "00" * 64)
    with pytest.raises(ValueError, match="runs no rank"):
        ext.export_cuda_comm("ipc-two", 3)
    with pytest.raises(ValueError, match="not another process's"):
        ext.import_cuda_comm("ipc-two", 0, 0, "00" * 64)
    for handle in ("00" * 63, "zz" * 64, "00" * 65):
        with pytest.raises(ValueError, match="hex digits"):
            ext.import_cuda_comm("ipc-two", 0, 1, handle)


# --- on a GPU ---


@pytest.mark.gpu
@pytest.mark.parametrize("donate", [False, True])
def test_epochs_persist_across_calls(donate):
    _skip_without_gpu()
    key = f"add-{donate}"
    _register(key, "add_epoch", aliases={0: 0} if donate else ())
    call = _call(key, aliases={0: 0} if donate else None)
    f = jax.jit(call, donate_argnums=0 if donate else ())
    sms = _gpu_devices()[0].core_count
    base = np.arange(N, dtype=np.float32)
    for epoch in range(1, 5):
        y, seen = f(jnp.asarray(base))
        np.testing.assert_array_equal(np.asarray(y), base + epoch)
        assert np.asarray(seen).tolist() == [sms, epoch]
    assert runtime.check_cuda_error(key, 0) is None


@pytest.mark.gpu
def test_same_key_and_launch_keeps_the_device_state_whatever_the_image():
    """nvcc embeds its build directory in the cubin's line info, so the same program compiled by another process
    (and read back from the shared cache) has other bytes: registering it again keeps the loaded plan and its
    device state (epochs go on; a plan whose communication buffer other processes mapped must not be replaced);
    another launch under the key replaces it (epochs restart)."""
    _skip_without_gpu()
    _register("rereg", "add_epoch")
    f = jax.jit(_call("rereg"))
    base = np.arange(N, dtype=np.float32)
    for epoch, change in [(1, None), (2, dict(image=_cubin() + b"\0")), (1, dict(smem_bytes=32 * 1024))]:
        if change is not None:
            _register("rereg", "add_epoch", **change)
        y, seen = f(jnp.asarray(base))
        np.testing.assert_array_equal(np.asarray(y), base + epoch)
        assert np.asarray(seen)[1] == epoch, (change, np.asarray(seen))


@pytest.mark.gpu
def test_watchdog_is_reported_later_and_resets():
    _skip_without_gpu()
    _register("hang", "hang", smem_bytes=0)
    f = jax.jit(_call("hang", watchdog_ms=50))
    x = jnp.zeros((N,), jnp.float32)
    jax.block_until_ready(f(x))
    message = runtime.check_cuda_error("hang", 0)
    assert message is not None and "jax_mpk watchdog: task 7 (kernel 3) waited more than 50 ms on event 1" in message
    assert runtime.check_cuda_error("hang", 0) is None
    jax.block_until_ready(f(x))  # fails on the device; reported by the next call, which does not run
    with pytest.raises(Exception, match=r"jax_mpk watchdog: .*Reported by a later call of plan 'hang'"):
        jax.block_until_ready(f(x))
    jax.block_until_ready(f(x))  # the state was reset: this one runs (and times out again)
    assert "watchdog" in runtime.check_cuda_error("hang", 0)


@pytest.mark.gpu
def test_index_out_of_range_message():
    _skip_without_gpu()
    _register("oob", "out_of_range", smem_bytes=0)
    jax.block_until_ready(jax.jit(_call("oob"))(jnp.zeros((N,), jnp.float32)))
    message = runtime.check_cuda_error("oob", 0)
    assert "task 7 (kernel 3) failed: a computed element position is outside its tensor (tensor 5, position 100, " \
           "size 64" in message


@pytest.mark.gpu
def test_call_errors_are_ffi_errors():
    _skip_without_gpu()
    x = jnp.zeros((N,), jnp.float32)
    with pytest.raises(Exception, match="CUDA plan not registered in this process: 'nothing'"):
        jax.block_until_ready(jax.jit(_call("nothing"))(x))
    _register("junk", "add_epoch", image=b"\x7fELF not really a cubin")
    with pytest.raises(Exception, match="megakernel image of plan 'junk'"):
        jax.block_until_ready(jax.jit(_call("junk"))(x))
    _register("no-such-kernel", "no_such_kernel")
    with pytest.raises(Exception, match="loading kernel 'no_such_kernel' from the megakernel image"):
        jax.block_until_ready(jax.jit(_call("no-such-kernel"))(x))
    _register("signature", "bad_signature", smem_bytes=0)
    with pytest.raises(Exception, match="must take exactly one parameter"):
        jax.block_until_ready(jax.jit(_call("signature"))(x))
    _register("buffer-count", "too_few_buffers", smem_bytes=0)
    with pytest.raises(Exception, match=r"KernelParams<3>` \(200 bytes\) by value; its first parameter has 192"):
        jax.block_until_ready(jax.jit(_call("buffer-count"))(x))
    _register("too-much-smem", "add_epoch", smem_bytes=1 << 20)
    with pytest.raises(Exception, match="cannot run a CTA of 128 threads, 1048576 bytes of dynamic"):
        jax.block_until_ready(jax.jit(_call("too-much-smem"))(x))
    _register("too-many-ctas", "add_epoch", num_ctas=1 << 20)
    with pytest.raises(Exception, match="co-resident CTAs"):
        jax.block_until_ready(jax.jit(_call("too-many-ctas"))(x))
    _register("sizes", "add_epoch")
    with pytest.raises(Exception, match="operand 0 has 8192 bytes, but plan 'sizes' expects 16384"):
        jax.block_until_ready(jax.jit(_call("sizes", n=N // 2))(x[: N // 2]))


COMMAND_BUFFER_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {tests!r})
import test_cuda_executor as t
t._register("graph", "add_epoch")
call = t._call("graph")
f = jax.jit(lambda x: call(x * 2.0 + 1.0))
sms = jax.devices()[0].core_count
base = np.arange(t.N, dtype=np.float32)
x = jnp.asarray(base)
# Captured launches start from a reset state: every call runs at epoch 1.
for _ in range(6):
    y, seen = f(x)
    np.testing.assert_array_equal(np.asarray(y), base * 2 + 2)
    assert np.asarray(seen).tolist() == [sms, 1], np.asarray(seen)
    del y, seen
assert t.runtime.check_cuda_error("graph", 0) is None
# A new plan under the same key, with old results kept alive: new buffer addresses make XLA re-capture the
# call (updating the graph in place), and the new plan's device state is created while the stream is captured.
kept = [f(x)]
t._register("graph", "add_epoch", smem_bytes=32 * 1024)
for _ in range(3):
    y, seen = f(x)
    np.testing.assert_array_equal(np.asarray(y), base * 2 + 2)
    assert np.asarray(seen).tolist() == [sms, 1], np.asarray(seen)
    kept.append((y, seen))
assert t.runtime.check_cuda_error("graph", 0) is None
# An error left by a call and found by a later call that XLA captures: that call runs (its captured reset
# comes first) and the message waits for check_cuda_error (or the next call that is not captured).
t._register("graph-hang", "hang", smem_bytes=0)
hang = t._call("graph-hang", watchdog_ms=50)
g = jax.jit(lambda x: hang(x * 2.0 + 1.0))
first = jax.block_until_ready(g(x))  # times out on the device
second = jax.block_until_ready(g(x))  # new buffers: captured again, with the error pending; times out again
message = t.runtime.check_cuda_error("graph-hang", 0)
assert message.startswith("jax_mpk watchdog") and "; later: jax_mpk watchdog" in message, message
assert t.runtime.check_cuda_error("graph-hang", 0) is None
third = jax.block_until_ready(g(x))
assert "jax_mpk watchdog" in t.runtime.check_cuda_error("graph-hang", 0)
# Epochs still advance across calls that are not captured, after all that.
plain = jax.jit(t._call("graph"))
for epoch in range(1, 4):
    y, seen = plain(x)
    assert np.asarray(seen)[0] == sms
print("COMMAND BUFFER OK")
"""


def run_with_command_buffers(script: str, timeout: int = 300, **env) -> tuple[subprocess.CompletedProcess, str]:
    """Runs ``script`` in a new process whose XLA captures every custom call into CUDA graphs (command buffers,
    from the first call on), logging their executions and updates; returns it and its whole output."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="command_buffer_thunk=3", **env)
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1"
                            " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL").strip()  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=timeout)
    return done, done.stdout + done.stderr


@pytest.mark.gpu
def test_command_buffer_capture_and_replay():
    """With command buffers forced on, XLA captures the call (its first one included) and replays it."""
    _skip_without_gpu()
    _cubin()
    done, log = run_with_command_buffers(COMMAND_BUFFER_SCRIPT.format(tests=str(ROOT / "tests")),
                                         XLA_PYTHON_CLIENT_PREALLOCATE="false")  # fmt: skip
    assert done.returncode == 0 and "COMMAND BUFFER OK" in done.stdout, log[-6000:]
    assert "Execute command buffer" in log, log[-6000:]  # it really went through a CUDA graph
    assert "Update command buffer" in log, log[-6000:]  # and was re-captured after the plan changed
    print(log[-3000:])


@pytest.mark.gpu
def test_each_device_has_its_own_state():
    """shard_map runs the call once per device, concurrently: each device loads the kernel and keeps its own
    counters, epoch and error record."""
    _skip_without_gpu()
    devices = _gpu_devices()
    if len(devices) < 2:
        pytest.skip("needs 2 GPUs")
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(devices[:2]), ("d",))
    _register("two-add", "add_epoch")
    _register("two-hang", "hang", smem_bytes=0)

    def sharded(key, watchdog_ms=2000):
        return jax.jit(jax.shard_map(_call(key, watchdog_ms=watchdog_ms), mesh=mesh, in_specs=P("d"),
                                     out_specs=[P("d"), P("d")], check_vma=False))

    f = sharded("two-add")
    base = np.arange(2 * N, dtype=np.float32)
    sms = [d.core_count for d in devices[:2]]
    for epoch in range(1, 4):
        y, seen = f(jnp.asarray(base))
        np.testing.assert_array_equal(np.asarray(y), base + epoch)
        assert np.asarray(seen).tolist() == [sms[0], epoch, sms[1], epoch]
    jax.block_until_ready(sharded("two-hang", watchdog_ms=50)(jnp.asarray(base)))
    for device in (0, 1):
        message = runtime.check_cuda_error("two-hang", devices[device].local_hardware_id)
        assert "jax_mpk watchdog" in message and f"on device {devices[device].local_hardware_id})" in message
        assert runtime.check_cuda_error("two-add", devices[device].local_hardware_id) is None
