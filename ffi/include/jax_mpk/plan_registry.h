// Process-wide plans, by key. Python registers a plan once; every custom call names it by its key
// (an FFI attribute), so the plan's words never travel through XLA.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "jax_mpk/plan.h"

namespace jax_mpk {

// Stores `plan` under `key`, replacing any plan registered under it before. Calls already running
// keep the plan they started with.
void RegisterPlan(std::string key, std::shared_ptr<const Plan> plan);

// The plan registered under `key`, or nullptr.
std::shared_ptr<const Plan> FindPlan(std::string_view key);

}  // namespace jax_mpk
