"""The elementwise scalar ops: ONE table of what each op means, for every part of jax_mpk.

An entry names the op (its ``layout.NodeOp`` member and plan code), the jaxpr primitives that lower to it, its
arity, the operand dtypes it accepts, and its scalar semantics as one C++ function body. From this table:

* ``layout.NodeOp`` gets the op's member (the plan code);
* ``lowering`` registers a rule for each primitive (``jax_mpk.supported_primitives()`` lists them);
* ``ffi/include/jax_mpk/scalar_ops.h`` is generated (``python -m jax_mpk.layout``): one ``ops::<name>``
  function template per op, ``__host__ __device__``, which the CPU evaluator calls on ``double`` (float dtypes)
  and the CUDA codegen on ``float``; both call it on ``int32_t`` (i32, i8), ``uint32_t`` (u32, u8) and ``bool``;
  plus the plan parser's arity and dtype checks and the CPU evaluator's dispatch switch.

Adding an elementwise op is one entry here and one test.

Semantics shared by every op: integer values are computed in 32 bits and wrap (8-bit dtypes are computed in
32 bits and wrapped to 8 when the node's value is rounded to its dtype, which is why ops whose result depends
on the width, such as shifts, accept only the 32-bit dtypes); float values are computed in ``T`` (double on the
CPU, float on the GPU) and rounded to the node's dtype afterwards. Helpers the bodies use (``kIsFloat``,
``kIsSigned``, ``u32``, ``wrapping_abs``, ``integer_power``, ``erf_inverse``) are in ``ffi/include/jax_mpk/scalar.h``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# Operand dtype classes an op accepts, as letters: f = f32, bf16, f16; i = i32, i8; u = u32, u8; b = bool;
# F = f32 only; I = i32 only; U = u32 only (ops whose result depends on the bit width).
DTYPE_CLASSES = {
    "f": ("F32", "BF16", "F16"), "i": ("I32", "I8"), "u": ("U32", "U8"), "b": ("BOOL",), "I": ("I32",),
    "U": ("U32",), "F": ("F32",),
}  # fmt: skip
# C++ names that are keywords, alternative tokens or standard functions get a trailing underscore.
_RESERVED = {"abs", "and", "max", "min", "not", "or", "xor"}


@dataclass(frozen=True)
class ScalarOp:
    name: str  # the NodeOp member
    code: int  # its value in a plan
    primitives: tuple[str, ...]  # jaxpr primitives lowered to it
    arity: int
    dtypes: str  # operand dtype classes (DTYPE_CLASSES letters)
    cpp: str  # body over x (unary) or a, b (binary) of type T: an expression, or statements with return
    # CUDA's float function where the device deliberately differs from ``cpp`` on float operands (a faster
    # intrinsic); the CPU reference always evaluates ``cpp``
    device_float: str | None = None
    # folds a scalar integer/bool constant expression (numpy), so that static indices stay static
    fold: Callable | None = None

    @property
    def cpp_name(self) -> str:
        name = self.name.lower()
        return name + "_" if name in _RESERVED else name

    @property
    def operand_dtypes(self) -> tuple[str, ...]:
        """DType member names of the operands it accepts."""
        return tuple(d for letter in self.dtypes for d in DTYPE_CLASSES[letter])


def _float(fn: str, arity: int = 1) -> str:
    return f"std::{fn}({'x' if arity == 1 else 'a, b'})"


def _wrapping(op: str) -> str:
    """a op b, integers modulo 2^32."""
    return f"if constexpr (kIsFloat<T>) return a {op} b; else return T(u32(a) {op} u32(b));"


def _nan_propagating(pick: str, std: str, device: str, keep_a: str, zero_bits: str) -> tuple[str, str]:
    """max/min as XLA computes them: NaN wins, and of two equal values (+0 and -0 compare equal) the one XLA
    orders right (-0 < +0): ``keep_a`` says when it is ``a``; on the device, the two zeros' bits combined with
    ``zero_bits`` (&: +0, |: -0), which leaves equal nonzero values as they are."""
    cpp = (f"if constexpr (kIsFloat<T>) {{ if (a != a || b != b) return T(NAN); "
           f"if (a == b) return {keep_a} ? a : b; return std::{std}(a, b); }} else return a {pick} b ? a : b;")  # fmt: skip
    device_float = (f"(a != a || b != b) ? __int_as_float(0x7fc00000) : (a == b ? "
                    f"__int_as_float(__float_as_int(a) {zero_bits} __float_as_int(b)) : {device}(a, b))")  # fmt: skip
    return cpp, device_float


_MAX, _MAX_DEVICE = _nan_propagating(">", "max", "fmaxf", "!std::signbit(a)", "&")
_MIN, _MIN_DEVICE = _nan_propagating("<", "min", "fminf", "std::signbit(a)", "|")

SCALAR_OPS: tuple[ScalarOp, ...] = (
    # ------------------------------------------------------------------------------------------ unary
    ScalarOp("NEG", 20, ("neg",), 1, "fiu",
             "if constexpr (kIsFloat<T>) return -x; else return T(0u - u32(x));", fold=np.negative),
    ScalarOp("ABS", 21, ("abs",), 1, "fiu",
             "if constexpr (kIsFloat<T>) return std::fabs(x); "
             "else if constexpr (kIsSigned<T>) return wrapping_abs(x); else return x;"),
    ScalarOp("SIGN", 22, ("sign",), 1, "fiu",
             "if constexpr (kIsFloat<T>) return (x != x || x == 0) ? x : (x > 0 ? T(1) : T(-1)); "
             "else return T((x > 0) - (x < 0));"),
    ScalarOp("FLOOR", 23, ("floor",), 1, "f", _float("floor")),
    ScalarOp("CEIL", 24, ("ceil",), 1, "f", _float("ceil")),
    ScalarOp("EXP", 25, ("exp",), 1, "f", _float("exp")),
    ScalarOp("EXP2", 26, ("exp2",), 1, "f", _float("exp2")),
    ScalarOp("LOG", 27, ("log",), 1, "f", _float("log")),
    ScalarOp("LOG1P", 28, ("log1p",), 1, "f", _float("log1p")),
    ScalarOp("EXPM1", 29, ("expm1",), 1, "f", _float("expm1")),
    ScalarOp("TANH", 30, ("tanh",), 1, "f", _float("tanh")),
    ScalarOp("LOGISTIC", 31, ("logistic",), 1, "f", "T(1) / (T(1) + std::exp(-x))"),
    ScalarOp("SIN", 32, ("sin",), 1, "f", _float("sin")),
    ScalarOp("COS", 33, ("cos",), 1, "f", _float("cos")),
    ScalarOp("TAN", 34, ("tan",), 1, "f", _float("tan")),
    ScalarOp("SQRT", 35, ("sqrt",), 1, "f", _float("sqrt")),
    ScalarOp("RSQRT", 36, ("rsqrt",), 1, "f", "T(1) / std::sqrt(x)", device_float="rsqrtf(x)"),
    ScalarOp("CBRT", 37, ("cbrt",), 1, "f", _float("cbrt")),
    ScalarOp("ERF", 38, ("erf",), 1, "f", _float("erf")),
    ScalarOp("IS_FINITE", 39, ("is_finite",), 1, "f", "std::isfinite(x)"),
    ScalarOp("SQUARE", 40, ("square",), 1, "fiu",
             "if constexpr (kIsFloat<T>) return x * x; else return T(u32(x) * u32(x));"),
    ScalarOp("ERFC", 42, ("erfc",), 1, "f", _float("erfc")),
    ScalarOp("ERF_INV", 43, ("erf_inv",), 1, "f", "erf_inverse(x)", device_float="erfinvf(x)"),
    ScalarOp("POPULATION_COUNT", 44, ("population_count",), 1, "IU",
             "uint32_t v = u32(x), n = 0; for (; v != 0; v &= v - 1) ++n; return T(n);"),
    # bitcast_convert_type to each 32-bit dtype; 8-bit ints keep their low byte (i8 <-> u8)
    ScalarOp("BITCAST_TO_F32", 45, (), 1, "FIU", "bit_cast<float>(x)"),
    ScalarOp("BITCAST_TO_I32", 46, (), 1, "FIU", "bit_cast<int32_t>(x)"),
    ScalarOp("BITCAST_TO_U32", 47, (), 1, "FIU", "bit_cast<uint32_t>(x)"),
    ScalarOp("BITCAST_TO_I8", 48, (), 1, "u", "int32_t(int8_t(u32(x) & 0xFFu))"),
    ScalarOp("BITCAST_TO_U8", 49, (), 1, "i", "uint32_t(u32(x) & 0xFFu)"),
    ScalarOp("NOT", 41, ("not",), 1, "iub",
             "if constexpr (std::is_same_v<T, bool>) return !x; else return T(~x);", fold=np.invert),
    # ----------------------------------------------------------------------------------------- binary
    ScalarOp("ADD", 60, ("add", "add_any"), 2, "fiu", _wrapping("+"), fold=np.add),
    ScalarOp("SUB", 61, ("sub",), 2, "fiu", _wrapping("-"), fold=np.subtract),
    ScalarOp("MUL", 62, ("mul",), 2, "fiu", _wrapping("*"), fold=np.multiply),
    # integers: truncating; x / 0 is -1 (all bits set), INT32_MIN / -1 is INT32_MIN, as XLA defines them
    ScalarOp("DIV", 63, ("div",), 2, "fiu",
             "if constexpr (kIsFloat<T>) return a / b; else { if (b == 0) return T(-1); "
             "if constexpr (kIsSigned<T>) { if (b == -1) return T(0u - u32(a)); } return T(a / b); }"),
    # integers: the sign of a; x % 0 is x
    ScalarOp("REM", 64, ("rem",), 2, "fiu",
             "if constexpr (kIsFloat<T>) return std::fmod(a, b); else { if (b == 0) return a; "
             "if constexpr (kIsSigned<T>) { if (b == -1) return T(0); } return T(a % b); }"),
    ScalarOp("POW", 65, ("pow",), 2, "fiu",
             "if constexpr (kIsFloat<T>) return std::pow(a, b); else return integer_power(a, b);"),
    ScalarOp("MAX", 66, ("max",), 2, "fiub", _MAX, device_float=_MAX_DEVICE, fold=np.maximum),
    ScalarOp("MIN", 67, ("min",), 2, "fiub", _MIN, device_float=_MIN_DEVICE, fold=np.minimum),
    ScalarOp("EQ", 68, ("eq",), 2, "fiub", "a == b", fold=np.equal),
    ScalarOp("NE", 69, ("ne",), 2, "fiub", "a != b", fold=np.not_equal),
    ScalarOp("LT", 70, ("lt",), 2, "fiub", "a < b", fold=np.less),
    ScalarOp("LE", 71, ("le",), 2, "fiub", "a <= b", fold=np.less_equal),
    ScalarOp("GT", 72, ("gt",), 2, "fiub", "a > b", fold=np.greater),
    ScalarOp("GE", 73, ("ge",), 2, "fiub", "a >= b", fold=np.greater_equal),
    ScalarOp("AND", 74, ("and",), 2, "iub", "T(a & b)", fold=np.bitwise_and),
    ScalarOp("OR", 75, ("or",), 2, "iub", "T(a | b)", fold=np.bitwise_or),
    ScalarOp("XOR", 76, ("xor",), 2, "iub", "T(a ^ b)", fold=np.bitwise_xor),
    ScalarOp("ATAN2", 77, ("atan2",), 2, "f", _float("atan2", 2)),
    # shifts by an amount (the second operand, read as unsigned) of 32 or more give 0 (logical) or the sign
    ScalarOp("SHIFT_LEFT", 78, ("shift_left",), 2, "IU", "return u32(b) < 32u ? T(u32(a) << u32(b)) : T(0);"),
    ScalarOp("SHIFT_RIGHT_LOGICAL", 79, ("shift_right_logical",), 2, "IU",
             "return u32(b) < 32u ? T(u32(a) >> u32(b)) : T(0);"),
    ScalarOp("SHIFT_RIGHT_ARITHMETIC", 80, ("shift_right_arithmetic",), 2, "IU",
             "return T(static_cast<int32_t>(u32(a)) >> (u32(b) < 32u ? u32(b) : 31u));"),
)  # fmt: skip

BY_NAME = {op.name: op for op in SCALAR_OPS}
