"""Each supported primitive, alone, equals jax.jit on fresh random inputs of awkward shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mpk
from conftest import check_against_jit, random_array

SHAPES = [(7,), (3, 5), (2, 3, 9), (1, 19)]
FLOAT_DTYPES = ["float32", "bfloat16", "float16"]

UNARY = {
    "neg": jnp.negative, "abs": jnp.abs, "sign": jnp.sign, "floor": jnp.floor, "ceil": jnp.ceil,
    "exp": jnp.exp, "exp2": jnp.exp2, "tanh": jnp.tanh, "logistic": jax.nn.sigmoid, "sin": jnp.sin,
    "cos": jnp.cos, "tan": lambda x: jnp.tan(x * 0.5), "square": jnp.square, "erf": jax.scipy.special.erf,
    "expm1": jnp.expm1, "cube": lambda x: x**3, "round": jnp.round, "is_finite": jnp.isfinite,
    "silu": jax.nn.silu, "gelu_tanh": jax.nn.gelu, "erfc": jax.scipy.special.erfc,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
}  # fmt: skip
POSITIVE = {
    "log": jnp.log, "log1p": jnp.log1p, "sqrt": jnp.sqrt, "rsqrt": jax.lax.rsqrt, "cbrt": jnp.cbrt,
    "pow": lambda x: x**1.7,
}  # fmt: skip
BINARY = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "div": jnp.divide, "max": jnp.maximum,
    "min": jnp.minimum, "pow": lambda a, b: jnp.abs(a) ** b, "atan2": jnp.arctan2, "rem": jnp.remainder,
    "eq": lambda a, b: a == jnp.round(b), "ne": lambda a, b: a != b, "lt": jnp.less, "le": jnp.less_equal,
    "gt": jnp.greater, "ge": jnp.greater_equal, "where": lambda a, b: jnp.where(a > b, a, b * 2),
    "clamp": lambda a, b: jax.lax.clamp(jnp.asarray(-0.5, a.dtype), a, jnp.asarray(0.75, a.dtype)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNARY))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_unary(name, dtype, shape, rng):
    check_against_jit(UNARY[name], random_array(rng, shape, dtype))


@pytest.mark.parametrize("name", sorted(POSITIVE))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unary_positive(name, dtype, rng):
    check_against_jit(POSITIVE[name], random_array(rng, (3, 11), dtype, low=0.1, high=4.0))


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_binary(name, dtype, shape, rng):
    check_against_jit(BINARY[name], random_array(rng, shape, dtype), random_array(rng, shape, dtype))


@pytest.mark.parametrize("dtype", ["int32", "uint32", "int8", "uint8"])
def test_integer_arithmetic(dtype, rng):
    def f(a, b):
        return a + b, a * b, a - b, jnp.maximum(a, b), a // jnp.where(b == 0, 1, b), a % jnp.where(b == 0, 1, b)

    low = 0 if dtype.startswith("u") else -50
    check_against_jit(f, random_array(rng, (4, 6), dtype, low, 50), random_array(rng, (4, 6), dtype, low, 50))


def test_bool_logic(rng):
    f = lambda a, b: (a & b, a | ~b, a ^ b, jnp.where(a, 1.5, -2.0))  # noqa: E731
    check_against_jit(f, random_array(rng, (5, 3), bool), random_array(rng, (5, 3), bool))


@pytest.mark.parametrize("src,dst", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "int32"),
                                     ("int32", "float32"), ("float16", "float32"), ("float32", "bool"),
                                     ("int8", "float16"), ("uint8", "int32")])  # fmt: skip
def test_convert_element_type(src, dst, rng):
    check_against_jit(lambda x: x.astype(dst), random_array(rng, (3, 17), src, -100, 100))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_erf_inv(dtype, rng):
    check_against_jit(jax.scipy.special.erfinv, random_array(rng, (3, 13), dtype, low=-0.999, high=0.999))


@pytest.mark.parametrize("dtype", ["int32", "uint32"])
def test_shifts_and_population_count(dtype, rng):
    def f(x, s):
        return (jax.lax.shift_left(x, s), jax.lax.shift_right_logical(x, s), jax.lax.shift_right_arithmetic(x, s),
                jax.lax.population_count(x))  # fmt: skip

    info = np.iinfo(dtype)
    x = jnp.asarray(rng.integers(info.min, info.max, size=(5, 7), endpoint=True).astype(dtype))
    s = random_array(rng, (5, 7), dtype, 0, 40)  # amounts of 32 and more included
    check_against_jit(f, x, s)


@pytest.mark.parametrize("src,dst", [("float32", "int32"), ("float32", "uint32"), ("uint32", "float32"),
                                     ("int32", "float32"), ("int32", "uint32"), ("int8", "uint8"),
                                     ("uint8", "int8")])  # fmt: skip
def test_bitcast_convert_type(src, dst, rng):
    def f(x):
        return jax.lax.bitcast_convert_type(x, dst)

    if np.dtype(src).kind == "f":
        x = random_array(rng, (3, 11), src, -1e3, 1e3)
    else:  # every bit pattern, except the float NaNs (their payloads are not compared)
        info = np.iinfo(src)
        x = jnp.asarray(rng.integers(info.min, info.max, size=(3, 11), endpoint=True).astype(src))
        if dst == "float32":
            x = jnp.where(jnp.isnan(jax.lax.bitcast_convert_type(x, jnp.float32)), 7, x).astype(src)
    check_against_jit(f, x)


def test_bitcast_between_widths_is_refused():
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="bitcast from float32 to uint8"):
        jax_mpk.megakernelize(lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8))(jnp.ones((3,), jnp.float32))


def test_bit_op_on_an_8_bit_dtype_is_refused():
    with pytest.raises(jax_mpk.UnsupportedPrimitiveError, match="shift_left.*on int8 operands"):
        jax_mpk.megakernelize(lambda x: jax.lax.shift_left(x, jnp.int8(1)))(jnp.ones((3,), jnp.int8))


# --------------------------------------------------------------------------------------------- views


@pytest.mark.parametrize(
    "name,fn,shape",
    [
        ("broadcast", lambda x: x[:, None, :] + jnp.zeros((1, 4, 1)), (3, 5)),
        ("reshape_split", lambda x: x.reshape(3, 2, 5) * 2, (6, 5)),
        ("reshape_merge", lambda x: x.reshape(-1) + 1, (3, 7)),
        ("reshape_transposed", lambda x: x.T.reshape(-1) * 3, (3, 7)),
        ("transpose", lambda x: jnp.transpose(x, (2, 0, 1)) - 1, (2, 3, 4)),
        ("squeeze_expand", lambda x: jnp.expand_dims(jnp.squeeze(x, 1), 0) * 2, (4, 1, 3)),
        ("slice", lambda x: x[1:4, ::2] + 1, (5, 9)),
        ("rev", lambda x: x[::-1, :] * 1.5, (4, 6)),
        ("concatenate", lambda x: jnp.concatenate([x, -x[:, :2], x * 2], axis=1), (3, 5)),
        ("split", lambda x: [a * (i + 1) for i, a in enumerate(jnp.split(x, [2, 5], axis=1))], (3, 8)),
        ("unstack", lambda x: [a * (i + 1) for i, a in enumerate(jax.lax.unstack(x, axis=1))], (3, 4, 5)),
        ("iota", lambda x: x + jnp.arange(x.shape[1], dtype=x.dtype), (3, 5)),
        ("passthrough", lambda x: (x, x), (2, 3)),
    ],
)
def test_views(name, fn, shape, rng):
    check_against_jit(fn, random_array(rng, shape, "float32"))


# ------------------------------------------------------------------------------------------ reductions


@pytest.mark.parametrize("reducer", ["sum", "max", "min", "prod", "argmax", "argmin", "mean"])
@pytest.mark.parametrize("axis", [0, 1, -1, (0, 2)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reductions(reducer, axis, dtype, rng):
    if reducer.startswith("arg") and isinstance(axis, tuple):
        pytest.skip("argmax takes one axis")
    fn = getattr(jnp, reducer)
    check_against_jit(lambda x: fn(x, axis=axis), random_array(rng, (3, 5, 7), dtype, low=0.5, high=1.5))


def test_bool_reductions(rng):
    x = random_array(rng, (4, 9), bool)
    check_against_jit(lambda x: (jnp.all(x, axis=1), jnp.any(x, axis=0)), x)


# ----------------------------------------------------------------------------------------- contraction


@pytest.mark.parametrize(
    "spec,lhs,rhs",
    [
        ("ij,jk->ik", (1, 19), (19, 33)),
        ("ij,jk->ik", (5, 7), (7, 3)),
        ("bij,bjk->bik", (2, 3, 5), (2, 5, 4)),
        ("ij,kj->ik", (3, 8), (6, 8)),
        ("bhd,bshd->bhs", (2, 3, 8), (2, 5, 3, 8)),
        ("i,i->", (13,), (13,)),
        # the first operand has more free elements: lowered as the swapped product, viewed transposed
        ("ij,jk->ik", (33, 19), (19, 2)),
        ("bsgd,btgrd->bgrts", (1, 40, 2, 8), (1, 1, 2, 3, 8)),
        ("bgrts,bsgd->btgrd", (1, 2, 3, 1, 40), (1, 40, 2, 8)),
        ("bsgd,btgrd->bgstr", (2, 40, 2, 8), (2, 1, 2, 3, 8)),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dot_general(spec, lhs, rhs, dtype, rng):
    f = lambda a, b: jnp.einsum(spec, a, b)  # noqa: E731
    check_against_jit(f, random_array(rng, lhs, dtype), random_array(rng, rhs, dtype), dtype=dtype)


def test_long_side_of_a_product_becomes_its_columns():
    """Whichever operand einsum puts first, the product's last (column) dim is the long free dim: the one
    a task tiles and streams along (the KV cache's positions of attention scores)."""
    from jax_mpk.capture import capture
    from jax_mpk.graph import Dot, topological

    def scores(keys, queries):  # [b, s, g, d] . [b, t, g, r, d] -> [b, g, s, t, r]
        return jax.lax.dot_general(keys, queries, (((3,), (4,)), ((0, 2), (0, 2))))

    keys, queries = jnp.zeros((1, 40, 2, 8)), jnp.zeros((1, 1, 2, 3, 8))
    (dot,) = [n for n in topological(capture(jax.make_jaxpr(scores)(keys, queries)).outputs) if isinstance(n, Dot)]
    assert dot.shape == (1, 2, 1, 3, 40)


def test_dot_preferred_float32(rng):
    f = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)  # noqa: E731
    check_against_jit(f, random_array(rng, (3, 40), "bfloat16"), random_array(rng, (40, 5), "bfloat16"))


# ------------------------------------------------------------------------------------------- dynamic


def test_dynamic_slice(rng):
    x = random_array(rng, (9, 6), "float32")
    for start in (0, 4, 7, 100, -3):  # out-of-range starts clamp like XLA
        check_against_jit(lambda x, i: jax.lax.dynamic_slice(x, (i, 1), (3, 4)), x, jnp.int32(start))


def test_scalar_index(rng):
    x = random_array(rng, (9, 6), "float32")
    for i in (0, 5, -1):
        check_against_jit(lambda x, i: x[i] * 2, x, jnp.int32(i))


@pytest.mark.parametrize("mode", [None, "clip", "fill"])
def test_gather_rows(mode, rng):
    table = random_array(rng, (11, 7), "float32")
    idx = jnp.asarray([0, 3, 10, 12, -1, 5], dtype=jnp.int32)
    check_against_jit(lambda t, i: t.at[i].get(mode=mode) if mode else t[i], table, idx)


def test_dynamic_update_slice(rng):
    x = random_array(rng, (6, 5), "float32")
    u = random_array(rng, (2, 3), "float32")
    for start in (0, 3, 5, -2):
        check_against_jit(lambda x, u, i: jax.lax.dynamic_update_slice(x, u * 2, (i, 1)), x, u, jnp.int32(start))


def test_update_of_computed_value(rng):
    x = random_array(rng, (4, 6), "float32")
    f = lambda x, i: jax.lax.dynamic_update_slice(jnp.exp(x), x[:1] * 3, (i, 0))  # noqa: E731
    check_against_jit(f, x, jnp.int32(2))


def test_update_that_reads_its_own_operand(rng):
    x = random_array(rng, (5, 4), "float32")
    f = lambda x, i: jax.lax.dynamic_update_slice(x, x[1:3] + 1, (i, 0))  # noqa: E731
    check_against_jit(f, x, jnp.int32(2))
