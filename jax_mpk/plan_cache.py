"""Plans on disk: what a call needs, keyed by the traced function and everything else that shapes its plan.

A new process that traces the same step for the same target loads its plan instead of planning again (fusion,
tiling, scheduling and validation take seconds to minutes for a large model; tracing takes about one). The key
covers the jaxpr (its printed form, with the contents of the constants it closes over), the signature, the
target, the knobs that change a plan or the checks made while planning, and the package (version and a digest
of its Python sources, so that an edited checkout never loads a stale plan) and jax versions. Files are written
atomically (temp file + os.replace) under ``JAX_MPK_CACHE_DIR/plans``; ``JAX_MPK_FORCE_COMPILE=1`` bypasses
them. A file that cannot be read is a miss.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import numpy as np

from .target import Target

if TYPE_CHECKING:
    from .codegen import GeneratedSource

log = logging.getLogger("jax_mpk")

FORMAT = 1  # bump when CallPlan changes


@dataclass
class CallPlan:
    """Everything a call of a planned function needs, without the pipeline stages that made it."""

    key: str  # the registry key: a digest of the words
    words: np.ndarray  # the serialized plan (docs/plan_format.md)
    consts: list[np.ndarray]  # operands after the arguments
    input_specs: list[tuple[tuple[int, ...], np.dtype]]  # every operand, the constants included
    output_specs: list[tuple[tuple[int, ...], np.dtype]]  # every result, the workspace excluded
    aliases: dict[int, int]  # operand -> result: one buffer
    workspace_bytes: int  # with the profile area, when there is one
    profile_offset: int | None  # JAX_MPK_PROFILE builds on a GPU: where the timestamps start in the workspace
    num_ranks: int
    comm_bytes: int
    num_tasks: int
    num_events: int
    num_remote_events: int
    num_kernels: int
    source: GeneratedSource | None  # the CUDA megakernel's source (None on the CPU)


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # function reprs in some params (custom_jvp's jvp function)


def cache_key(closed_jaxpr, signature: str, target: Target, knobs: tuple) -> str:
    """The content hash a plan is stored under."""
    from . import __version__

    digest = hashlib.sha256()
    for part in (f"format {FORMAT}", __version__, jax.__version__, _package_digest(), signature, repr(target),
                 repr(knobs), _ADDRESS.sub("", str(closed_jaxpr))):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    for const in closed_jaxpr.consts:
        array = np.asarray(const)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@functools.cache
def _package_digest() -> str:
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).resolve().parent
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _path(cache_dir: str, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / "plans" / f"{key}.pkl"


def load(cache_dir: str, key: str) -> CallPlan | None:
    path = _path(cache_dir, key)
    try:
        with open(path, "rb") as f:
            plan = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a truncated or foreign file: plan again (and overwrite it)
        log.warning("jax_mpk: ignoring the unreadable cached plan %s (%r)", path, exc)
        return None
    return plan if isinstance(plan, CallPlan) else None


def store(cache_dir: str, key: str, plan: CallPlan) -> None:
    path = _path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only or full disk costs the next process a plan, nothing else
        log.warning("jax_mpk: could not cache the plan in %s (%r)", path, exc)
