"""Where a plan runs, made once from the device and passed down the pipeline.

The target-neutral stages (capture, the core of fusion, tiling, scheduling) need only its worker count; the GPU
rewrites of fusion run as the target's list of named passes (``fusion_passes``), after the neutral part.
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

    @property
    def is_gpu(self) -> bool:
        return self.platform == "cuda"

    @property
    def fusion_passes(self) -> tuple[str, ...]:
        """The rewrites fusion applies after its target-neutral part, in order (fusion.PASSES names them)."""
        if not self.is_gpu:
            return ()
        return ("rows_in_dot_staging",) + (("split_attention",) if self.split_attention else ())
