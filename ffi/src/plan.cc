// The plan reader: the int64 words of docs/plan_format.md into a checked Plan (tensors, maps, kernels and their
// nodes, tasks, workers). Over 600 lines because it is one parser of one format, section by section, and every
// word is checked where it is read (ids, shapes, arities against the generated op table), so that a writer bug
// surfaces as an error naming the item and the word, never as a crash of the executors that trust the Plan.
#include "jax_mpk/plan.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "jax_mpk/scalar_ops.h"
#include "jax_mpk/str_cat.h"

namespace jax_mpk {
namespace {

using layout::Header;
using layout::TaskField;

// Bounds every shape (counting zero dims as 1) so that strides, linear offsets and affine index
// arithmetic stay far from int64 overflow and every position is exact as a double.
constexpr int64_t kMaxElements = int64_t{1} << 53;
// The CPU runtime allocates one counter per event and call.
constexpr int64_t kMaxEvents = int64_t{1} << 24;

bool IsStructuralOp(int64_t code) {
  switch (static_cast<NodeOp>(code)) {
    case NodeOp::kLoad:
    case NodeOp::kConst:
    case NodeOp::kIota:
    case NodeOp::kReindex:
    case NodeOp::kAcc:
    case NodeOp::kSelectN:
    case NodeOp::kPiecewise:
    case NodeOp::kReduce:
    case NodeOp::kConvert:
    case NodeOp::kClamp:
    case NodeOp::kIntegerPow:
    case NodeOp::kRound:
      return true;
    default:
      return false;
  }
}

bool IsValidReduceKind(int64_t code) {
  switch (static_cast<ReduceKind>(code)) {
    case ReduceKind::kSum:
    case ReduceKind::kMax:
    case ReduceKind::kMin:
    case ReduceKind::kProd:
    case ReduceKind::kArgmax:
    case ReduceKind::kArgmin:
    case ReduceKind::kAnd:
    case ReduceKind::kOr:
      return true;
  }
  return false;
}

Shape Concatenate(const Shape& a, const Shape& b) {
  Shape result = a;
  for (int d = 0; d < b.rank; ++d) result.dims[result.rank++] = b.dims[d];
  return result;
}

// Reads the word array front to back. Every failure names the item being read (`context_`) and the
// word position, so a writer bug can be found in the plan dump.
class PlanParser {
 public:
  PlanParser(const int64_t* words, size_t num_words) : words_(words), num_words_(num_words) {}

  Plan Parse() {
    ReadHeader();
    ReadBufferSpecs("input", num_inputs_, plan_.inputs);
    ReadBufferSpecs("output", num_outputs_, plan_.outputs);
    if (plan_.rank_input >= 0) {
      context_ = "header";
      const BufferSpec& rank = plan_.inputs[plan_.rank_input];
      Require(rank.dtype == DType::kI32 && rank.shape.rank == 0, "the rank operand must be an int32 scalar");
    }
    ReadAliases();
    ReadTensors();
    ReadMaps();
    ReadKernels();
    ReadTasks();
    ReadSignals();
    ReadWorkers();
    context_ = "plan";
    if (position_ != num_words_) {
      Fail(StrCat(num_words_ - position_, " words follow the last worker list; the sections imply ",
                  position_, " words"));
    }
    return std::move(plan_);
  }

 private:
  [[noreturn]] void Fail(const std::string& message) const {
    throw std::invalid_argument(
        StrCat("invalid jax_mpk plan: ", context_, ": ", message, " (at word ", position_, ")"));
  }

  void Require(bool condition, const char* message) const {
    if (!condition) Fail(message);
  }

  int64_t Next(const char* field) {
    if (position_ >= num_words_) Fail(StrCat("plan ends while reading ", field));
    return words_[position_++];
  }

  // A count of items that each take at least `words_per_item` of the remaining words.
  int64_t ReadCount(const char* field, int64_t words_per_item = 1) {
    const int64_t count = Next(field);
    const auto remaining = static_cast<int64_t>(num_words_ - position_);
    if (count < 0 || (words_per_item > 0 && count > remaining / words_per_item)) {
      Fail(StrCat(field, " = ", count, " does not fit in the remaining ", remaining, " words"));
    }
    return count;
  }

  int CheckId(int64_t id, int64_t bound, const char* field) const {
    if (id < 0 || id >= bound) Fail(StrCat(field, " = ", id, " is not in [0, ", bound, ")"));
    return static_cast<int>(id);
  }

  int ReadId(const char* field, int64_t bound) { return CheckId(Next(field), bound, field); }

  DType ReadDType(const char* field) {
    const int64_t code = Next(field);
    if (!IsValidDType(code)) Fail(StrCat(field, " = ", code, " is not a DType"));
    return static_cast<DType>(code);
  }

  Shape ReadShape(const char* field) {
    Shape shape;
    const int64_t rank = Next(field);
    if (rank < 0 || rank > layout::kMaxRank) {
      Fail(StrCat(field, " rank ", rank, " is not in [0, ", layout::kMaxRank, "]"));
    }
    shape.rank = static_cast<int>(rank);
    int64_t bound = 1;  // product of the dims, zero dims counted as 1
    for (int d = 0; d < shape.rank; ++d) {
      const int64_t dim = Next(field);
      if (dim < 0 || std::max<int64_t>(dim, 1) > kMaxElements / bound) {
        Fail(StrCat(field, " dim ", d, " = ", dim, " is negative or makes the shape too large"));
      }
      shape.dims[d] = dim;
      bound *= std::max<int64_t>(dim, 1);
    }
    return shape;
  }

  int64_t HeaderWord(Header field) const { return words_[static_cast<int>(field)]; }

  int64_t HeaderCount(Header field, const char* name, int64_t limit) {
    const int64_t count = HeaderWord(field);
    if (count < 0 || count > limit) Fail(StrCat(name, " = ", count, " is not in [0, ", limit, "]"));
    return count;
  }

  void ReadHeader() {
    context_ = "header";
    if (num_words_ < static_cast<size_t>(layout::kHeaderWords)) {
      Fail(StrCat("the plan has ", num_words_, " words, fewer than the ", layout::kHeaderWords,
                  " header words"));
    }
    if (HeaderWord(Header::kMagic) != layout::kMagic) {
      Fail(StrCat("bad magic 0x", std::hex, HeaderWord(Header::kMagic), " (expected 0x", layout::kMagic, ")"));
    }
    if (HeaderWord(Header::kVersion) != layout::kVersion) {
      Fail(StrCat("plan format version ", HeaderWord(Header::kVersion), ", this runtime reads version ",
                  layout::kVersion));
    }
    const int64_t platform = HeaderWord(Header::kPlatform);
    if (platform != static_cast<int64_t>(Platform::kCpu) && platform != static_cast<int64_t>(Platform::kCuda)) {
      Fail(StrCat("platform ", platform, " is not a Platform"));
    }
    plan_.platform = static_cast<Platform>(platform);
    // Every section item takes at least one word, which bounds the counts before anything is allocated.
    const auto words = static_cast<int64_t>(num_words_);
    num_inputs_ = HeaderCount(Header::kNumInputs, "NUM_INPUTS", words);
    num_outputs_ = HeaderCount(Header::kNumOutputs, "NUM_OUTPUTS", words);
    plan_.workspace_bytes = HeaderCount(Header::kWorkspaceBytes, "WORKSPACE_BYTES", kMaxElements);
    num_tensors_ = HeaderCount(Header::kNumTensors, "NUM_TENSORS", words);
    num_maps_ = HeaderCount(Header::kNumMaps, "NUM_MAPS", words);
    num_kernels_ = HeaderCount(Header::kNumKernels, "NUM_KERNELS", words);
    num_tasks_ = HeaderCount(Header::kNumTasks, "NUM_TASKS", words / layout::kTaskWords);
    plan_.num_events = HeaderCount(Header::kNumEvents, "NUM_EVENTS", kMaxEvents);
    num_workers_ = HeaderCount(Header::kNumWorkers, "NUM_WORKERS", words);
    num_aliases_ = HeaderCount(Header::kNumAliases, "NUM_ALIASES", words);
    plan_.num_ranks = HeaderCount(Header::kNumRanks, "NUM_RANKS", layout::kMaxPlanRanks);
    if (plan_.num_ranks < 1) Fail("NUM_RANKS must be at least 1");
    plan_.comm_bytes = HeaderCount(Header::kCommBytes, "COMM_BYTES", kMaxElements);
    plan_.num_remote_events = HeaderCount(Header::kNumRemoteEvents, "NUM_REMOTE_EVENTS", kMaxEvents);
    const int64_t rank_input = HeaderWord(Header::kRankInput);
    if (plan_.num_ranks == 1 ? rank_input != -1 : rank_input < 0 || rank_input >= num_inputs_) {
      Fail(StrCat("RANK_INPUT ", rank_input, " is not ", plan_.num_ranks == 1 ? "-1 (one rank)" : "an input"));
    }
    plan_.rank_input = static_cast<int>(rank_input);
    for (int word = static_cast<int>(Header::kRankInput) + 1; word < layout::kHeaderWords; ++word) {
      if (words_[word] != 0) Fail(StrCat("unused header word ", word, " is ", words_[word], ", not 0"));
    }
    position_ = layout::kHeaderWords;
  }

  void ReadBufferSpecs(const char* kind, int64_t count, std::vector<BufferSpec>& specs) {
    specs.reserve(count);
    for (int64_t i = 0; i < count; ++i) {
      context_ = StrCat(kind, " ", i);
      BufferSpec spec;
      spec.dtype = ReadDType("dtype");
      spec.shape = ReadShape("shape");
      specs.push_back(spec);
    }
  }

  void ReadAliases() {
    for (int64_t i = 0; i < num_aliases_; ++i) {
      context_ = StrCat("alias ", i);
      Alias alias;
      alias.input = ReadId("input_index", num_inputs_);
      alias.output = ReadId("output_index", num_outputs_);
      const BufferSpec& input = plan_.inputs[alias.input];
      const BufferSpec& output = plan_.outputs[alias.output];
      if (input.dtype != output.dtype || input.shape != output.shape) {
        Fail(StrCat("input ", alias.input, " ", DTypeName(input.dtype), input.shape.ToString(), " and output ",
                    alias.output, " ", DTypeName(output.dtype), output.shape.ToString(),
                    " differ, so they cannot share a buffer"));
      }
      plan_.aliases.push_back(alias);
    }
  }

  void ReadTensors() {
    plan_.tensors.reserve(num_tensors_);
    for (int64_t t = 0; t < num_tensors_; ++t) {
      context_ = StrCat("tensor ", t);
      Tensor tensor;
      const int64_t kind = Next("kind");
      tensor.index = Next("index");
      tensor.dtype = ReadDType("dtype");
      tensor.shape = ReadShape("shape");
      tensor.kind = static_cast<TensorKind>(kind);
      switch (tensor.kind) {
        case TensorKind::kInput:
          CheckBufferView(tensor, "input", plan_.inputs);
          break;
        case TensorKind::kOutput:
          CheckBufferView(tensor, "output", plan_.outputs);
          break;
        case TensorKind::kWorkspace: {
          const int64_t bytes = tensor.shape.NumElements() * ByteWidth(tensor.dtype);
          if (tensor.index < 0 || tensor.index > plan_.workspace_bytes - bytes) {
            Fail(StrCat("bytes [", tensor.index, ", ", tensor.index + bytes, ") are not inside the ",
                        plan_.workspace_bytes, "-byte workspace"));
          }
          break;
        }
        case TensorKind::kComm: {  // num_ranks slots (row-major); a region of the whole tensor in each rank's buffer
          Require(tensor.shape.NumElements() % plan_.num_ranks == 0,
                  "a COMM tensor holds one equal slot per rank");
          tensor.slot_elements = std::max<int64_t>(tensor.shape.NumElements() / plan_.num_ranks, 1);
          const int64_t bytes = tensor.shape.NumElements() * ByteWidth(tensor.dtype);
          if (tensor.index < 0 || tensor.index > plan_.comm_bytes - bytes) {
            Fail(StrCat("bytes [", tensor.index, ", ", tensor.index + bytes, ") are not inside the ",
                        plan_.comm_bytes, "-byte communication buffer"));
          }
          break;
        }
        default:
          Fail(StrCat("kind ", kind, " is not a TensorKind"));
      }
      int64_t stride = 1;
      for (int d = tensor.shape.rank - 1; d >= 0; --d) {
        tensor.strides[d] = stride;
        stride *= std::max<int64_t>(tensor.shape.dims[d], 1);
      }
      plan_.tensors.push_back(tensor);
    }
  }

  // A tensor may view an operand or result with another shape of the same size.
  void CheckBufferView(const Tensor& tensor, const char* kind, const std::vector<BufferSpec>& buffers) {
    const int index = CheckId(tensor.index, static_cast<int64_t>(buffers.size()), "index");
    const BufferSpec& buffer = buffers[index];
    if (tensor.dtype != buffer.dtype || tensor.shape.NumElements() != buffer.shape.NumElements()) {
      Fail(StrCat(DTypeName(tensor.dtype), tensor.shape.ToString(), " does not view ", kind, " ", index, " ",
                  DTypeName(buffer.dtype), buffer.shape.ToString(), " (same dtype and size required)"));
    }
  }

  void ReadMaps() {
    plan_.maps.reserve(num_maps_);
    for (int64_t m = 0; m < num_maps_; ++m) {
      context_ = StrCat("map ", m);
      IndexMap map;
      map.in_shape = ReadShape("in_shape");
      const int64_t n_stages = ReadCount("n_stages", 2);
      for (int64_t s = 0; s < n_stages; ++s) {
        context_ = StrCat("map ", m, " stage ", s);
        map.stages.push_back(ReadStage(map.out_shape()));
      }
      plan_.maps.push_back(std::move(map));
    }
  }

  MapStage ReadStage(const Shape& in_shape) {
    MapStage stage;
    const int64_t kind = Next("kind");
    stage.kind = static_cast<StageKind>(kind);
    stage.out_shape = ReadShape("out_shape");
    const Shape& out = stage.out_shape;
    switch (stage.kind) {
      case StageKind::kAffine:
        stage.matrix.resize(static_cast<size_t>(out.rank) * in_shape.rank);
        for (int64_t& coefficient : stage.matrix) coefficient = Next("A");
        for (int j = 0; j < out.rank; ++j) stage.offset[j] = Next("offset");
        CheckAffineImage(stage, in_shape);
        break;
      case StageKind::kReshape:
        if (out.NumElements() != in_shape.NumElements()) {
          Fail(StrCat("RESHAPE from ", in_shape.ToString(), " to ", out.ToString(), " changes the size"));
        }
        break;
      default:
        Fail(StrCat("kind ", kind, " is not a StageKind"));
    }
    return stage;
  }

  // An affine map takes its extremes over a box at the box's corners: check them (exactly, in 128 bits)
  // against out_shape, so that every index the map produces lies inside it.
  void CheckAffineImage(const MapStage& stage, const Shape& in_shape) {
    if (in_shape.NumElements() == 0) return;  // the stage is never applied
    for (int j = 0; j < stage.out_shape.rank; ++j) {
      __int128 low = stage.offset[j];
      __int128 high = stage.offset[j];
      for (int d = 0; d < in_shape.rank; ++d) {
        const __int128 span = static_cast<__int128>(stage.matrix[j * in_shape.rank + d]) * (in_shape.dims[d] - 1);
        (span < 0 ? low : high) += span;
      }
      if (low < 0 || high >= stage.out_shape.dims[j]) {
        Fail(StrCat("AFFINE output dim ", j, " takes values outside [0, ", stage.out_shape.dims[j],
                    ") on the input shape ", in_shape.ToString()));
      }
    }
  }

  void ReadKernels() {
    plan_.kernels.reserve(num_kernels_);
    for (int64_t k = 0; k < num_kernels_; ++k) {
      context_ = StrCat("kernel ", k);
      Kernel kernel;
      const int64_t kind = Next("kind");
      kernel.kind = static_cast<KernelKind>(kind);
      if (kernel.kind != KernelKind::kFused && kernel.kind != KernelKind::kDot) {
        Fail(StrCat("kind ", kind, " is not a KernelKind"));
      }
      kernel.domain = ReadShape("domain_shape");
      if (kernel.kind == KernelKind::kDot) ReadDotSpec(kernel);
      const int64_t n_nodes = ReadCount("n_nodes", 5);
      kernel.nodes.reserve(n_nodes);
      for (int64_t n = 0; n < n_nodes; ++n) {
        context_ = StrCat("kernel ", k, " node ", n);
        kernel.nodes.push_back(ReadNode(kernel));
      }
      context_ = StrCat("kernel ", k);
      if (kernel.kind == KernelKind::kDot && kernel.dot.lhs_node >= 0) CheckComputedLhs(kernel);
      const int64_t n_outputs = ReadCount("n_outputs", 4);
      for (int64_t o = 0; o < n_outputs; ++o) {
        context_ = StrCat("kernel ", k, " output ", o);
        kernel.outputs.push_back(ReadKernelOutput(kernel));
      }
      plan_.kernels.push_back(std::move(kernel));
    }
  }

  void CheckComputedLhs(const Kernel& kernel) {
    const int node = kernel.dot.lhs_node;
    if (node >= static_cast<int>(kernel.nodes.size())) {
      Fail(StrCat("lhs_node ", node, " is not one of the kernel's ", kernel.nodes.size(), " nodes"));
    }
    const Shape expected = Concatenate(kernel.domain, kernel.dot.k_shape);
    if (kernel.nodes[node].shape != expected) {
      Fail(StrCat("lhs_node ", node, " has shape ", kernel.nodes[node].shape.ToString(), ", not the product's ",
                  expected.ToString(), " (domain ++ contraction)"));
    }
  }

  void ReadDotSpec(Kernel& kernel) {
    DotSpec& dot = kernel.dot;
    dot.k_shape = ReadShape("k_shape");
    if (kernel.domain.rank + dot.k_shape.rank > layout::kMaxRank) {
      Fail(StrCat("domain rank ", kernel.domain.rank, " + contraction rank ", dot.k_shape.rank, " exceeds ",
                  layout::kMaxRank));
    }
    const Shape operand_index_shape = Concatenate(kernel.domain, dot.k_shape);
    const int64_t lhs_tensor = Next("lhs_tensor");
    if (lhs_tensor == layout::kComputedOperand) {
      dot.lhs_node = CheckId(Next("lhs_node"), INT32_MAX, "lhs_node");  // against the nodes once they are read
    } else {
      dot.lhs_tensor = CheckId(lhs_tensor, num_tensors_, "lhs_tensor");
      dot.lhs_map = ReadId("lhs_map", num_maps_);
      CheckTensorMap("lhs_map", dot.lhs_map, operand_index_shape, dot.lhs_tensor);
    }
    dot.rhs_tensor = ReadId("rhs_tensor", num_tensors_);
    dot.rhs_map = ReadId("rhs_map", num_maps_);
    CheckTensorMap("rhs_map", dot.rhs_map, operand_index_shape, dot.rhs_tensor);
    dot.acc_dtype = ReadDType("acc_dtype");
  }

  // A map that turns indices of `index_shape` into positions of `tensor`.
  void CheckTensorMap(const char* field, int map_id, const Shape& index_shape, int tensor_id) {
    const IndexMap& map = plan_.maps[map_id];
    const Shape& tensor_shape = plan_.tensors[tensor_id].shape;
    if (map.in_shape != index_shape || map.out_shape().rank != tensor_shape.rank) {
      Fail(StrCat(field, " ", map_id, " maps ", map.in_shape.ToString(), " to ", map.out_shape().ToString(),
                  "; expected ", index_shape.ToString(), " to rank ", tensor_shape.rank, " (tensor ",
                  tensor_id, ")"));
    }
  }

  Node ReadNode(const Kernel& kernel) {
    Node node;
    const int64_t op = Next("op");
    const int scalar_arity = ops::ScalarOpArity(static_cast<NodeOp>(op));
    if (scalar_arity == 0 && !IsStructuralOp(op)) Fail(StrCat("op ", op, " is not a NodeOp"));
    node.op = static_cast<NodeOp>(op);
    node.dtype = ReadDType("dtype");
    node.shape = ReadShape("shape");
    const int64_t n_children = ReadCount("n_children");
    const auto earlier_nodes = static_cast<int64_t>(kernel.nodes.size());
    for (int64_t c = 0; c < n_children; ++c) node.children.push_back(ReadId("child (an earlier node)", earlier_nodes));
    const int64_t n_params = ReadCount("n_params");
    std::vector<int64_t> params(n_params);
    for (int64_t& param : params) param = Next("param");

    if (scalar_arity == 0) {
      DecodeStructuralNode(node, params, kernel);
      return node;
    }
    RequireOperands(node, params, static_cast<size_t>(scalar_arity), 0);
    RequireChildrenShaped(node, kernel, 0);
    const DType operand = kernel.nodes[node.children[0]].dtype;
    for (int child : node.children) {
      Require(kernel.nodes[child].dtype == operand, "the operands of a scalar op must have one dtype");
    }
    if (!ops::AcceptsOperand(node.op, operand)) {
      Fail(StrCat("op ", op, " is not defined on ", DTypeName(operand), " operands"));
    }
    return node;
  }

  void RequireOperands(const Node& node, const std::vector<int64_t>& params, size_t n_children, size_t n_params) {
    if (node.children.size() != n_children || params.size() != n_params) {
      Fail(StrCat("op ", static_cast<int64_t>(node.op), " takes ", n_children, " children and ", n_params,
                  " params, not ", node.children.size(), " and ", params.size()));
    }
  }

  // Children evaluated at the node's own index must have the node's shape.
  void RequireChildrenShaped(const Node& node, const Kernel& kernel, size_t first_child) {
    for (size_t c = first_child; c < node.children.size(); ++c) {
      const Shape& child_shape = kernel.nodes[node.children[c]].shape;
      if (child_shape != node.shape) {
        Fail(StrCat("child ", c, " (node ", node.children[c], ") has shape ", child_shape.ToString(),
                    ", not the node's shape ", node.shape.ToString()));
      }
    }
  }

  void DecodeStructuralNode(Node& node, const std::vector<int64_t>& params, const Kernel& kernel) {
    switch (node.op) {
      case NodeOp::kLoad: DecodeLoad(node, params, kernel); return;
      case NodeOp::kConst:
        RequireOperands(node, params, 0, 1);
        std::memcpy(&node.constant, &params[0], sizeof(double));
        return;
      case NodeOp::kIota:
        RequireOperands(node, params, 0, 1);
        node.axis = CheckId(params[0], node.shape.rank, "IOTA dim");
        return;
      case NodeOp::kReindex: {
        RequireOperands(node, params, 1, 1);
        node.map = CheckId(params[0], num_maps_, "REINDEX map");
        const IndexMap& map = plan_.maps[node.map];
        const Shape& child_shape = kernel.nodes[node.children[0]].shape;
        if (map.in_shape != node.shape || map.out_shape() != child_shape) {
          Fail(StrCat("REINDEX map ", node.map, " maps ", map.in_shape.ToString(), " to ",
                      map.out_shape().ToString(), "; expected ", node.shape.ToString(), " to the child's ",
                      child_shape.ToString()));
        }
        return;
      }
      case NodeOp::kAcc:
        RequireOperands(node, params, 0, 0);
        Require(kernel.kind == KernelKind::kDot, "ACC outside a DOT kernel");
        Require(node.shape == kernel.domain, "ACC must have the domain's shape");
        return;
      case NodeOp::kSelectN: {
        Require(node.children.size() >= 2 && params.empty(), "SELECT_N takes a predicate, cases, no params");
        const DType pred_dtype = kernel.nodes[node.children[0]].dtype;
        Require(pred_dtype == DType::kBool || pred_dtype == DType::kI32, "SELECT_N predicate must be bool or i32");
        RequireChildrenShaped(node, kernel, 0);
        return;
      }
      case NodeOp::kPiecewise: DecodePiecewise(node, params, kernel); return;
      case NodeOp::kReduce: DecodeReduce(node, params, kernel); return;
      case NodeOp::kConvert:
        RequireOperands(node, params, 1, 0);
        RequireChildrenShaped(node, kernel, 0);
        return;
      case NodeOp::kClamp:
        RequireOperands(node, params, 3, 0);
        RequireChildrenShaped(node, kernel, 0);
        return;
      case NodeOp::kIntegerPow:
        RequireOperands(node, params, 1, 1);
        RequireChildrenShaped(node, kernel, 0);
        node.exponent = params[0];
        return;
      case NodeOp::kRound:
        RequireOperands(node, params, 1, 1);
        RequireChildrenShaped(node, kernel, 0);
        Require(params[0] == 0 || params[0] == 1, "ROUND method must be 0 or 1");
        node.round_half_to_even = params[0] == 1;
        return;
      default:
        Fail("unhandled structural op");  // IsStructuralOp and this switch list the same ops
    }
  }

  // params: tensor, map, n_dyn, dims[n_dyn], his[n_dyn]; child j is the offset along dims[j].
  void DecodeLoad(Node& node, const std::vector<int64_t>& params, const Kernel& kernel) {
    Require(params.size() >= 3, "LOAD needs params tensor, map, n_dyn");
    node.tensor = CheckId(params[0], num_tensors_, "LOAD tensor");
    node.map = CheckId(params[1], num_maps_, "LOAD map");
    const int64_t n_dyn = params[2];
    if (n_dyn < 0 || params.size() != static_cast<size_t>(3 + 2 * n_dyn) ||
        node.children.size() != static_cast<size_t>(n_dyn)) {
      Fail(StrCat("LOAD with n_dyn = ", n_dyn, " needs ", 3 + 2 * n_dyn, " params and ", n_dyn,
                  " children, not ", params.size(), " and ", node.children.size()));
    }
    CheckTensorMap("LOAD map", node.map, node.shape, node.tensor);
    RequireChildrenShaped(node, kernel, 0);
    for (int64_t j = 0; j < n_dyn; ++j) {
      node.dyn.push_back(CheckDynOffset(params[3 + j], node.children[j], params[3 + n_dyn + j], node.tensor));
    }
  }

  DynOffset CheckDynOffset(int64_t dim, int node, int64_t hi, int tensor_id) {
    DynOffset dyn;
    dyn.dim = CheckId(dim, plan_.tensors[tensor_id].shape.rank, "dynamic dim");
    dyn.node = node;
    if (hi < 0 || hi > kMaxElements) Fail(StrCat("dynamic offset bound hi = ", hi, " is out of range"));
    dyn.hi = hi;
    return dyn;
  }

  // params: axis, lo[n]; part k covers [lo[k], lo[k+1]) along axis, the last part up to shape[axis].
  void DecodePiecewise(Node& node, const std::vector<int64_t>& params, const Kernel& kernel) {
    const size_t n_parts = node.children.size();
    Require(n_parts >= 1 && params.size() == 1 + n_parts, "PIECEWISE takes n parts and params axis, lo[n]");
    node.axis = CheckId(params[0], node.shape.rank, "PIECEWISE axis");
    node.part_bounds.assign(params.begin() + 1, params.end());
    node.part_bounds.push_back(node.shape.dims[node.axis]);
    Require(node.part_bounds[0] == 0, "PIECEWISE lo[0] must be 0");
    for (size_t k = 0; k < n_parts; ++k) {
      const int64_t extent = node.part_bounds[k + 1] - node.part_bounds[k];
      if (extent < 0) Fail(StrCat("PIECEWISE bounds are not increasing at part ", k));
      Shape part_shape = node.shape;
      part_shape.dims[node.axis] = extent;
      const Shape& child_shape = kernel.nodes[node.children[k]].shape;
      if (child_shape != part_shape) {
        Fail(StrCat("PIECEWISE part ", k, " has shape ", child_shape.ToString(), ", expected ",
                    part_shape.ToString()));
      }
    }
  }

  // params: kind, n_inner; the child's shape is the node's shape followed by n_inner reduced dims.
  void DecodeReduce(Node& node, const std::vector<int64_t>& params, const Kernel& kernel) {
    RequireOperands(node, params, 1, 2);
    if (!IsValidReduceKind(params[0])) Fail(StrCat("REDUCE kind ", params[0], " is not a ReduceKind"));
    node.reduce_kind = static_cast<ReduceKind>(params[0]);
    const Shape& child_shape = kernel.nodes[node.children[0]].shape;
    const int64_t n_inner = params[1];
    bool prefix_matches = n_inner >= 0 && child_shape.rank == node.shape.rank + n_inner;
    for (int d = 0; prefix_matches && d < node.shape.rank; ++d) {
      prefix_matches = child_shape.dims[d] == node.shape.dims[d];
    }
    if (!prefix_matches) {
      Fail(StrCat("REDUCE of ", child_shape.ToString(), " over its last ", n_inner, " dims cannot give ",
                  node.shape.ToString()));
    }
    node.n_inner = static_cast<int>(n_inner);
  }

  KernelOutput ReadKernelOutput(const Kernel& kernel) {
    KernelOutput output;
    const auto n_nodes = static_cast<int64_t>(kernel.nodes.size());
    output.node = ReadId("node", n_nodes);
    output.tensor = ReadId("tensor", num_tensors_);
    output.map = ReadId("map", num_maps_);
    Require(kernel.nodes[output.node].shape == kernel.domain, "the output node must have the domain's shape");
    Require(plan_.tensors[output.tensor].kind != TensorKind::kInput,
            "kernels store into OUTPUT or WORKSPACE tensors, never into operands");
    CheckTensorMap("map", output.map, kernel.domain, output.tensor);
    const int64_t n_dyn = ReadCount("n_dyn", 3);
    for (int64_t j = 0; j < n_dyn; ++j) {
      const int64_t dim = Next("dyn dim");
      const int node = ReadId("dyn node", n_nodes);
      const int64_t hi = Next("dyn hi");
      Require(kernel.nodes[node].shape == kernel.domain, "a dynamic offset node must have the domain's shape");
      output.dyn.push_back(CheckDynOffset(dim, node, hi, output.tensor));
    }
    return output;
  }

  void ReadTasks() {
    plan_.tasks.reserve(num_tasks_);
    for (int64_t t = 0; t < num_tasks_; ++t) {
      context_ = StrCat("task ", t);
      const size_t record = position_;
      if (num_words_ - position_ < static_cast<size_t>(layout::kTaskWords)) Fail("plan ends inside the task record");
      position_ += layout::kTaskWords;
      auto field = [&](TaskField f, int offset = 0) { return words_[record + static_cast<int>(f) + offset]; };
      Task task;
      task.kernel = CheckId(field(TaskField::kKernel), num_kernels_, "KERNEL");
      const int64_t wait_event = field(TaskField::kWaitEvent);
      if (wait_event != -1) CheckId(wait_event, plan_.num_events, "WAIT_EVENT");
      task.wait_event = static_cast<int>(wait_event);
      task.wait_count = field(TaskField::kWaitCount);
      task.signal_begin = field(TaskField::kSignalBegin);
      task.signal_count = field(TaskField::kSignalCount);
      Require(task.wait_count >= 0 && task.wait_count <= kMaxElements, "WAIT_COUNT is out of range");
      const int64_t remote_wait_event = field(TaskField::kRemoteWaitEvent);
      if (remote_wait_event != -1) CheckId(remote_wait_event, plan_.num_remote_events, "REMOTE_WAIT_EVENT");
      task.remote_wait_event = static_cast<int>(remote_wait_event);
      task.remote_wait_count = field(TaskField::kRemoteWaitCount);
      task.remote_signal_begin = field(TaskField::kRemoteSignalBegin);
      task.remote_signal_count = field(TaskField::kRemoteSignalCount);
      Require(task.remote_wait_count >= 0 && task.remote_wait_count <= kMaxElements,
              "REMOTE_WAIT_COUNT is out of range");
      const Shape& domain = plan_.kernels[task.kernel].domain;
      for (int d = 0; d < domain.rank; ++d) {
        task.lo[d] = field(TaskField::kLo, d);
        task.hi[d] = field(TaskField::kHi, d);
        if (task.lo[d] < 0 || task.lo[d] > task.hi[d] || task.hi[d] > domain.dims[d]) {
          Fail(StrCat("tile [", task.lo[d], ", ", task.hi[d], ") of domain dim ", d, " is not inside [0, ",
                      domain.dims[d], "]"));
        }
      }
      plan_.tasks.push_back(task);
    }
  }

  void ReadSignals() {
    ReadSignalList("signals", plan_.num_events, plan_.signals, &Task::signal_begin, &Task::signal_count);
    ReadSignalList("remote signals", plan_.num_remote_events, plan_.remote_signals, &Task::remote_signal_begin,
                   &Task::remote_signal_count);
  }

  void ReadSignalList(const char* what, int64_t num_events, std::vector<int>& list, int64_t Task::*begin,
                      int64_t Task::*count) {
    context_ = what;
    const int64_t n_signals = ReadCount("n_signals");
    list.reserve(n_signals);
    for (int64_t s = 0; s < n_signals; ++s) list.push_back(ReadId("event", num_events));
    for (size_t t = 0; t < plan_.tasks.size(); ++t) {
      const Task& task = plan_.tasks[t];
      if (task.*begin < 0 || task.*count < 0 || task.*begin > n_signals - task.*count) {
        context_ = StrCat("task ", t);
        Fail(StrCat(what, " slice [", task.*begin, ", +", task.*count, ") is not inside the ", n_signals,
                    "-entry list"));
      }
    }
  }

  // Every task runs exactly once, so it must appear in exactly one worker list.
  void ReadWorkers() {
    std::vector<int> owner(plan_.tasks.size(), -1);
    plan_.workers.resize(num_workers_);
    for (int64_t w = 0; w < num_workers_; ++w) {
      context_ = StrCat("worker ", w);
      const int64_t n = ReadCount("n");
      for (int64_t i = 0; i < n; ++i) {
        const int task = ReadId("task", num_tasks_);
        if (owner[task] != -1) Fail(StrCat("task ", task, " is already listed by worker ", owner[task]));
        owner[task] = static_cast<int>(w);
        plan_.workers[w].push_back(task);
      }
    }
    const auto unlisted = std::find(owner.begin(), owner.end(), -1);
    if (unlisted != owner.end()) {
      context_ = "workers";
      Fail(StrCat("task ", unlisted - owner.begin(), " is in no worker list"));
    }
  }

  const int64_t* words_;
  size_t num_words_;
  size_t position_ = 0;
  std::string context_;
  Plan plan_;
  int64_t num_inputs_ = 0;
  int64_t num_outputs_ = 0;
  int64_t num_tensors_ = 0;
  int64_t num_maps_ = 0;
  int64_t num_kernels_ = 0;
  int64_t num_tasks_ = 0;
  int64_t num_workers_ = 0;
  int64_t num_aliases_ = 0;
};

}  // namespace

int64_t Shape::NumElements() const {
  int64_t count = 1;
  for (int d = 0; d < rank; ++d) count *= dims[d];
  return count;
}

bool Shape::operator==(const Shape& other) const {
  return rank == other.rank && std::equal(dims.begin(), dims.begin() + rank, other.dims.begin());
}

std::string Shape::ToString() const {
  std::ostringstream out;
  out << '[';
  for (int d = 0; d < rank; ++d) out << (d ? ", " : "") << dims[d];
  out << ']';
  return out.str();
}

std::string IndexToString(const Index& index, int rank) {
  std::ostringstream out;
  out << '(';
  for (int d = 0; d < rank; ++d) out << (d ? ", " : "") << index[d];
  out << ')';
  return out.str();
}

bool NextIndexInBox(Index& index, const Index& lo, const Index& hi, int rank) {
  for (int d = rank - 1; d >= 0; --d) {
    if (++index[d] < hi[d]) return true;
    index[d] = lo[d];
  }
  return false;
}

int64_t Tensor::LinearOffset(const Index& position) const {
  int64_t offset = 0;
  for (int d = 0; d < shape.rank; ++d) offset += position[d] * strides[d];
  return offset;
}

Index IndexMap::Apply(const Index& index) const {
  Index current = index;
  const Shape* current_shape = &in_shape;
  for (const MapStage& stage : stages) {
    const Shape& out = stage.out_shape;
    Index next{};
    if (stage.kind == StageKind::kAffine) {
      const int in_rank = current_shape->rank;
      for (int j = 0; j < out.rank; ++j) {
        const int64_t* row = stage.matrix.data() + static_cast<size_t>(j) * in_rank;
        int64_t value = stage.offset[j];
        for (int d = 0; d < in_rank; ++d) value += row[d] * current[d];
        next[j] = value;
      }
    } else {  // RESHAPE
      int64_t linear = 0;
      for (int d = 0; d < current_shape->rank; ++d) linear = linear * current_shape->dims[d] + current[d];
      // A zero dim means an empty shape, which no index reaches; the guard only avoids dividing by it.
      for (int d = out.rank - 1; d >= 0; --d) {
        const int64_t dim = std::max<int64_t>(out.dims[d], 1);
        next[d] = linear % dim;
        linear /= dim;
      }
    }
    current = next;
    current_shape = &out;
  }
  return current;
}

Plan ParsePlan(const int64_t* words, size_t num_words) { return PlanParser(words, num_words).Parse(); }

}  // namespace jax_mpk
