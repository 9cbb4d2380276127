"""Fused patterns: elementwise chains, RMSNorm, softmax, RoPE, dot epilogues and in-place updates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_trees_close, check_against_jit, random_array

from jax_mpk.capture import capture
from jax_mpk.dot_staging import shared_weight_dims
from jax_mpk.fusion import fuse
from jax_mpk.graph import Acc, Reduce, topological
from jax_mpk.target import Target

GPU = Target("cuda", 132, "9.0")  # an H100/H200's SM count, for GPU-fused plans without a GPU
GPU_SPLIT_ATTENTION = Target("cuda", 132, "9.0", split_attention=True)


def _rms_norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rms_norm_is_one_kernel(dtype, rows, rng):
    x, w = random_array(rng, (rows, 40), dtype), random_array(rng, (40,), dtype)
    fast = check_against_jit(_rms_norm, x, w, dtype=dtype)
    (mk,) = fast.plans.values()
    assert len(mk.graph.kernels) == 1
    assert any(isinstance(n, Reduce) for n in mk.graph.kernels[0].nodes())


@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 33)])
def test_softmax_is_one_kernel(shape, rng):
    fast = check_against_jit(lambda s: jax.nn.softmax(s, axis=-1), random_array(rng, shape, "float32", -8, 8))
    (mk,) = fast.plans.values()
    assert len(mk.graph.kernels) == 1


def test_elementwise_chain_is_one_kernel(rng):
    f = lambda x, y: jnp.tanh(x * 2 + 1) * jax.nn.sigmoid(y) - jnp.exp(-x)  # noqa: E731
    fast = check_against_jit(f, random_array(rng, (5, 9), "float32"), random_array(rng, (5, 9), "float32"))
    assert len(next(iter(fast.plans.values())).graph.kernels) == 1


def test_residual_add_becomes_dot_epilogue(rng):
    f = lambda h, x, w: h + x @ w  # noqa: E731
    args = [random_array(rng, s, "float32") for s in [(2, 24), (2, 16), (16, 24)]]
    fast = check_against_jit(f, *args)
    (mk,) = fast.plans.values()
    assert len(mk.graph.kernels) == 1 and mk.graph.kernels[0].dot is not None
    assert any(isinstance(n, Acc) for n in mk.graph.kernels[0].nodes())


def test_product_read_by_two_kernels_is_no_epilogue(rng):
    """Both results recompute tanh(x @ w) * 2 (too cheap to store): the product stays stored for both."""
    f = lambda x, w: (lambda z: (z + 1.0, z * 3.0))(jnp.tanh(x @ w) * 2.0)  # noqa: E731
    check_against_jit(f, random_array(rng, (4, 8), "float32"), random_array(rng, (8, 4), "float32"))


def test_rope_with_concatenate_fuses(rng):
    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    args = [random_array(rng, s, "float32") for s in [(3, 4, 16), (16,), (16,)]]
    fast = check_against_jit(rope, *args)
    assert len(next(iter(fast.plans.values())).graph.kernels) == 1


def test_norm_then_matmul_then_softmax(rng):
    def f(x, w, v):
        return jax.nn.softmax(_rms_norm(x, 1.0) @ w, axis=-1) @ v

    args = [random_array(rng, s, "float32") for s in [(3, 32), (32, 20), (20, 8)]]
    check_against_jit(f, *args)


def test_shared_reduction_is_computed_once(rng):
    def f(x):
        m = jnp.max(x, axis=-1, keepdims=True)
        return x - m, jnp.exp(x - m)

    fast = check_against_jit(f, random_array(rng, (4, 10), "float32"))
    (mk,) = fast.plans.values()
    assert sum(isinstance(n, Reduce) for k in mk.graph.kernels for n in k.nodes()) == 1


def test_chained_updates_alias_input_to_output(rng):
    def f(cache, a, b, i):
        cache = jax.lax.dynamic_update_slice(cache, a, (0, i))
        cache = jax.lax.dynamic_update_slice(cache, b, (1, i))
        return cache, cache[0].sum()

    args = [random_array(rng, (2, 9), "float32"), random_array(rng, (1, 3), "float32"),
            random_array(rng, (1, 3), "float32"), jnp.int32(4)]  # fmt: skip
    fast = check_against_jit(f, *args)
    (mk,) = fast.plans.values()
    assert mk.graph.aliases == {0: 0}


def test_reader_of_old_value_runs_before_in_place_update(rng):
    def f(cache, a, i):
        old_total = cache.sum()
        return jax.lax.dynamic_update_slice(cache, a, (i, 0)), old_total

    args = [random_array(rng, (6, 4), "float32"), random_array(rng, (2, 4), "float32"), jnp.int32(3)]
    fast = check_against_jit(f, *args)
    assert next(iter(fast.plans.values())).graph.aliases == {0: 0}


def test_reader_that_needs_both_versions_forces_a_copy(rng):
    def f(cache, a, i):
        new = jax.lax.dynamic_update_slice(cache, a, (i, 0))
        return new, new.sum() - cache.sum()

    args = [random_array(rng, (6, 4), "float32"), random_array(rng, (2, 4), "float32"), jnp.int32(1)]
    fast = check_against_jit(f, *args)
    assert next(iter(fast.plans.values())).graph.aliases == {}


def test_megakernel_of_jitted_and_custom_jvp_functions(rng):
    inner = jax.jit(lambda x: jax.nn.gelu(x) * 2)
    f = lambda x: inner(x) + jax.nn.relu(x) + jax.nn.softplus(x)  # noqa: E731
    check_against_jit(f, random_array(rng, (4, 6), "float32"))
    check_against_jit(jax.checkpoint(lambda x: jnp.sin(x) * x), random_array(rng, (5,), "float32"))


@pytest.mark.parametrize("reducer", ["argmax", "argmin", "max", "sum"])
def test_long_reduction_is_split_into_chunks(reducer, rng):
    x = random_array(rng, (2, 40000), "float32")
    x = x.at[0, 39000].set(x[0].max() + 1).at[0, 123].set(x[0].max() + 1)  # a tie: the first one wins
    # NaN counts as the extreme for arg-reductions (jnp's rule); XLA:CPU's own reduce_max may skip NaN
    x = x.at[1, 777].set(jnp.nan) if reducer.startswith("arg") else x
    fast = check_against_jit(lambda x: getattr(jnp, reducer)(x, axis=-1), x)
    (mk,) = fast.plans.values()
    assert len(mk.graph.kernels) >= 2  # partial reductions over chunks, then the final one


def test_narrow_products_split_along_k_on_many_workers(rng):
    """With a GPU's worth of workers, x @ W with few output columns becomes float32 partial products over
    K slices plus a sum fused into the consumer; the CPU executor runs that graph too."""
    from jax_mpk.capture import capture
    from jax_mpk.fusion import fuse
    from jax_mpk.plan import plan_key, serialize
    from jax_mpk.runtime import emit_call, register_plan
    from jax_mpk.schedule import schedule
    from jax_mpk.tasks import build_task_graph
    from jax_mpk.validate import validate

    def f(h, x, w):
        return h + (x @ w).astype(jnp.float32)

    args = [random_array(rng, (1, 128), "float32"), random_array(rng, (1, 2048), "bfloat16"),
            random_array(rng, (2048, 128), "bfloat16")]  # fmt: skip
    graph = fuse(capture(jax.make_jaxpr(f)(*args)), GPU)
    dots = [k for k in graph.kernels if k.dot is not None]
    assert len(dots) == 1 and dots[0].domain[0] > 1 and dots[0].dot.acc_dtype == jnp.float32
    tasks = build_task_graph(graph, 4, 1)
    sched = schedule(tasks, 4)
    validate(tasks, sched)
    words = serialize(tasks, sched)
    register_plan(plan_key(words), words)
    (out,) = jax.jit(lambda *a: emit_call(plan_key(words), list(a), graph.output_specs, {}, graph.workspace_bytes, 5000))(*args)
    expected = f(*[a.astype(jnp.float32) for a in args])
    assert_trees_close(out, expected, "bfloat16")


def test_residual_sum_is_stored_by_the_norm_that_reads_it(rng):
    def f(h, a, b, w):
        h = h + a * b  # the residual stream: read by the norm and returned
        return h, _rms_norm(h, w)

    args = [random_array(rng, s, "float32") for s in [(3, 40), (3, 40), (3, 40), (40,)]]
    fast = check_against_jit(f, *args)
    (mk,) = fast.plans.values()
    assert len(mk.graph.kernels) == 1 and len(mk.graph.kernels[0].outputs) == 2


def test_gpu_plans_compute_norm_and_softmax_rows_in_the_products_staging(rng):
    """With a GPU's worth of workers, a product whose activation row is an RMSNorm (or a softmax) computes that
    row while staging it: the row kernel is gone (or keeps only its other outputs), the product reads what the
    row kernel read, and the validated task graph has one dependency level less per such pair. The CPU
    executor runs such a plan (the product evaluates the row's expression as it reads its lhs)."""
    from jax_mpk.capture import capture
    from jax_mpk.fusion import fuse
    from jax_mpk.plan import plan_key, serialize
    from jax_mpk.runtime import emit_call, register_plan
    from jax_mpk.schedule import schedule
    from jax_mpk.tasks import build_task_graph
    from jax_mpk.validate import validate

    def f(h, a, w_norm, w, v):
        h = h + a  # residual stream, returned: the norm kernel keeps storing it
        scores = _rms_norm(h, w_norm).astype(jnp.bfloat16) @ w
        return h, jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(jnp.bfloat16) @ v

    args = [random_array(rng, (1, 512), "bfloat16"), random_array(rng, (1, 512), "bfloat16"),
            random_array(rng, (512,), "bfloat16"), random_array(rng, (512, 256), "bfloat16"),
            random_array(rng, (256, 64), "bfloat16")]  # fmt: skip
    closed = jax.make_jaxpr(f)(*args)
    plain, fused = fuse(capture(closed)), fuse(capture(closed), GPU)
    computed = [k for k in fused.kernels if k.dot is not None and k.dot.lhs_expr is not None]
    assert len(computed) == 2 and all(k.dot.lhs_expr is None for k in plain.kernels if k.dot is not None)
    assert len(fused.kernels) < len(plain.kernels)
    row_reductions = [n for k in computed for n in k.nodes() if isinstance(n, Reduce)]
    assert len(row_reductions) >= 3  # sum of squares; max and sum of exponentials
    tasks = build_task_graph(fused, 8, 1)
    sched = schedule(tasks, 8)
    validate(tasks, sched)
    words = serialize(tasks, sched)
    register_plan(plan_key(words), words)
    run = jax.jit(lambda *a: emit_call(plan_key(words), list(a), fused.output_specs, fused.aliases,
                                       fused.workspace_bytes, 5000))  # fmt: skip
    assert_trees_close(tuple(run(*args)), jax.jit(f)(*args), "bfloat16")


@pytest.mark.parametrize("batch,shared_rows,pointwise",
                         [(1, False, False), (4, True, False), (4, False, True), (4, False, False)])
def test_the_cpu_executor_runs_a_gpu_fused_decode_step(batch, shared_rows, pointwise, monkeypatch):
    """JAX_MPK_GPU_FUSION=1: the CPU executor runs the plan fused and tiled as for a GPU of 16 SMs (RMSNorm and
    QK-norm rows computed in the products' staging, split-K products, the SwiGLU epilogue rule), and agrees
    with jax.jit over several decode steps of a Qwen3-style model; with JAX_MPK_STAGE_SHARED_ROWS=1 the batch's
    products compute their rows (RMSNorm, SwiGLU) in their staging too, with JAX_MPK_STAGE_SHARED_POINTWISE=1
    only the rows without a reduction (the SwiGLU, once a layer; the default)."""
    from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens

    import jax_mpk

    monkeypatch.setenv("JAX_MPK_GPU_FUSION", "1")
    monkeypatch.setenv("JAX_MPK_STAGE_SHARED_ROWS", str(int(shared_rows)))
    monkeypatch.setenv("JAX_MPK_STAGE_SHARED_POINTWISE", str(int(pointwise)))
    cfg = TinyConfig(qk_norm=True, hidden=256, heads=4, kv_heads=2, head_dim=64, mlp=512, batch=batch)
    params, cache = init_params(cfg, jax.random.PRNGKey(3)), init_cache(cfg, jax.random.PRNGKey(4))
    step = make_decode_step(cfg)
    fast = jax_mpk.megakernelize(step, num_workers=16)
    tokens, fast_cache, ref_cache = random_tokens(cfg, 5), cache, cache
    for pos in range(3, 6):
        ref_tokens, ref_logits, *ref_cache = jax.jit(step)(params, tokens, jnp.int32(pos), *ref_cache)
        fast_tokens, fast_logits, *fast_cache = fast(params, tokens, jnp.int32(pos), *fast_cache)
        assert_trees_close((fast_logits, *fast_cache), (ref_logits, *ref_cache), "float32")
        tokens = ref_tokens
    (mk,) = fast.plans.values()
    computed = [k for k in mk.graph.kernels if k.dot is not None and k.dot.lhs_expr is not None]
    weight_rows = [k for k in computed if math.prod(k.domain[d] for d in shared_weight_dims(k)) == batch > 1]
    assert mk.target.gpu_fusion and computed and (len(weight_rows) >= 3 * cfg.layers) == shared_rows
    pointwise_rows = [k for k in weight_rows if not any(isinstance(n, Reduce) for n in topological([k.dot.lhs_expr]))]
    assert (len(weight_rows) == len(pointwise_rows) == cfg.layers) == pointwise


def test_gpu_fusion_leaves_rows_that_read_an_overwritten_version_outside_product_staging():
    """rem(x, y) computed in the staging of dot(rem(x, y), x.at[0:2].set(u)) would read x before the in-place
    update and the product would read its result: a cycle between in-place updates, on GPU targets only (fuzz
    program 2026:1492, planned for 132 SMs on the CPU)."""

    def f(x, y, u):
        updated = jax.lax.dynamic_update_slice(x, u, (0,))
        return updated, jax.lax.rem(x, y) @ updated

    avals = [jax.ShapeDtypeStruct((7,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((2,), jnp.float32)]
    graph = fuse(capture(jax.make_jaxpr(f)(*avals)), GPU)
    assert any(k.name == "rem" for k in graph.kernels), graph  # stored, not recomputed by the product


def test_gpu_fusion_keeps_the_base_of_an_in_place_update():
    """On a GPU target, a stored value read only through a later in-place update of its buffer (floor(x), then
    a slice of it overwritten, then the whole read) is still computed: the pass that moves row computations
    into product staging dropped every store nobody read directly, so the GPU read unwritten memory (the GPU
    fuzzer's nondeterministic and wrong results, 2026-11-30)."""

    def f(x, update):
        base = jnp.floor(jnp.cumsum(x * x))
        return jnp.isfinite(jax.lax.dynamic_update_slice(base, update, (20,)))

    avals = [jax.ShapeDtypeStruct((32,), jnp.float16), jax.ShapeDtypeStruct((12,), jnp.float16)]
    graph = fuse(capture(jax.make_jaxpr(f)(*avals)), GPU)
    (chain,) = [k for k in graph.kernels if k.name.startswith("update_slice")]
    writers = [k for k in graph.kernels if any(o.tensor.buffer is chain.outputs[0].tensor.buffer for o in k.outputs)]
    assert any("floor" in k.name for k in writers), graph


def _attention(q, keys, values, wo, pos):
    b, seq, _, head_dim = keys.shape
    scores = jnp.einsum("bgrd,bsgd->bgrs", q, keys).astype(jnp.float32) * head_dim**-0.5
    probs = jax.nn.softmax(jnp.where(jnp.arange(seq) <= pos, scores, -1e30), axis=-1).astype(values.dtype)
    return jnp.einsum("bgrs,bsgd->bgrd", probs, values).reshape(b, -1) @ wo


def _attention_args(batch, kv_heads, group, head_dim, seq):
    bf16 = jnp.bfloat16
    return [jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), bf16),
            jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), bf16),
            jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), bf16),
            jax.ShapeDtypeStruct((kv_heads * group * head_dim, 256), bf16), jax.ShapeDtypeStruct((), jnp.int32)]  # fmt: skip


def test_gpu_plans_split_attention_along_the_keys():
    """On a GPU target the scores product and the softmax-weighted values product become one split-attention
    kernel (one dependency level less): its tasks take whole chunks of keys with all the query heads of their
    key/value head and write per-chunk partials, and one merge counter per group of query rows exists."""
    from jax_mpk.schedule import schedule
    from jax_mpk.tasks import build_task_graph
    from jax_mpk.validate import validate

    closed = jax.make_jaxpr(_attention)(*_attention_args(2, 4, 4, 64, 512))
    plain, fused = fuse(capture(closed)), fuse(capture(closed), GPU_SPLIT_ATTENTION)
    (attention,) = [k for k in fused.kernels if k.attention is not None]
    spec = attention.attention
    assert attention.domain == (2, 4, 4, 512) and spec.rows_dims == (2,) and 512 % spec.chunk == 0
    assert spec.partial_out.shape == (2, 4, 4, 512 // spec.chunk, 64)
    # the output projection reads the attention's output, which each group's last task merges; no kernel reads the
    # partials (only that task, inside the kernel)
    partials = {t.version for t in spec.partials()}
    assert not any(partials & {t.version for t in k.read_tensors()} for k in fused.kernels if k is not attention)
    assert any(k.dot is not None and k.dot.lhs.version == spec.output.version for k in fused.kernels)
    assert max(k.level for k in fused.kernels) == max(k.level for k in plain.kernels) - 1
    tasks = build_task_graph(fused, 132)
    validate(tasks, schedule(tasks, 132))
    assert tasks.num_events - tasks.merge_counters[attention.index] == 2 * 4  # (batch, kv head) groups
    tiles = [(t.lo, t.hi) for t in tasks.tasks if t.kernel == attention.index]
    assert len(tiles) >= 2 * 4 * 2  # every (batch, kv head) in several tasks
    for lo, hi in tiles:
        assert (lo[2], hi[2]) == (0, 4) and hi[0] - lo[0] == 1 and hi[1] - lo[1] == 1  # all 4 query heads
        assert lo[3] % spec.chunk == 0 and hi[3] % spec.chunk == 0


def _attention_one_query_position(q, keys, values, wo, pos):
    """As examples/models.py writes it: the scores' rows (batch, kv head, position, group) and the values'
    (batch, kv head, group, position) differ in where the one query position sits."""
    b, seq, _, head_dim = keys.shape
    groups = q[:, None]  # [batch, 1 position, kv heads, group, head dim]
    scores = jnp.einsum("btgrd,bsgd->bgrts", groups, keys).astype(jnp.float32) * head_dim**-0.5
    probs = jax.nn.softmax(jnp.where(jnp.arange(seq) <= pos, scores, -1e30), axis=-1).astype(values.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, values).reshape(b, -1) @ wo


def test_split_attention_takes_scores_whose_unit_axes_sit_elsewhere():
    """The scores product stores its rows with the query position between the heads, the values' product reads
    them with it after: the same memory order, so the pair is still one split-attention kernel, over the values'
    rows, whose tasks take all the query heads of their KV head."""
    from jax_mpk.tasks import build_task_graph

    closed = jax.make_jaxpr(_attention_one_query_position)(*_attention_args(2, 4, 4, 64, 512))
    fused = fuse(capture(closed), GPU_SPLIT_ATTENTION)
    (attention,) = [k for k in fused.kernels if k.attention is not None]
    assert attention.domain == (2, 4, 4, 1, 512) and attention.attention.rows_dims == (2,)
    assert not any(k.dot is not None and k.domain[-1] == 512 for k in fused.kernels if k is not attention)
    tiles = [(t.lo, t.hi) for t in build_task_graph(fused, 132).tasks if t.kernel == attention.index]
    assert all((lo[2], hi[2]) == (0, 4) for lo, hi in tiles)


def test_split_attention_leaves_products_without_rows():
    """A dot of two vectors (no rows, found by the GPU fuzzer once split attention was on by default) is not the
    values' product of an attention: the pass leaves it, where it used to index its empty domain."""
    closed = jax.make_jaxpr(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ()))))(
        jax.ShapeDtypeStruct((6,), jnp.float32), jax.ShapeDtypeStruct((6,), jnp.float32))
    assert not any(k.attention is not None for k in fuse(capture(closed), GPU_SPLIT_ATTENTION).kernels)


def test_split_attention_needs_whole_chunks():
    """A prime number of keys above the largest chunk has no whole chunks: the two products stay as they were."""
    closed = jax.make_jaxpr(_attention)(*_attention_args(1, 2, 2, 128, 1031))
    assert not any(k.attention is not None for k in fuse(capture(closed), GPU_SPLIT_ATTENTION).kernels)
