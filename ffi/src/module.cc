// The Python extension `jax_mpk._ext`: FFI handler capsules and the process-wide plan registry.
#include <cstdint>
#include <memory>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "jax_mpk/cpu_executor.h"
#include "jax_mpk/plan.h"
#include "jax_mpk/plan_registry.h"
#include "jax_mpk/str_cat.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_mpk {
namespace {

using PlanWords = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

nb::dict Registrations() {
  nb::dict targets;
  targets["jax_mpk_megakernel"] = nb::capsule(reinterpret_cast<void*>(JaxMpkMegakernelCpu));
  return targets;
}

void RegisterPlanFromWords(std::string key, const PlanWords& words) {
  // ParsePlan's std::invalid_argument reaches Python as ValueError.
  auto plan = std::make_shared<const Plan>(ParsePlan(words.data(), words.shape(0)));
  RegisterPlan(std::move(key), std::move(plan));
}

nb::dict PlanSummary(const std::string& key) {
  const std::shared_ptr<const Plan> plan = FindPlan(key);
  if (!plan) throw nb::key_error(StrCat("jax_mpk: plan not registered in this process: '", key, "'").c_str());
  nb::dict summary;
  summary["platform"] = static_cast<int64_t>(plan->platform);
  summary["num_inputs"] = plan->inputs.size();
  summary["num_outputs"] = plan->outputs.size();
  summary["num_tensors"] = plan->tensors.size();
  summary["num_maps"] = plan->maps.size();
  summary["num_kernels"] = plan->kernels.size();
  summary["num_tasks"] = plan->tasks.size();
  summary["num_events"] = plan->num_events;
  summary["num_workers"] = plan->workers.size();
  summary["workspace_bytes"] = plan->workspace_bytes;
  return summary;
}

}  // namespace
}  // namespace jax_mpk

NB_MODULE(_ext, m) {
  m.doc() = "C++ runtime of jax_mpk: FFI handlers and the process-wide plan registry.";
  m.def("registrations", &jax_mpk::Registrations,
        "FFI handler capsules by custom-call target name, for jax.ffi.register_ffi_target(..., platform='cpu').");
  m.def("register_plan", &jax_mpk::RegisterPlanFromWords, "key"_a, "words"_a,
        "Parses and validates a plan (1-D int64 array) and stores it under `key`, replacing any earlier plan "
        "with that key. Raises ValueError for an invalid plan.");
  m.def(
      "has_plan", [](const std::string& key) { return jax_mpk::FindPlan(key) != nullptr; }, "key"_a,
      "Whether a plan is registered under `key` in this process.");
  m.def("plan_summary", &jax_mpk::PlanSummary, "key"_a,
        "Counts of a registered plan: platform, num_inputs, num_outputs, num_tensors, num_maps, num_kernels, "
        "num_tasks, num_events, num_workers, workspace_bytes. Raises KeyError for an unknown key.");
}
