"""Runtime: the nanobind extension, plan registration, and the one XLA FFI custom call per function."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import MegakernelError

TARGET = "jax_mpk_megakernel"
# The same handlers for plans that several devices run together; on the GPU without CUDA-graph capture.
RANKS_TARGET = "jax_mpk_megakernel_ranks"
# CPU only: plans whose ranks run in several processes, with the shared memory their buffers are in.
PROCESSES_TARGET = "jax_mpk_megakernel_processes"


@functools.cache
def extension():
    """The compiled extension, with its FFI targets registered with jax (once per process)."""
    try:
        from . import _ext
    except ImportError as exc:  # pragma: no cover - only when the package was not built
        raise MegakernelError(
            "the jax_mpk C++ extension is not built; install the package with `pip install -e .`"
        ) from exc
    for name, capsule in _ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    if _ext.has_cuda():
        # Same target name: one jax.ffi.ffi_call lowers to whichever handler the platform has. On a jax without
        # CUDA the registration is only queued.
        for name, capsule in _ext.cuda_registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return _ext


def has_cuda() -> bool:
    """Whether the extension was built with the CUDA backend."""
    return extension().has_cuda()


def register_plan(key: str, words: np.ndarray) -> None:
    extension().register_plan(key, np.ascontiguousarray(words, dtype=np.int64))


def register_cuda_plan(
    key: str,
    cubin: bytes,
    kernel_name: str,
    *,
    num_events: int,
    threads: int,
    smem_bytes: int,
    arg_bytes: list[int],
    ret_bytes: list[int],
    aliases: dict[int, int] | list[tuple[int, int]] = (),
    num_ctas: int = 0,
    rank_devices: Sequence[int] = (),
    comm_bytes: int = 0,
    num_remote_events: int = 0,
) -> None:
    """Register a compiled megakernel for the CUDA handler under ``key`` (the ``plan_key`` of :func:`emit_call`).

    ``cubin`` is a cubin, fatbin or PTX image holding ``extern "C" __global__ void kernel_name(const
    jax_mpk::KernelParams<N> p)`` (runtime/params.h), N the number of operands and results. ``arg_bytes``/``ret_bytes`` are the byte sizes of the call's operands and
    results (the workspace included), ``aliases`` the ``input_output_aliases`` pairs. The kernel is launched
    cooperatively with ``num_ctas`` CTAs (0: one per SM) of ``threads`` threads and ``smem_bytes`` of dynamic
    shared memory. Nothing touches the GPU here; the image is loaded on the first call on each device. A plan
    that several devices run together (a shard_map body) gives their ordinals in rank order (``rank_devices``),
    the bytes of one rank's communication buffer and its number of remote events.
    Raises ValueError for invalid arguments, RuntimeError when the extension has no CUDA backend.
    """
    pairs = sorted(aliases.items()) if isinstance(aliases, dict) else [tuple(p) for p in aliases]
    extension().register_cuda_plan(
        key,
        bytes(cubin),
        kernel_name,
        int(num_events),
        int(threads),
        int(smem_bytes),
        len(arg_bytes),
        len(ret_bytes),
        [int(b) for b in arg_bytes],
        [int(b) for b in ret_bytes],
        [(int(i), int(o)) for i, o in pairs],
        int(num_ctas),
        [int(d) for d in rank_devices],
        int(comm_bytes),
        int(num_remote_events),
    )


def check_cuda_error(key: str, device: int = 0) -> str | None:
    """After synchronizing (e.g. ``jax.block_until_ready``): the error of the last failed call of CUDA plan
    ``key`` on device ordinal ``device``, or None. Reading an error also resets the plan's state on that device.

    The CUDA handler does not wait for its kernel, so a kernel-side error (watchdog, index out of range) is
    otherwise only reported by the next call of the plan on that device, which then does not run.
    """
    return extension().check_cuda_error(key, int(device))


def emit_call(
    key: str,
    operands: list,
    out_specs: list[tuple[tuple[int, ...], np.dtype]],
    aliases: dict[int, int],
    workspace_bytes: int,
    watchdog_ms: int,
    keep_workspace: bool = False,
    several_devices: bool = False,
    comm_segment: str = "",
) -> list:
    """Emit the custom call; returns the results, without the workspace unless ``keep_workspace``.
    ``several_devices``: the plan is a shard_map body (its call may not be captured into a CUDA graph).
    ``comm_segment``: its ranks run in several processes, and their buffers are in this shared memory (CPU)."""
    extension()
    result_types = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_specs]
    result_types.append(jax.ShapeDtypeStruct((max(workspace_bytes, 1),), jnp.uint8))
    target = PROCESSES_TARGET if comm_segment else RANKS_TARGET if several_devices else TARGET
    call = jax.ffi.ffi_call(target, result_types, input_output_aliases=dict(aliases) or None, vmap_method=None)
    attributes = dict(comm_segment=comm_segment) if comm_segment else {}
    results = call(*operands, plan_key=key, watchdog_ms=np.int64(watchdog_ms), **attributes)
    return list(results) if keep_workspace else list(results[:-1])
