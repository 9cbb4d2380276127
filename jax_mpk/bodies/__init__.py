"""Task-body kinds: how the CUDA megakernel runs a kind of kernel. Each kind is a module with
``tiling(kernel) -> Tiling | None``, how it wants the kernels it may take cut into tasks (None: no rule of its own
for this kernel), and
``render(body) -> (text, shared memory bytes, prefetch renderer) | None`` (None: not this kind's kernel; the
body's parameters are ``KernelBody.arguments``) over an :class:`jax_mpk.emit.KernelBody`, paired with a header under ``ffi/include/jax_mpk/tasks/``. The
kinds are tried in order; ``flat`` takes any kernel. A kind can still decline a kernel it tiled when it renders
(a product whose operands have no linear layout renders as ``flat``, tiled as a product).

Not yet per kind: a resources declaration that tiling could read (each kind computes its shared memory while it
renders).
"""

from __future__ import annotations

from ..emit import KernelBody, Tiling
from ..kernels import Kernel
from . import attention, dot, flat, rows

KINDS = (attention, dot, rows, flat)
# the headers every generated source includes, in this order (their kinds' device code, and what all use)
HEADERS = ("dot", "attention", "elementwise", "reduce")


def tiling(kernel: Kernel) -> Tiling:
    for kind in KINDS:
        rule = kind.tiling(kernel)
        if rule is not None:
            return rule
    raise AssertionError("the flat kind tiles every kernel")


def render(body: KernelBody):
    for kind in KINDS:
        rendered = kind.render(body)
        if rendered is not None:
            return rendered
    raise AssertionError("the flat kind takes every kernel")
