"""Task-body kinds: how the CUDA megakernel runs a kind of kernel. Each kind is a module with
``render(body) -> (text, pointer parameters, shared memory bytes, prefetch renderer) | None`` (None: not this kind's
kernel) over an :class:`jax_mpk.emit.KernelBody`, paired with a header under ``ffi/include/jax_mpk/tasks/``. The
kinds are tried in order; ``flat`` takes any kernel.

Not yet per kind: tiling (``tasks.tile_domain`` special-cases products and split attention) and a resources
declaration that tiling could read (each kind computes its shared memory while it renders).
"""

from __future__ import annotations

from ..emit import KernelBody
from . import attention, dot, flat, rows

KINDS = (attention, dot, rows, flat)
# the headers every generated source includes, in this order (their kinds' device code, and what all use)
HEADERS = ("dot", "attention", "elementwise", "reduce")


def render(body: KernelBody):
    for kind in KINDS:
        rendered = kind.render(body)
        if rendered is not None:
            return rendered
    raise AssertionError("the flat kind takes every kernel")
