#include "jax_mpk/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace jax_mpk {
namespace {

// Layout of a binary floating-point format, for rounding doubles to it.
struct FloatFormat {
  int precision;     // significand bits, the implicit leading bit included
  int min_exponent;  // exponent of the smallest normal number
  int max_exponent;  // exponent of the largest finite number
};

constexpr FloatFormat kBf16Format{8, -126, 127};
constexpr FloatFormat kF16Format{11, -14, 15};

struct IntegerFormat {
  int bits;
  bool is_signed;
};

const layout::DTypeInfo& Info(DType dtype) { return layout::kDTypeInfo[static_cast<int>(dtype)]; }

IntegerFormat IntegerFormatOf(DType dtype) {
  const layout::ValueClass value_class = Info(dtype).value_class;
  if (value_class != layout::ValueClass::kSigned && value_class != layout::ValueClass::kUnsigned) return {0, false};
  return {8 * Info(dtype).bytes, value_class == layout::ValueClass::kSigned};
}

// Round half to even without depending on the floating-point environment's rounding mode.
double RoundHalfToEven(double value) {
  if (std::fabs(value - std::trunc(value)) == 0.5) return 2.0 * std::round(value / 2.0);
  return std::round(value);
}

// Rounds to the nearest value of `format` (ties to even, subnormals included, overflow to infinity).
// Scaling by powers of two is exact in double, so this rounds once, directly from the double.
double RoundToFormat(double value, const FloatFormat& format) {
  if (!std::isfinite(value) || value == 0.0) return value;
  int exponent;  // value = m * 2^exponent with 0.5 <= |m| < 1
  std::frexp(value, &exponent);
  const int quantum_exponent = std::max(exponent - 1, format.min_exponent) - (format.precision - 1);
  const double rounded =
      std::ldexp(RoundHalfToEven(std::ldexp(value, -quantum_exponent)), quantum_exponent);
  if (std::fabs(rounded) >= std::ldexp(1.0, format.max_exponent + 1)) {
    return std::copysign(std::numeric_limits<double>::infinity(), value);
  }
  return rounded;
}

double WrapToInteger(double value, const IntegerFormat& format) {
  if (!std::isfinite(value)) return 0.0;
  const double modulus = std::ldexp(1.0, format.bits);
  double wrapped = std::fmod(std::trunc(value), modulus);  // exact, in (-modulus, modulus)
  if (wrapped < 0) wrapped += modulus;
  if (format.is_signed && wrapped >= modulus / 2) wrapped -= modulus;
  return wrapped == 0.0 ? 0.0 : wrapped;  // no negative zero in integer types
}

template <typename T>
T LoadUnaligned(const void* base, int64_t element) {
  T value;
  std::memcpy(&value, static_cast<const char*>(base) + element * sizeof(T), sizeof(T));
  return value;
}

template <typename T>
void StoreUnaligned(void* base, int64_t element, T value) {
  std::memcpy(static_cast<char*>(base) + element * sizeof(T), &value, sizeof(T));
}

uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

float FloatFromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// `value` must be a bfloat16 value, so the top half of its float32 pattern is exact.
uint16_t EncodeBf16(double value) {
  const uint32_t bits = FloatBits(static_cast<float>(value));
  const uint16_t top = static_cast<uint16_t>(bits >> 16);
  return std::isnan(value) ? static_cast<uint16_t>(top | 0x0040) : top;  // keep NaN quiet (non-zero)
}

double DecodeBf16(uint16_t bits) { return FloatFromBits(static_cast<uint32_t>(bits) << 16); }

// `value` must be a float16 value.
uint16_t EncodeF16(double value) {
  const uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  if (std::isnan(value)) return sign | 0x7E00;
  const double magnitude = std::fabs(value);
  if (std::isinf(magnitude)) return sign | 0x7C00;
  if (magnitude == 0.0) return sign;
  int exponent;
  std::frexp(magnitude, &exponent);
  const int unbiased = exponent - 1;  // magnitude in [2^unbiased, 2^(unbiased+1))
  if (unbiased < kF16Format.min_exponent) {  // subnormal: multiples of 2^-24
    return sign | static_cast<uint16_t>(std::ldexp(magnitude, 24));
  }
  const auto mantissa = static_cast<uint16_t>(std::ldexp(magnitude, 10 - unbiased) - 1024.0);
  return sign | static_cast<uint16_t>((unbiased + 15) << 10) | mantissa;
}

double DecodeF16(uint16_t bits) {
  const int exponent_field = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  double magnitude;
  if (exponent_field == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else if (exponent_field == 0x1F) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else {
    magnitude = std::ldexp(mantissa + 1024, exponent_field - 25);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
}

}  // namespace

bool IsValidDType(int64_t code) { return code >= 0 && code < layout::kNumDTypes; }

const char* DTypeName(DType dtype) { return Info(dtype).name; }

int64_t ByteWidth(DType dtype) { return Info(dtype).bytes; }

bool IsFloat(DType dtype) { return Info(dtype).value_class == layout::ValueClass::kFloat; }

bool IsInteger(DType dtype) { return IntegerFormatOf(dtype).bits != 0; }

double RoundToDType(double value, DType dtype) {
  switch (dtype) {
    case DType::kF32: return static_cast<float>(value);  // IEEE conversion: one RNE rounding
    case DType::kBf16: return RoundToFormat(value, kBf16Format);
    case DType::kF16: return RoundToFormat(value, kF16Format);
    case DType::kBool: return value != 0.0 ? 1.0 : 0.0;  // NaN is true, as in XLA
    default: return WrapToInteger(value, IntegerFormatOf(dtype));
  }
}

double ConvertValue(double value, DType from, DType to) {
  if (IsFloat(from) && IsInteger(to)) {
    if (std::isnan(value)) return 0.0;
    return std::clamp(std::trunc(value), LowestValue(to), HighestValue(to)) + 0.0;  // +0.0: no -0
  }
  return RoundToDType(value, to);
}

double LowestValue(DType dtype) {
  if (IsFloat(dtype)) return -std::numeric_limits<double>::infinity();
  const IntegerFormat format = IntegerFormatOf(dtype);
  if (format.bits == 0) return 0.0;  // bool
  return format.is_signed ? -std::ldexp(1.0, format.bits - 1) : 0.0;
}

double HighestValue(DType dtype) {
  if (IsFloat(dtype)) return std::numeric_limits<double>::infinity();
  const IntegerFormat format = IntegerFormatOf(dtype);
  if (format.bits == 0) return 1.0;  // bool
  return std::ldexp(1.0, format.is_signed ? format.bits - 1 : format.bits) - 1.0;
}

double ReadElement(DType dtype, const void* base, int64_t element) {
  switch (dtype) {
    case DType::kF32: return LoadUnaligned<float>(base, element);
    case DType::kBf16: return DecodeBf16(LoadUnaligned<uint16_t>(base, element));
    case DType::kF16: return DecodeF16(LoadUnaligned<uint16_t>(base, element));
    case DType::kI32: return LoadUnaligned<int32_t>(base, element);
    case DType::kU32: return LoadUnaligned<uint32_t>(base, element);
    case DType::kI8: return LoadUnaligned<int8_t>(base, element);
    case DType::kU8: return LoadUnaligned<uint8_t>(base, element);
    case DType::kBool: return LoadUnaligned<uint8_t>(base, element) != 0 ? 1.0 : 0.0;
  }
  return 0.0;
}

void WriteElement(DType dtype, void* base, int64_t element, double value) {
  switch (dtype) {
    case DType::kF32: return StoreUnaligned(base, element, static_cast<float>(value));
    case DType::kBf16: return StoreUnaligned(base, element, EncodeBf16(value));
    case DType::kF16: return StoreUnaligned(base, element, EncodeF16(value));
    case DType::kI32: return StoreUnaligned(base, element, static_cast<int32_t>(value));
    case DType::kU32: return StoreUnaligned(base, element, static_cast<uint32_t>(value));
    case DType::kI8: return StoreUnaligned(base, element, static_cast<int8_t>(value));
    case DType::kU8: return StoreUnaligned(base, element, static_cast<uint8_t>(value));
    case DType::kBool: return StoreUnaligned(base, element, static_cast<uint8_t>(value != 0.0));
  }
}

}  // namespace jax_mpk
