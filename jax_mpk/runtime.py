"""Runtime: the nanobind extension, plan registration, and the one XLA FFI custom call per function."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .errors import MegakernelError

TARGET = "jax_mpk_megakernel"


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
    return _ext


def register_plan(key: str, words: np.ndarray) -> None:
    extension().register_plan(key, np.ascontiguousarray(words, dtype=np.int64))


def emit_call(
    key: str,
    operands: list,
    out_specs: list[tuple[tuple[int, ...], np.dtype]],
    aliases: dict[int, int],
    workspace_bytes: int,
    watchdog_ms: int,
) -> list:
    """Emit the custom call; returns the results without the workspace."""
    extension()
    result_types = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_specs]
    result_types.append(jax.ShapeDtypeStruct((max(workspace_bytes, 1),), jnp.uint8))
    call = jax.ffi.ffi_call(
        TARGET,
        result_types,
        input_output_aliases=dict(aliases) or None,
        vmap_method=None,
    )
    results = call(*operands, plan_key=key, watchdog_ms=np.int64(watchdog_ms))
    return list(results[:-1])
