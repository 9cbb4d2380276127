"""The task graph: validator, worker-count independence, shuffled schedules, watchdog, layout header."""

from __future__ import annotations

import copy
import pathlib
import random
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, random_array
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens

import jax_mpk
from jax_mpk import layout
from jax_mpk.plan import plan_key, serialize
from jax_mpk.runtime import emit_call, register_plan
from jax_mpk.schedule import FIXED_COST_WEIGHT_BYTES, Schedule, fixed_task_cost, schedule, shuffled_schedule
from jax_mpk.validate import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _decode_case(seed=0):
    cfg = TinyConfig(qk_norm=True, batch=2)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    cache = init_cache(cfg, jax.random.PRNGKey(seed + 1))
    args = (params, random_tokens(cfg, seed), jnp.int32(5), *cache)
    return make_decode_step(cfg), args


def _run_plan(megakernel, words, *args, watchdog_ms=None):
    """Run ``megakernel``'s function with another plan (same kernels, other tasks or schedule)."""
    key = plan_key(words)
    register_plan(key, words)
    flat = jax.tree_util.tree_leaves(args)
    run = jax.jit(
        lambda *flat: emit_call(
            key, list(flat) + megakernel.consts, megakernel.graph.output_specs, megakernel.graph.aliases,
            megakernel.graph.workspace_bytes, watchdog_ms or megakernel.watchdog_ms,
        )
    )
    return jax.tree_util.tree_unflatten(megakernel.out_tree, jax.block_until_ready(run(*flat)))


def test_stages_are_printable():
    step, args = _decode_case()
    mk = jax_mpk.compile(step, *args, num_workers=3)
    assert "kernel0" in repr(mk.graph) and "task0" in repr(mk.tasks) and "worker2" in repr(mk.schedule)
    assert "kernels" in repr(mk)
    # fusion keeps the step to a few dozen kernels per layer, not one per jaxpr equation
    assert len(mk.graph.kernels) < len(mk.jaxpr.jaxpr.eqns) / 4


@pytest.mark.parametrize("num_workers", [1, 2, 8])
def test_results_do_not_depend_on_worker_count(num_workers):
    step, args = _decode_case(seed=3)
    expected = jax.jit(step)(*args)
    mk = jax_mpk.compile(step, *args, num_workers=num_workers)
    assert len(mk.schedule.workers) == num_workers
    assert_trees_close(mk(*args), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_topological_schedules_give_identical_results(seed):
    step, args = _decode_case(seed=7)
    mk = jax_mpk.compile(step, *args, num_workers=4)
    baseline = mk(*args)
    sched = shuffled_schedule(mk.tasks, 4, seed)
    validate(mk.tasks, sched)
    shuffled = _run_plan(mk, serialize(mk.tasks, sched), *args)
    for a, b in zip(jax.tree_util.tree_leaves(shuffled), jax.tree_util.tree_leaves(baseline)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_validator_rejects_a_removed_dependency():
    step, args = _decode_case()
    mk = jax_mpk.compile(step, *args, num_workers=2)
    broken = copy.deepcopy(mk.tasks)
    victim = next(t for t in broken.tasks if t.wait_event >= 0)
    victim.wait_event, victim.wait_count = -1, 0
    with pytest.raises(jax_mpk.InvalidTaskGraphError, match="without waiting|before task"):
        validate(broken, mk.schedule)


def test_validator_rejects_a_read_of_workspace_no_earlier_task_wrote():
    """The class of the GPU fusion bug that dropped the base of an in-place update chain: the update kernel
    wrote part of the buffer, a later kernel read all of it, the rest was whatever the previous call left.
    Emulated by taking the base's writes away: every dependency still holds, only coverage is missing."""

    def f(x, update):
        base = jnp.floor(jnp.cumsum(x * x))
        return jnp.isfinite(jax.lax.dynamic_update_slice(base, update, (20,)))

    mk = jax_mpk.compile(f, jnp.ones(32, jnp.float16), jnp.ones(12, jnp.float16), num_workers=2)
    validate(mk.tasks, mk.schedule)  # the real plan: the base covers what the update does not
    broken = copy.deepcopy(mk.tasks)
    (chain,) = [k for k in broken.kernels.kernels if k.name.startswith("update_slice")]
    chain_buffer = broken.kernels.buffers.index(chain.outputs[0].tensor.buffer)
    base_kernel = next(k.index for k in broken.kernels.kernels if "floor" in k.name)
    broken.accesses = [a for a in broken.accesses
                       if not (a.kernel == base_kernel and a.is_write and a.buffer_id == chain_buffer)]  # fmt: skip
    with pytest.raises(jax_mpk.InvalidTaskGraphError, match="no task of an earlier kernel"):
        validate(broken, mk.schedule)


def test_read_coverage_takes_the_union_of_several_kernels_writes():
    from jax_mpk.tasks import Accesses
    from jax_mpk.validate import _check_reads_are_written, _Stacked

    def stacked(*accesses):  # (task, rect)
        rank = len(accesses[0][1])
        tasks = np.array([t for t, _ in accesses], np.int64)
        lo = np.array([[lo for lo, _ in r] for _, r in accesses], np.int64).reshape(len(accesses), rank)
        hi = np.array([[hi for _, hi in r] for _, r in accesses], np.int64).reshape(len(accesses), rank)
        return _Stacked([Accesses(0, 0, False, tasks, lo, hi)], rank)

    kernel_of = np.array([0, 1, 2, 2, 3, 5, 0, 0, 0, 3])  # task -> kernel
    reads = stacked((9, ((0, 10), (0, 4))))
    halves = stacked((1, ((0, 6), (0, 4))), (2, ((6, 10), (0, 4))), (5, ((0, 10), (0, 4))))  # task 5: a later kernel
    pairs = np.array([0, 0, 0]), np.array([0, 1, 2])
    _check_reads_are_written(reads, halves, *pairs, kernel_of, "t")
    with pytest.raises(jax_mpk.InvalidTaskGraphError, match=r"reads t\[\(0, 10\), \(0, 4\)\]"):
        _check_reads_are_written(reads, halves, np.array([0, 0]), np.array([0, 2]), kernel_of, "t")
    _check_reads_are_written(stacked((4, ())), stacked((1, ())), np.array([0]), np.array([0]), kernel_of, "scalar")


def test_validator_rejects_a_deadlocking_schedule():
    step, args = _decode_case()
    mk = jax_mpk.compile(step, *args, num_workers=2)
    reversed_lists = Schedule([list(reversed(w)) for w in mk.schedule.workers])
    with pytest.raises(jax_mpk.InvalidTaskGraphError, match="deadlock"):
        validate(mk.tasks, reversed_lists)


def test_watchdog_turns_a_dependency_that_never_completes_into_an_error():
    step, args = _decode_case()
    mk = jax_mpk.compile(step, *args, num_workers=2)
    broken = copy.deepcopy(mk.tasks)
    victim = next(t for t in broken.tasks if t.wait_event >= 0)
    victim.wait_count += 1  # one more signal than will ever come
    start = time.monotonic()
    with pytest.raises(Exception, match="jax_mpk watchdog") as info:
        _run_plan(mk, serialize(broken, mk.schedule), *args, watchdog_ms=300)
    assert time.monotonic() - start < 30
    # The first watchdog to fire names the victim, or (on a loaded machine, where another worker may start
    # waiting first) a task that waits on it, directly or not.
    blocked = {victim.index}
    for task in broken.tasks:  # created in a topological order
        if blocked.intersection(task.deps):
            blocked.add(task.index)
    named = re.search(r"task (\d+)", str(info.value))
    assert named and int(named.group(1)) in blocked, (str(info.value), victim.index)


def test_watchdog_error_type_from_a_direct_call(monkeypatch):
    monkeypatch.setenv("JAX_MPK_WATCHDOG_S", "0.3")
    step, args = _decode_case()
    mk = jax_mpk.compile(step, *args, num_workers=2)
    broken = copy.deepcopy(mk.tasks)
    next(t for t in broken.tasks if t.wait_event >= 0).wait_count += 1
    mk.words = serialize(broken, mk.schedule)
    mk.key = plan_key(mk.words)
    register_plan(mk.key, mk.words)
    with pytest.raises(jax_mpk.DependencyTimeoutError, match="waited more than"):
        mk(*args)
        mk.check_errors()


@pytest.mark.parametrize("path", sorted(layout.GENERATED), ids=lambda p: p.name)
def test_generated_headers_are_up_to_date(path):
    assert path.read_text() == layout.GENERATED[path](), "run: python -m jax_mpk.layout"


def test_moving_length_one_dims_after_a_reshape_stays_one_reshape():
    """Attention's output for one query, stored [b, g, r, t, d] (t == 1) and read as [b, t, hidden]: the read
    is a reshape to [b, t, g, r, d], then a transpose moving only t. That is one reshape (the same row-major
    order), which loads absorb by viewing the tensor, so the O projection takes the 16-byte path."""
    from jax_mpk.indexmap import IndexMap, Reshape

    hidden_to_heads = IndexMap.reshape((1, 1, 2048), (1, 1, 8, 4, 64))
    to_stored = IndexMap.affine((1, 1, 8, 4, 64), (1, 8, 4, 1, 64), [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0],
                                [0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1]])  # fmt: skip
    composed = hidden_to_heads.then(to_stored)
    assert [type(s) for s in composed.stages] == [Reshape]
    for index in [(0, 0, 0), (0, 0, 17), (0, 0, 1000), (0, 0, 2047)]:
        assert composed.apply(index) == to_stored.apply(hidden_to_heads.apply(index))


def test_rect_images_bound_every_image_and_match_one_rect_at_a_time(rng):
    """The planner maps all tiles of a kernel at once (IndexMap.rect_images). Through random views (a slice at
    an offset, a permutation, a broadcast, a reshape that splits or merges dims): every index of each rect maps
    inside that rect's image (checked with IndexMap.apply, which does not use rect math), which stays within
    the output shape, permutations and
    slices give exactly the bounding box, rects do not affect each other, and an empty rect maps to an empty one."""
    from jax_mpk.indexmap import IndexMap

    for _ in range(20):
        shape = tuple(int(d) for d in rng.integers(1, 6, size=3))
        big = tuple(d + int(o) for d, o in zip(shape, rng.integers(0, 3, size=3)))
        offset = [int(rng.integers(0, b - d + 1)) for b, d in zip(big, shape)]
        perm = rng.permutation(3)
        sliced = IndexMap.affine(shape, big, np.eye(3, dtype=int), offset)
        permuted = IndexMap.affine(big, tuple(big[p] for p in perm), np.eye(3, dtype=int)[perm])
        out = tuple(big[p] for p in perm)
        flat = IndexMap.reshape(out, (int(np.prod(out)),))
        split = IndexMap.reshape((int(np.prod(out)),), (out[0] * out[1], out[2]))
        maps = [(sliced, True), (sliced.then(permuted), True), (sliced.then(permuted).then(flat), False),
                (sliced.then(permuted).then(flat).then(split), False),
                (IndexMap.affine((shape[0], shape[1]), shape, [[1, 0], [0, 1], [0, 0]]), True)]  # fmt: skip
        for index_map, exact in maps:
            in_shape = index_map.in_shape
            lo = np.array([[int(rng.integers(0, d)) for d in in_shape] for _ in range(6)], np.int64)
            hi = np.array([[int(rng.integers(a + 1, d + 1)) for a, d in zip(row, in_shape)] for row in lo], np.int64)
            hi[-1, 0] = lo[-1, 0]  # the last rect is empty
            got_lo, got_hi = index_map.rect_images(lo, hi)
            for r in range(len(lo)):
                single = index_map.rect_image(tuple(zip(lo[r].tolist(), hi[r].tolist())))
                assert single == tuple(zip(got_lo[r].tolist(), got_hi[r].tolist()))
                if r == len(lo) - 1:
                    assert (got_hi[r] <= got_lo[r]).any()  # empty (all zeros through a map with stages)
                    continue
                images = np.array([index_map.apply(i) for i in np.ndindex(*(hi[r] - lo[r]))
                                   for i in [tuple(np.array(i) + lo[r])]])  # fmt: skip
                assert (images >= got_lo[r]).all() and (images < got_hi[r]).all(), (index_map, lo[r], hi[r])
                assert (got_lo[r] >= 0).all() and (got_hi[r] <= np.array(index_map.out_shape)).all()  # in bounds
                if exact:
                    np.testing.assert_array_equal(images.min(axis=0), got_lo[r])
                    np.testing.assert_array_equal(images.max(axis=0) + 1, got_hi[r])


def test_reader_refuses_a_scalar_op_on_operands_its_table_entry_does_not_accept(rng):
    """The plan reader's dtype check comes from jax_mpk/scalar_ops.py: ADD patched into SHIFT_LEFT (32-bit
    integers only) on float32 operands is refused with the op and the dtype named."""
    x = random_array(rng, (3, 5), "float32")
    words = np.array(jax_mpk.compile(lambda a, b: a + b, x, x).words)
    node = [int(layout.NodeOp.ADD), int(layout.DType.F32), 2, 3, 5]
    at = [i for i in range(len(words) - 4) if list(words[i : i + 5]) == node]
    assert len(at) == 1
    words[at[0]] = int(layout.NodeOp.SHIFT_LEFT)
    with pytest.raises(ValueError, match=f"op {int(layout.NodeOp.SHIFT_LEFT)} is not defined on f32 operands"):
        register_plan("refused-scalar-op", words)


def test_equal_kernels_of_a_level_get_equal_tilings():
    """Qwen3-8B's Q, K and V products at batch 8 share a dependency level and 132 workers; K and V are the same
    product (split along K in 8 slices, tiled in steps of 8 tasks). Their tilings are equal, and the level's
    largest task no larger than Q's: V was left at 16 tasks of 4.2 M work next to K's 24 and Q's 92 of 3.2 M."""
    from jax_mpk.capture import capture
    from jax_mpk.fusion import fuse
    from jax_mpk.target import Target
    from jax_mpk.tasks import build_task_graph

    def qkv(x, g, wq, wk, wv):
        h = (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g).astype(jnp.bfloat16)
        return h @ wq, h @ wk, h @ wv

    shapes = [(8, 4096), (4096,), (4096, 4096), (4096, 1024), (4096, 1024)]
    avals = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    graph = fuse(capture(jax.make_jaxpr(qkv)(*avals)), Target("cuda", 132, "9.0"))
    tasks = build_task_graph(graph, 132)
    products = [(k, kt) for k, kt in zip(tasks.kernels.kernels, tasks.tasks_by_kernel()) if k.dot is not None]
    assert len(products) == 3 and len({k.level for k, _ in products}) == 1
    (_, q_tasks), (_, k_tasks), (_, v_tasks) = sorted(products, key=lambda p: -p[0].domain[-1])  # Q: 4096 columns
    assert len(k_tasks) == len(v_tasks) and len(q_tasks) + len(k_tasks) + len(v_tasks) <= 132
    largest = lambda kernel_tasks: max(t.cost for t in kernel_tasks)  # noqa: E731
    assert max(largest(k_tasks), largest(v_tasks)) <= largest(q_tasks)


def test_fixed_task_cost_keeps_a_levels_small_tasks_apart():
    """Qwen3-8B's decode step at batch 8 (1 layer, planned for 132 SMs on the CPU): list-scheduled on estimates
    without a fixed cost, V-append tasks queue behind K-append tasks of the same level on the same SMs (their
    estimated costs are ~1/60 of a product tile's, so such an SM looks idle; on the H200 the V append ran after
    the K append, ~7 us a layer); with schedule.fixed_task_cost (JAX_MPK_TASK_FIXED_COST) none do."""
    import dataclasses
    import sys

    sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
    import models
    import planning

    cfg = dataclasses.replace(models.PRESETS["qwen3-8b"], layers=1)
    graph = planning.plan_for_gpu(planning.trace_decode_step(cfg, 8, 1024), 132, "9.0").tasks
    appends = {k.index for k in graph.kernels.kernels if k.name.startswith("update_slice")}

    def appends_back_to_back(sched: Schedule) -> int:
        kernels = [[graph.tasks[t].kernel for t in tasks] for tasks in sched.workers]
        return sum(a != b and {a, b} <= appends for ks in kernels for a, b in zip(ks, ks[1:]))

    assert len(appends) == 2 and appends_back_to_back(schedule(graph, 132)) > 0
    fixed = fixed_task_cost(graph)
    # products of 8 rows: 16 units of work (2 per multiply-add) per 2 bytes of bf16 weight
    assert fixed == pytest.approx(8 * FIXED_COST_WEIGHT_BYTES, rel=0.01)
    sched = schedule(graph, 132, fixed)
    validate(graph, sched)
    assert appends_back_to_back(sched) == 0
