#include "jax_mpk/plan_registry.h"

#include <functional>
#include <map>
#include <mutex>
#include <utility>

namespace jax_mpk {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<const Plan>, std::less<>> plans;
};

Registry& GlobalRegistry() {
  static auto* registry = new Registry();  // never destroyed: handlers may run during interpreter exit
  return *registry;
}

}  // namespace

void RegisterPlan(std::string key, std::shared_ptr<const Plan> plan) {
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  registry.plans[std::move(key)] = std::move(plan);
}

std::shared_ptr<const Plan> FindPlan(std::string_view key) {
  Registry& registry = GlobalRegistry();
  std::lock_guard<std::mutex> lock(registry.mutex);
  const auto found = registry.plans.find(key);
  return found == registry.plans.end() ? nullptr : found->second;
}

}  // namespace jax_mpk
