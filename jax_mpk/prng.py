"""jax.random inside a step: key primitives become the key's uint32 data and the threefry hash.

A typed key (``key<fry>[...]``) is carried through the op graph as its data, ``uint32[..., 2]``;
``random_wrap``/``random_unwrap`` change nothing, and ``random_bits``, ``random_split`` and
``random_fold_in`` are replaced by the jaxpr of the key's own implementation (JAX's ``PRNGImpl``) on that data,
which capture inlines. That jaxpr calls ``threefry2x32`` and ``iota_2x32_shape``, which ``lowering`` turns into
scalar ops; so the bits are those ``jax.jit`` draws, for the same key.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .errors import UnsupportedPrimitiveError
from .graph import Elementwise, Node
from .layout import NodeOp
from .lowering import broadcast_to, const, rule

# primitives whose result is their operand's data unchanged
PASS_THROUGH = ("random_wrap", "random_unwrap")


def is_key(aval) -> bool:
    return jax.dtypes.issubdtype(getattr(aval, "dtype", None), jax.dtypes.prng_key)


def expansion(eqn, source: str):
    """The ClosedJaxpr computing ``eqn`` (random_bits, random_split, random_fold_in) on key data, or None for
    other primitives."""
    name = eqn.primitive.name
    if name not in ("random_bits", "random_split", "random_fold_in"):
        return None
    key_aval = eqn.invars[0].aval
    if key_aval.shape != ():
        raise UnsupportedPrimitiveError(name, source, f"an array of keys {key_aval.str_short()}: jax_mpk samples "
                                        "with one key at a time (split it, or vmap outside the step)")  # fmt: skip
    impl = key_aval.dtype._impl
    data = jax.ShapeDtypeStruct(tuple(impl.key_shape), jnp.uint32)
    params = eqn.params
    if name == "random_bits":
        return jax.make_jaxpr(lambda k: impl.random_bits(k, params["bit_width"], params["shape"]))(data)
    if name == "random_split":
        return jax.make_jaxpr(lambda k: impl.split(k, params["shape"]))(data)
    message = eqn.invars[1].aval
    return jax.make_jaxpr(impl.fold_in)(data, jax.ShapeDtypeStruct(message.shape, message.dtype))


# ------------------------------------------------------------------------------------------------ random
# What jax.random's threefry keys expand to (see prng.py): the Threefry-2x32 hash (20 rounds, Salmon et al.
# 2011, as jax._src.random.threefry2x32 computes it) and the 64-bit counters it hashes, as uint32 scalar ops.

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _u32(op: str, *xs: Node, shape) -> Node:
    children = tuple(broadcast_to(x, shape) for x in xs)
    return Elementwise(shape=shape, dtype=np.dtype(np.uint32), children=children, op=NodeOp[op])


@rule("threefry2x32")
def _threefry2x32(ctx, key1, key2, x1, x2, **_):
    shape = ctx.out_shape

    def add(a, b):
        return _u32("ADD", a, b, shape=shape)

    def u32(value):
        return const(value, np.uint32, source=ctx.source)

    def rotate_left(v, r):
        return _u32("OR", _u32("SHIFT_LEFT", v, u32(r), shape=shape), _u32("SHIFT_RIGHT_LOGICAL", v, u32(32 - r),
                                                                           shape=shape), shape=shape)  # fmt: skip

    ks = [key1, key2, _u32("XOR", _u32("XOR", key1, key2, shape=key1.shape), u32(0x1BD11BDA), shape=key1.shape)]
    x = [add(x1, ks[0]), add(x2, ks[1])]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x[0] = add(x[0], x[1])
            x[1] = _u32("XOR", x[0], rotate_left(x[1], r), shape=shape)
        x = [add(x[0], ks[(i + 1) % 3]), add(add(x[1], ks[(i + 2) % 3]), u32(i + 1))]
    return x


@rule("iota_2x32_shape")
def _iota_2x32_shape(ctx, *, shape, **_):
    """The row-major position of each element as a 64-bit count in two uint32 words (high, low)."""
    shape = tuple(shape)
    if math.prod(shape) >= 1 << 32:
        raise ctx.unsupported(f"{math.prod(shape)} counters: jax_mpk draws fewer than 2^32 values at once")
    u32 = np.dtype(np.uint32)
    low = const(0, u32, shape)
    for d in range(len(shape)):
        iota = Elementwise(shape=shape, dtype=u32, op=NodeOp.IOTA, params=(d,), source=ctx.source)
        stride = const(math.prod(shape[d + 1 :]), u32, shape)
        low = _u32("ADD", low, _u32("MUL", iota, stride, shape=shape), shape=shape)
    return [const(0, u32, shape, source=ctx.source), low]
