// Element types of plan tensors: rounding, conversion and storage.
//
// The CPU runtime computes every value in `double`; these helpers move values between `double` and the
// plan's element types exactly as docs/plan_format.md ("Tensors and memory", CONVERT) prescribes.
#pragma once

#include <cstdint>

#include "jax_mpk/layout.h"

namespace jax_mpk {

using layout::DType;

bool IsValidDType(int64_t code);
const char* DTypeName(DType dtype);
int64_t ByteWidth(DType dtype);
bool IsFloat(DType dtype);
bool IsInteger(DType dtype);  // I32, U32, I8, U8 (not BOOL)

// The value of `dtype` nearest to `value`: round-to-nearest-even for floats, wrap-around for integers
// (after truncation; NaN and infinities wrap to 0), 0/1 for bool. This is the per-node rounding.
double RoundToDType(double value, DType dtype);

// `value` of type `from` converted to `to` with convert_element_type semantics: like RoundToDType, except
// that float -> integer maps NaN to 0 and saturates instead of wrapping.
double ConvertValue(double value, DType from, DType to);

// The smallest and largest values of `dtype` (-inf and +inf for floats): the identities of MAX and MIN.
double LowestValue(DType dtype);
double HighestValue(DType dtype);

// Element `element` of a dense array of `dtype` at `base`. Unaligned addresses are fine.
double ReadElement(DType dtype, const void* base, int64_t element);
// Stores `value`, which must be representable in `dtype` (a result of RoundToDType or ConvertValue).
void WriteElement(DType dtype, void* base, int64_t element, double value);

}  // namespace jax_mpk
