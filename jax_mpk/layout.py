"""The plan layout: the ONE definition of every code, record and limit shared by Python and C++.

A compiled plan travels to the C++ runtime as a flat little-endian array of int64 words.
This module names every enum value and fixed record offset in it, the dtypes with what each part of jax_mpk
needs to know about them, the limits both sides check, and the task record the CUDA megakernel reads. The
elementwise ops and their scalar semantics come from ``jax_mpk.scalar_ops``. The generated headers
(:data:`GENERATED`: ``ffi/include/jax_mpk/layout.h`` and ``scalar_ops.h``) are written by
``python -m jax_mpk.layout`` and a test checks that the committed ones are up to date. Word order of the
variable-length sections is documented in ``docs/plan_format.md`` and implemented by ``jax_mpk.plan``
(writer) and ``ffi/src/plan.cc`` (reader).
"""

from __future__ import annotations

import enum
import pathlib
import sys

import ml_dtypes  # noqa: F401  (registers the bfloat16 name with numpy)
import numpy as np
from dataclasses import dataclass

from .scalar_ops import SCALAR_OPS, ScalarOp

MAGIC = 0x4B504D58  # "XMPK"
VERSION = 2
MAX_RANK = 8  # dims of a tensor, a kernel domain, or a domain followed by a contraction
HEADER_WORDS = 17
# In a DOT record's lhs_tensor: the lhs is not loaded but computed by the kernel's expression node whose
# position follows in place of lhs_map (CUDA plans only; the CPU executor rejects it).
COMPUTED_OPERAND = -1
# Devices a plan may run on together (a header's NUM_RANKS): what the plan parser and the CPU executor accept.
MAX_PLAN_RANKS = 1024
# Devices a CUDA plan may run on together: the size of the peer arrays in the kernel's parameters
# (runtime/params.h CommParams), which must stay small (the parameter block is limited to 4 KB).
MAX_CUDA_RANKS = 8
# A profiling build (JAX_MPK_PROFILE) records these global-timer stamps per task, in this order, as uint64 words
# after the workspace: the wait begins, the body begins, its rows are staged, its products computed, the body
# ends (the block's last barrier), the task has signalled. Staged and computed stay 0 in bodies without them.
PROFILE_STAMPS = ("wait", "start", "staged", "computed", "body_end", "signalled")


def profile_sm_words(num_tasks: int) -> int:
    """Where the profile region's per-worker physical SM ids (%smid, one uint64 word a worker) start, in words from
    the region's start: after every task's PROFILE_STAMPS. The region is that plus one word a worker."""
    return len(PROFILE_STAMPS) * num_tasks


class Platform(enum.IntEnum):
    CPU = 0
    CUDA = 1


class DType(enum.IntEnum):
    F32 = 0
    BF16 = 1
    F16 = 2
    I32 = 3
    U32 = 4
    I8 = 5
    U8 = 6
    BOOL = 7


@dataclass(frozen=True)
class DTypeInfo:
    """What Python (numpy names), the CPU runtime (byte width, value class) and the CUDA codegen (storage and
    value types, rounding function) need to know about one dtype."""

    numpy_name: str
    name: str  # in messages
    bytes: int
    value_class: str  # float | signed | unsigned | bool: the C++ type it is computed in (see scalar.h)
    cuda_storage: str
    cuda_value: str
    cuda_round: str | None  # rounds a value to the dtype after every node (None: the value type is exact)


DTYPES = {
    DType.F32: DTypeInfo("float32", "f32", 4, "float", "float", "float", None),
    DType.BF16: DTypeInfo("bfloat16", "bf16", 2, "float", "__nv_bfloat16", "float", "ops::round_bf16"),
    DType.F16: DTypeInfo("float16", "f16", 2, "float", "__half", "float", "ops::round_f16"),
    DType.I32: DTypeInfo("int32", "i32", 4, "signed", "int32_t", "int32_t", None),
    DType.U32: DTypeInfo("uint32", "u32", 4, "unsigned", "uint32_t", "uint32_t", None),
    DType.I8: DTypeInfo("int8", "i8", 1, "signed", "int8_t", "int32_t", "ops::wrap_i8"),
    DType.U8: DTypeInfo("uint8", "u8", 1, "unsigned", "uint8_t", "uint32_t", "ops::wrap_u8"),
    DType.BOOL: DTypeInfo("bool", "bool", 1, "bool", "bool", "bool", None),
}
assert list(DTYPES) == list(DType) == [DType(code) for code in range(len(DType))]
_DTYPE_CODES = {np.dtype(info.numpy_name): code for code, info in DTYPES.items()}


def dtype_code(dtype) -> DType:
    """The code of a numpy/jax dtype."""
    return _DTYPE_CODES[np.dtype(dtype)]

_VALUE_CLASSES = ("float", "signed", "unsigned", "bool")


class TensorKind(enum.IntEnum):
    INPUT = 0  # index = operand number of the custom call
    OUTPUT = 1  # index = result number of the custom call
    WORKSPACE = 2  # index = byte offset in the workspace result
    # index = byte offset in each rank's communication buffer; shape [NUM_RANKS, ...]: slot r lives in rank
    # r's buffer (written there by rank r only) and every rank reads every slot
    COMM = 3


class KernelKind(enum.IntEnum):
    FUSED = 0
    DOT = 1


class StageKind(enum.IntEnum):
    AFFINE = 0
    RESHAPE = 1


class ReduceKind(enum.IntEnum):
    SUM = 0
    MAX = 1
    MIN = 2
    PROD = 3
    ARGMAX = 4
    ARGMIN = 5
    AND = 6
    OR = 7


class StructuralOp(enum.IntEnum):
    """Node ops with their own rules (children, params); the elementwise ones are in jax_mpk.scalar_ops."""

    LOAD = 0
    CONST = 1
    IOTA = 2
    REINDEX = 3
    ACC = 4
    SELECT_N = 5
    PIECEWISE = 6
    REDUCE = 7
    CONVERT = 8
    CLAMP = 9
    INTEGER_POW = 10
    ROUND = 11


# Every node op of a plan: the structural ones, then the scalar ops of jax_mpk.scalar_ops.
NodeOp = enum.IntEnum(
    "NodeOp", [(m.name, m.value) for m in StructuralOp] + [(op.name, op.code) for op in SCALAR_OPS], module=__name__
)
SCALAR_OP_OF = {NodeOp[op.name]: op for op in SCALAR_OPS}


class Header(enum.IntEnum):
    """Word offsets of the fixed plan header."""

    MAGIC = 0
    VERSION = 1
    PLATFORM = 2
    NUM_INPUTS = 3
    NUM_OUTPUTS = 4
    WORKSPACE_BYTES = 5
    NUM_TENSORS = 6
    NUM_MAPS = 7
    NUM_KERNELS = 8
    NUM_TASKS = 9
    NUM_EVENTS = 10
    NUM_WORKERS = 11
    NUM_ALIASES = 12
    NUM_RANKS = 13  # devices running the plan together (1: no collectives)
    COMM_BYTES = 14  # bytes of one rank's communication buffer (one of its two halves, see plan_format.md)
    NUM_REMOTE_EVENTS = 15  # counters in every rank's communication buffer
    RANK_INPUT = 16  # the operand holding the device's rank (int32 scalar); -1 when NUM_RANKS is 1


class TaskField(enum.IntEnum):
    """Word offsets inside one fixed-size task record."""

    KERNEL = 0
    WAIT_EVENT = 1  # -1: the task waits on nothing
    WAIT_COUNT = 2  # signals per epoch; the task runs once counter >= WAIT_COUNT * epoch
    SIGNAL_BEGIN = 3  # first entry in the signal list
    SIGNAL_COUNT = 4
    LO = 5  # MAX_RANK words: first domain index of the tile
    HI = 5 + MAX_RANK  # MAX_RANK words: one past the last domain index
    # The same task on every rank has signalled REMOTE_WAIT_EVENT (a counter in each rank's communication
    # buffer) REMOTE_WAIT_COUNT times per epoch: what a reader of COMM tensors waits for (-1: nothing).
    REMOTE_WAIT_EVENT = 5 + 2 * MAX_RANK
    REMOTE_WAIT_COUNT = 6 + 2 * MAX_RANK
    REMOTE_SIGNAL_BEGIN = 7 + 2 * MAX_RANK  # first entry in the remote signal list
    REMOTE_SIGNAL_COUNT = 8 + 2 * MAX_RANK


TASK_WORDS = 9 + 2 * MAX_RANK

_ENUMS = (Platform, DType, TensorKind, KernelKind, StageKind, ReduceKind, NodeOp, Header, TaskField)
_INCLUDE = pathlib.Path(__file__).resolve().parent.parent / "ffi" / "include" / "jax_mpk"
_BANNER = "// GENERATED by `python -m jax_mpk.layout` from jax_mpk/{}. Do not edit."


def render_layout_header() -> str:
    """layout.h: every constant, enum, dtype fact and the task record of this module."""
    lines = [
        _BANNER.format("layout.py"),
        "#pragma once",
        "#include <cstdint>",
        "",
        "namespace jax_mpk::layout {",
        "",
        f"inline constexpr int64_t kMagic = 0x{MAGIC:X};",
        f"inline constexpr int64_t kVersion = {VERSION};",
        f"inline constexpr int kMaxRank = {MAX_RANK};",
        f"inline constexpr int kHeaderWords = {HEADER_WORDS};",
        f"inline constexpr int64_t kComputedOperand = {COMPUTED_OPERAND};",
        f"inline constexpr int kTaskWords = {TASK_WORDS};",
        f"inline constexpr int64_t kMaxPlanRanks = {MAX_PLAN_RANKS};",
        f"inline constexpr int kMaxCudaRanks = {MAX_CUDA_RANKS};",
        f"inline constexpr int kProfileStamps = {len(PROFILE_STAMPS)};  // {', '.join(PROFILE_STAMPS)}",
        *(f"inline constexpr int kStamp{_camel(name.upper())} = {i};" for i, name in enumerate(PROFILE_STAMPS)),
        "",
    ]
    for enum_type in _ENUMS:
        lines.append(f"enum class {enum_type.__name__} : int64_t {{")
        lines.extend(f"  k{_camel(member.name)} = {member.value}," for member in enum_type)
        lines.append("};")
        lines.append("")
    lines += _render_dtype_table() + _render_task_record()
    lines.append("}  // namespace jax_mpk::layout")
    return "\n".join(lines) + "\n"


def _render_dtype_table() -> list[str]:
    classes = ", ".join(f"k{_camel(c)}" for c in _VALUE_CLASSES)
    rows = [
        f'  {{"{info.name}", {info.bytes}, ValueClass::k{_camel(info.value_class)}}},  // {dtype.name}'
        for dtype, info in DTYPES.items()
    ]
    return [
        "// The C++ type a dtype's values are computed in: float (double on the CPU, float on the GPU), int32_t,",
        "// uint32_t or bool (see scalar.h).",
        f"enum class ValueClass : int {{ {classes} }};",
        "struct DTypeInfo {",
        "  const char* name;",
        "  int bytes;",
        "  ValueClass value_class;",
        "};",
        f"inline constexpr int kNumDTypes = {len(DTYPES)};",
        "inline constexpr DTypeInfo kDTypeInfo[kNumDTypes] = {  // indexed by DType",
        *rows,
        "};",
        "",
    ]


def _render_task_record() -> list[str]:
    """The CUDA megakernel's copy of one task record: TaskField's words as int32, LO and HI as arrays."""
    members = []
    for field in TaskField:
        if field in (TaskField.LO, TaskField.HI):
            members.append(f"  int32_t {field.name.lower()}[kMaxRank];")
        else:
            members.append(f"  int32_t {field.name.lower()};")
    return [
        "// One task record as the CUDA megakernel reads it (int32 words in TaskField order).",
        "struct TaskRecord {",
        *members,
        "};",
        "static_assert(sizeof(TaskRecord) == kTaskWords * sizeof(int32_t), \"TaskRecord must match TaskField\");",
        "",
    ]


def render_scalar_ops_header() -> str:
    """scalar_ops.h: one function template per scalar op, the parser's arity and dtype checks, and the CPU
    evaluator's dispatch."""
    lines = [
        _BANNER.format("scalar_ops.py"),
        "#pragma once",
        "#include <cmath>",
        "#include <cstdint>",
        "#include <type_traits>",
        "",
        '#include "jax_mpk/layout.h"',
        '#include "jax_mpk/scalar.h"',
        "",
        "namespace jax_mpk::ops {",
        "",
    ]
    for op in SCALAR_OPS:
        lines += _render_scalar_function(op)
    lines += [
        f"inline constexpr int kMaxScalarOpArity = {max(op.arity for op in SCALAR_OPS)};",
        "",
        "// Children of a scalar op (0: not a scalar op).",
        "inline int ScalarOpArity(layout::NodeOp op) {",
        "  switch (op) {",
        *[f"    case layout::NodeOp::k{_camel(op.name)}: return {op.arity};" for op in SCALAR_OPS],
        "    default: return 0;",
        "  }",
        "}",
        "",
        "// Whether scalar op `op` is defined on operands of `dtype`.",
        "inline bool AcceptsOperand(layout::NodeOp op, layout::DType dtype) {",
        "  switch (op) {",
    ]
    for op in SCALAR_OPS:
        dtypes = " || ".join(f"dtype == layout::DType::k{_camel(d)}" for d in op.operand_dtypes)
        lines.append(f"    case layout::NodeOp::k{_camel(op.name)}: return {dtypes};")
    lines += [
        "    default: return false;",
        "  }",
        "}",
        "",
        "#ifndef __CUDA_ARCH__",
        "// The CPU evaluator's call of scalar op `op` on operands of `dtype` (values held in doubles), which",
        "// AcceptsOperand must allow. The result is the op's value, not yet rounded to the node's dtype.",
        "inline double EvaluateScalarOp(layout::NodeOp op, layout::DType dtype, const double* args) {",
        "  const layout::ValueClass value_class = layout::kDTypeInfo[static_cast<int>(dtype)].value_class;",
        "  switch (op) {",
    ]
    for op in SCALAR_OPS:
        lines.append(f"    case layout::NodeOp::k{_camel(op.name)}:")
        lines.append("      switch (value_class) {")
        for value_class, cpp_type in _HOST_TYPES.items():
            if not any(DTYPES[DType[d]].value_class == value_class for d in op.operand_dtypes):
                continue
            args = ", ".join(f"static_cast<{cpp_type}>(args[{i}])" for i in range(op.arity))
            call = f"{op.cpp_name}({args})"
            lines.append(f"        case layout::ValueClass::k{_camel(value_class)}: return static_cast<double>({call});")
        lines += ["        default: break;", "      }", "      break;"]
    lines += [
        "    default: break;",
        "  }",
        "  return NAN;  // unreachable for a parsed plan",
        "}",
        "#endif",
        "",
        "}  // namespace jax_mpk::ops",
    ]
    return "\n".join(lines) + "\n"


# The types the CPU evaluator calls scalar ops on; integer values are whole doubles, so the casts are exact.
_HOST_TYPES = {"float": "double", "signed": "int32_t", "unsigned": "uint32_t", "bool": "bool"}


def _render_scalar_function(op: ScalarOp) -> list[str]:
    params = "T x" if op.arity == 1 else "T a, T b"
    body = op.cpp if "return" in op.cpp else f"return {op.cpp};"
    lines = [f"// {op.name}: {', '.join(op.primitives)}; operands {' '.join(op.operand_dtypes).lower()}",
             f"template <class T> JAX_MPK_HD auto {op.cpp_name}({params}) {{"]  # fmt: skip
    if op.device_float is None:
        lines.append(f"  {body}")
    else:
        lines += [
            "#ifdef __CUDA_ARCH__",
            f"  if constexpr (std::is_same_v<T, float>) return {op.device_float};",
            f"  else {{ {body} }}",
            "#else",
            f"  {body}",
            "#endif",
        ]
    return lines + ["}", ""]


# generated header -> its text
GENERATED = {
    _INCLUDE / "layout.h": render_layout_header,
    _INCLUDE / "scalar_ops.h": render_scalar_ops_header,
}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def write_headers() -> None:
    for path, render in GENERATED.items():
        path.write_text(render())


if __name__ == "__main__":
    write_headers()
    sys.stdout.write("".join(f"wrote {path}\n" for path in GENERATED))
