"""The public entry points: :func:`megakernelize` and :func:`compile`."""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import config as config_module
from .capture import Captured, ShardMap, capture, find_shard_map
from .errors import DependencyTimeoutError, GraphTooLargeError, InvalidArgumentError, SignatureMismatchError
from .fusion import KernelGraph, fuse
from .layout import Platform
from .plan import plan_key, serialize
from .runtime import check_cuda_error, emit_call, register_cuda_plan, register_plan
from .schedule import Schedule, schedule, shuffled_schedule
from .tasks import TaskGraph, build_task_graph
from .validate import validate


@dataclass(frozen=True)
class _ArgSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    weak_type: bool

    @staticmethod
    def of(x) -> _ArgSpec:
        aval = jax.typeof(x)
        return _ArgSpec(tuple(aval.shape), np.dtype(aval.dtype), bool(getattr(aval, "weak_type", False)))

    def __str__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


class Megakernel:
    """A function lowered, for one input signature, to a scheduled task graph run by one custom call.

    Each pipeline stage's output is kept and printable: ``jaxpr``, ``graph`` (kernels), ``tasks``,
    ``schedule``; ``dump(dir)`` writes them all.
    """

    def __init__(self, fn: Callable, in_tree, specs: tuple[_ArgSpec, ...], num_workers: int | None = None):
        cfg = config_module.load()
        self.fn, self.in_tree, self.specs = fn, in_tree, specs
        self.platform = _default_platform()
        self.device = jax.devices("gpu")[0] if self.platform == "cuda" else None
        # On the GPU a worker is an SM: exactly one CTA per SM, all co-resident.
        self.num_workers = self.device.core_count if self.device is not None else (num_workers or cfg.num_workers)
        self.watchdog_ms = max(1, round(cfg.watchdog_seconds * 1000))

        def flat_fn(*flat):
            args, kwargs = jax.tree_util.tree_unflatten(in_tree, flat)
            return fn(*args, **kwargs)

        avals = [jax.ShapeDtypeStruct(s.shape, s.dtype, weak_type=s.weak_type) for s in specs]
        closed, out_shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        self.out_tree = jax.tree_util.tree_structure(out_shapes)
        self.jaxpr = closed
        # a shard_map: the plan is one device's body, and every device of the mesh runs it on its shards
        self.shard_map: ShardMap | None = find_shard_map(closed)
        if self.shard_map is not None:
            self.captured: Captured = capture(self.shard_map.body, self.shard_map.axis_sizes)
        else:
            self.captured = capture(closed)
        self.graph: KernelGraph = fuse(self.captured, self.num_workers if self.device is not None else None)
        self._check_workspace(cfg)
        self.tasks: TaskGraph = build_task_graph(self.graph, self.num_workers, cfg.min_task_work)
        if len(self.tasks.tasks) > cfg.max_tasks:
            raise GraphTooLargeError(
                f"the task graph has {len(self.tasks.tasks)} tasks, more than the {cfg.max_tasks} allowed "
                "(JAX_MPK_MAX_TASKS)"
            )
        if cfg.schedule_seed is None:
            self.schedule: Schedule = schedule(self.tasks, self.num_workers)
        else:
            self.schedule = shuffled_schedule(self.tasks, self.num_workers, cfg.schedule_seed)
        if cfg.validate:
            validate(self.tasks, self.schedule)
        target = Platform.CUDA if self.device is not None else Platform.CPU
        self.words = serialize(self.tasks, self.schedule, target)
        self.key = plan_key(self.words)
        self.source = None
        self.workspace_bytes = self.graph.workspace_bytes
        self.profile_offset = None
        if self.device is not None and cfg.profile:
            self.profile_offset = -(-self.workspace_bytes // 256) * 256
            self.workspace_bytes = self.profile_offset + 24 * len(self.tasks.tasks)
        if self.device is None:
            register_plan(self.key, self.words)
        else:
            self._build_cuda()
        self.consts = [np.asarray(c) for c in self.captured.consts]
        if cfg.dump_dir:
            self.dump(os.path.join(cfg.dump_dir, self.key))

    def _check_workspace(self, cfg) -> None:
        limit = cfg.max_workspace_bytes
        if self.device is not None:
            stats = self.device.memory_stats() or {}
            limit = min(limit, stats.get("bytes_limit", limit) - stats.get("bytes_in_use", 0))
        if self.graph.workspace_bytes > limit:
            raise GraphTooLargeError(
                f"the workspace for intermediates needs {self.graph.workspace_bytes} bytes, more than the "
                f"{limit} available (JAX_MPK_MAX_WORKSPACE_BYTES, device memory)"
            )

    def _build_cuda(self) -> None:
        from .codegen import generate
        from .toolchain import compile_cubin

        self.source = generate(self.tasks, self.schedule, self.profile_offset)
        cubin = compile_cubin(self.source.text, self.device.compute_capability)
        kg = self.graph
        arg_bytes = [_nbytes(shape, dtype) for shape, dtype in kg.input_specs]
        ret_bytes = [_nbytes(shape, dtype) for shape, dtype in kg.output_specs] + [max(self.workspace_bytes, 1)]
        register_cuda_plan(
            self.key, cubin, self.source.kernel_name, num_events=self.tasks.num_events,
            threads=self.source.threads, smem_bytes=self.source.smem_bytes, arg_bytes=arg_bytes,
            ret_bytes=ret_bytes, aliases=kg.aliases, num_ctas=self.num_workers,
            rank_devices=[d.local_hardware_id for d in self._devices()] if kg.num_ranks > 1 else (),
            comm_bytes=kg.comm_bytes, num_remote_events=self.tasks.num_remote_events,
        )  # fmt: skip

    def _devices(self) -> list:
        """The devices that run the plan, in rank order."""
        if self.shard_map is None:
            return [self.device]
        return list(self.shard_map.mesh.devices.flat)

    # ----------------------------------------------------------------------------------------- calling
    def check_signature(self, flat_args: Sequence[Any], in_tree) -> None:
        if in_tree != self.in_tree:
            raise SignatureMismatchError(
                f"argument structure {in_tree} does not match the traced structure {self.in_tree}"
            )
        paths = [_argument_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree_util.tree_unflatten(in_tree, list(flat_args)))[0]]
        for path, arg, spec in zip(paths, flat_args, self.specs):
            got = _ArgSpec.of(arg)
            if (got.shape, got.dtype) != (spec.shape, spec.dtype):
                raise SignatureMismatchError(f"argument {path}: expected {spec}, got {got}")

    def emit(self, flat_args: Sequence[Any], keep_workspace: bool = False) -> list:
        """The custom call on flat arguments (inside a trace); returns flat results. For a shard_map, the call
        runs inside the same shard_map: once per device, on its shards, with its rank as an extra operand."""
        if self.shard_map is None:
            return self._emit_local(list(flat_args), keep_workspace)
        if keep_workspace:
            raise ValueError("profiling a shard_map function is not supported")
        sm = self.shard_map

        def per_device(*local):
            return tuple(self._emit_local([*local, _device_rank(sm.axis_sizes)], False))

        run = jax.shard_map(per_device, mesh=sm.mesh, in_specs=sm.in_specs, out_specs=sm.out_specs, check_vma=False)
        return list(run(*flat_args))

    def _emit_local(self, flat_args: list, keep_workspace: bool) -> list:
        return emit_call(
            self.key,
            list(flat_args) + self.consts,
            self.graph.output_specs,
            self.graph.aliases,
            self.workspace_bytes,
            self.watchdog_ms,
            keep_workspace,
            several_devices=self.graph.num_ranks > 1,
        )

    def profile(self, *args, **kwargs) -> np.ndarray:
        """Run once and return per-task [wait, start, end] times in microseconds from the first wait
        (a plan compiled with JAX_MPK_PROFILE=1 on a GPU). Rows follow ``self.tasks.tasks``."""
        if self.profile_offset is None:
            raise ValueError("compile with JAX_MPK_PROFILE=1 on a GPU to profile")
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        self.check_signature(flat, in_tree)
        workspace = jax.jit(lambda *f: self.emit(f, keep_workspace=True)[-1])(*flat)
        raw = np.asarray(workspace)[self.profile_offset :].view(np.uint64).reshape(-1, 3)
        return (raw.astype(np.int64) - int(raw[:, 0].min())) / 1e3

    def __call__(self, *args, **kwargs):
        """Dispatch asynchronously (like any jitted function); see :meth:`check_errors`."""
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        self.check_signature(flat, in_tree)
        self._last = _reporting_timeouts(lambda: jax.tree_util.tree_unflatten(self.out_tree, self._jitted(*flat)))
        return self._last

    def check_errors(self) -> None:
        """Wait for the last call and raise :class:`DependencyTimeoutError` if any call of this plan hit the
        watchdog. (A failed call is also reported by the next call; waiting here reports it now.)"""
        _reporting_timeouts(lambda: jax.block_until_ready(getattr(self, "_last", None)))
        self.raise_device_error()

    def raise_device_error(self) -> None:
        """Raise the watchdog failure a finished CUDA call left behind, if any."""
        if self.device is not None:
            messages = [check_cuda_error(self.key, d.local_hardware_id) for d in self._devices()]
            if any(messages):
                raise DependencyTimeoutError("; ".join(m for m in messages if m))

    @functools.cached_property
    def _jitted(self):
        return jax.jit(lambda *flat: self.emit(flat))

    # ----------------------------------------------------------------------------------------- looking
    def __repr__(self) -> str:
        return (
            f"Megakernel({getattr(self.fn, '__name__', 'fn')}: {len(self.graph.kernels)} kernels, "
            f"{len(self.tasks.tasks)} tasks, {self.tasks.num_events} events, {self.num_workers} workers, "
            f"workspace {self.graph.workspace_bytes} B, plan {self.key})"
        )

    def dump(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        stages = {
            "0_jaxpr.txt": str(self.jaxpr),
            "1_kernels.txt": repr(self.graph),
            "2_tasks.txt": repr(self.tasks),
            "3_schedule.txt": repr(self.schedule),
        }
        for name, text in stages.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text + "\n")
        np.save(os.path.join(directory, "4_plan.npy"), self.words)


def _reporting_timeouts(thunk):
    """Run, turning the runtime's watchdog failure (raised by XLA) into DependencyTimeoutError."""
    try:
        return thunk()
    except Exception as exc:  # XLA wraps handler errors in its own runtime error type
        if "jax_mpk watchdog" in str(exc):
            raise DependencyTimeoutError(str(exc)) from exc
        raise


def _device_rank(axis_sizes) -> jax.Array:
    """This device's row-major position in the mesh (inside shard_map)."""
    rank = np.int32(0)
    for name, size in axis_sizes:
        rank = rank * np.int32(size) + jax.lax.axis_index(name).astype(np.int32)
    return rank


def _argument_name(path) -> str:
    """The argument a flattened leaf came from, as the call wrote it: ``args[1]['w']``, ``kwargs['cache']``."""
    where, rest = path[0].idx, jax.tree_util.keystr(tuple(path[1:]))
    return f"args{rest}" if where == 0 else f"kwargs{rest}"


def _default_platform() -> str:
    chosen = config_module.load().platform
    if chosen:
        return chosen
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def compile(fn: Callable, *example_args, num_workers: int | None = None, **example_kwargs) -> Megakernel:  # noqa: A001
    """Lower ``fn`` for the signature of ``example_args`` and ``example_kwargs`` (arrays or
    ``jax.ShapeDtypeStruct``) on the default backend: the CPU executor, or one CUDA megakernel on a GPU (whose SM
    count sets the worker count)."""
    _check_num_workers(num_workers)
    flat, in_tree = jax.tree_util.tree_flatten((example_args, example_kwargs))
    return Megakernel(fn, in_tree, tuple(_ArgSpec.of(x) for x in flat), num_workers)


def _check_num_workers(num_workers) -> None:
    if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool)
                                    or num_workers < 1):  # fmt: skip
        raise InvalidArgumentError(f"num_workers={num_workers!r} is not valid: expected an integer >= 1")


def _donated_positions(fn: Callable, donate_argnums) -> tuple[int, ...]:
    """``donate_argnums`` checked as jax.jit checks it: integers, within ``fn``'s positional parameters
    (negative ones count from the end) when its signature says how many there are."""
    positions = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in positions):
        raise InvalidArgumentError(f"donate_argnums={donate_argnums!r} is not valid: expected integers")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or a callable without a signature: checked at call time
        return positions
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return positions
    count = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    for d in positions:
        if not -count <= d < count:
            raise InvalidArgumentError(
                f"donate_argnums={donate_argnums!r}, but {getattr(fn, '__name__', 'fn')} accepts only {count} "
                "positional arguments"
            )
    return tuple(d % count for d in positions)


def megakernelize(
    fn: Callable, *, donate_argnums: int | Sequence[int] = (), num_workers: int | None = None
) -> Callable:
    """Run ``fn`` as one persistent megakernel: one custom call in place of the whole function.

    The result traces ``fn`` once per input signature (pytree structure, shapes, dtypes), caches the
    compiled plan (``.plans``: signature -> :class:`Megakernel`), and can be called directly or inside
    ``jax.jit``. Calls dispatch asynchronously; ``.check_errors()`` waits for the last one and raises
    :class:`DependencyTimeoutError` if a call hit the watchdog. Arguments listed in ``donate_argnums`` are
    donated (use it for a KV cache updated in place: with donation, no copy is made); they are checked as
    jax.jit checks them. Keyword arguments are traced like positional ones (as jax.jit does: arrays or pytrees,
    never donated). ``num_workers`` sets the CPU executor's threads; on a GPU every SM is a worker.
    """
    _check_num_workers(num_workers)
    donated = _donated_positions(fn, donate_argnums)
    plans: dict[tuple, Megakernel] = {}

    def lookup(flat, in_tree) -> Megakernel:
        key = (in_tree, tuple(_ArgSpec.of(x) for x in flat))
        if key not in plans:
            plans[key] = Megakernel(fn, in_tree, key[1], num_workers)
        return plans[key]

    def traced(*args, **kwargs):
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        megakernel = lookup(flat, in_tree)
        return jax.tree_util.tree_unflatten(megakernel.out_tree, megakernel.emit(flat))

    jitted = jax.jit(traced, donate_argnums=donated)

    last_result: list = [None]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outside = [d for d in donated if not -len(args) <= d < len(args)]
        if outside:
            raise InvalidArgumentError(
                f"donate_argnums={donate_argnums!r}, but the call passes only {len(args)} positional arguments"
            )
        last_result[0] = _reporting_timeouts(lambda: jitted(*args, **kwargs))
        return last_result[0]

    def check_errors() -> None:
        """Wait for the last call; raise DependencyTimeoutError if a call hit the watchdog."""
        _reporting_timeouts(lambda: jax.block_until_ready(last_result[0]))
        for plan in plans.values():
            plan.raise_device_error()

    wrapper.plans = plans  # signature -> Megakernel, for inspection
    wrapper.check_errors = check_errors
    return wrapper
