// Error messages are built from mixed parts; this keeps their call sites one line.
#pragma once

#include <sstream>
#include <string>

namespace jax_mpk {

template <typename... Parts>
std::string StrCat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace jax_mpk
