"""The public entry points: :func:`megakernelize` and :func:`compile`."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import config as config_module
from . import plan_cache
from .capture import Captured, ShardMap, capture, find_shard_map
from .errors import DependencyTimeoutError, GraphTooLargeError, InvalidArgumentError, SignatureMismatchError
from .fusion import fuse
from .kernels import KernelGraph
from .layout import PROFILE_STAMPS, Platform, profile_sm_words
from .plan import plan_key, serialize
from .plan_cache import CallPlan
from .processes import check_platform, mesh_processes, share_comm_group, share_cuda_comm
from .target import Target
from .runtime import check_cuda_error, emit_call, extension, register_cuda_plan, register_plan
from .schedule import Schedule, fixed_task_cost, schedule, shuffled_schedule
from .tasks import TaskGraph, build_task_graph
from .validate import validate

log = logging.getLogger("jax_mpk")


@dataclass(frozen=True)
class _ArgSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    weak_type: bool
    # on a mesh with Explicit axes (jax.make_mesh's default), an argument's sharding over them is part of its
    # type: the function is traced with it, as jax.jit would (a shard_map checks its in_specs against it).
    # None when the type names no mesh axis (Auto axes, replicated values, one device)
    sharding: Any = None

    @staticmethod
    def of(x) -> _ArgSpec:
        aval = jax.typeof(x)
        sharding = getattr(aval, "sharding", None)
        if not any(getattr(sharding, "spec", ())):
            sharding = None
        return _ArgSpec(tuple(aval.shape), np.dtype(aval.dtype), bool(getattr(aval, "weak_type", False)), sharding)

    def aval(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype, weak_type=self.weak_type, sharding=self.sharding)

    def __str__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


@dataclass
class Stages:
    """The pipeline's stages for one traced function, each printable."""

    captured: Captured  # the op graph
    graph: KernelGraph  # kernels
    tasks: TaskGraph
    schedule: Schedule
    plan: CallPlan  # what a call needs


def plan_stages(jaxpr, shard_map: ShardMap | None, target: Target, cfg: config_module.Config) -> Stages:
    """Capture, fuse, tile, schedule, validate and serialize ``jaxpr`` (one device's body when ``shard_map`` is
    given) for ``target``, and generate the CUDA megakernel's source on a CUDA target (not compiled). Each
    stage logs its time (logger ``jax_mpk``, INFO)."""
    with _collector_paused():
        return _plan_stages(jaxpr, shard_map, target, cfg)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off: planning allocates millions of small objects that all live until
    it ends, and the collector would scan them (and all of jax's) hundreds of times (2 of 8 s for Qwen3-8B).
    What planning leaves for it is collected at its next run."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan_stages(jaxpr, shard_map: ShardMap | None, target: Target, cfg: config_module.Config) -> Stages:
    cuda = target.platform == "cuda"
    with _stage("capture"):
        if shard_map is not None:
            captured = capture(shard_map.body, shard_map.axis_sizes)
        else:
            captured = capture(jaxpr)
    with _stage("fusion"):
        graph = fuse(captured, target)
    num_buffers = len(graph.input_specs) + len(graph.output_specs) + 1  # the workspace is the last result
    if cuda and num_buffers > extension().max_cuda_buffers:
        raise GraphTooLargeError(
            f"the megakernel would take {num_buffers} buffers ({len(graph.input_specs)} operands, constants "
            f"included, {len(graph.output_specs)} results and the workspace); a CUDA megakernel takes at most "
            f"{extension().max_cuda_buffers}, whose addresses fill its 32 KB parameter block"
        )
    with _stage("tiling"):
        tasks = build_task_graph(graph, target.num_workers, cfg.min_task_work)
    if len(tasks.tasks) > cfg.max_tasks:
        raise GraphTooLargeError(
            f"the task graph has {len(tasks.tasks)} tasks, more than the {cfg.max_tasks} allowed (JAX_MPK_MAX_TASKS)"
        )
    with _stage("scheduling"):
        if cfg.schedule_seed is None:
            sched = schedule(tasks, target.num_workers, cfg.task_fixed_cost * fixed_task_cost(tasks))
        else:
            sched = shuffled_schedule(tasks, target.num_workers, cfg.schedule_seed)
    if cfg.validate:
        with _stage("validation"):
            validate(tasks, sched)
    with _stage("serialization"):
        words = serialize(tasks, sched, Platform.CUDA if cuda else Platform.CPU)
    workspace_bytes, profile_offset, source = graph.workspace_bytes, None, None
    if cuda and cfg.profile:
        profile_offset = -(-workspace_bytes // 256) * 256
        # every task's stamps, then every worker's SM (%smid: which physical SM ran it this call)
        workspace_bytes = profile_offset + 8 * (profile_sm_words(len(tasks.tasks)) + target.num_workers)
    if cuda:
        from .codegen import generate

        with _stage("code generation"):
            source = generate(tasks, sched, profile_offset)
    plan = CallPlan(
        key=plan_key(words, source.text if source else ""), words=words,
        consts=[np.asarray(c) for c in captured.consts],
        input_specs=list(graph.input_specs), output_specs=list(graph.output_specs), aliases=dict(graph.aliases),
        workspace_bytes=workspace_bytes, profile_offset=profile_offset, num_ranks=graph.num_ranks,
        comm_bytes=graph.comm_bytes, num_tasks=len(tasks.tasks), num_events=tasks.num_events,
        num_remote_events=tasks.num_remote_events, num_kernels=len(graph.kernels), source=source,
    )  # fmt: skip
    return Stages(captured, graph, tasks, sched, plan)


def trace_signature(fn: Callable, in_tree, specs: Sequence[_ArgSpec]) -> tuple[Any, Any]:
    """``fn`` traced for a signature: flat argument ``specs`` of the positional and keyword arguments whose
    structure is ``in_tree``. Returns the closed jaxpr (over the flat arguments) and the output shapes."""

    def flat_fn(*flat):
        args, kwargs = jax.tree_util.tree_unflatten(in_tree, flat)
        return fn(*args, **kwargs)

    with _stage("tracing"):
        return jax.make_jaxpr(flat_fn, return_shape=True)(*[s.aval() for s in specs])


def cached_plan(jaxpr, shard_map: ShardMap | None, signature: str, target: Target,
                cfg: config_module.Config) -> tuple[CallPlan, Stages | None]:  # fmt: skip
    """The plan of a traced function (``signature``: its arguments' specs) for ``target``: loaded from the disk
    cache, or planned and stored. Returns it with the stages that made it (None when loaded)."""
    with _stage("looking up the plan cache"):
        knobs = (cfg.min_task_work, cfg.max_tasks, cfg.max_workspace_bytes, cfg.validate, cfg.profile,
                 cfg.schedule_seed, cfg.task_fixed_cost)  # fmt: skip
        key = plan_cache.cache_key(jaxpr, signature, target, knobs)
        plan = None if cfg.force_compile else plan_cache.load(cfg.cache_dir, key)
    if plan is not None:
        log.info("jax_mpk: loaded plan %s from the cache (%s)", plan.key, key[:12])
        return plan, None
    stages = plan_stages(jaxpr, shard_map, target, cfg)
    plan_cache.store(cfg.cache_dir, key, stages.plan)
    return stages.plan, stages


class Megakernel:
    """A function lowered, for one input signature, to a scheduled task graph run by one custom call.

    Each pipeline stage's output is printable: ``jaxpr``, ``captured`` (the op graph), ``graph`` (kernels),
    ``tasks``, ``schedule``; ``dump(dir)`` writes them all. A plan loaded from the disk cache
    (``from_cache``) runs without them; they are computed again when first looked at.
    """

    def __init__(self, fn: Callable, in_tree, specs: tuple[_ArgSpec, ...], num_workers: int | None = None):
        cfg = self._cfg = config_module.load()
        self.fn, self.in_tree, self.specs = fn, in_tree, specs
        self.platform = _default_platform()
        # this process's first GPU: under jax.distributed, jax.devices()[0] may be another process's
        self.device = jax.local_devices(backend="gpu")[0] if self.platform == "cuda" else None
        # On the GPU a worker is an SM: exactly one CTA per SM, all co-resident.
        if self.device is not None:
            self.target = Target.cuda(self.device.core_count, str(self.device.compute_capability), cfg)
        else:
            self.target = Target("cpu", num_workers or cfg.num_workers, gpu_fusion=cfg.gpu_fusion,
                                 stage_shared_rows=cfg.stage_shared_rows, comm_copies=cfg.comm_copies,
                                 stage_shared_pointwise=cfg.stage_shared_pointwise)
        self.num_workers = self.target.num_workers
        self.watchdog_ms = max(1, round(cfg.watchdog_seconds * 1000))

        closed, out_shapes = trace_signature(fn, in_tree, specs)
        self.out_tree = jax.tree_util.tree_structure(out_shapes)
        self.out_shardings = [getattr(o, "sharding", None) for o in jax.tree_util.tree_leaves(out_shapes)]
        self.jaxpr = closed
        # a shard_map: the plan is one device's body, and every device of the mesh runs it on its shards
        self.shard_map: ShardMap | None = find_shard_map(closed)
        # the processes that run the plan's ranks: several under jax.distributed, each running its own devices
        self.processes = [jax.process_index()] if self.shard_map is None else mesh_processes(self.shard_map.mesh)
        local_devices = 1 if self.shard_map is None else sum(
            d.process_index == jax.process_index() for d in self.shard_map.mesh.devices.flat)  # fmt: skip
        check_platform(self.platform, self.processes, local_devices)
        plan, stages = cached_plan(closed, self.shard_map, repr(specs), self.target, cfg)
        self.from_cache = stages is None
        if stages is not None:
            self.__dict__["_stages"] = stages
        self.call_plan: CallPlan = plan
        self.key, self.words, self.consts, self.source = plan.key, plan.words, plan.consts, plan.source
        self.workspace_bytes, self.profile_offset = plan.workspace_bytes, plan.profile_offset
        self.profile_sms: np.ndarray | None = None  # the physical SM of each worker in the last profile() call
        self._check_workspace(cfg)
        # the shared memory of the ranks' buffers when they run in several processes
        self.comm_segment = ""
        if self.device is None:
            register_plan(self.key, self.words)
            if len(self.processes) > 1:
                self.comm_segment = share_comm_group(self.key, self.processes, cfg.setup_timeout_seconds)
        else:
            self._build_cuda()
            if len(self.processes) > 1:
                share_cuda_comm(self.key, self.processes, self._rank_devices(), cfg.setup_timeout_seconds)
        if cfg.dump_dir:
            self.dump(os.path.join(cfg.dump_dir, self.key))

    @functools.cached_property
    def _stages(self) -> Stages:
        return plan_stages(self.jaxpr, self.shard_map, self.target, self._cfg)

    @property
    def captured(self) -> Captured:
        return self._stages.captured

    @property
    def graph(self) -> KernelGraph:
        return self._stages.graph

    @property
    def tasks(self) -> TaskGraph:
        return self._stages.tasks

    @property
    def schedule(self) -> Schedule:
        return self._stages.schedule

    def _check_workspace(self, cfg) -> None:
        limit = cfg.max_workspace_bytes
        if self.device is not None:
            stats = self.device.memory_stats() or {}
            limit = min(limit, stats.get("bytes_limit", limit) - stats.get("bytes_in_use", 0))
        if self.call_plan.workspace_bytes > limit:
            raise GraphTooLargeError(
                f"the workspace for intermediates needs {self.call_plan.workspace_bytes} bytes, more than the "
                f"{limit} available (JAX_MPK_MAX_WORKSPACE_BYTES, device memory)"
            )

    def _build_cuda(self) -> None:
        from .toolchain import compile_cubin

        plan = self.call_plan
        with _stage("nvcc (or its cache)"):
            cubin = compile_cubin(self.source.text, self.device.compute_capability)
        arg_bytes = [_nbytes(shape, dtype) for shape, dtype in plan.input_specs]
        ret_bytes = [_nbytes(shape, dtype) for shape, dtype in plan.output_specs] + [max(self.workspace_bytes, 1)]
        register_cuda_plan(
            self.key, cubin, self.source.kernel_name, num_events=plan.num_events,
            threads=self.source.threads, smem_bytes=self.source.smem_bytes, arg_bytes=arg_bytes,
            ret_bytes=ret_bytes, aliases=plan.aliases, num_ctas=self.num_workers,
            rank_devices=self._rank_devices() if plan.num_ranks > 1 else (),
            comm_bytes=plan.comm_bytes, num_remote_events=plan.num_remote_events,
        )  # fmt: skip

    def _devices(self) -> list:
        """The devices that run the plan, in rank order."""
        if self.shard_map is None:
            return [self.device]
        return list(self.shard_map.mesh.devices.flat)

    def _rank_devices(self) -> list[int]:
        """The GPU ordinal of each rank in this process, -1 for another process's rank."""
        me = jax.process_index()
        return [d.local_hardware_id if d.process_index == me else -1 for d in self._devices()]

    # ----------------------------------------------------------------------------------------- calling
    def check_signature(self, args: tuple, kwargs: dict) -> list:
        """The flat arguments of a call's positional and keyword arguments, checked against the traced
        signature: SignatureMismatchError names the first argument that differs."""
        flat, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        if in_tree != self.in_tree:
            raise SignatureMismatchError(
                f"argument structure {in_tree} does not match the traced structure {self.in_tree}"
            )
        for (path, _), arg, spec in zip(jax.tree_util.tree_flatten_with_path((args, kwargs))[0], flat, self.specs):
            got = _ArgSpec.of(arg)
            if (got.shape, got.dtype) != (spec.shape, spec.dtype):
                raise SignatureMismatchError(f"argument {_argument_name(path)}: expected {spec}, got {got}")
        return flat

    def emit(self, flat_args: Sequence[Any], keep_workspace: bool = False) -> list:
        """The custom call on flat arguments (inside a trace); returns flat results. For a shard_map, the call
        runs inside the same shard_map: once per device, on its shards, with its rank as an extra operand."""
        if self.shard_map is None:
            results = self._emit_local(list(flat_args), keep_workspace)
            # Every device computes the whole function (XLA gathers sharded operands for a custom call); on an
            # Explicit mesh, the results are given the shardings jax.jit's would have, as their types say
            typed = [_resharded(r, s) for r, s in zip(results, self.out_shardings)]
            return typed + results[len(typed) :]
        sm = self.shard_map

        def per_device(*local):
            results = self._emit_local([*local, _device_rank(sm.axis_sizes)], keep_workspace)
            if keep_workspace:  # one row per device, in rank order
                results[-1] = results[-1][None]
            return tuple(results)

        out_specs = sm.out_specs
        if keep_workspace:
            out_specs = (*out_specs, jax.sharding.PartitionSpec(tuple(name for name, _ in sm.axis_sizes)))
        run = jax.shard_map(per_device, mesh=sm.mesh, in_specs=sm.in_specs, out_specs=out_specs, check_vma=False)
        return list(run(*flat_args))

    def _emit_local(self, flat_args: list, keep_workspace: bool) -> list:
        return emit_call(
            self.key,
            list(flat_args) + self.consts,
            self.call_plan.output_specs,
            self.call_plan.aliases,
            self.workspace_bytes,
            self.watchdog_ms,
            keep_workspace,
            several_devices=self.call_plan.num_ranks > 1,
            comm_segment=self.comm_segment,
        )

    def profile(self, *args, trace: str | None = None, phases: bool = False, **kwargs) -> np.ndarray:
        """Run once and return per-task [wait, start, end] times in microseconds from the first wait
        (a plan compiled with JAX_MPK_PROFILE=1 on a GPU). Rows follow ``self.tasks.tasks``; for a shard_map,
        one such array per device, stacked in rank order, from the first wait on any device (each device
        stamps its own global timer, and those disagree: each device's times are shifted onto device 0's timer
        by the waits of its tasks for the other's, :func:`jax_mpk.trace.clock_offsets`). With
        ``phases``, every stamp of ``layout.PROFILE_STAMPS`` instead (wait, start, staged, computed, body_end,
        signalled; NaN for a phase the task's body does not mark). With ``trace``, also write the call as a
        Chrome/Perfetto trace there: one track per SM (a process per device), a slice per task named by its
        kernel, the wait before it apart (:mod:`jax_mpk.trace`). Also sets ``profile_sms``: the physical SM
        (``%smid``) each worker ran on in this call, ``[devices, workers]``."""
        if self.profile_offset is None:
            raise ValueError("compile with JAX_MPK_PROFILE=1 on a GPU to profile")
        flat = self.check_signature(args, kwargs)
        workspace = np.asarray(jax.jit(lambda *f: self.emit(f, keep_workspace=True)[-1])(*flat))
        per_device = workspace.reshape(-1, workspace.shape[-1])
        stamps_end = self.profile_offset + 8 * profile_sm_words(len(self.tasks.tasks))
        raw = np.stack([w[self.profile_offset : stamps_end].view(np.uint64).reshape(-1, len(PROFILE_STAMPS))
                        for w in per_device])  # fmt: skip
        self.profile_sms = np.stack([w[stamps_end : stamps_end + 8 * self.num_workers].view(np.uint64).astype(np.int64)
                                     for w in per_device])  # fmt: skip
        from . import trace as trace_module

        all_times = (raw.astype(np.int64) - int(trace_module.task_times(raw)[..., 0].min())) / 1e3  # from the first wait
        all_times[raw == 0] = np.nan  # a phase the body does not mark
        if len(all_times) > 1:  # the devices' timers disagree: put them on device 0's by the remote waits
            offsets = trace_module.clock_offsets(all_times, [t.remote_deps for t in self.tasks.tasks])
            log.info("jax_mpk: profile: device timers minus device 0's, from the remote waits: %s us",
                     ", ".join(f"{o:.1f}" for o in offsets[1:]))
            all_times -= offsets[:, None, None]
            all_times -= np.nanmin(trace_module.task_times(all_times)[..., 0])
        times = trace_module.task_times(all_times)
        if trace is not None:
            kernels = [t.kernel for t in self.tasks.tasks]
            names = [k.name for k in self.graph.kernels]
            title = repr(self) if len(times) == 1 else [f"device {rank}: {self!r}" for rank in range(len(times))]
            trace_module.save(trace_module.chrome_trace(all_times, self.schedule.workers, kernels, names, title,
                                                        self.profile_sms), trace)  # fmt: skip
        result = all_times if phases else times
        return result if self.shard_map is not None else result[0]

    def __call__(self, *args, **kwargs):
        """Dispatch asynchronously (like any jitted function); see :meth:`check_errors`. The arguments go to
        ``jax.jit`` as they are: its C++ dispatch flattens and checks them, and the signature check (in the
        trace) runs only for a signature it has not seen."""
        self._last = _reporting_timeouts(functools.partial(self._jitted, **kwargs), *args)
        return self._last

    def check_errors(self) -> None:
        """Wait for the last call and raise :class:`DependencyTimeoutError` if any call of this plan hit the
        watchdog. (A failed call is also reported by the next call; waiting here reports it now.)"""
        _reporting_timeouts(jax.block_until_ready, getattr(self, "_last", None))
        self.raise_device_error()

    def raise_device_error(self) -> None:
        """Raise the watchdog failure a finished CUDA call left behind, if any."""
        if self.device is not None:
            # this process's ranks only: another process's GPU is not this process's to check
            messages = [check_cuda_error(self.key, d.local_hardware_id) for d in self._devices()
                        if d.process_index == jax.process_index()]  # fmt: skip
            if any(messages):
                raise DependencyTimeoutError("; ".join(m for m in messages if m))

    @functools.cached_property
    def _jitted(self):
        def call(*args, **kwargs):
            return jax.tree_util.tree_unflatten(self.out_tree, self.emit(self.check_signature(args, kwargs)))

        return jax.jit(call)

    # ----------------------------------------------------------------------------------------- looking
    def __repr__(self) -> str:
        plan = self.call_plan
        return (
            f"Megakernel({getattr(self.fn, '__name__', 'fn')}: {plan.num_kernels} kernels, {plan.num_tasks} "
            f"tasks, {plan.num_events} events, {self.num_workers} workers, workspace {plan.workspace_bytes} B, "
            f"plan {self.key}{', from the cache' if self.from_cache else ''})"
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


@contextlib.contextmanager
def _stage(name: str):
    """Logs how long the stage took (INFO on logger ``jax_mpk``: a first call that takes long says where)."""
    start = time.perf_counter()
    yield
    log.info("jax_mpk: %s took %.2f s", name, time.perf_counter() - start)


def _reporting_timeouts(fn, *args):
    """``fn(*args)``, turning the runtime's watchdog failure (raised by XLA) into DependencyTimeoutError."""
    try:
        return fn(*args)
    except Exception as exc:  # XLA wraps handler errors in its own runtime error type
        if "jax_mpk watchdog" in str(exc):
            raise DependencyTimeoutError(str(exc)) from exc
        raise


def _resharded(value, sharding):
    if sharding is None or jax.typeof(value).sharding == sharding:
        return value
    return jax.sharding.reshard(value, sharding)


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
        last_result[0] = _reporting_timeouts(functools.partial(jitted, **kwargs), *args)
        return last_result[0]

    def check_errors() -> None:
        """Wait for the last call; raise DependencyTimeoutError if a call hit the watchdog."""
        _reporting_timeouts(jax.block_until_ready, last_result[0])
        for plan in plans.values():
            plan.raise_device_error()

    wrapper.plans = plans  # signature -> Megakernel, for inspection
    wrapper.check_errors = check_errors
    return wrapper
