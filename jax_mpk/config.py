"""All knobs, read from environment variables with defaults, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


@dataclass(frozen=True)
class Config:
    num_workers: int  # CPU executor worker threads (JAX_MPK_NUM_WORKERS)
    watchdog_seconds: float  # longest wait on one dependency before the call fails (JAX_MPK_WATCHDOG_S)
    max_tasks: int  # largest task graph accepted (JAX_MPK_MAX_TASKS)
    min_task_work: int  # smallest work (elements x cost) worth a task of its own (JAX_MPK_MIN_TASK_WORK)
    max_workspace_bytes: int  # largest intermediate workspace accepted (JAX_MPK_MAX_WORKSPACE_BYTES)
    dump_dir: str  # when set, every compiled plan's stages are written there (JAX_MPK_DUMP_DIR)
    validate: bool  # run the task-graph validator on every plan (JAX_MPK_VALIDATE, default on)
    profile: bool  # CUDA: record per-task timestamps, read with Megakernel.profile() (JAX_MPK_PROFILE)
    platform: str  # "cpu" or "cuda" to override the default backend's choice (JAX_MPK_PLATFORM)
    cache_dir: str  # plans and compiled megakernels (JAX_MPK_CACHE_DIR, default ~/.cache/jax_mpk)
    force_compile: bool  # plan and compile again, ignoring the cache (JAX_MPK_FORCE_COMPILE)


def load() -> Config:
    """Read the knobs now (so tests and users can change the environment between compilations)."""
    return Config(
        num_workers=_env_int("JAX_MPK_NUM_WORKERS", min(4, os.cpu_count() or 1)),
        watchdog_seconds=_env_float("JAX_MPK_WATCHDOG_S", 10.0),
        max_tasks=_env_int("JAX_MPK_MAX_TASKS", 1 << 20),
        min_task_work=_env_int("JAX_MPK_MIN_TASK_WORK", 1 << 14),
        max_workspace_bytes=_env_int("JAX_MPK_MAX_WORKSPACE_BYTES", 8 << 30),
        dump_dir=os.environ.get("JAX_MPK_DUMP_DIR", ""),
        validate=_env_int("JAX_MPK_VALIDATE", 1) != 0,
        profile=_env_int("JAX_MPK_PROFILE", 0) != 0,
        platform=os.environ.get("JAX_MPK_PLATFORM", "").lower(),
        cache_dir=os.environ.get("JAX_MPK_CACHE_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jax_mpk"),
        force_compile=_env_int("JAX_MPK_FORCE_COMPILE", 0) != 0,
    )
