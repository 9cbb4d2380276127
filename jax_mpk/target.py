"""Where a plan runs, made once from the device and passed down the pipeline.

The target-neutral stages (capture, the core of fusion, tiling, scheduling) need only its worker count; the GPU
rewrites of fusion run as the target's list of named passes (``fusion_passes``), after the neutral part. A CPU
target can ask for them too (``gpu_fusion``, knob ``JAX_MPK_GPU_FUSION``): the CPU executor then runs the plan as
a GPU of ``num_workers`` SMs would be fused and tiled, so that CI checks the GPU fusion's semantics without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """The CPU executor with ``num_workers`` threads, or a CUDA megakernel with one worker per SM of a GPU of
    ``compute_capability`` (``"9.0"``: Hopper)."""

    platform: str  # "cpu" or "cuda"
    num_workers: int
    compute_capability: str | None = None
    # CUDA: attention as one kernel split along its keys (JAX_MPK_SPLIT_ATTENTION; not yet faster, so off)
    split_attention: bool = False
    # GPU fusion: products whose tasks share a weight tile over several rows (batch > 1) also compute those rows
    # in their staging (JAX_MPK_STAGE_SHARED_ROWS; off until measured)
    stage_shared_rows: bool = False
    # CPU, testing: fused and tiled as for a GPU (its passes, split-K products, epilogue rules), but for the
    # split attention, which only the CUDA megakernel runs
    gpu_fusion: bool = False

    def __post_init__(self) -> None:
        assert not (self.split_attention and self.platform != "cuda"), "split attention runs on CUDA only"

    @property
    def fuses_for_gpu(self) -> bool:
        return self.platform == "cuda" or self.gpu_fusion

    @property
    def fusion_passes(self) -> tuple[str, ...]:
        """The rewrites fusion applies after its target-neutral part, in order (fusion.PASSES names them)."""
        if not self.fuses_for_gpu:
            return ()
        return ("rows_in_dot_staging",) + (("split_attention",) if self.split_attention else ())
