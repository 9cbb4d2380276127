// Task bodies of the CPU runtime: evaluates a kernel over one tile, in double, exactly as the table in
// docs/plan_format.md defines each node.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "jax_mpk/plan.h"

namespace jax_mpk {

// A failure inside a task body, e.g. a dynamic offset that moves a position outside its tensor.
class TaskError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One per worker thread: it keeps per-task memos, so it must not be shared between threads.
class TileEvaluator {
 public:
  // `tensor_data[t]` is where tensor t of `plan` lives during this call; a COMM tensor's slot r lives at its
  // byte offset in `comm_bases[r]` (rank r's communication buffer, the half of this call).
  TileEvaluator(const Plan& plan, const std::vector<void*>& tensor_data, std::vector<char*> comm_bases = {});

  // Computes and stores every output of the task's kernel over the task's tile, row-major.
  // Throws TaskError.
  void RunTile(const Task& task);

 private:
  // The last value of a node. Nodes are pure within a task, so this computes a row reduction once per row
  // and keeps shared subexpressions of a node DAG from being recomputed.
  struct Memo {
    bool valid = false;
    Index index{};
    double value = 0.0;
  };

  // How a DOT kernel reads one operand at (domain index ++ contraction index).
  struct DotOperand {
    int tensor_id = -1;
    int map_id = -1;
    int node_id = -1;  // a computed operand: this node, evaluated at (domain index ++ contraction index)
    // When the map is the identity or a single AFFINE stage, positions are affine in the index and the
    // operand is read through precomputed strides; otherwise through IndexMap::Apply.
    bool affine = false;
    std::vector<int64_t> matrix;  // position dims x (domain rank + contraction rank)
    Index offset{};
    Index contraction_step{};     // linear element step per unit of each contraction dim
    Index contraction_low{};      // per position dim: extremes of the contraction part over the
    Index contraction_high{};     //   contraction box, to bounds-check a whole row at once
  };

  double Eval(int node_id, const Index& index);
  double Compute(const Node& node, const Index& index);
  double Load(const Node& node, const Index& index);
  double SelectN(const Node& node, const Index& index);
  double Piecewise(const Node& node, const Index& index);
  double Reduce(const Node& node, const Index& index);
  double Accumulate(const Index& domain_index);
  void AccumulateRun(const Index& first, int64_t length);

  // Where element `element` of tensor `tensor_id` lives: a base address and the element's index from it.
  std::pair<void*, int64_t> Locate(int tensor_id, int64_t element) const;
  double ReadTensor(int tensor_id, int64_t element) const;
  void WriteTensor(int tensor_id, int64_t element, double value) const;
  void AddDynOffsets(const std::vector<DynOffset>& dyn, const Index& index, Index& position);
  int64_t CheckedElement(int tensor_id, const Index& position, const char* access) const;

  void PrepareDot(int kernel_id);
  DotOperand MakeDotOperand(int tensor_id, int map_id) const;
  int64_t AffineRowBase(const DotOperand& operand, const Index& domain_index, const char* side) const;
  int64_t ContractionOffset(const DotOperand& operand, const Index& contraction_index) const;
  double ReadDotOperand(const DotOperand& operand, int64_t affine_element, const Index& domain_index,
                        const Index& contraction_index);

  const Plan& plan_;
  const std::vector<void*>& tensor_data_;
  const std::vector<char*> comm_bases_;
  const Kernel* kernel_ = nullptr;
  std::vector<Memo> memos_;
  int prepared_dot_kernel_ = -1;
  DotOperand lhs_;
  DotOperand rhs_;
  // Accumulators of one run of domain indices that differ only in the last dim (see Accumulate).
  Index tile_lo_{};
  Index tile_hi_{};
  bool run_valid_ = false;
  Index run_first_{};
  std::vector<double> run_accumulators_;
  std::vector<uint64_t> run_modular_accumulators_;
  std::vector<int64_t> run_lhs_bases_;
  std::vector<int64_t> run_rhs_bases_;
  std::vector<double> output_values_;
  std::vector<int64_t> output_elements_;
};

}  // namespace jax_mpk
