"""All knobs, read from environment variables with defaults, in one place.

Every value is checked when it is read (a function is traced): a bad one raises InvalidArgumentError naming the
variable and the value, not an error deep in planning or at call time.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import InvalidArgumentError


def _env(name: str, default, parse, valid=lambda v: True, expected: str = ""):
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = parse(text.strip())
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise InvalidArgumentError(f"{name}={text!r} is not valid: expected {expected}")
    return value


def _env_int(name: str, default: int, minimum: int) -> int:
    return _env(name, default, int, lambda v: v >= minimum, f"an integer >= {minimum}")


def _env_flag(name: str, default: bool) -> bool:
    return _env(name, int(default), int, lambda v: v in (0, 1), "0 or 1") == 1


@dataclass(frozen=True)
class Config:
    num_workers: int  # CPU executor worker threads (JAX_MPK_NUM_WORKERS)
    watchdog_seconds: float  # longest wait on one dependency before the call fails (JAX_MPK_WATCHDOG_S)
    # longest wait for the other processes of a shard_map spread over several (jax.distributed) to plan it and map
    # its communication buffers (JAX_MPK_SETUP_TIMEOUT_S): planning takes seconds, and a process may plan while
    # another loads the plan from the cache
    setup_timeout_seconds: float
    max_tasks: int  # largest task graph accepted (JAX_MPK_MAX_TASKS)
    min_task_work: int  # smallest work (elements x cost) worth a task of its own (JAX_MPK_MIN_TASK_WORK)
    max_workspace_bytes: int  # largest intermediate workspace accepted (JAX_MPK_MAX_WORKSPACE_BYTES)
    dump_dir: str  # when set, every compiled plan's stages are written there (JAX_MPK_DUMP_DIR)
    validate: bool  # run the task-graph validator on every plan (JAX_MPK_VALIDATE, default on)
    profile: bool  # CUDA: record per-task timestamps, read with Megakernel.profile() (JAX_MPK_PROFILE)
    platform: str  # "cpu" or "cuda" to override the default backend's choice (JAX_MPK_PLATFORM)
    cache_dir: str  # plans and compiled megakernels (JAX_MPK_CACHE_DIR, default ~/.cache/jax_mpk)
    force_compile: bool  # plan and compile again, ignoring the cache (JAX_MPK_FORCE_COMPILE)
    # CUDA: attention as one split-along-the-keys kernel (flash-decoding, jax_mpk/attention.py), merged by the
    # last task of each group of query rows (JAX_MPK_SPLIT_ATTENTION, default on since its tensor-core body: never
    # slower in the 2-layer profiles of the benchmark models, 1-8% faster at batch 8; docs/notes/cuda_megakernel.md)
    split_attention: bool
    # testing: the CPU executor runs plans fused and tiled as for a GPU of JAX_MPK_NUM_WORKERS SMs
    # (JAX_MPK_GPU_FUSION), so that the GPU fusion's semantics are checked without a GPU
    gpu_fusion: bool
    # GPU fusion: a batch's products also compute their rows (RMSNorm, SwiGLU) in their staging, all rows side by
    # side (JAX_MPK_STAGE_SHARED_ROWS, default off: measured mixed, see README)
    stage_shared_rows: bool
    # GPU fusion: at batch > 1 the products compute in their staging the rows that need no reduction (a SwiGLU
    # before the down projection, not one of split-K partials), the norms still stored
    # (JAX_MPK_STAGE_SHARED_POINTWISE, default on: Llama-1B b8 -8%; JAX_MPK_STAGE_SHARED_ROWS does all rows)
    stage_shared_pointwise: bool
    # testing: schedule a random topological order on random workers (JAX_MPK_SCHEDULE_SEED; unset: list
    # scheduling by estimated cost)
    schedule_seed: int | None
    # list scheduling: every task's estimate includes a fixed cost (schedule.fixed_task_cost), so that a small task
    # does not make its SM look idle (JAX_MPK_TASK_FIXED_COST: a multiple of schedule.FIXED_COST_WEIGHT_BYTES' cost,
    # default 1: Qwen3-8B b8 -9%, Llama-1B b1/b8 -0.3%; 0: estimates alone)
    task_fixed_cost: float
    # several devices: every rank keeps a copy of every rank's slot of a communication buffer, stores go to all
    # copies, reads are local (Target.comm_copies; JAX_MPK_COMM_COPIES, default off until it is measured on two
    # GPUs)
    comm_copies: bool
    # CUDA: weights and the KV cache, read once a step, are streamed through L2 with an evict-first policy, so that
    # activations, partials, task tables and code stay there (Target.stream_evict_first; JAX_MPK_STREAM_EVICT_FIRST,
    # default on: H200 Qwen3-0.6B b1 1.336 -> 1.225 ms, Llama-1B b1 1.181 -> 1.131, Qwen3-8B b1 +0.6%)
    stream_evict_first: bool
    # CUDA: CUDA-core products stream their weight through a ring whose slots are divided between the warps, each
    # copying what it multiplies, so that no block barrier per 32 KB slot waits for the slowest copy (dot.cuh's
    # columns_warp_ring; JAX_MPK_WARP_RING, default on: H200 Qwen3-8B b1 5.044 -> 4.999 ms, Llama-1B b1 1.181 -> 1.168)
    warp_ring: bool
    # CUDA: a pointwise element computes every operand that is not elementwise at its own index (loads, reindexed
    # and concatenated operands, a thread's own folds) before its arithmetic, so that no transcendental's branch
    # separates two of its loads (JAX_MPK_ELEMENT_LOADS_FIRST, default on: H200 Llama-1B b1 1.118 -> 1.113 ms,
    # Qwen3-0.6B b1 1.197 -> 1.191, Qwen3-0.6B b8 1.843 -> 1.829, Llama-1B b8 unchanged)
    element_loads_first: bool
    # CUDA: the ring products and the ring's first copies are functions of their own, shared by every task of a
    # weight type and tile shape, instead of inlined into every variant and every case of the prefetch (dot.cuh's
    # JAX_MPK_SHARED_CODE, default on: nvcc about twice as fast, H200 step times unchanged)
    shared_code: bool
    # CUDA: the ring products take their tile's shape as template arguments where a kernel's tiles are all alike,
    # so that their index arithmetic folds (dot.cuh's JAX_MPK_STATIC_TILES, default on: a 64 KB product's body
    # 3,400 -> 1,700 cycles, benchmarks/micro/product_body.cu; 0 for measuring)
    static_tiles: bool
    # CUDA: a product staging a normalized row computes the parts of its values that need no norm, loads
    # included, before the row's block reduction, so that they are in flight while the block reduces (one L2 round
    # trip before the product, not two; JAX_MPK_STAGING_LOADS_FIRST, default on: H200 b1 Llama-1B -1.5%, Qwen3-0.6B
    # -0.6%)
    staging_loads_first: bool
    # CUDA: a rows kernel (a norm, then pointwise) whose row has at most a block's worth of elements computes each
    # thread's element operands -- loads, short folds, every piece of a concatenation -- before the row's block
    # reduction (JAX_MPK_ROWS_LOADS_FIRST, default on: H200 b1 same process Llama-1B -0.5%, Qwen3-0.6B -0.8%)
    rows_loads_first: bool
    # CUDA: a static one-row warp-ring product adds its partial sums with shuffles and vector stores into padded
    # rows (dot.cuh's JAX_MPK_VECTOR_PARTIALS: its body -2 to -11% in benchmarks/micro/product_body.cu; default on:
    # H200 b1 same process Llama-1B -0.7%, Qwen3-0.6B -0.7%)
    vector_partials: bool
    # CUDA, measuring: a split-attention task of a few keys a warp (batch 1) runs attention.cuh's keys_by_warps
    # (each warp its keys' scores, softmax and values in registers; one barrier a chunk; JAX_MPK_ATTENTION_WARPS,
    # default off until measured)
    attention_warps: bool
    # CUDA, measuring: a split-attention task issues its score's loads of the call's scalars (the position) at its
    # start, not after the scores' products (JAX_MPK_SCORE_LOADS_FIRST, default off until measured)
    score_loads_first: bool


@contextlib.contextmanager
def overridden(knobs: dict[str, str]) -> Iterator[None]:
    """The environment with ``knobs`` set (they are read when a megakernel is made: ``load``), then as it was."""
    saved = {name: os.environ.get(name) for name in knobs}
    os.environ.update(knobs)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load() -> Config:
    """Read the knobs now (so tests and users can change the environment between compilations)."""
    return Config(
        num_workers=_env_int("JAX_MPK_NUM_WORKERS", min(4, os.cpu_count() or 1), 1),
        watchdog_seconds=_env(
            "JAX_MPK_WATCHDOG_S", 10.0, float, lambda v: math.isfinite(v) and v >= 0.001, "seconds >= 0.001"
        ),
        setup_timeout_seconds=_env(
            "JAX_MPK_SETUP_TIMEOUT_S", 300.0, float, lambda v: math.isfinite(v) and v >= 0.001, "seconds >= 0.001"
        ),
        max_tasks=_env_int("JAX_MPK_MAX_TASKS", 1 << 20, 1),
        min_task_work=_env_int("JAX_MPK_MIN_TASK_WORK", 1 << 14, 1),
        max_workspace_bytes=_env_int("JAX_MPK_MAX_WORKSPACE_BYTES", 8 << 30, 0),
        dump_dir=os.environ.get("JAX_MPK_DUMP_DIR", ""),
        validate=_env_flag("JAX_MPK_VALIDATE", True),
        profile=_env_flag("JAX_MPK_PROFILE", False),
        platform=_env("JAX_MPK_PLATFORM", "", str.lower, lambda v: v in ("cpu", "cuda"), "'cpu' or 'cuda'"),
        cache_dir=os.environ.get("JAX_MPK_CACHE_DIR")
        or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jax_mpk"),
        force_compile=_env_flag("JAX_MPK_FORCE_COMPILE", False),
        split_attention=_env_flag("JAX_MPK_SPLIT_ATTENTION", True),
        gpu_fusion=_env_flag("JAX_MPK_GPU_FUSION", False),
        stage_shared_rows=_env_flag("JAX_MPK_STAGE_SHARED_ROWS", False),
        stage_shared_pointwise=_env_flag("JAX_MPK_STAGE_SHARED_POINTWISE", True),
        schedule_seed=_env("JAX_MPK_SCHEDULE_SEED", None, int, expected="an integer"),
        task_fixed_cost=_env("JAX_MPK_TASK_FIXED_COST", 1.0, float, lambda v: 0 <= v < 1e6, "a number in [0, 1e6)"),
        comm_copies=_env_flag("JAX_MPK_COMM_COPIES", False),
        stream_evict_first=_env_flag("JAX_MPK_STREAM_EVICT_FIRST", True),
        warp_ring=_env_flag("JAX_MPK_WARP_RING", True),
        element_loads_first=_env_flag("JAX_MPK_ELEMENT_LOADS_FIRST", True),
        shared_code=_env_flag("JAX_MPK_SHARED_CODE", True),
        static_tiles=_env_flag("JAX_MPK_STATIC_TILES", True),
        staging_loads_first=_env_flag("JAX_MPK_STAGING_LOADS_FIRST", True),
        rows_loads_first=_env_flag("JAX_MPK_ROWS_LOADS_FIRST", True),
        vector_partials=_env_flag("JAX_MPK_VECTOR_PARTIALS", True),
        attention_warps=_env_flag("JAX_MPK_ATTENTION_WARPS", False),
        score_loads_first=_env_flag("JAX_MPK_SCORE_LOADS_FIRST", False),
    )
