"""The generated CUDA megakernel compiles with nvcc for sm_90a (no GPU needed; skipped without nvcc)."""

from __future__ import annotations

import gzip
import json
import math
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from tiny_models import TinyConfig, init_cache, init_params, make_decode_step

from jax_mpk.capture import capture
from jax_mpk.codegen import generate
from jax_mpk.dot_staging import shared_weight_dims
from jax_mpk.fusion import fuse
from jax_mpk.schedule import schedule
from jax_mpk.tasks import build_task_graph
from jax_mpk.target import SHARED_MEMORY_OPT_IN, Target
from jax_mpk.toolchain import compile_cubin
from jax_mpk.validate import validate

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit (nvcc)")
H100_SMS = 132


def _generate(fn, *avals, validate_graph=False, **target):
    graph = fuse(capture(jax.make_jaxpr(fn)(*avals)), Target("cuda", H100_SMS, **target))
    tasks = build_task_graph(graph, H100_SMS)
    sched = schedule(tasks, H100_SMS)
    if validate_graph:
        validate(tasks, sched)
    return tasks, generate(tasks, sched)


def _generate_decode_step(cfg: TinyConfig, validate_graph=False, **target):
    """``_generate`` of tiny_models' decode step at ``cfg``, on abstract weights and cache (no memory)."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: init_cache(cfg, jax.random.PRNGKey(1)))
    tokens, pos = jax.ShapeDtypeStruct((cfg.batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    return _generate(make_decode_step(cfg), params, tokens, pos, *cache, validate_graph=validate_graph, **target)


def test_llama_1b_shaped_decode_step_compiles(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256,
                     max_seq=1024, dtype="bfloat16", theta=500000.0)  # fmt: skip
    tasks, source = _generate_decode_step(cfg)
    # the 16 identical layers share their device functions
    assert source.num_variants <= 24, source.num_variants
    text = source.text
    # x @ W streams weight tiles through shared memory, each warp its part of a slot (JAX_MPK_WARP_RING)
    assert "dot::columns_warp_ring<__nv_bfloat16, 1" in text
    assert "dot::warp_ring_begin" in text  # ... whose first slots are issued before a task waits
    # scores: the four query heads of a KV head read its keys once (128 tasks); P @ V keeps them together only
    # while that leaves half the SMs busy (32 tasks would not): a head per task (test_query_heads_share_... at b8)
    assert "dot::rows_shared<__nv_bfloat16, 4>" in text and "dot::columns_ring_mma" not in text
    assert "dot::rows(" in text  # the tied LM head reads embedding rows
    assert "dot::prefetch_l2" in text  # ... asking L2 for their head before the task waits
    assert "block_reduce" in text  # norms and softmax reduce cooperatively per row
    # RoPE's rotate-half and cos/sin concatenations are computed piece by piece at clamped indices and selected:
    # no branch holds a load, so the loads of the key append are in flight together
    append = next(v for v in text.split("__device__ __noinline__ void ")[1:] if "ops::cos(" in v)
    assert "const index_t at" in append and "} else if (" not in append
    cubin = compile_cubin(text, "9.0")
    assert len(cubin) > 10_000


@pytest.mark.parametrize("variant", ["attention_chunk", "weight_stream", "chain_under_stream", "l2_stage", "icache",
                                     "product_body", "product_body:-DJAX_MPK_VECTOR_PARTIALS=1"])
def test_microbenchmarks_compile(variant, tmp_path):
    """benchmarks/micro/*.cu (attention.cuh, dot.cuh's weight ring, alone with their checks) build against the
    headers as they are, with the flags their header comment gives (and a variant's, as `gpu_session.sh micro`
    builds MICROS="name:-DFLAG=1")."""
    from jax_mpk.toolchain import nvcc

    name, _, extra = variant.partition(":")
    root = pathlib.Path(__file__).resolve().parents[1]
    source = root / "benchmarks" / "micro" / f"{name}.cu"
    flags = re.search(r"//   nvcc (.*?) \\\n//\s+(.*?) \\\n", source.read_text())
    assert flags, "the build command in the header comment"
    command = [nvcc(), *flags.group(1).split(), *flags.group(2).split(), *extra.split(), str(source), "-o",
               str(tmp_path / "bench")]
    command = [f"-I{root / 'ffi' / 'include'}" if c == "-I" else c for c in command if c != "ffi/include"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "bench").stat().st_size > 100_000


def test_experiment_trees_apply_to_this_tree():
    """scripts/ab_trees.py's measuring changes (session 17's landed and twice trees) still find the text they
    replace, once each: a change to dot.cuh or bodies/dot.py that moves it fails here, not on the GPU machine."""
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    try:
        import ab_trees
    finally:
        sys.path.remove(str(root / "scripts"))
    for name, changes in ab_trees.EXPERIMENTS.items():
        for relative, old, new in changes:
            assert (root / relative).read_text().count(old) == 1, (name, relative)
            assert old != new


@pytest.mark.parametrize("head_dim,batch,evict_first,warp_ring,loads_first,shared_code,static_tiles,staging_first",
                         [(64, 1, True, True, False, True, True, True), (128, 8, True, True, True, False, True, False),
                          (64, 1, False, False, True, True, False, False)])
def test_split_attention_decode_step_compiles(head_dim, batch, evict_first, warp_ring, loads_first, shared_code,
                                              static_tiles, staging_first):
    """attention.cuh instantiated by a decode step (Llama's 64-wide heads at batch 1 with their RoPE staged in one
    pass; Qwen3's 128-wide heads with QK-norm at batch 8), compiled for sm_90; also without the streams' L2
    evict-first policy (JAX_MPK_STREAM_EVICT_FIRST=0: plain copies and loads instead of cache-hinted ones) and the
    warp ring (JAX_MPK_WARP_RING=0: the b1 products' block-wide ring and dot), both on by default; with and
    without pointwise elements loading their operands before their arithmetic (JAX_MPK_ELEMENT_LOADS_FIRST, on by
    default); with and without the ring products' code shared by their variants (JAX_MPK_SHARED_CODE: dot.cuh's
    ring functions not inlined) and their tile shapes as template arguments (JAX_MPK_STATIC_TILES), both on by
    default; and with a normalized row's loads issued before its block reduction (JAX_MPK_STAGING_LOADS_FIRST)."""
    cfg = TinyConfig(layers=2, hidden=2048, heads=2048 // head_dim, kv_heads=8, head_dim=head_dim, mlp=4096,
                     vocab=4096, max_seq=1024, batch=batch, dtype="bfloat16", qk_norm=head_dim == 128)  # fmt: skip
    tasks, source = _generate_decode_step(cfg, validate_graph=True, split_attention=True,
                                          stream_evict_first=evict_first, warp_ring=warp_ring,
                                          element_loads_first=loads_first, shared_code=shared_code,
                                          static_tiles=static_tiles, staging_loads_first=staging_first)  # fmt: skip
    assert f"#define JAX_MPK_SHARED_CODE {int(shared_code)}" in source.text
    assert f"#define JAX_MPK_STATIC_TILES {int(static_tiles)}" in source.text
    # the norm before Q/K/V and the one before gate/up: their reductions after the loads of the values' pass
    assert (source.text.count("// JAX_MPK_STAGING_LOADS_FIRST") >= 2) == staging_first
    # the key append and the queries: RoPE's cos and sin after every load of the element (the split-K partials')
    marker = "// JAX_MPK_ELEMENT_LOADS_FIRST: the operands first, then the arithmetic"
    elements = [part.split("ops::store")[0] for part in source.text.split(marker)[1:]]
    roped = [e for e in elements if "ops::cos(" in e]
    assert (len(roped) >= 2) == loads_first
    assert all(e.rindex("ops::load") < min(e.index("ops::cos("), e.index("ops::sin(")) for e in roped)
    # the bodies' shared memory on a 128-byte boundary, whatever run_worker's static shared memory (codegen.py)
    assert "extern __shared__ __align__(128) char smem[];" in source.text
    assert source.smem_bytes <= SHARED_MEMORY_OPT_IN["9.0"]
    uses_warp_ring = warp_ring and batch == 1  # at batch 8 the products are on tensor cores (columns_ring_mma)
    assert ("dot::columns_warp_ring<" in source.text) == ("dot::warp_ring_begin<" in source.text) == uses_warp_ring
    if batch == 1:
        assert ("dot::columns_ring<" in source.text) != warp_ring
    assert f"#define JAX_MPK_STREAM_EVICT_FIRST {int(evict_first)}" in source.text
    text = source.text
    # the products of a read-only weight ask L2 for its head before they wait
    assert text[text.index("void prefetch(") : text.index("void run(")].count("case ") > 0
    assert f"attention::keys_in_chunks<__nv_bfloat16, {2048 // head_dim // 8}, {head_dim}," in source.text  # a task: the 4 or 2 query heads of a KV head
    # both layers' attention kernels are one variant: their merge counters are a parameter, not a number in the
    # text (a variant per layer doubled Llama-1B's compile time)
    assert source.text.count("attention::keys_in_chunks<") == 1
    assert len(compile_cubin(source.text, "9.0")) > 10_000


def _bits_and_special_functions(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    unit = jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(bits, jnp.uint32(9)) | jnp.uint32(0x3F800000),
                                        jnp.float32)  # fmt: skip
    ints = jax.lax.bitcast_convert_type(x, jnp.int32)
    return (unit - 1.0, jax.scipy.special.erfinv(unit - 1.5), jax.scipy.special.erfc(x),
            jax.lax.population_count(bits), jax.lax.shift_right_arithmetic(ints, jnp.int32(3)) << 2)  # fmt: skip


@pytest.mark.parametrize(
    "fn,shapes,dtype",
    [
        (lambda x, w: jnp.argmax(jax.nn.softmax(x @ w, axis=-1), axis=-1), [(3, 64), (64, 40)], "float32"),
        (lambda x: jnp.concatenate([jnp.sin(x), x[::-1].T.reshape(x.shape)], 0).sum(0), [(6, 6)], "float16"),
        (lambda x, i: jax.lax.dynamic_update_slice(x, x[:1] * 2, (i, 0)), [(5, 8), ()], "int32"),
        (lambda a, b: jnp.einsum("bij,bkj->bik", a, b), [(2, 5, 7), (2, 3, 7)], "bfloat16"),
        (lambda x: (jnp.all(x > 0, axis=1), jnp.where(x > 0, x, -x).min()), [(4, 9)], "float32"),
        (_bits_and_special_functions, [(3, 21)], "float32"),
        (lambda a, b: jnp.einsum("ikj,kl->ijl", a, b), [(5, 7, 3), (7, 4)], "int32"),  # a reduction, not dot::
    ],
)
def test_small_functions_compile(fn, shapes, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    avals = [jax.ShapeDtypeStruct(s, jnp.int32 if s == () else dtype) for s in shapes]
    tasks, source = _generate(fn, *avals, validate_graph=True)
    assert "kTasks[] = {" in source.text and len(tasks.tasks) >= 1
    assert dtype != "int32" or "dot::" not in source.text  # the float product bodies would round int32 sums
    compile_cubin(source.text, "9.0")


def test_sampling_over_a_vocabulary_compiles(tmp_path, monkeypatch):
    """temperature + top-k + top-p + categorical over Qwen3's 151,936 logits, with a key passed in."""
    from test_sampling import sample

    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    logits = jax.ShapeDtypeStruct((2, 151_936), jnp.float32)
    tasks, source = _generate(sample, logits, jax.ShapeDtypeStruct((2,), jnp.uint32), validate_graph=True)
    assert "ops::shift_right_logical" in source.text and "ops::bitcast_to_f32" in source.text
    compile_cubin(source.text, "9.0")


def test_profiling_build_compiles(tmp_path, monkeypatch):
    """A profiling build passes the stamps' buffer to the runtime, and product bodies stamp their phases (rows
    staged, product computed); a build without profiling renders no stamps."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    graph = fuse(capture(jax.make_jaxpr(lambda x, w: jnp.argmax(x @ w, -1))(
        jax.ShapeDtypeStruct((1, 64), jnp.float32), jax.ShapeDtypeStruct((64, 64), jnp.float32))))  # fmt: skip
    tasks = build_task_graph(graph, H100_SMS)
    source = generate(tasks, schedule(tasks, H100_SMS), profile_offset=256)
    assert "reinterpret_cast<uint64_t*>" in source.text
    assert "mark_phase(layout::kStampStaged);" in source.text and "mark_phase(layout::kStampComputed);" in source.text
    assert "mark_phase" not in generate(tasks, schedule(tasks, H100_SMS)).text
    compile_cubin(source.text, "9.0")


def test_batched_weight_products_share_the_weight_tile(tmp_path, monkeypatch):
    """At batch 8 a task multiplies all 8 rows with the weight tile it streams once (the rows stay whole
    in every tile), for a loaded and for a computed (RMSNorm) activation; bf16 rows times bf16 weights on
    tensor cores."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))

    def mlp(x, g, w1, w2):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g
        return x + jax.nn.silu(h @ w1) @ w2

    shapes = [(8, 2048), (2048,), (2048, 1024), (1024, 2048)]
    tasks, source = _generate(mlp, *[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes], validate_graph=True)
    for kernel, kernel_tasks in zip(tasks.kernels.kernels, tasks.tasks_by_kernel()):
        if kernel.dot is not None:
            rows = {t.hi[-2] - t.lo[-2] for t in kernel_tasks}
            assert rows == {8}, (kernel, rows)
    # both products on tensor cores (a call per tile width: one of them has two), none on CUDA cores
    assert source.text.count("dot::columns_ring_mma<__nv_bfloat16, 8") >= 2 and "dot::columns_warp_ring" not in source.text
    assert source.text.count("dot::ring_begin<__nv_bfloat16, true>") == 2  # the ring laid out for ldmatrix
    compile_cubin(source.text, "9.0")


def test_batch_rows_too_long_for_the_ring_are_split_along_k(tmp_path, monkeypatch):
    """Qwen3-8B's MLP and untied LM head at batch 8: 8 rows of K = 4096 or 12288 floats do not fit in shared
    memory beside the weight ring, and each row would stream the weight tile again. Fusion splits K until they
    fit (2048 for 8 rows), and the head's column tiles stay within the tensor-core dot's 512 columns even though
    that takes more than one task per SM: every product multiplies its 8 rows in one pass on tensor cores."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))

    def mlp_and_head(x, g, w_gate, w_up, w_down, w_head):
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g
        y = x + (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down
        return y @ w_head

    shapes = [(8, 4096), (4096,), (4096, 12288), (4096, 12288), (12288, 4096), (4096, 151936)]
    tasks, source = _generate(mlp_and_head, *[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes])
    products = [(k, kt) for k, kt in zip(tasks.kernels.kernels, tasks.tasks_by_kernel()) if k.dot is not None]
    assert len(products) == 4
    for kernel, kernel_tasks in products:
        assert kernel.dot.k_shape[0] <= 2048, (kernel.name, kernel.dot.k_shape)
        assert {t.hi[-2] - t.lo[-2] for t in kernel_tasks} == {8}
        assert max(t.hi[-1] - t.lo[-1] for t in kernel_tasks) <= 512
    head = max(products, key=lambda p: p[0].domain[-1])
    assert len(head[1]) > H100_SMS
    assert "dot::columns_ring_mma<__nv_bfloat16, 8" in source.text  # (gate and up share one device function)
    assert "dot::columns_vec(" not in source.text  # no row streams a weight tile on its own
    compile_cubin(source.text, "9.0")


def test_batch_products_computing_their_rows_compile(tmp_path, monkeypatch):
    """JAX_MPK_STAGE_SHARED_ROWS: at batch 8 the QKV, gate/up and down products of a Llama-1B-shaped step compute
    their 8 rows (RMSNorm, SwiGLU) in their staging, the rows side by side (their norms in one pass, one block
    reduction for the 8); the source fits the shared memory and compiles. (Their values: tests/test_fusion.py
    runs the same fusion on the CPU executor, tests/test_gpu.py the CUDA megakernel.)"""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=2, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=8192, max_seq=1024,
                     batch=8, dtype="bfloat16", theta=500000.0)  # fmt: skip
    tasks, source = _generate_decode_step(cfg, validate_graph=True, stage_shared_rows=True)
    computed = [k for k in tasks.kernels.kernels if k.dot is not None and k.dot.lhs_expr is not None
                and math.prod(k.domain[d] for d in shared_weight_dims(k)) == 8]  # fmt: skip
    assert len(computed) >= 2 * 3, [(k.name, k.domain) for k in computed]  # QKV (or fused), gate/up, down per layer
    assert "reduce::block_reduce_rows<reduce::Sum<float>, float, 8>" in source.text
    compile_cubin(source.text, "9.0")


@pytest.mark.parametrize("compute_capability", ["8.9", "8.0"])
def test_plans_for_other_architectures_fit_their_shared_memory(compute_capability, tmp_path, monkeypatch):
    """The bodies' shared-memory budget is the target's (99 KB a CTA on sm_89, 163 KB on sm_80, 227 KB on
    Hopper): a batch-8 Llama-shaped step planned for sm_89 streams its weights without the 128 KB ring (it needed
    219 KB, which an sm_89 GPU cannot launch), and compiles for that architecture."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=1, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=8192, max_seq=1024,
                     batch=8, dtype="bfloat16", theta=500000.0)  # fmt: skip
    target = Target("cuda", 84, compute_capability)
    _, hopper = _generate_decode_step(cfg)
    _, source = _generate_decode_step(cfg, compute_capability=compute_capability)
    assert source.smem_bytes <= target.shared_memory_bytes < hopper.smem_bytes
    compile_cubin(source.text, compute_capability)


def test_a_stacked_cache_append_spreads_its_heads_over_workers():
    """Qwen3's key append into a [layer, batch, position, head, dim] cache normalizes each head (a reduction of
    shape [batch, 1, heads] reached through a reshape, not a prefix of the update's domain): its tiles split the
    heads as a per-layer cache's do. It was one task (one SM, on the critical path of every layer). Each task
    reduces its head once with the whole block (the rows kind, the norm read at [batch, head] of the domain's
    rows): one thread per element summing the head's 128 squares of 4-8 split-K partials took 8 us a task on
    an H200."""

    def append(x, w, norm, cache):
        k = (x @ w).reshape(1, 1, 8, 128)
        k = k * jax.lax.rsqrt(jnp.mean(k * k, -1, keepdims=True) + 1e-6) * norm
        return jax.lax.dynamic_update_slice(cache, k[None], (1, 0, 5, 0, 0))

    shapes = [(1, 1024), (1024, 1024), (128,), (3, 1, 64, 8, 128)]
    tasks, source = _generate(append, *[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes], validate_graph=True)
    appends = [ts for k, ts in zip(tasks.kernels.kernels, tasks.tasks_by_kernel()) if k.dot is None]
    assert len(appends) == 1 and len(appends[0]) == 8, [len(ts) for ts in appends]
    assert "reduce::block_reduce<reduce::Sum<float>>" in source.text
    compile_cubin(source.text, "9.0")


@pytest.mark.parametrize("batch", [1, 8])
def test_rows_loads_first_issues_every_operand_before_the_norm(batch, tmp_path, monkeypatch):
    """JAX_MPK_ROWS_LOADS_FIRST (on by default): Qwen3's key append and queries (a per-head RMSNorm, then RoPE)
    load every operand of their element -- the split-K partials' sums, their rotate-half partner's at both pieces'
    clamped positions, the norm's weight, the position, the frequencies -- before the norm's block reduction, and
    select between the pieces without a branch: one memory round trip while the block reduces, where the knob's 0
    makes three (the fold's, then the element's, then the partner's inside the branch); both forms compile."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=1, hidden=1024, heads=16, kv_heads=8, head_dim=128, mlp=512, vocab=512, max_seq=1024,
                     batch=batch, dtype="bfloat16", qk_norm=True)  # fmt: skip
    _, three_trips = _generate_decode_step(cfg, split_attention=True, rows_loads_first=False)
    assert "JAX_MPK_ROWS_LOADS_FIRST" not in three_trips.text
    compile_cubin(three_trips.text, "9.0")
    _, source = _generate_decode_step(cfg, split_attention=True)
    bodies = [b for b in source.text.split("__device__ __noinline__") if "// JAX_MPK_ROWS_LOADS_FIRST" in b]
    roped = [b for b in bodies if "ops::cos(" in b and "reduce::block_reduce" in b]
    assert len(roped) >= 2, len(roped)  # the key append and the queries
    for body in roped:
        before, _, after = body.partition("reduce::block_reduce")
        assert "ops::load" not in after and " else if (" not in body, body
        assert before.index("ops::load_readonly<int32_t>") < before.index("#pragma unroll 1")  # the position
    compile_cubin(source.text, "9.0")


def test_vector_partials_knob_compiles(tmp_path, monkeypatch):
    """JAX_MPK_VECTOR_PARTIALS (on by default): codegen defines dot.cuh's macro of that name, so that the static
    one-row warp ring's partial sums go through shuffles and vector stores (its index arithmetic: the
    microbenchmark's host simulation); a batch-1 step with 128- and 256-wide tiles compiles with the knob's 0 (the
    default form compiles in every other codegen test)."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=1, hidden=1024, heads=16, kv_heads=8, head_dim=128, mlp=512, vocab=512, max_seq=1024,
                     batch=1, dtype="bfloat16", qk_norm=True)  # fmt: skip
    _, default = _generate_decode_step(cfg, split_attention=True)
    assert "#define JAX_MPK_VECTOR_PARTIALS 1" in default.text and "dot::columns_warp_ring" in default.text
    _, stored = _generate_decode_step(cfg, split_attention=True, vector_partials=False)
    assert "#define JAX_MPK_VECTOR_PARTIALS 0" in stored.text
    compile_cubin(stored.text, "9.0")


def _attention_variant(text: str) -> str:
    variants = [v for v in text.split("__device__ __noinline__") if "attention::keys_" in v]
    assert len(variants) == 1  # the layers share one
    return variants[0]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_warps_knob_renders_keys_by_warps_at_batch_1(head_dim, tmp_path, monkeypatch):
    """JAX_MPK_ATTENTION_WARPS (measuring, off by default): batch-1 split attention (64-key chunks: 4 keys a warp)
    runs attention.cuh's keys_by_warps, which stages the queries (the `stage` it is given) once it has issued its
    first keys' loads. Batch 8's chunks (16 keys a warp and more) keep keys_in_chunks. Llama's 64-wide heads (4
    query rows a task) and Qwen3's 128-wide (2 rows)."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    for batch in (1, 8):
        cfg = TinyConfig(layers=2, hidden=2048 // (head_dim // 64), heads=2048 // head_dim, kv_heads=8,
                         head_dim=head_dim, mlp=512, vocab=512, max_seq=1024, batch=batch, dtype="bfloat16",
                         qk_norm=head_dim == 128)  # fmt: skip
        _, default = _generate_decode_step(cfg, split_attention=True)
        assert "keys_by_warps" not in default.text
        _, source = _generate_decode_step(cfg, split_attention=True, attention_warps=True)
        body = _attention_variant(source.text)
        if batch == 8:
            assert "attention::keys_in_chunks<" in body
            continue
        assert "attention::keys_by_warps<" in body and body.rstrip().count("score, store, stage);") == 1
        assert body.index("auto stage = [&]() {") < body.index("dot::stage_rows<") < body.index("auto score")
        compile_cubin(source.text, "9.0")


@pytest.mark.parametrize("batch", [1, 8])
def test_score_loads_first_issues_the_position_at_the_tasks_start(batch, tmp_path, monkeypatch):
    """JAX_MPK_SCORE_LOADS_FIRST (measuring, off by default): a split-attention task's score reads the position (its
    mask); the knob issues that load at the body's start, in flight while the queries are staged, where by default
    it waits until after the scores' products (an L2 round trip at the end of the chain); with either body."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=2, hidden=1024, heads=16, kv_heads=8, head_dim=128, mlp=512, vocab=512, max_seq=1024,
                     batch=batch, dtype="bfloat16", qk_norm=True)  # fmt: skip
    position = r"const int32_t (x\d+) = ops::load_readonly<int32_t>\(b\d+, 0\);"
    _, default = _generate_decode_step(cfg, split_attention=True)
    score = _attention_variant(default.text).split("auto score", 1)[1].split("auto store", 1)[0]
    assert re.search(position, score)  # by default inside the score
    for warps in (False, True):
        _, source = _generate_decode_step(cfg, split_attention=True, score_loads_first=True, attention_warps=warps)
        body = _attention_variant(source.text)
        first = re.search(position, body)
        assert first is not None and body.index(first.group(0)) < body.index("dot::stage_rows<")
        score = body[body.index("auto score") : body.index("auto store")]
        assert "ops::load" not in score and f"ops::le(v8, {first.group(1)})" in score
        compile_cubin(source.text, "9.0")


def test_pointwise_tasks_hold_one_element_a_thread():
    """A kernel without products or row reductions gets a task per 512 elements (a block's threads) even when its
    work would fit one task: a thread's second element waits for its first one's loads. Llama-1B's queries
    (RoPE of 32 heads x 64 from 4 split-K partials) were 3 tasks of ~683 elements."""

    def queries(parts, cos, sin):
        q = parts.sum(0).reshape(32, 64)
        rotated = jnp.concatenate([-q[:, 32:], q[:, :32]], axis=-1)
        return q * cos + rotated * sin

    shapes = [(4, 2048), (32, 64), (32, 64)]
    tasks, _ = _generate(queries, *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    (kernel_tasks,) = tasks.tasks_by_kernel()
    assert len(kernel_tasks) == 4, len(kernel_tasks)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x: jnp.swapaxes(x, 0, 1) * jax.lax.rsqrt(jnp.mean(x * x, -1)).T[..., None], (4, 3, 512)),
        (lambda x: (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True)))[None], (3, 512)),
    ],
    ids=["permuted_rows", "after_a_unit_dim"],
)
def test_row_reductions_read_at_other_rows_are_reduced_once_per_row(fn, shape):
    """A norm read at the rows in another order, or past a leading dim of size 1 (as the stacked cache append's
    per-head norm): the rows kind finds where it is read and reduces it once per row with the block, instead of
    every thread folding the whole row for its own element (the flat form)."""
    _, source = _generate(fn, jax.ShapeDtypeStruct(shape, jnp.float32), validate_graph=True)
    assert "reduce::block_reduce<reduce::Sum<float>>" in source.text
    compile_cubin(source.text, "9.0")


@pytest.mark.parametrize(
    "shapes,dtypes,dot",
    [
        ([(8, 256), (256, 512)], ("float32", "float32"), "dot::columns_warp_ring<float, 8"),  # no f32 tensor cores
        ([(8, 256), (256, 512)], ("float32", "bfloat16"), "dot::columns_warp_ring<__nv_bfloat16, 8"),  # f32 rows
        ([(3, 256), (256, 512)], ("float16", "float16"), "dot::columns_ring_mma<__half, 3"),
    ],
)
def test_tensor_core_rows_only_where_exact(shapes, dtypes, dot, tmp_path, monkeypatch):
    """The tensor-core ring takes rows whose values are the weight's type (their conversion is exact); float32
    weights or rows stay on a CUDA-core ring (the warp ring: JAX_MPK_WARP_RING)."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    avals = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes)]
    _, source = _generate(lambda x, w: jnp.tanh(jnp.dot(x, w, preferred_element_type=jnp.float32)), *avals)
    assert dot in source.text
    compile_cubin(source.text, "9.0")


def test_query_heads_share_their_kv_heads_pass(tmp_path, monkeypatch):
    """Llama-1B's attention at batch 8: the four query heads of a KV head stay in one task (tiles keep the dims
    that do not index the cache whole), which reads their keys once (dot::rows_shared over the 64-wide head:
    rows_short) and their values once (the ring, started in the body after the wait, since the step's own
    append writes the cache), the four rows staged side by side."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=1, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=512, vocab=512, max_seq=1024,
                     batch=8, dtype="bfloat16", theta=500000.0)  # fmt: skip
    tasks, source = _generate_decode_step(cfg)
    for kernel, kernel_tasks in zip(tasks.kernels.kernels, tasks.tasks_by_kernel()):
        if kernel.dot is not None and len(kernel.domain) == 5:  # scores [b, kv, 1, q, keys], P.V [b, kv, q, 1, d]
            assert {math.prod(t.hi[d] - t.lo[d] for d in range(4)) for t in kernel_tasks} == {4}, kernel
    assert "dot::rows_shared<__nv_bfloat16, 4>" in source.text
    assert "dot::columns_ring_mma<__nv_bfloat16, 4" in source.text  # P.V on tensor cores
    assert source.text.count("streams while the rows are staged") == 1
    assert "reduce::block_reduce_rows<reduce::Max<float>, float, 4>" in source.text  # the softmax rows together
    compile_cubin(source.text, "9.0")


@pytest.mark.parametrize("batch,group", [(8, 4), (1, 2)])
def test_softmax_passes_issue_their_loads_before_computing(batch, group, tmp_path, monkeypatch):
    """P.V's softmax staged by each task: in each of its three passes (max, sum, the staged row) a loop of loads
    alone fills a register array for the group, before any value, fold or division is computed -- the four
    rows side by side at batch 8, a thread's two positions of the one row at batch 1. (A branch between two
    loads kept the second waiting for the first: 24 serial L2 round trips a task at batch 8, 6 at batch 1.)
    At batch 1 the staged row's values that need no reduction (the scaled, masked scores) are computed before
    the first pass (JAX_MPK_STAGING_LOADS_FIRST, on by default), with nothing that needs the max or the sum."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    cfg = TinyConfig(layers=1, hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=512, vocab=512, max_seq=1024,
                     batch=batch, dtype="bfloat16", theta=500000.0)  # fmt: skip
    _, source = _generate_decode_step(cfg)
    body = next(b for b in source.text.split("__device__ __noinline__") if "reduce::Max<float>::combine" in b)
    passes = body.split("reduce::block_reduce")
    assert len(passes) == 3  # max, sum, then the pass that stages the row(s)
    computing = r"ops::(exp|div|sub|mul)\(|::combine\("
    early, marker, passes[0] = passes[0].rpartition("// JAX_MPK_STAGING_LOADS_FIRST")
    assert bool(marker) == (batch == 1)
    if marker:
        assert "ops::load<__nv_bfloat16>" in early and "ops::mul(" in early  # the scaled scores
        assert not re.search(r"ops::(exp|div|sub)\(|::combine\(", early), early
        # the staged row's pass loads nothing more: it reads the early values
        assert "ops::load" not in passes[2] and re.search(r"ops::sub\(pre\d+\[u\]", passes[2]), passes[2]
        passes = passes[:2]
    for code in passes:
        arrays = re.search(rf"float pre\d+\[{group}\];", code)  # the loads' loop: its arrays to their last fill
        assert arrays, code
        fills = list(re.finditer(r"pre\d+\[(row|u)\] = \w+;", code))
        preloading = code[arrays.start() : fills[-1].end()]
        assert "ops::load<__nv_bfloat16>" in preloading  # the scores
        assert not re.search(computing, preloading), preloading
        assert re.search(computing, code[fills[-1].end() :])
    compile_cubin(source.text, "9.0")


def test_batched_tied_head_reads_each_embedding_row_once(tmp_path, monkeypatch):
    """x @ E.T at batch 8 (a tied LM head): each task multiplies all 8 rows with the embedding rows it reads."""
    monkeypatch.setenv("JAX_MPK_CACHE_DIR", str(tmp_path))
    shapes = [(8, 2048), (32000, 2048)]
    tasks, source = _generate(lambda x, e: x @ e.T, *[jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes])
    assert "dot::rows_shared<__nv_bfloat16, 8>" in source.text
    assert "dot::prefetch_l2" in source.text
    compile_cubin(source.text, "9.0")


def test_register_report_of_a_decode_step(tmp_path):
    """benchmarks/registers.py on a tiny model: ptxas's report parsed into the kernel's registers (within the
    512-thread budget of 128), its stack and spills, and the spilling variants with their kernels; files written."""
    root = pathlib.Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "registers.py"), "--models", "llama-tiny", "--batch", "2",
               "--ctx", "64", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "registers_sm90.json").read_text())
    (row,) = report["results"]
    assert 16 <= row["registers"] <= 128 and row["stack_bytes"] >= 0 and row["spill_store_bytes"] >= 0
    assert all(v["kernels"] for v in row["spilling_variants"])
    assert "| llama-tiny | 2 |" in (tmp_path / "registers_sm90.md").read_text()


def test_a_knob_that_only_codegen_reads_gives_another_plan_key(monkeypatch):
    """The extension keeps one loaded kernel per plan key: a variant that differs only in its generated source
    (JAX_MPK_STREAM_EVICT_FIRST) must not share the default's key, or a same-process A/B times one kernel twice."""
    from jax_mpk import config
    from jax_mpk.api import plan_stages

    closed = jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w))(jnp.ones((1, 256)), jnp.ones((256, 512)))
    plans = []
    for flag in ("1", "0"):
        monkeypatch.setenv("JAX_MPK_STREAM_EVICT_FIRST", flag)
        knobs = config.load()
        plans.append(plan_stages(closed, None, Target.cuda(H100_SMS, "9.0", knobs), knobs).plan)
    assert (plans[0].words == plans[1].words).all() and plans[0].source.text != plans[1].source.text
    assert plans[0].key != plans[1].key


def test_ncu_summary_splits_a_session_export_at_its_clock_reads():
    """scripts/ncu_summary.py on session 18's ncu export of product_body (the first three products): a region
    between clock reads per timed phase, the product's own region holding most of its samples."""
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    try:
        import ncu_summary
    finally:
        sys.path.remove(str(root / "scripts"))
    export = root / "benchmarks/results/session18/ncu_product_body/sass_product_body_76f0925.csv.gz"
    kernels = ncu_summary.read_kernels(gzip.decompress(export.read_bytes()).decode())
    assert len(kernels) == 3 and all(name.startswith("void product<") for name in kernels)
    for instructions in kernels.values():
        total = sum(i.samples for i in instructions)
        timed = ncu_summary.regions(instructions)[0][2]  # from the clock read before the product to the one after
        assert sum(i.samples for i in timed) > total / 2
        assert any("BAR.SYNC" in i.text for i in timed)
    assert "region" in ncu_summary.summarize(kernels, top=5)
