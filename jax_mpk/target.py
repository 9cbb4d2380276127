"""Where a plan runs, made once from the device and passed down the pipeline.

The target-neutral stages (capture, the core of fusion, tiling, scheduling) need only its worker count; the GPU
rewrites of fusion run as the target's list of named passes (``fusion_passes``), after the neutral part. A CPU
target can ask for them too (``gpu_fusion``, knob ``JAX_MPK_GPU_FUSION``): the CPU executor then runs the plan as
a GPU of ``num_workers`` SMs would be fused and tiled, so that CI checks the GPU fusion's semantics without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dynamic shared memory one CTA may opt in to, by compute capability (CUDA C++ Programming Guide, technical
# specifications per compute capability): the budget of every task body. The megakernel runs one CTA of
# ``emit.THREADS`` threads per SM (``__launch_bounds__(THREADS, 1)``), which leaves 65536 / THREADS = 128
# registers a thread on every architecture listed; the runtime checks the device's own limits before it launches.
SHARED_MEMORY_OPT_IN = {
    "8.0": 163 * 1024, "8.6": 99 * 1024, "8.7": 163 * 1024, "8.9": 99 * 1024, "9.0": 227 * 1024,
    "10.0": 227 * 1024, "12.0": 99 * 1024,
}  # fmt: skip
# What plans made without a device are made for (the cuda-plan fuzz platform, the codegen tests): Hopper.
DEFAULT_COMPUTE_CAPABILITY = "9.0"


@dataclass(frozen=True)
class Target:
    """The CPU executor with ``num_workers`` threads, or a CUDA megakernel with one worker per SM of a GPU of
    ``compute_capability`` (``"9.0"``: Hopper)."""

    platform: str  # "cpu" or "cuda"
    num_workers: int
    compute_capability: str | None = None
    # CUDA: attention as one kernel split along its keys (JAX_MPK_SPLIT_ATTENTION, which defaults to on)
    split_attention: bool = False
    # GPU fusion: products whose tasks share a weight tile over several rows (batch > 1) also compute those rows
    # in their staging (JAX_MPK_STAGE_SHARED_ROWS; off until it measures faster)
    stage_shared_rows: bool = False
    # ... only the rows that need no reduction (a SwiGLU), the norms still stored (JAX_MPK_STAGE_SHARED_POINTWISE,
    # which defaults to on)
    stage_shared_pointwise: bool = True
    # Several devices: every rank's communication buffer keeps a copy of every rank's slot (a slot's writer stores
    # into all of them; readers read their own, so a product may stage its rows from a psum); else slot r is
    # only in rank r's buffer and read from there element by element (JAX_MPK_COMM_COPIES; off until it is
    # measured on two GPUs)
    comm_copies: bool = False
    # CUDA: weight and KV-cache streams carry an L2 evict-first policy (JAX_MPK_STREAM_EVICT_FIRST, which defaults
    # to on: faster on an H200 in every model and batch measured but Qwen3-8B b1, +0.6%)
    stream_evict_first: bool = True
    # CUDA: the CUDA-core ring products stream through the warp ring, each warp's part of a slot private to it
    # (JAX_MPK_WARP_RING, which defaults to on: on an H200 Qwen3-8B b1 -0.9%, Llama-1B b1 -1.1%, b8 unchanged)
    warp_ring: bool = True
    # CUDA: a pointwise element's operands before its arithmetic (JAX_MPK_ELEMENT_LOADS_FIRST, which defaults to
    # on: on an H200 -0.4 to -0.8% at Llama-1B b1, Qwen3-0.6B b1 and b8, Llama-1B b8 unchanged)
    element_loads_first: bool = True
    # CUDA: the ring products' code shared by their variants (JAX_MPK_SHARED_CODE, which defaults to on: nvcc about
    # twice as fast, the step's time unchanged on an H200)
    shared_code: bool = True
    # CUDA: the ring products' tile shapes as template arguments (JAX_MPK_STATIC_TILES, which defaults to on)
    static_tiles: bool = True
    # CUDA: a normalized row's loads issued before its block reduction (JAX_MPK_STAGING_LOADS_FIRST, which
    # defaults to on)
    staging_loads_first: bool = True
    # CUDA: a rows kernel's element operands before its row's block reduction (JAX_MPK_ROWS_LOADS_FIRST, which
    # defaults to on)
    rows_loads_first: bool = True
    # CUDA: the one-row warp ring's partial sums by shuffles and vector stores (JAX_MPK_VECTOR_PARTIALS, which
    # defaults to on)
    vector_partials: bool = True
    # CUDA, measuring: batch-1 split attention by warps (attention.cuh's keys_by_warps; JAX_MPK_ATTENTION_WARPS)
    attention_warps: bool = False
    # CUDA, measuring: split attention's scalar score loads at the task's start (JAX_MPK_SCORE_LOADS_FIRST)
    score_loads_first: bool = False
    # CPU, testing: fused and tiled as for a GPU (its passes, split-K products, epilogue rules), but for the
    # split attention, which only the CUDA megakernel runs
    gpu_fusion: bool = False

    def __post_init__(self) -> None:
        assert not (self.split_attention and self.platform != "cuda"), "split attention runs on CUDA only"

    @staticmethod
    def cuda(num_workers: int, compute_capability: str, knobs) -> Target:
        """The CUDA megakernel's target for a GPU of ``num_workers`` SMs, with the GPU knobs of ``knobs`` (a
        config.Config): what megakernelize plans for, and so what any planning on its behalf must use."""
        return Target("cuda", num_workers, compute_capability, split_attention=knobs.split_attention,
                      stage_shared_rows=knobs.stage_shared_rows, stage_shared_pointwise=knobs.stage_shared_pointwise,
                      comm_copies=knobs.comm_copies, stream_evict_first=knobs.stream_evict_first,
                      warp_ring=knobs.warp_ring,
                      element_loads_first=knobs.element_loads_first, shared_code=knobs.shared_code,
                      static_tiles=knobs.static_tiles, staging_loads_first=knobs.staging_loads_first,
                      rows_loads_first=knobs.rows_loads_first, vector_partials=knobs.vector_partials,
                      attention_warps=knobs.attention_warps, score_loads_first=knobs.score_loads_first)  # fmt: skip

    @property
    def shared_memory_bytes(self) -> int:
        """The shared memory a task body may use: the architecture's opt-in limit (the smallest listed one for
        an architecture not listed)."""
        return SHARED_MEMORY_OPT_IN.get(self.compute_capability or DEFAULT_COMPUTE_CAPABILITY,
                                        min(SHARED_MEMORY_OPT_IN.values()))  # fmt: skip

    @property
    def fuses_for_gpu(self) -> bool:
        return self.platform == "cuda" or self.gpu_fusion

    @property
    def fusion_passes(self) -> tuple[str, ...]:
        """The rewrites fusion applies after its target-neutral part, in order (fusion.PASSES names them)."""
        if not self.fuses_for_gpu:
            return ()
        return ("rows_in_dot_staging",) + (("split_attention",) if self.split_attention else ())
