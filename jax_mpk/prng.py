"""jax.random inside a step: key primitives become the key's uint32 data and the threefry hash.

A typed key (``key<fry>[...]``) is carried through the op graph as its data, ``uint32[..., 2]``;
``random_wrap``/``random_unwrap`` change nothing, and ``random_bits``, ``random_split`` and
``random_fold_in`` are replaced by the jaxpr of the key's own implementation (JAX's ``PRNGImpl``) on that data,
which capture inlines. That jaxpr calls ``threefry2x32`` and ``iota_2x32_shape``, which ``lowering`` turns into
scalar ops; so the bits are those ``jax.jit`` draws, for the same key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import UnsupportedPrimitiveError

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
