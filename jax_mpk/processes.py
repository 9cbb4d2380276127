"""A shard_map whose devices belong to several processes (``jax.distributed``, e.g. one process per device).

Each process runs only its own devices' ranks. On the CPU executor the ranks' communication buffers and remote
event counters then live in one POSIX shared-memory segment that every process of the mesh maps, with the same
protocol and watchdog as ranks in one process. The processes agree on the segment's name through jax's
distributed key-value store: the mesh's first process publishes it, the plan key with a random token (a name
unique to the run, so that a segment a crashed run left cannot be picked up). Once every process has mapped the
segment (a barrier through the same store), each removes its name, so that nothing is left in /dev/shm whatever
happens later.

On the CUDA runtime each process of such a mesh runs one GPU: it creates its rank's state at plan time (the
kernel loaded, the communication buffer allocated), publishes a CUDA IPC handle of the buffer under the plan's
key in the same store, maps every other rank's, and waits at a barrier; the kernels then signal and poll each
other's counters as ranks of one process do (system-scope release and acquire). A failed call cannot be
restarted in step across processes, so the plan then refuses its later calls ("restart the processes").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import jax

from .errors import DependencyTimeoutError, UnsupportedPrimitiveError
from .runtime import extension

# plan key -> shared-memory segment, for the plans this process has set up (once each: a key of the store and a
# barrier are used only once)
_segments: dict[str, str] = {}


def mesh_processes(mesh) -> list[int]:
    """The processes the devices of ``mesh`` belong to, in increasing order."""
    return sorted({int(d.process_index) for d in mesh.devices.flat})


def check_platform(platform: str, processes: Sequence[int], local_devices: int = 1) -> None:
    """Refuse, at plan time, what the ``platform``'s runtime cannot run: on the CUDA runtime, a mesh spread over
    several ``processes`` of which this one holds ``local_devices`` GPUs other than one (its ranks would share a
    context with other processes' ranks mapped into it, an arrangement not supported)."""
    if platform == "cuda" and len(processes) > 1 and local_devices != 1:
        raise UnsupportedPrimitiveError(
            "shard_map",
            detail=f"its mesh's devices belong to {len(processes)} processes and this one holds {local_devices} of "
            "them: across processes the CUDA runtime runs one GPU per process (e.g. jax.distributed.initialize("
            "..., local_device_ids=[i])), or run the shard_map's devices in one process",
        )


def share_comm_group(key: str, processes: Sequence[int], timeout_s: float) -> str:
    """Map the communication buffers of registered CPU plan ``key``, whose ranks run in ``processes``, from a
    shared-memory segment that all of them map; returns the segment's name (already unlinked). Every process of
    the mesh calls it for the plan; DependencyTimeoutError when one does not within ``timeout_s``."""
    if key in _segments:
        return _segments[key]
    from jax._src.distributed import global_state

    client = global_state.client
    timeout_ms = max(1, round(timeout_s * 1000))
    where = f"jax_mpk/{key}"
    try:
        if jax.process_index() == processes[0]:
            segment = f"/jax_mpk_{key}_{secrets.token_hex(8)}"
            client.key_value_set(f"{where}/segment", segment)
        else:
            segment = client.blocking_key_value_get(f"{where}/segment", timeout_ms)
        try:
            extension().share_comm_group(key, segment)
            client.wait_at_barrier(f"{where}/mapped", timeout_ms, list(processes))
        finally:
            extension().unlink_shared_memory(segment)
    except jax.errors.JaxRuntimeError as exc:
        raise _setup_timeout(key, processes, timeout_s, exc) from exc
    _segments[key] = segment
    return segment


# plan keys whose communication buffers this process has exchanged (once each, as for _segments)
_cuda_exchanged: set[str] = set()


def share_cuda_comm(key: str, processes: Sequence[int], rank_devices: Sequence[int], timeout_s: float) -> None:
    """For registered CUDA plan ``key`` whose ranks run in ``processes``, this process's on the GPUs
    ``rank_devices`` names (-1: another process's rank): publish this process's rank's communication buffer as a
    CUDA IPC handle, map the other ranks', and wait until every process has. DependencyTimeoutError when one
    does not within ``timeout_s``."""
    if key in _cuda_exchanged:
        return
    from jax._src.distributed import global_state

    client = global_state.client
    timeout_ms = max(1, round(timeout_s * 1000))
    where = f"jax_mpk/{key}/cuda_comm"
    local = [(r, d) for r, d in enumerate(rank_devices) if d >= 0]
    assert len(local) == 1, "check_platform: one GPU of the mesh per process"
    ((rank, device),) = local
    try:
        client.key_value_set(f"{where}/{rank}", extension().export_cuda_comm(key, device))
        for peer, peer_device in enumerate(rank_devices):
            if peer_device < 0:
                extension().import_cuda_comm(key, device, peer, client.blocking_key_value_get(f"{where}/{peer}", timeout_ms))
        client.wait_at_barrier(f"{where}/mapped", timeout_ms, list(processes))
    except jax.errors.JaxRuntimeError as exc:
        raise _setup_timeout(key, processes, timeout_s, exc) from exc
    _cuda_exchanged.add(key)


def _setup_timeout(key: str, processes: Sequence[int], timeout_s: float, exc: Exception) -> DependencyTimeoutError:
    return DependencyTimeoutError(
        f"jax_mpk: the processes {list(processes)} of a shard_map did not all set up its plan {key} within "
        f"{timeout_s} s (JAX_MPK_SETUP_TIMEOUT_S); did every process of the mesh call the function? ({exc})"
    )
