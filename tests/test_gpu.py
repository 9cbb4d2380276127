"""The CUDA megakernel: the same equalities as the CPU suite, on the GPU (skipped without one)."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_model_outputs_close, assert_trees_close, check_against_jit, random_array
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step, random_tokens

import jax_mpk
from jax_mpk.codegen import generate
from jax_mpk.toolchain import compile_cubin
from jax_mpk.plan import plan_key, serialize
from jax_mpk.runtime import register_cuda_plan

pytestmark = pytest.mark.gpu


def _plan(fast):
    (megakernel,) = fast.plans.values()
    return megakernel


def _stacked_key_append(x, w, norm, cache):
    """Qwen3's key append into a [layer, batch, position, head, dim] cache: the per-head norm is read at [batch,
    head] of the update's rows, one block reduction per head (test_codegen.py)."""
    k = (x @ w).reshape(1, 1, 8, 128)
    k = k * jax.lax.rsqrt(jnp.mean(k * k, -1, keepdims=True) + 1e-6) * norm
    return jax.lax.dynamic_update_slice(cache, k[None], (1, 0, 5, 0, 0))


@pytest.mark.parametrize(
    "name,fn,shapes,dtype",
    [
        ("chain", lambda x, y: jnp.tanh(x * 2 + 1) * jax.nn.sigmoid(y) - jnp.exp(-x), [(5, 9), (5, 9)], "float32"),
        ("rms_norm", lambda x, w: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w, [(3, 2048), (2048,)], "bfloat16"),
        ("softmax", lambda s: jax.nn.softmax(s, axis=-1), [(2, 4, 1000)], "float32"),
        ("gemv_columns", lambda x, w, h: h + x @ w, [(1, 512), (512, 1024), (1, 1024)], "bfloat16"),
        # rows sharing the embedding rows (dot::rows_shared): 2, 8 and 5 rows (padded sums), a K tail
        ("gemv_rows", lambda x, e: x @ e.T, [(2, 256), (3000, 256)], "bfloat16"),
        ("gemv_rows_b8", lambda x, e: x @ e.T, [(8, 2048), (5000, 2048)], "bfloat16"),
        ("gemv_rows_b5_f32", lambda x, e: jnp.tanh((x @ e.T) * 0.05), [(5, 264), (1001, 264)], "float32"),
        # the weight ring: 8 and 3 rows per weight tile, float32 weights, a norm computed while staged
        ("gemv_ring_b8", lambda x, w, h: h + x @ w, [(8, 2048), (2048, 1024), (8, 1024)], "bfloat16"),
        # ... on tensor cores: f16, 5 rows, 48 columns (3 blocks of 16: warps in 5 k-groups, one idle); 2 rows of
        # wide tiles
        ("gemv_ring_mma_b5_f16", lambda x, w: x @ w, [(5, 1024), (1024, 48)], "float16"),
        ("gemv_ring_mma_b2", lambda x, w, h: h + x @ w, [(2, 512), (512, 4096), (2, 4096)], "bfloat16"),
        # (scaled: float32 sums of 2048 terms in another order than XLA's differ by ~1e-4 at unit inputs)
        ("gemv_ring_b3_f32", lambda x, w: jnp.tanh((x @ w) * 0.02), [(3, 2048), (2048, 512)], "float32"),
        ("norm_gemv_b4", lambda x, g, w: (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g) @ w,
         [(4, 2048), (2048,), (2048, 1536)], "bfloat16"),
        ("gemm_odd", lambda a, b: a @ b, [(5, 37), (37, 19)], "float32"),
        ("attention", lambda q, k: jnp.einsum("bgrd,bsgd->bgrs", q, k), [(1, 2, 4, 64), (1, 96, 2, 64)], "bfloat16"),
        ("attention_keys_first", lambda k, q: jax.lax.dot_general(k, q, (((3,), (4,)), ((0, 2), (0, 2)))),
         [(1, 96, 2, 64), (1, 1, 2, 4, 64)], "bfloat16"),
        ("argmax", lambda x: jnp.argmax(x, axis=-1), [(3, 5000)], "float32"),
        ("concat_rope", lambda x: jnp.concatenate([-x[..., 8:], x[..., :8]], -1) * x, [(2, 3, 16)], "float32"),
        ("integer", lambda a, b: (a * 3 - b) // 2, [(4, 33), (4, 33)], "int32"),
        ("stacked_key_append", _stacked_key_append, [(1, 1024), (1024, 1024), (128,), (3, 1, 64, 8, 128)], "bfloat16"),
        # row reductions read at rows in another order, and after a leading dim of size 1 (the rows kind's probe)
        ("rows_permuted", lambda x: jnp.swapaxes(x, 0, 1) * jax.lax.rsqrt(jnp.mean(x * x, -1)).T[..., None],
         [(4, 3, 512)], "float32"),
        ("rows_after_unit_dim", lambda x: (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True)))[None], [(3, 512)],
         "float32"),
    ],
)
def test_matches_jit(name, fn, shapes, dtype, rng):
    args = [random_array(rng, s, dtype) for s in shapes]
    with jax.default_matmul_precision("float32"):  # XLA's default on the GPU is TF32; ours is float32
        expected = jax.jit(fn)(*args)
    actual = jax_mpk.megakernelize(fn)(*args)
    if dtype == "bfloat16":
        # XLA keeps a fused epilogue in float32 where the graph rounds the product to bf16 first
        assert_model_outputs_close(actual, expected, dtype)
    else:
        assert_trees_close(actual, expected, dtype)


def _attend(q, keys, values, wo, pos, masked=-1e30):
    """Decode attention as models write it (grouped query heads), then the output projection."""
    b, seq, _, head_dim = keys.shape
    scores = jnp.einsum("bgrd,bsgd->bgrs", q, keys).astype(jnp.float32) * head_dim**-0.5
    scores = jnp.where(jnp.arange(seq) <= pos, scores, masked)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bgrs,bsgd->bgrd", probs, values).reshape(b, -1) @ wo


@pytest.mark.parametrize(
    "batch,kv_heads,group,head_dim,seq,pos,masked,dtype",
    [
        (1, 8, 4, 64, 1024, 700, -1e30, "bfloat16"),  # Llama-3.2-1B's heads: 16 chunks of 64 keys per head
        (2, 2, 2, 128, 384, 5, -jnp.inf, "bfloat16"),  # most chunks wholly masked with -inf
        (1, 1, 1, 32, 96, 95, -1e30, "float16"),  # one query row per task
        (8, 8, 2, 128, 1024, 1000, -1e30, "bfloat16"),  # batch 8: tasks of several chunks
        (2, 2, 2, 128, 768, 700, -1e30, "bfloat16"),  # 24 chunks a group: merged in batches of 16 and 8
        (1, 1, 1, 32, 1536, 100, -jnp.inf, "float16"),  # 48 chunks, all but 2 wholly masked
    ],
)
def test_split_attention_matches_jit(batch, kv_heads, group, head_dim, seq, pos, masked, dtype, rng, monkeypatch):
    _check_split_attention(batch, kv_heads, group, head_dim, seq, pos, masked, dtype, rng, monkeypatch)


def _check_split_attention(batch, kv_heads, group, head_dim, seq, pos, masked, dtype, rng, monkeypatch) -> Callable:
    """_attend through split attention against jax.jit; returns the megakernel."""
    monkeypatch.setenv("JAX_MPK_SPLIT_ATTENTION", "1")
    args = [random_array(rng, (batch, kv_heads, group, head_dim), dtype),
            random_array(rng, (batch, seq, kv_heads, head_dim), dtype),
            random_array(rng, (batch, seq, kv_heads, head_dim), dtype),
            random_array(rng, (kv_heads * group * head_dim, 256), dtype)]  # fmt: skip
    fn = functools.partial(_attend, masked=masked)
    with jax.default_matmul_precision("float32"):
        expected = jax.jit(fn)(*args, jnp.int32(pos))
    fast = jax_mpk.megakernelize(fn)
    actual = fast(*args, jnp.int32(pos))
    assert any(k.attention is not None for k in _plan(fast).graph.kernels)
    # the split form keeps the probabilities in float32 where the unsplit one rounds them to bf16 first
    assert_model_outputs_close(actual, expected, dtype)
    return fast


def test_gather_and_update(rng):
    table = random_array(rng, (50, 64), "bfloat16")
    cache = random_array(rng, (4, 16, 64), "bfloat16")

    def f(table, tokens, cache, pos):
        rows = table[tokens]
        return jax.lax.dynamic_update_slice(cache, rows[None], (1, pos, 0)), rows.sum()

    tokens = jnp.asarray([3, 49, 0], jnp.int32)
    check_against_jit(f, table, tokens, cache, jnp.int32(7), dtype="bfloat16")


@pytest.mark.parametrize("split_attention", ["0", "1"])
@pytest.mark.parametrize(
    "cfg",
    [TinyConfig(), TinyConfig(qk_norm=True, dtype="bfloat16", batch=2, max_seq=32)],
    ids=["llama-f32", "qwen3-bf16-b2"],
)
def test_decode_steps_match_jit(cfg, split_attention, monkeypatch):
    # split attention: its queries RoPE'd (and QK-normed) by a kernel beside the cache append, merged by the last task
    monkeypatch.setenv("JAX_MPK_SPLIT_ATTENTION", split_attention)
    fast = _check_decode_steps(cfg)
    # split attention reads two-byte keys and values only, in whole 16-key mma tiles (32 keys: 2 chunks of 16 or
    # one of 32): the float32 model keeps the two products
    assert ("attention::keys_in_chunks" in _plan(fast).source.text) == (split_attention == "1" and cfg.dtype != "float32")


@pytest.mark.parametrize("batch", [2, 8])
def test_batch_products_computing_their_rows_match_jit(batch, monkeypatch):
    """JAX_MPK_STAGE_SHARED_ROWS: the batch's RMSNorm and SwiGLU rows computed in the staging of the products
    that share a weight tile over them, all rows side by side (block_reduce_rows)."""
    monkeypatch.setenv("JAX_MPK_STAGE_SHARED_ROWS", "1")
    _check_decode_steps(TinyConfig(qk_norm=True, dtype="bfloat16", batch=batch))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("knob,value,marker,present", [
    ("JAX_MPK_WARP_RING", "0", "dot::columns_ring<", True),  # the block-wide ring, one barrier per slot
    ("JAX_MPK_STREAM_EVICT_FIRST", "0", "#define JAX_MPK_STREAM_EVICT_FIRST 0", True),  # L2's default policy
    ("JAX_MPK_ELEMENT_LOADS_FIRST", "0", "// JAX_MPK_ELEMENT_LOADS_FIRST", False),  # operations as written
    ("JAX_MPK_SHARED_CODE", "0", "#define JAX_MPK_SHARED_CODE 0", True),  # ring products inlined
    ("JAX_MPK_STATIC_TILES", "0", "#define JAX_MPK_STATIC_TILES 0", True),  # tile shapes read at run time
    ("JAX_MPK_VECTOR_PARTIALS", "0", "#define JAX_MPK_VECTOR_PARTIALS 0", True),  # partials stored, then summed
])  # fmt: skip
def test_decode_steps_with_codegen_knobs_match_jit(batch, knob, value, marker, present, monkeypatch):
    """The knobs codegen reads, set against their defaults (the warp ring and evict-first off, pointwise elements
    computing their operations in the order their expression reads, the ring products' code inlined into their
    variants, their tile shapes read at run time, the warp ring's partial sums stored and then summed by a quarter of
    its warps): the steps still agree with jax.jit (at batch 8 the bf16 products are on tensor cores: the
    warp ring's knob changes the float32 model's)."""
    monkeypatch.setenv(knob, value)
    cfg = TinyConfig(qk_norm=True, dtype="float32" if knob == "JAX_MPK_WARP_RING" else "bfloat16", batch=batch)
    fast = _check_decode_steps(cfg)
    assert (marker in _plan(fast).source.text) == present


@pytest.mark.parametrize("value", ["1", "0"])
def test_decode_step_staging_loads_first_on_and_off_matches_jit(monkeypatch, value):
    """JAX_MPK_STAGING_LOADS_FIRST (on by default): at batch 1 a product staging an RMSNorm computes the parts of
    its values that need no norm, loads included, before the norm's block reduction; 0 reduces first. A model wide
    enough that its norms are staged in the products (hidden 512; the default tiny model's are not); at batch 8 its
    rows are staged side by side, which the knob leaves alone."""
    monkeypatch.setenv("JAX_MPK_STAGING_LOADS_FIRST", value)
    cfg = TinyConfig(qk_norm=True, dtype="bfloat16", hidden=512, heads=8, kv_heads=4, head_dim=64, mlp=1024)
    fast = _check_decode_steps(cfg)
    assert ("// JAX_MPK_STAGING_LOADS_FIRST" in _plan(fast).source.text) == (value == "1")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("value", ["1", "0"])
def test_rows_loads_first_matches_jit(value, batch, monkeypatch):
    """JAX_MPK_ROWS_LOADS_FIRST (default 1): a rows kernel of at most 512 elements a row -- Qwen3's key append and
    queries, a per-head RMSNorm then RoPE -- loads its element's operands, both rotate-half pieces included, before
    the row's block reduction; 0 makes the norm's, the element's and the partner's round trips one after another.
    Heads of 128 (the default tiny model's 16-wide heads are not rendered as rows)."""
    monkeypatch.setenv("JAX_MPK_ROWS_LOADS_FIRST", value)
    cfg = TinyConfig(layers=1, hidden=1024, heads=16, kv_heads=8, head_dim=128, mlp=512, vocab=512, max_seq=1024,
                     batch=batch, dtype="bfloat16", qk_norm=True)  # fmt: skip
    fast = _check_decode_steps(cfg)
    assert ("// JAX_MPK_ROWS_LOADS_FIRST" in _plan(fast).source.text) == (value == "1")


@pytest.mark.parametrize("knobs", ["JAX_MPK_ATTENTION_WARPS", "JAX_MPK_SCORE_LOADS_FIRST",
                                   "JAX_MPK_ATTENTION_WARPS,JAX_MPK_SCORE_LOADS_FIRST"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_by_warps_matches_jit(head_dim, knobs, monkeypatch):
    """JAX_MPK_ATTENTION_WARPS=1 (batch-1 split attention by warps: attention.cuh's keys_by_warps) and
    JAX_MPK_SCORE_LOADS_FIRST=1 (the position's load at the task's start), alone and together; Llama's 64-wide heads
    (4 query rows a task) and Qwen3's 128-wide (2): five chained steps at positions 0-4 (all but a few keys of every
    chunk masked: warps of masked keys only) and one at 700, against jax.jit."""
    for knob in knobs.split(","):
        monkeypatch.setenv(knob, "1")
    cfg = TinyConfig(layers=2, hidden=2048 // (head_dim // 64), heads=2048 // head_dim, kv_heads=8, head_dim=head_dim,
                     mlp=512, vocab=512, max_seq=1024, dtype="bfloat16", qk_norm=head_dim == 128)  # fmt: skip
    fast = _check_decode_steps(cfg)
    assert ("attention::keys_by_warps<" in _plan(fast).source.text) == ("JAX_MPK_ATTENTION_WARPS" in knobs)
    params, cache = init_params(cfg, jax.random.PRNGKey(5)), init_cache(cfg, jax.random.PRNGKey(6))
    args = (params, random_tokens(cfg, 5), jnp.int32(700), *cache)
    with jax.default_matmul_precision("float32"):
        expected = jax.jit(make_decode_step(cfg))(*args)
    assert_model_outputs_close(fast(*args)[1:], expected[1:], cfg.dtype)


@pytest.mark.parametrize("batch,kv_heads,group,head_dim,seq,pos,masked,dtype", [
    (1, 8, 4, 64, 1024, 700, -1e30, "bfloat16"),  # Llama-3.2-1B's heads
    (2, 2, 2, 128, 384, 5, -jnp.inf, "bfloat16"),  # most chunks wholly masked with -inf
    (1, 4, 2, 128, 512, 300, -jnp.inf, "float16"),
])  # fmt: skip
def test_split_attention_by_warps_matches_jit(batch, kv_heads, group, head_dim, seq, pos, masked, dtype, rng,
                                              monkeypatch):
    """JAX_MPK_ATTENTION_WARPS=1 on attention alone, where its chunks are of at most 8 keys a warp: masked keys by
    -1e30 and by -inf (whole warps and chunks of them), bf16 and f16 caches."""
    monkeypatch.setenv("JAX_MPK_ATTENTION_WARPS", "1")
    fast = _check_split_attention(batch, kv_heads, group, head_dim, seq, pos, masked, dtype, rng, monkeypatch)
    assert "attention::keys_by_warps<" in _plan(fast).source.text


def _check_decode_steps(cfg: TinyConfig) -> Callable:
    """Five chained decode steps of ``cfg`` through the megakernel against jax.jit's; returns the megakernel."""
    params = init_params(cfg, jax.random.PRNGKey(11))
    cache_k, cache_v = init_cache(cfg, jax.random.PRNGKey(12))
    step = make_decode_step(cfg)
    fast = jax_mpk.megakernelize(step)

    def reference(*args):
        with jax.default_matmul_precision("float32"):
            return jax.jit(step)(*args)

    tokens = random_tokens(cfg, 11)
    ref_k, ref_v, k, v = cache_k, cache_v, cache_k, cache_v
    for pos in range(5):
        expected = reference(params, tokens, jnp.int32(pos), ref_k, ref_v)
        actual = fast(params, tokens, jnp.int32(pos), k, v)
        assert_model_outputs_close(actual[1:], expected[1:], cfg.dtype)
        tokens, ref_k, ref_v = expected[0], expected[2], expected[3]
        k, v = actual[2], actual[3]
    return fast


@pytest.mark.parametrize("split_attention,batch", [("0", 1), ("1", 1), ("0", 8)])
def test_llama_1b_shaped_layers_bf16(split_attention, batch, monkeypatch):
    """The query heads of a KV head share one pass over its keys (dot::rows_shared over a 64-wide head) and, at
    batch 8, over its values (the ring, started after the wait: the cache is written by the step), four rows per
    task (at batch 1 P.V takes a head per task: four would leave 100 of 132 SMs idle)."""
    monkeypatch.setenv("JAX_MPK_SPLIT_ATTENTION", split_attention)
    cfg = TinyConfig(layers=2, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=1024, batch=batch, dtype="bfloat16", theta=500000.0)  # fmt: skip
    params = init_params(cfg, jax.random.PRNGKey(3))
    cache = init_cache(cfg, jax.random.PRNGKey(4))
    step = make_decode_step(cfg)
    args = (params, random_tokens(cfg, 3), jnp.int32(700), *cache)
    with jax.default_matmul_precision("float32"):
        expected = jax.jit(step)(*args)
    fast = jax_mpk.megakernelize(step)
    actual = fast(*args)
    assert_model_outputs_close(actual[1:], expected[1:], cfg.dtype)
    text = _plan(fast).source.text
    assert ("attention::keys_in_chunks" in text) == (split_attention == "1")
    if split_attention == "0":
        assert "dot::rows_shared<__nv_bfloat16, 4>" in text
        assert ("streams while the rows are staged" in text) == (batch == 8)


def _entry_opcodes(hlo: str) -> list[str]:
    """Opcodes of the compiled HLO's entry computation (each fusion, copy or custom call is a launch)."""
    lines = hlo[hlo.index("\nENTRY") :].splitlines()[1:]
    opcodes = []
    for line in lines:
        if line.startswith("}"):
            break
        if " = " not in line:
            continue
        rest = line.split(" = ", 1)[1]
        if rest.startswith("("):  # tuple shape: skip to its closing parenthesis
            depth, i = 0, 0
            for i, ch in enumerate(rest):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    break
            rest = rest[i + 1 :].strip()
        else:
            rest = rest.split(" ", 1)[1]
        opcodes.append(rest.split("(", 1)[0])
    return opcodes


def test_profile_stamps_every_task_and_the_phases_of_products(rng, monkeypatch):
    """JAX_MPK_PROFILE: every task's [wait, start, end], and with phases=True the product bodies' own stamps
    (rows staged, product computed) in order between the start and the signal; the physical SM of every worker."""
    monkeypatch.setenv("JAX_MPK_PROFILE", "1")
    # (K under 1024: no split-K partials, whose sum would be a kernel of another kind)
    x, w = random_array(rng, (4, 512), "bfloat16"), random_array(rng, (512, 1024), "bfloat16")
    fn = lambda x, w: jnp.tanh(x @ w)  # noqa: E731
    mk = jax_mpk.compile(fn, x, w)
    times, stamps = mk.profile(x, w), mk.profile(x, w, phases=True)
    assert times.shape == (len(mk.tasks.tasks), 3) and stamps.shape == (len(mk.tasks.tasks), 6)
    assert np.nanmin(stamps) == 0 and not np.isnan(stamps).any()  # every task here is a product of the ring
    assert np.all(np.diff(stamps, axis=1) >= 0)
    # one CTA per SM: every worker on a different physical SM
    (sms,) = mk.profile_sms
    assert len(set(sms.tolist())) == mk.num_workers and sms.min() >= 0 and sms.max() < mk.device.core_count
    assert_model_outputs_close(mk(x, w), jax.jit(fn)(x, w), "bfloat16")


def test_one_launch_per_call():
    cfg = TinyConfig(layers=1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, jax.random.PRNGKey(1))
    fast = jax_mpk.megakernelize(make_decode_step(cfg), donate_argnums=(3, 4))
    compiled = jax.jit(fast, donate_argnums=(3, 4)).lower(params, random_tokens(cfg, 0), jnp.int32(0), *cache).compile()
    opcodes = _entry_opcodes(compiled.as_text())
    launches = [op for op in opcodes if op not in ("parameter", "tuple", "get-tuple-element", "constant", "bitcast")]
    assert launches == ["custom-call"], opcodes


def test_watchdog_raises_instead_of_hanging(monkeypatch):
    monkeypatch.setenv("JAX_MPK_WATCHDOG_S", "0.5")
    f = lambda x, w: jax.nn.relu(x @ w) @ w.T  # noqa: E731
    x, w = jnp.ones((1, 256)), jnp.ones((256, 512)) * 0.01
    mk = jax_mpk.compile(f, x, w)
    broken = copy.deepcopy(mk.tasks)
    next(t for t in broken.tasks if t.wait_event >= 0).wait_count += 1
    source = generate(broken, mk.schedule)
    mk.words = serialize(broken, mk.schedule)
    mk.key = plan_key(mk.words) + "broken"
    register_cuda_plan(
        mk.key, compile_cubin(source.text, mk.device.compute_capability), source.kernel_name,
        num_events=broken.num_events, threads=source.threads, smem_bytes=source.smem_bytes,
        arg_bytes=[x.nbytes, w.nbytes], ret_bytes=[4 * 256, max(mk.graph.workspace_bytes, 1)],
        num_ctas=mk.num_workers,
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(jax_mpk.DependencyTimeoutError, match="waited more than"):
        mk(x, w)
        mk.check_errors()
    assert time.monotonic() - start < 20
    # the state is reset: a correct plan still runs afterwards
    assert_trees_close(jax_mpk.megakernelize(f)(x, w), jax.jit(f)(x, w))


def test_warm_cache_loads_fast():
    f = lambda x: jnp.exp(x) * 2  # noqa: E731
    jax_mpk.compile(f, jnp.ones((7, 3)))
    start = time.monotonic()
    jax_mpk.compile(f, jnp.ones((7, 3)))
    assert time.monotonic() - start < 1.0
