// The parsed, validated form of a plan (docs/plan_format.md).
//
// ParsePlan checks every count, id, rank and shape relation while it reads, so the runtimes can index
// the structures below without further checks. What depends on run-time values (dynamic offsets, the
// buffers of one call) is checked by the runtimes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "jax_mpk/dtype.h"
#include "jax_mpk/layout.h"

namespace jax_mpk {

using layout::KernelKind;
using layout::NodeOp;
using layout::Platform;
using layout::ReduceKind;
using layout::StageKind;
using layout::TensorKind;

// An index vector; entries past the rank are unused and kept 0.
using Index = std::array<int64_t, layout::kMaxRank>;

struct Shape {
  int rank = 0;
  Index dims{};

  int64_t NumElements() const;
  bool operator==(const Shape& other) const;
  bool operator!=(const Shape& other) const { return !(*this == other); }
  std::string ToString() const;  // "[2, 3]"
};

std::string IndexToString(const Index& index, int rank);  // "(0, 2)"

// Advances `index` to the next index of the box [lo, hi) in row-major order (first `rank` entries).
// Returns false, leaving `index` at `lo`, once the box is exhausted.
bool NextIndexInBox(Index& index, const Index& lo, const Index& hi, int rank);

struct BufferSpec {  // one custom-call operand or result
  DType dtype;
  Shape shape;
};

struct Alias {
  int input;
  int output;
};

struct Tensor {
  TensorKind kind;
  int64_t index;  // operand number, result number, or byte offset in the workspace
  DType dtype;
  Shape shape;
  Index strides{};  // row-major, in elements
  int64_t slot_elements = 0;  // COMM: elements of one rank's slot (element e lives in rank e / slot_elements)

  int64_t LinearOffset(const Index& position) const;
};

struct MapStage {
  StageKind kind;
  Shape out_shape;
  std::vector<int64_t> matrix;  // AFFINE: out_rank x in_rank, row-major
  Index offset{};               // AFFINE
};

// Every index of in_shape maps to an index of out_shape (the reader checks this for AFFINE stages).
struct IndexMap {
  Shape in_shape;
  std::vector<MapStage> stages;

  const Shape& out_shape() const { return stages.empty() ? in_shape : stages.back().out_shape; }
  Index Apply(const Index& index) const;
};

// Position along `dim` is increased by clamp(value of `node`, 0, hi).
struct DynOffset {
  int dim;
  int node;
  int64_t hi;
};

struct Node {
  NodeOp op;
  DType dtype;
  Shape shape;
  std::vector<int> children;  // all earlier nodes of the same kernel

  // Parameters, decoded according to `op`.
  int tensor = -1;                         // LOAD
  int map = -1;                            // LOAD, REINDEX
  std::vector<DynOffset> dyn;              // LOAD: entry j belongs to child j
  double constant = 0.0;                   // CONST
  int axis = 0;                            // IOTA (its dim), PIECEWISE
  std::vector<int64_t> part_bounds;        // PIECEWISE: lo[0..n), then shape[axis]
  ReduceKind reduce_kind = ReduceKind::kSum;  // REDUCE
  int n_inner = 0;                         // REDUCE
  int64_t exponent = 0;                    // INTEGER_POW
  bool round_half_to_even = false;         // ROUND (method 1)
};

struct KernelOutput {
  int node;
  int tensor;
  int map;
  std::vector<DynOffset> dyn;
};

struct DotSpec {
  Shape k_shape;
  int lhs_tensor = -1;
  int lhs_map = -1;
  // A plan fused for a GPU computes the lhs while the product stages it (an RMSNorm row): then lhs_tensor is
  // kComputedOperand and this node of the kernel gives the lhs at (domain index ++ contraction index).
  int lhs_node = -1;
  int rhs_tensor = -1;
  int rhs_map = -1;
  DType acc_dtype = DType::kF32;
};

struct Kernel {
  KernelKind kind;
  Shape domain;
  DotSpec dot;  // DOT kernels only
  std::vector<Node> nodes;
  std::vector<KernelOutput> outputs;
};

struct Task {
  int kernel;
  int wait_event;  // -1: no wait
  int64_t wait_count;
  int64_t signal_begin;
  int64_t signal_count;
  Index lo{};
  Index hi{};
  // Reads of communication buffers: the same tasks on every rank (counters in the communication buffers).
  int remote_wait_event;  // -1: no wait
  int64_t remote_wait_count;
  int64_t remote_signal_begin;
  int64_t remote_signal_count;
};

struct Plan {
  Platform platform;
  int64_t workspace_bytes;
  int64_t num_events;
  int64_t num_ranks = 1;          // devices running this plan together (a shard_map body)
  int64_t comm_bytes = 0;         // one rank's communication buffer (COMM tensors), per half
  int64_t num_remote_events = 0;  // counters in every rank's communication buffer
  int rank_input = -1;            // the int32 scalar operand holding the rank, when num_ranks > 1
  std::vector<BufferSpec> inputs;
  std::vector<BufferSpec> outputs;  // the workspace result excluded
  std::vector<Alias> aliases;
  std::vector<Tensor> tensors;
  std::vector<IndexMap> maps;
  std::vector<Kernel> kernels;
  std::vector<Task> tasks;
  std::vector<int> signals;               // event ids; tasks own slices of it
  std::vector<int> remote_signals;        // remote event ids; tasks own slices of it
  std::vector<std::vector<int>> workers;  // task ids, in execution order
};

// Reads and validates a plan. Throws std::invalid_argument describing the first problem found.
Plan ParsePlan(const int64_t* words, size_t num_words);

}  // namespace jax_mpk
