"""Collectives inside shard_map: megakernelize(f) equals jax.jit(f) on 2 and 4 CPU devices (conftest gives the
process 4), and on 2 or more GPUs (the `gpu` cases, skipped without them)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_model_outputs_close, assert_trees_close, random_array
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens, tp_specs

import jax_mpk
from jax_mpk.layout import TensorKind
from jax_mpk.errors import UnsupportedPrimitiveError


PLATFORMS = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu), pytest.param("gpu-comm-copies", marks=pytest.mark.gpu)]


@pytest.fixture(params=PLATFORMS)
def platform(request, monkeypatch) -> str:
    """The devices' platform; "gpu-comm-copies": the GPUs, with every slot copied to every GPU
    (JAX_MPK_COMM_COPIES=1)."""
    if request.param == "gpu-comm-copies":
        monkeypatch.setenv("JAX_MPK_COMM_COPIES", "1")
        return "gpu"
    return request.param


def mesh_of(n: int, names=("x",), platform: str = "cpu", axis_type: AxisType | None = None) -> Mesh:
    """A mesh of ``n`` devices; with ``axis_type``, made by jax.make_mesh (whose default is Explicit)."""
    devices = jax.devices(platform) if platform == "cpu" or jax.default_backend() == "gpu" else []
    if len(devices) < n:
        pytest.skip(f"needs {n} {platform} devices (CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    shape = (n,) if len(names) == 1 else (2, n // 2)
    if axis_type is not None:
        return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names), devices=devices[:n])
    return Mesh(np.array(devices[:n]).reshape(shape), names)


def placed(mesh: Mesh, values, specs):
    """``values`` put on ``mesh`` as ``specs`` say (pytrees of arrays and of PartitionSpecs)."""
    return jax.device_put(values, jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs))


def check_calls(fn, make_args, calls=3, dtype=None):
    """megakernelize(fn) equals jax.jit(fn) on fresh inputs for several calls (the communication buffers
    alternate between two halves from call to call)."""
    fast = jax_mpk.megakernelize(fn)
    for _ in range(calls):
        args = make_args()
        with jax.default_matmul_precision("float32"):  # XLA's GPU default is TF32; ours is float32
            expected = jax.jit(fn)(*args)
        if dtype == "bfloat16":  # partial sums that cancel: one bf16 rounding apart is a large error elementwise
            assert_model_outputs_close(fast(*args), expected, dtype)
        else:
            assert_trees_close(fast(*args), expected, dtype)
    fast.check_errors()
    return fast


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_psum_of_a_row_parallel_product(n, dtype, platform, rng):
    def body(x, w):
        return jax.lax.psum(x @ w, "x")

    f = jax.shard_map(body, mesh=mesh_of(n, platform=platform), in_specs=(P(None, "x"), P("x", None)), out_specs=P())
    fast = check_calls(f, lambda: (random_array(rng, (3, 8 * n), dtype), random_array(rng, (8 * n, 20), dtype)),
                       dtype=dtype)
    (plan,) = fast.plans.values()
    assert plan.graph.num_ranks == n and plan.tasks.num_remote_events >= 1


def test_a_products_contribution_is_stored_in_its_slot_by_the_product(rng):
    """psum(x @ w): the product kernel stores its result straight into this rank's slot of the communication
    buffer (no copy kernel between them: one dependency level less per collective)."""
    def body(x, w):
        return jax.lax.psum(x @ w, "x")

    f = jax.shard_map(body, mesh=mesh_of(2), in_specs=(P(None, "x"), P("x", None)), out_specs=P())
    fast = check_calls(f, lambda: (random_array(rng, (2, 64), "float32"), random_array(rng, (64, 48), "float32")))
    (plan,) = fast.plans.values()
    (product,) = [k for k in plan.graph.kernels if k.dot is not None]
    assert [o.tensor.buffer.kind for o in product.outputs] == [TensorKind.COMM]
    assert not any(k.name.startswith("update_slice") for k in plan.graph.kernels)
    assert max(k.level for k in plan.graph.kernels) == 1  # the product, then the sum over the slots


def test_a_products_converted_contribution_is_stored_in_its_slot_by_the_product(rng):
    """all_gather(float32(x @ w)) of bfloat16 operands (a vocabulary-parallel head's logits): the product stores
    its result converted to float32 straight into this rank's slot; no copy kernel between them."""
    def body(x, w):
        return jax.lax.all_gather((x @ w).astype(jnp.float32), "x", axis=1, tiled=True)

    # check_vma=False: jax marks all_gather's result varying (as test_all_gather)
    f = jax.shard_map(body, mesh=mesh_of(2), in_specs=(P(), P(None, "x")), out_specs=P(), check_vma=False)
    fast = check_calls(f, lambda: (random_array(rng, (2, 64), "bfloat16"), random_array(rng, (64, 96), "bfloat16")),
                       dtype="bfloat16")  # fmt: skip
    (plan,) = fast.plans.values()
    (product,) = [k for k in plan.graph.kernels if k.dot is not None]
    assert [o.tensor.buffer.kind for o in product.outputs] == [TensorKind.COMM]
    assert product.outputs[0].tensor.buffer.dtype == np.float32
    assert not any(k.name.startswith("update_slice") for k in plan.graph.kernels)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_split_k_products_partials_are_exchanged_with_comm_copies(dtype, monkeypatch, rng):
    """JAX_MPK_COMM_COPIES with the GPU's fusion (JAX_MPK_GPU_FUSION, 16 SMs): psum(x @ w) of a long
    contraction split along K exchanges the float32 partials of the slices, [ranks, S, ...], stored into the
    slots by the product itself; the sum over ranks and slices is the only kernel after it. Equals jax.jit."""
    monkeypatch.setenv("JAX_MPK_GPU_FUSION", "1")
    monkeypatch.setenv("JAX_MPK_NUM_WORKERS", "16")
    monkeypatch.setenv("JAX_MPK_COMM_COPIES", "1")

    def body(x, w):
        return jax.lax.psum(x @ w, "x")

    f = jax.shard_map(body, mesh=mesh_of(2), in_specs=(P(None, "x"), P("x", None)), out_specs=P())
    fast = jax_mpk.megakernelize(f)
    for _ in range(3):  # the buffers' two halves, and back
        x, w = random_array(rng, (1, 4096), dtype), random_array(rng, (4096, 128), dtype)
        with jax.default_matmul_precision("float32"):
            expected = np.asarray(jax.jit(f)(x, w), np.float64)
        # sums of 4096 terms in another order: elementwise, a cancelling column is off by ~1e-4 of the others'
        # size; against the whole result's size XLA's float32 sums are ~1e-7 to 1e-6 off (1.02e-6 seen), a slice
        # summed twice or left out ~1e-1 (bf16: its one rounding, or XLA's)
        error = np.linalg.norm(np.asarray(fast(x, w), np.float64) - expected) / np.linalg.norm(expected)
        assert error < (1e-5 if dtype == "float32" else 8e-3), error
    fast.check_errors()
    (plan,) = fast.plans.values()
    (product,) = [k for k in plan.graph.kernels if k.dot is not None]
    (slots,) = [o.tensor for o in product.outputs]
    assert slots.buffer.kind == TensorKind.COMM and slots.buffer.dtype == np.float32
    assert len(slots.shape) == 4 and slots.shape[0] == 2 and slots.shape[1] > 1, slots.shape  # ranks, slices, row, columns
    assert len(plan.graph.kernels) == 2 and max(k.level for k in plan.graph.kernels) == 1


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("axis,tiled", [(0, True), (1, True), (1, False), (2, False)])
def test_all_gather(n, axis, tiled, platform, rng):
    def body(x):
        return jax.lax.all_gather(jnp.sin(x), "x", axis=axis, tiled=tiled)

    # every device holds the whole gathered value (check_vma=False: jax marks all_gather's result varying;
    # its collectives are then psum, not psum_invariant)
    f = jax.shard_map(body, mesh=mesh_of(n, platform=platform), in_specs=P(None, "x"), out_specs=P(), check_vma=False)
    check_calls(f, lambda: (random_array(rng, (3, 2 * n), "float32"),))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dim,tiled", [(0, True), (1, True), (0, False)])
def test_psum_scatter(n, dim, tiled, platform, rng):
    def body(x):
        return jax.lax.psum_scatter(x * 2.0, "x", scatter_dimension=dim, tiled=tiled)

    shape = (n * 3, 2 * n) if tiled else (n, 5)
    out_spec = P("x") if tiled and dim == 0 else P(None, "x") if tiled else P("x")  # blocks side by side
    f = jax.shard_map(body, mesh=mesh_of(n, platform=platform), in_specs=P(), out_specs=out_spec)
    check_calls(f, lambda: (random_array(rng, shape, "float32"),))


def test_axis_index_and_several_results(rng):
    def body(x):
        i = jax.lax.axis_index("x")
        total = jax.lax.psum(x.sum(), "x")
        return x * i.astype(x.dtype), total, jax.lax.psum(i, "x")

    f = jax.shard_map(body, mesh=mesh_of(4), in_specs=P("x"), out_specs=(P("x"), P(), P()))
    check_calls(f, lambda: (random_array(rng, (8, 3), "float32"),))


def test_constants_of_the_body(platform, rng):
    """Arrays the function closes over reach the shard_map as replicated operands (jax hoists them)."""
    table = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
    f = jax.shard_map(lambda x: jax.lax.psum(x * table, "x"), mesh=mesh_of(2, platform=platform), in_specs=P(),
                      out_specs=P())  # fmt: skip
    check_calls(f, lambda: (random_array(rng, (4, 3), "float32"),))
    check_calls(jax.jit(f), lambda: (random_array(rng, (4, 3), "float32"),))


def test_two_dimensional_mesh(rng):
    mesh = mesh_of(4, ("a", "b"))

    def body(x):
        rank = jax.lax.axis_index("a") * 2 + jax.lax.axis_index("b")
        return jax.lax.psum(x + rank.astype(x.dtype), ("a", "b"))

    f = jax.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P())
    check_calls(f, lambda: (random_array(rng, (4, 6), "float32"),))


def test_each_device_keeps_its_workspace(rng):
    """What Megakernel.profile reads: a shard_map's call, asked for its workspace, returns every device's, one row
    per device (stacked over the mesh axes in the order of the plan's ranks), beside the results."""
    mesh = mesh_of(4, ("a", "b"))

    def body(x, w):
        h = jnp.tanh(x @ w)  # stored in the workspace: the norm below reads all of it
        return jax.lax.psum(h / jnp.sum(h * h), ("a", "b"))

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("a", "b"), P("b", None)), out_specs=P())
    x, w = random_array(rng, (4, 64), "float32"), random_array(rng, (64, 48), "float32")
    fast = jax_mpk.megakernelize(f)
    fast(x, w)
    (plan,) = fast.plans.values()
    result, workspace = jax.jit(lambda *v: plan.emit(v, keep_workspace=True))(x, w)
    assert plan.workspace_bytes > 0 and workspace.shape == (4, plan.workspace_bytes)
    with jax.default_matmul_precision("float32"):
        assert_trees_close(result, jax.jit(f)(x, w), "float32")


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensor_parallel_decode_steps(n, dtype, platform, rng):
    """A tiny Llama-style step with Q/K/V, gate/up split by column and O/down by row (psum after each), over
    several steps: the megakernel equals jax.jit of the same shard_map and of the unsharded step."""
    check_tensor_parallel_decode(n, dtype, platform, rng)


def test_tensor_parallel_decode_with_comm_copies_fused_for_a_gpu(monkeypatch, rng):
    """JAX_MPK_COMM_COPIES with the GPU's fusion on the CPU executor (JAX_MPK_GPU_FUSION): the products after
    each psum compute its RMSNorm in their staging, reading the communication buffer; the steps still equal
    jax.jit's."""
    monkeypatch.setenv("JAX_MPK_GPU_FUSION", "1")
    monkeypatch.setenv("JAX_MPK_COMM_COPIES", "1")
    fast = check_tensor_parallel_decode(2, "float32", "cpu", rng)
    (plan,) = fast.plans.values()
    staged = [k for k in plan.graph.kernels
              if k.dot is not None and k.dot.lhs_expr is not None and k.reads_comm()]  # fmt: skip
    assert len(staged) >= 4, [k.name for k in plan.graph.kernels]  # gate and up after each layer's attention psum


def test_llama_width_tensor_parallel_layer_with_comm_copies_fused_for_a_gpu(monkeypatch, rng):
    """A Llama-3.2-1B-wide layer split over 2 devices, fused as for a 132-SM GPU on the CPU executor with
    JAX_MPK_COMM_COPIES: the O and down projections are split along K (1024 and 4096 long per device) and exchange
    their float32 partials (dot|update_slice(copy) into [2, S, 1, 2048] slots), the next products stage the
    psum's RMSNorm; two steps equal jax.jit's (float32: logits and cache to 1e-5 of their size, tokens exactly)."""
    monkeypatch.setenv("JAX_MPK_GPU_FUSION", "1")
    monkeypatch.setenv("JAX_MPK_NUM_WORKERS", "132")
    monkeypatch.setenv("JAX_MPK_COMM_COPIES", "1")
    cfg = TinyConfig(layers=1, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=4096, max_seq=256,
                     theta=500000.0)  # fmt: skip
    params = init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache = init_cache(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache_spec = P(None, None, None, "x", None)
    step = jax.shard_map(make_decode_step(cfg, "x"), mesh=mesh_of(2),
                         in_specs=(tp_specs(params, "x"), P(), P(), cache_spec, cache_spec),
                         out_specs=(P(), P(), cache_spec, cache_spec))  # fmt: skip
    fast, tokens = jax_mpk.megakernelize(step), random_tokens(cfg, 0)
    for pos in (100, 101):
        with jax.default_matmul_precision("float32"):
            expected = jax.jit(step)(params, tokens, jnp.int32(pos), *cache)
        actual = fast(params, tokens, jnp.int32(pos), *cache)
        # logits of ~100 from 2048- and 8192-long float32 sums: XLA's rounding is ~1e-4 of a small one, ~1e-6
        # of the whole (the CPU executor sums in double); so the logits and the caches against their size
        for a, e in zip(jax.tree_util.tree_leaves(actual[1:]), jax.tree_util.tree_leaves(expected[1:])):
            a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            assert np.linalg.norm(a64 - e64) <= 1e-5 * np.linalg.norm(e64)
        np.testing.assert_array_equal(np.asarray(actual[0]), np.asarray(expected[0]))
    fast.check_errors()
    (plan,) = fast.plans.values()
    exchanged = [o.tensor.shape for k in plan.graph.kernels if k.dot is not None for o in k.outputs
                 if o.tensor.buffer.kind == TensorKind.COMM]  # fmt: skip
    assert len(exchanged) == 2 and all(s[0] == 2 and s[1] > 1 and s[-1] == 2048 for s in exchanged), exchanged


def check_tensor_parallel_decode(n, dtype, platform, rng):
    """The megakernel of the tiny TP decode step equals jax.jit over 4 steps; returns it."""
    cfg = TinyConfig(layers=2, heads=4, kv_heads=4 if n == 4 else 2, mlp=96, dtype=dtype)
    params = init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache = init_cache(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache_spec = P(None, None, None, "x", None)
    tp_step = jax.shard_map(
        make_decode_step(cfg, "x"), mesh=mesh_of(n, platform=platform),
        in_specs=(tp_specs(params, "x"), P(), P(), cache_spec, cache_spec),
        out_specs=(P(), P(), cache_spec, cache_spec),
    )  # fmt: skip
    fast, reference, single = jax_mpk.megakernelize(tp_step), jax.jit(tp_step), jax.jit(make_decode_step(cfg))
    tokens, expected_cache, actual_cache = random_tokens(cfg, 0), cache, cache
    def close(actual, expected, dtype):
        if dtype == "float32":
            return assert_trees_close(actual, expected, dtype)
        # bf16: both round every partial product and sum, but at different points (XLA keeps fused
        # epilogues in float32); over two layers of random weights that is ~1e-2 of the logits
        for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
            a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            assert np.linalg.norm(a64 - e64) <= 3e-2 * np.linalg.norm(e64)

    for pos in range(3, 7):
        with jax.default_matmul_precision("float32"):
            expected = reference(params, tokens, jnp.int32(pos), *expected_cache)
            if dtype == "float32":  # in bf16 the shards round their partial sums where the whole step does not
                close(single(params, tokens, jnp.int32(pos), *expected_cache)[1:], expected[1:], dtype)
        actual = fast(params, tokens, jnp.int32(pos), *actual_cache)
        close(actual[1:], expected[1:], dtype)
        if dtype == "float32":  # bf16 logits of random weights have near-ties
            np.testing.assert_array_equal(np.asarray(actual[0]), np.asarray(expected[0]))
        tokens, expected_cache, actual_cache = expected[0], expected[2:], actual[2:]
    fast.check_errors()
    return fast


AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_meshes_made_by_make_mesh(n, axis_type, platform, rng):
    """Arguments placed on a jax.make_mesh mesh (CPU devices, and GPUs where there are n): with Explicit axes
    their shardings are part of their types, which the shard_map checks its in_specs against; results have
    jax.jit's types."""
    mesh = mesh_of(n, ("a", "b") if n == 4 else ("x",), platform=platform, axis_type=axis_type)
    axes = tuple(mesh.axis_names)
    in_specs = (P(None, axes), P(axes, None))
    f = jax.shard_map(lambda x, w: jax.lax.psum(x @ w, axes), mesh=mesh, in_specs=in_specs, out_specs=P())
    make_args = lambda: placed(mesh, (random_array(rng, (3, 8 * n), "float32"),  # noqa: E731
                                      random_array(rng, (8 * n, 5), "float32")), in_specs)
    fast = check_calls(f, make_args)
    args = make_args()
    assert jax.typeof(fast(*args)) == jax.typeof(jax.jit(f)(*args))


@pytest.mark.parametrize("n", [2, 4])
def test_tensor_parallel_decode_step_on_an_explicit_mesh(n, rng):
    cfg = TinyConfig(layers=2, heads=4, kv_heads=4 if n == 4 else 2, mlp=96)
    mesh = mesh_of(n, axis_type=AxisType.Explicit)
    cache_spec = P(None, None, None, "x", None)
    specs = (tp_specs(init_params(cfg, jax.random.PRNGKey(0)), "x"), P(), P(), cache_spec, cache_spec)
    step = jax.shard_map(make_decode_step(cfg, "x"), mesh=mesh, in_specs=specs,
                         out_specs=(P(), P(), cache_spec, cache_spec))  # fmt: skip
    params = init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache = init_cache(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    args = placed(mesh, (params, random_tokens(cfg, 0), jnp.int32(3), *cache), specs)
    with jax.default_matmul_precision("float32"):
        expected = jax.jit(step)(*args)
    actual = jax_mpk.megakernelize(step)(*args)
    assert_trees_close(actual[1:], expected[1:])
    np.testing.assert_array_equal(np.asarray(actual[0]), np.asarray(expected[0]))


@pytest.mark.parametrize("n", [2, 4])
def test_sharding_annotations_are_identities(n, rng):
    """reshard (also under jax.set_mesh, and as auto_axes makes it) and with_sharding_constraint change where
    a value lives, not the value: outside a shard_map every device computes the whole function."""
    explicit, auto = mesh_of(n, axis_type=AxisType.Explicit), mesh_of(n, axis_type=AxisType.Auto)

    def on_explicit(x, w):  # called under jax.set_mesh(explicit), where specs name its axes
        y = jax.sharding.reshard(jnp.tanh(x @ w), NamedSharding(explicit, P()))
        z = jax.sharding.reshard(y * 2.0, P("x", None))
        return z + 1.0, jax.sharding.auto_axes(lambda v: v * 3.0, out_sharding=P(None, "x"))(z)

    def on_auto(x):
        y = jax.lax.with_sharding_constraint(jnp.sin(x), NamedSharding(auto, P("x")))
        return jax.lax.with_sharding_constraint(y * x, NamedSharding(auto, P(None, "x")))

    for fn, mesh, make in [
        (on_explicit, explicit, lambda: placed(explicit, (random_array(rng, (2 * n, 8), "float32"),
                                                          random_array(rng, (8, 2 * n), "float32")),
                                               (P("x", None), P()))),
        (on_auto, auto, lambda: placed(auto, (random_array(rng, (2 * n, 2 * n), "float32"),), (P("x"),))),
    ]:  # fmt: skip
        with jax.set_mesh(mesh):
            fast = check_calls(fn, make, calls=2)
            (plan,) = fast.plans.values()
            names = {e.primitive.name for e in plan.jaxpr.jaxpr.eqns}
            assert names & {"reshard", "sharding_constraint"}, names
            args = make()
            types = lambda tree: jax.tree_util.tree_map(jax.typeof, tree)  # noqa: E731
            assert types(fast(*args)) == types(jax.jit(fn)(*args))


def test_a_rank_that_never_arrives_trips_the_watchdog(monkeypatch, rng):
    """The plan of a 2-device shard_map run by device 0 alone: its wait for rank 1's data times out with an
    error that names the remote event and the rank, instead of hanging."""
    monkeypatch.setenv("JAX_MPK_WATCHDOG_S", "0.5")
    f = jax.shard_map(lambda x: jax.lax.psum(x, "x"), mesh=mesh_of(2), in_specs=P("x"), out_specs=P())
    fast = jax_mpk.megakernelize(f)
    x = random_array(rng, (4, 3), "float32")
    fast(x)
    (plan,) = fast.plans.values()
    alone = jax.shard_map(lambda x: tuple(plan._emit_local([x, jnp.int32(0)], False)), mesh=mesh_of(1),
                          in_specs=P(), out_specs=P(), check_vma=False)  # fmt: skip
    start = time.monotonic()
    with pytest.raises(Exception, match="remote event .* of rank 1"):
        jax.block_until_ready(jax.jit(alone)(x[:2]))
    assert time.monotonic() - start < 10
    assert_trees_close(fast(x), jax.jit(f)(x))  # the group starts afresh


def test_collective_over_part_of_the_mesh_is_refused(rng):
    f = jax.shard_map(lambda x: jax.lax.psum(x, "a"), mesh=mesh_of(4, ("a", "b")), in_specs=P("a", "b"),
                      out_specs=P(None, "b"))  # fmt: skip
    with pytest.raises(UnsupportedPrimitiveError, match="over axes"):
        jax_mpk.megakernelize(f)(random_array(rng, (4, 4), "float32"))


def test_shard_map_inside_other_work_is_refused(rng):
    inner = jax.shard_map(lambda x: jax.lax.psum(x, "x"), mesh=mesh_of(2), in_specs=P("x"), out_specs=P())
    with pytest.raises(UnsupportedPrimitiveError, match="one shard_map"):
        jax_mpk.megakernelize(lambda x: inner(x) + 1.0)(random_array(rng, (4,), "float32"))


def test_collective_outside_shard_map_is_refused(rng):
    with pytest.raises(Exception, match="axis name|unbound"):
        jax_mpk.megakernelize(lambda x: jax.lax.psum(x, "x"))(random_array(rng, (4,), "float32"))


@pytest.mark.gpu
def test_profile_of_a_tensor_parallel_step_has_every_devices_tasks(monkeypatch, rng):
    """Megakernel.profile of a shard_map over 2 GPUs: each device's [wait, start, end] of every task."""
    monkeypatch.setenv("JAX_MPK_PROFILE", "1")
    mesh = mesh_of(2, platform="gpu")

    def body(x, w):
        return jax.lax.psum(jnp.tanh(x @ w), "x")

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "x"), P("x", None)), out_specs=P())
    x, w = random_array(rng, (2, 512), "bfloat16"), random_array(rng, (512, 256), "bfloat16")
    mk = jax_mpk.compile(f, x, w)
    times = mk.profile(x, w)
    assert times.shape == (2, len(mk.tasks.tasks), 3)
    assert np.all(np.isfinite(times)) and times.min() == 0
    assert np.all(times[:, :, 0] <= times[:, :, 1]) and np.all(times[:, :, 1] <= times[:, :, 2])


@pytest.mark.gpu
@pytest.mark.parametrize("comm_copies", ["0", "1"])
@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen3-8b"])
def test_tensor_parallel_full_width_layers_on_two_gpus(shape, comm_copies, monkeypatch, rng):
    """Two layers at the width of Llama-3.2-1B and Qwen3-8B (bf16, context 1024), split over 2 GPUs, with each
    layout of the communication buffers (JAX_MPK_COMM_COPIES): the megakernels equal jax.jit of the same
    shard_map over several steps."""
    monkeypatch.setenv("JAX_MPK_COMM_COPIES", comm_copies)
    widths = {
        "llama-3.2-1b": dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256, theta=500000.0),
        "qwen3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=12288, vocab=151936, qk_norm=True,
                         theta=1e6),
    }  # fmt: skip
    cfg = TinyConfig(layers=2, max_seq=1024, dtype="bfloat16", **widths[shape])
    mesh = mesh_of(2, platform="gpu")
    params = init_params(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache = init_cache(cfg, jax.random.PRNGKey(int(rng.integers(1 << 30))))
    cache_spec = P(None, None, None, "x", None)
    tp_step = jax.shard_map(make_decode_step(cfg, "x"), mesh=mesh,
                            in_specs=(tp_specs(params, "x"), P(), P(), cache_spec, cache_spec),
                            out_specs=(P(), P(), cache_spec, cache_spec))  # fmt: skip
    fast, reference = jax_mpk.megakernelize(tp_step), jax.jit(tp_step)
    tokens, expected_cache, actual_cache = random_tokens(cfg, 0), cache, cache
    for pos in range(1000, 1003):
        expected = reference(params, tokens, jnp.int32(pos), *expected_cache)
        actual = fast(params, tokens, jnp.int32(pos), *actual_cache)
        assert_model_outputs_close(actual[1:], expected[1:], "bfloat16")
        tokens, expected_cache, actual_cache = expected[0], expected[2:], actual[2:]
    fast.check_errors()


@pytest.mark.parametrize("comm_copies", [False, True])
def test_cuda_source_of_a_tensor_parallel_step_reads_slots_as_its_comm_layout_says(comm_copies, rng):
    """The generated CUDA source of the tiny TP step (2 ranks, bf16, no GPU needed): with Target.comm_copies a
    slot is stored into every rank's copy (comm::store_everywhere) and read locally, the products after each
    psum staging its RMSNorm (fewer kernels); without it, slot r is read from rank r element by element
    (comm::on_rank). Compiles."""
    from jax_mpk import config
    from jax_mpk.api import plan_stages
    from jax_mpk.capture import find_shard_map
    from jax_mpk.target import Target
    from jax_mpk.toolchain import compile_cubin

    cfg = TinyConfig(layers=2, heads=4, kv_heads=2, mlp=96, dtype="bfloat16")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: init_cache(cfg, jax.random.PRNGKey(1)))
    cache_spec = P(None, None, None, "x", None)
    tp_step = jax.shard_map(make_decode_step(cfg, "x"), mesh=mesh_of(2),
                            in_specs=(tp_specs(params, "x"), P(), P(), cache_spec, cache_spec),
                            out_specs=(P(), P(), cache_spec, cache_spec))  # fmt: skip
    closed = jax.make_jaxpr(tp_step)(params, random_tokens(cfg, 0), jnp.int32(3), *cache)
    knobs = config.load()

    def source(copies: bool):
        return plan_stages(closed, find_shard_map(closed), Target("cuda", 16, "9.0", comm_copies=copies), knobs).plan

    plan, other = source(comm_copies), source(not comm_copies)
    text = plan.source.text
    assert ("comm::store_everywhere<" in text) == comm_copies
    assert ("comm::on_rank(p, " in text) != comm_copies
    assert (plan.num_kernels < other.num_kernels) == comm_copies, (plan.num_kernels, other.num_kernels)
    assert len(compile_cubin(text, "9.0")) > 10_000
