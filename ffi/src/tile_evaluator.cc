#include "jax_mpk/tile_evaluator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "jax_mpk/scalar_ops.h"
#include "jax_mpk/str_cat.h"

namespace jax_mpk {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Integer node values are integral doubles. A value that is not (a writer bug) must still not reach an
// undefined float -> int conversion.
int64_t ToInt64(double value) { return std::fabs(value) < 0x1p63 ? static_cast<int64_t>(value) : 0; }

// Integer dtypes have at most 32 bits, so integer results only matter modulo 2^32: unsigned 64-bit
// arithmetic gets them exactly (where double products would round), and the low 32 bits convert to double
// exactly. RoundToDType then wraps them into the node's dtype.
uint64_t ToModular(double value) { return static_cast<uint64_t>(ToInt64(value)); }
double FromModular(uint64_t value) { return static_cast<double>(value & 0xFFFFFFFFu); }
double WrappingProduct(double a, double b) { return FromModular(ToModular(a) * ToModular(b)); }

// NaN wins, and -0 < +0 as in XLA (std::max/min would return the first of two equal zeros).
double NanPropagatingMax(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return a == b ? (std::signbit(a) ? b : a) : std::max(a, b);
}
double NanPropagatingMin(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return a == b ? (std::signbit(a) ? a : b) : std::min(a, b);
}

double RoundHalfToEven(double value) {
  if (std::fabs(value - std::trunc(value)) == 0.5) return 2.0 * std::round(value / 2.0);
  return std::round(value);
}

// x ** n by squaring; integers wrap at every product, as repeated multiplication in the dtype would.
double Power(double base, int64_t exponent, bool integer) {
  if (integer && exponent < 0) {  // only 1 and -1 have integer reciprocals
    if (base == 1.0) return 1.0;
    if (base == -1.0) return (exponent % 2 == 0) ? 1.0 : -1.0;
    return 0.0;
  }
  uint64_t remaining = exponent < 0 ? -static_cast<uint64_t>(exponent) : static_cast<uint64_t>(exponent);
  double result = 1.0;
  for (double factor = base; remaining != 0; remaining >>= 1) {
    if (remaining & 1) result = integer ? WrappingProduct(result, factor) : result * factor;
    if (remaining > 1) factor = integer ? WrappingProduct(factor, factor) : factor * factor;
  }
  return exponent < 0 ? 1.0 / result : result;
}

// Position change for a dynamic offset: clamp(value, 0, hi), NaN counted as 0.
int64_t ClampOffset(double value, int64_t hi) {
  if (!(value > 0.0)) return 0;
  return value >= static_cast<double>(hi) ? hi : static_cast<int64_t>(value);
}

}  // namespace

TileEvaluator::TileEvaluator(const Plan& plan, const std::vector<void*>& tensor_data, std::vector<char*> comm_bases)
    : plan_(plan), tensor_data_(tensor_data), comm_bases_(std::move(comm_bases)) {}

std::pair<void*, int64_t> TileEvaluator::Locate(int tensor_id, int64_t element) const {
  const Tensor& tensor = plan_.tensors[tensor_id];
  if (tensor.kind != TensorKind::kComm) return {tensor_data_[tensor_id], element};
  const int64_t slot = tensor.slot_elements;  // slot r: rank r's buffer
  return {comm_bases_[element / slot] + tensor.index, element % slot};
}

double TileEvaluator::ReadTensor(int tensor_id, int64_t element) const {
  const auto [base, at] = Locate(tensor_id, element);
  return ReadElement(plan_.tensors[tensor_id].dtype, base, at);
}

void TileEvaluator::WriteTensor(int tensor_id, int64_t element, double value) const {
  const auto [base, at] = Locate(tensor_id, element);
  WriteElement(plan_.tensors[tensor_id].dtype, base, at, value);
}

void TileEvaluator::RunTile(const Task& task) {
  kernel_ = &plan_.kernels[task.kernel];
  memos_.assign(kernel_->nodes.size(), Memo{});  // other tasks may have changed what LOADs read
  run_valid_ = false;
  tile_lo_ = task.lo;
  tile_hi_ = task.hi;
  if (kernel_->kind == KernelKind::kDot) PrepareDot(task.kernel);
  const int rank = kernel_->domain.rank;
  for (int d = 0; d < rank; ++d) {
    if (task.lo[d] == task.hi[d]) return;  // empty tile
  }
  const std::vector<KernelOutput>& outputs = kernel_->outputs;
  output_values_.resize(outputs.size());
  output_elements_.resize(outputs.size());
  Index index = task.lo;
  do {
    try {
      // Evaluate everything at this index before storing anything, so no output reads another's store.
      for (size_t o = 0; o < outputs.size(); ++o) {
        const KernelOutput& output = outputs[o];
        const Node& node = kernel_->nodes[output.node];
        const Tensor& tensor = plan_.tensors[output.tensor];
        output_values_[o] = ConvertValue(Eval(output.node, index), node.dtype, tensor.dtype);
        Index position = plan_.maps[output.map].Apply(index);
        AddDynOffsets(output.dyn, index, position);
        output_elements_[o] = CheckedElement(output.tensor, position, "store");
      }
      for (size_t o = 0; o < outputs.size(); ++o) {
        const int tensor_id = outputs[o].tensor;
        WriteTensor(tensor_id, output_elements_[o], output_values_[o]);
      }
    } catch (const TaskError& error) {
      throw TaskError(StrCat(error.what(), " at domain index ", IndexToString(index, rank)));
    }
  } while (NextIndexInBox(index, task.lo, task.hi, rank));
}

double TileEvaluator::Eval(int node_id, const Index& index) {
  const Node& node = kernel_->nodes[node_id];
  Memo& memo = memos_[node_id];
  if (memo.valid && std::equal(index.begin(), index.begin() + node.shape.rank, memo.index.begin())) {
    return memo.value;
  }
  const double value = RoundToDType(Compute(node, index), node.dtype);
  memo.valid = true;
  memo.index = index;
  memo.value = value;
  return value;
}

double TileEvaluator::Compute(const Node& node, const Index& index) {
  const std::vector<int>& children = node.children;
  switch (node.op) {
    case NodeOp::kLoad: return Load(node, index);
    case NodeOp::kConst: return node.constant;
    case NodeOp::kIota: return static_cast<double>(index[node.axis]);
    case NodeOp::kReindex: return Eval(children[0], plan_.maps[node.map].Apply(index));
    case NodeOp::kAcc: return Accumulate(index);
    case NodeOp::kSelectN: return SelectN(node, index);
    case NodeOp::kPiecewise: return Piecewise(node, index);
    case NodeOp::kReduce: return Reduce(node, index);
    case NodeOp::kConvert:
      return ConvertValue(Eval(children[0], index), kernel_->nodes[children[0]].dtype, node.dtype);
    case NodeOp::kClamp: {
      const double lo = Eval(children[0], index);
      const double x = Eval(children[1], index);
      const double hi = Eval(children[2], index);
      return NanPropagatingMin(NanPropagatingMax(x, lo), hi);
    }
    case NodeOp::kIntegerPow: return Power(Eval(children[0], index), node.exponent, IsInteger(node.dtype));
    case NodeOp::kRound: {
      const double x = Eval(children[0], index);
      return node.round_half_to_even ? RoundHalfToEven(x) : std::round(x);
    }
    default: {  // a scalar op (jax_mpk/scalar_ops.py): computed in its operands' type
      double args[ops::kMaxScalarOpArity];
      for (size_t c = 0; c < children.size(); ++c) args[c] = Eval(children[c], index);
      return ops::EvaluateScalarOp(node.op, kernel_->nodes[children[0]].dtype, args);
    }
  }
}

double TileEvaluator::Load(const Node& node, const Index& index) {
  Index position = plan_.maps[node.map].Apply(index);
  AddDynOffsets(node.dyn, index, position);
  const int64_t element = CheckedElement(node.tensor, position, "LOAD");
  const DType stored = plan_.tensors[node.tensor].dtype;
  return ConvertValue(ReadTensor(node.tensor, element), stored, node.dtype);
}

// A bool predicate picks case 0 or 1. An i32 predicate outside the cases is clamped to them, which is
// what the select tree XLA builds for select_n does.
double TileEvaluator::SelectN(const Node& node, const Index& index) {
  const auto n_cases = static_cast<int64_t>(node.children.size()) - 1;
  const int64_t selected = std::clamp<int64_t>(ToInt64(Eval(node.children[0], index)), 0, n_cases - 1);
  return Eval(node.children[1 + selected], index);
}

double TileEvaluator::Piecewise(const Node& node, const Index& index) {
  // part_bounds = lo[0] = 0, ..., lo[n-1], shape[axis]; the index lies in [0, shape[axis]), so the last
  // lo[k] <= index[axis] names a part that contains it.
  const std::vector<int64_t>& bounds = node.part_bounds;
  const auto part = std::upper_bound(bounds.begin(), bounds.end() - 1, index[node.axis]) - bounds.begin() - 1;
  Index part_index = index;
  part_index[node.axis] -= bounds[part];
  return Eval(node.children[part], part_index);
}

double TileEvaluator::Reduce(const Node& node, const Index& index) {
  const int child_id = node.children[0];
  const Shape& child_shape = kernel_->nodes[child_id].shape;
  // The box of child indices index ++ j: outer dims fixed, inner dims whole.
  Index lo = index;
  Index hi = index;
  for (int d = 0; d < node.shape.rank; ++d) hi[d] = index[d] + 1;
  for (int d = node.shape.rank; d < child_shape.rank; ++d) {
    lo[d] = 0;
    hi[d] = child_shape.dims[d];
  }
  const bool integer = IsInteger(node.dtype);
  const ReduceKind kind = node.reduce_kind;

  double result;
  switch (kind) {
    case ReduceKind::kSum: result = 0.0; break;
    case ReduceKind::kProd: result = 1.0; break;
    case ReduceKind::kMax: result = LowestValue(node.dtype); break;
    case ReduceKind::kMin: result = HighestValue(node.dtype); break;
    case ReduceKind::kAnd: result = node.dtype == DType::kBool ? 1.0 : -1.0; break;  // all bits set
    case ReduceKind::kOr: result = 0.0; break;
    default: result = 0.0; break;  // ARGMAX, ARGMIN: position 0 of an empty reduction
  }
  if (child_shape.NumElements() == 0) return result;
  // XLA rewrites a sum over one element into the element itself (its +0 initial value is not added), so the
  // sum of a single -0 is -0; starting from -0 then is the same (x + -0 == x for every other x).
  bool one_element = true;
  for (int d = node.shape.rank; d < child_shape.rank; ++d) one_element = one_element && child_shape.dims[d] == 1;
  if (kind == ReduceKind::kSum && one_element) result = -0.0;

  uint64_t modular_sum = 0;  // integer SUM, exact modulo 2^32
  double best = 0.0;         // ARGMAX, ARGMIN
  int64_t position = 0;      // row-major position in the inner box
  Index child_index = lo;
  do {
    const double value = Eval(child_id, child_index);
    switch (kind) {
      case ReduceKind::kSum:
        if (integer) {
          modular_sum += ToModular(value);
        } else {
          result += value;
        }
        break;
      case ReduceKind::kProd: result = integer ? WrappingProduct(result, value) : result * value; break;
      case ReduceKind::kMax: result = NanPropagatingMax(result, value); break;
      case ReduceKind::kMin: result = NanPropagatingMin(result, value); break;
      case ReduceKind::kAnd: result = static_cast<double>(ToInt64(result) & ToInt64(value)); break;
      case ReduceKind::kOr: result = static_cast<double>(ToInt64(result) | ToInt64(value)); break;
      default: {  // ARGMAX, ARGMIN: the first extreme wins, and a NaN beats everything
        const bool better = kind == ReduceKind::kArgmax ? value > best : value < best;
        if (position == 0 || (!std::isnan(best) && (std::isnan(value) || better))) {
          best = value;
          result = static_cast<double>(position);
        }
      }
    }
    ++position;
  } while (NextIndexInBox(child_index, lo, hi, child_shape.rank));
  if (kind == ReduceKind::kSum && integer) return FromModular(modular_sum);
  return result;
}

void TileEvaluator::AddDynOffsets(const std::vector<DynOffset>& dyn, const Index& index, Index& position) {
  for (const DynOffset& offset : dyn) position[offset.dim] += ClampOffset(Eval(offset.node, index), offset.hi);
}

int64_t TileEvaluator::CheckedElement(int tensor_id, const Index& position, const char* access) const {
  const Tensor& tensor = plan_.tensors[tensor_id];
  for (int d = 0; d < tensor.shape.rank; ++d) {
    if (position[d] < 0 || position[d] >= tensor.shape.dims[d]) {
      throw TaskError(StrCat(access, " position ", IndexToString(position, tensor.shape.rank),
                             " is outside tensor ", tensor_id, " of shape ", tensor.shape.ToString()));
    }
  }
  return tensor.LinearOffset(position);
}

void TileEvaluator::PrepareDot(int kernel_id) {
  if (prepared_dot_kernel_ == kernel_id) return;
  if (kernel_->dot.lhs_node >= 0) {
    lhs_ = DotOperand{};
    lhs_.node_id = kernel_->dot.lhs_node;
  } else {
    lhs_ = MakeDotOperand(kernel_->dot.lhs_tensor, kernel_->dot.lhs_map);
  }
  rhs_ = MakeDotOperand(kernel_->dot.rhs_tensor, kernel_->dot.rhs_map);
  prepared_dot_kernel_ = kernel_id;
}

TileEvaluator::DotOperand TileEvaluator::MakeDotOperand(int tensor_id, int map_id) const {
  DotOperand operand;
  operand.tensor_id = tensor_id;
  operand.map_id = map_id;
  const IndexMap& map = plan_.maps[map_id];
  const Tensor& tensor = plan_.tensors[tensor_id];
  const int in_rank = map.in_shape.rank;
  if (map.stages.empty()) {  // identity
    operand.matrix.assign(static_cast<size_t>(tensor.shape.rank) * in_rank, 0);
    for (int j = 0; j < tensor.shape.rank; ++j) operand.matrix[j * in_rank + j] = 1;
  } else if (map.stages.size() == 1 && map.stages[0].kind == StageKind::kAffine) {
    operand.matrix = map.stages[0].matrix;
    operand.offset = map.stages[0].offset;
  } else {
    return operand;
  }
  operand.affine = true;
  const Shape& contraction = kernel_->dot.k_shape;
  const int domain_rank = kernel_->domain.rank;
  for (int j = 0; j < tensor.shape.rank; ++j) {
    for (int d = 0; d < contraction.rank; ++d) {
      const int64_t coefficient = operand.matrix[j * in_rank + domain_rank + d];
      operand.contraction_step[d] += coefficient * tensor.strides[j];
      const int64_t span = coefficient * std::max<int64_t>(contraction.dims[d] - 1, 0);
      (span < 0 ? operand.contraction_low[j] : operand.contraction_high[j]) += span;
    }
  }
  return operand;
}

// Linear element offset of an affine operand at (domain_index ++ 0), after checking that the positions
// for every contraction index lie inside the tensor.
int64_t TileEvaluator::AffineRowBase(const DotOperand& operand, const Index& domain_index, const char* side) const {
  const Tensor& tensor = plan_.tensors[operand.tensor_id];
  const int in_rank = plan_.maps[operand.map_id].in_shape.rank;
  int64_t base = 0;
  for (int j = 0; j < tensor.shape.rank; ++j) {
    int64_t position = operand.offset[j];
    for (int d = 0; d < kernel_->domain.rank; ++d) position += operand.matrix[j * in_rank + d] * domain_index[d];
    const int64_t low = position + operand.contraction_low[j];
    const int64_t high = position + operand.contraction_high[j];
    if (low < 0 || high >= tensor.shape.dims[j]) {
      throw TaskError(StrCat("DOT ", side, " positions [", low, ", ", high, "] along dim ", j, " for domain index ",
                             IndexToString(domain_index, kernel_->domain.rank), " are outside tensor ",
                             operand.tensor_id, " of shape ", tensor.shape.ToString()));
    }
    base += position * tensor.strides[j];
  }
  return base;
}

int64_t TileEvaluator::ContractionOffset(const DotOperand& operand, const Index& contraction_index) const {
  int64_t offset = 0;
  for (int d = 0; d < kernel_->dot.k_shape.rank; ++d) offset += operand.contraction_step[d] * contraction_index[d];
  return offset;
}

// `affine_element` is the operand's element when its map is affine; otherwise the map is applied here, or the
// operand's node evaluated (its memo keeps a row's reductions from being recomputed along the contraction).
double TileEvaluator::ReadDotOperand(const DotOperand& operand, int64_t affine_element, const Index& domain_index,
                                     const Index& contraction_index) {
  if (operand.affine) return ReadTensor(operand.tensor_id, affine_element);
  Index full_index = domain_index;
  const int domain_rank = kernel_->domain.rank;
  for (int d = 0; d < kernel_->dot.k_shape.rank; ++d) full_index[domain_rank + d] = contraction_index[d];
  if (operand.node_id >= 0) return Eval(operand.node_id, full_index);
  return ReadTensor(operand.tensor_id,
                    CheckedElement(operand.tensor_id, plan_.maps[operand.map_id].Apply(full_index), "DOT operand"));
}

// acc(i) = sum over the contraction box of lhs * rhs, in double (modulo 2^32 for an integer accumulator),
// rounded to acc_dtype. The accumulators are computed a run at a time: all indices of the tile that differ
// from `domain_index` only in the last dim (see AccumulateRun).
double TileEvaluator::Accumulate(const Index& domain_index) {
  const int rank = kernel_->domain.rank;
  const int last = rank - 1;
  if (rank == 0) {
    if (!run_valid_) AccumulateRun(domain_index, 1);
    return run_accumulators_[0];
  }
  const int64_t position = domain_index[last] - run_first_[last];
  const bool cached = run_valid_ && std::equal(domain_index.begin(), domain_index.begin() + last, run_first_.begin()) &&
                      position >= 0 && position < static_cast<int64_t>(run_accumulators_.size());
  if (cached) return run_accumulators_[position];
  const bool in_tile = domain_index[last] >= tile_lo_[last] && domain_index[last] < tile_hi_[last];
  Index first = domain_index;
  if (in_tile) first[last] = tile_lo_[last];
  AccumulateRun(first, in_tile ? tile_hi_[last] - tile_lo_[last] : 1);
  return run_accumulators_[domain_index[last] - first[last]];
}

// Walks the contraction once for `length` domain indices starting at `first` and stepping the last dim:
// a row-major rhs is then read row by row instead of column by column. Every accumulator still adds its
// terms in contraction order, so the sums are those of one-index-at-a-time accumulation.
void TileEvaluator::AccumulateRun(const Index& first, int64_t length) {
  const DotSpec& dot = kernel_->dot;
  const Shape& contraction = dot.k_shape;
  const int last = kernel_->domain.rank - 1;
  const bool integer = IsInteger(dot.acc_dtype);
  run_valid_ = false;  // stays false if a bounds check throws
  // XLA rewrites a product with one contraction element into a multiply, so a -0 product stays -0; starting
  // that one-term sum from -0 gives the same (-0 + x == x otherwise). Longer sums start from +0, as XLA's do.
  run_accumulators_.assign(length, contraction.NumElements() == 1 ? -0.0 : 0.0);
  run_modular_accumulators_.assign(integer ? length : 0, 0);
  run_lhs_bases_.assign(length, 0);
  run_rhs_bases_.assign(length, 0);
  auto index_of = [&](int64_t j) {
    Index index = first;
    if (last >= 0) index[last] += j;
    return index;
  };
  if (contraction.NumElements() > 0) {
    for (int64_t j = 0; j < length; ++j) {
      if (lhs_.affine) run_lhs_bases_[j] = AffineRowBase(lhs_, index_of(j), "lhs");
      if (rhs_.affine) run_rhs_bases_[j] = AffineRowBase(rhs_, index_of(j), "rhs");
    }
    auto add_product = [&](int64_t j, double a, double b) {
      if (integer) {
        run_modular_accumulators_[j] += ToModular(a) * ToModular(b);
      } else {
        run_accumulators_[j] += a * b;
      }
    };
    const Index zero{};
    Index k{};
    do {
      const int64_t lhs_offset = ContractionOffset(lhs_, k);
      const int64_t rhs_offset = ContractionOffset(rhs_, k);
      if (lhs_.affine && rhs_.affine) {  // the common case, without index vectors
        for (int64_t j = 0; j < length; ++j) {
          add_product(j, ReadTensor(lhs_.tensor_id, run_lhs_bases_[j] + lhs_offset),
                      ReadTensor(rhs_.tensor_id, run_rhs_bases_[j] + rhs_offset));
        }
      } else {
        for (int64_t j = 0; j < length; ++j) {
          const Index index = index_of(j);
          add_product(j, ReadDotOperand(lhs_, run_lhs_bases_[j] + lhs_offset, index, k),
                      ReadDotOperand(rhs_, run_rhs_bases_[j] + rhs_offset, index, k));
        }
      }
    } while (NextIndexInBox(k, zero, contraction.dims, contraction.rank));
  }
  for (int64_t j = 0; j < length; ++j) {
    const double sum = integer ? FromModular(run_modular_accumulators_[j]) : run_accumulators_[j];
    run_accumulators_[j] = RoundToDType(sum, dot.acc_dtype);
  }
  run_first_ = first;
  run_valid_ = true;
}

}  // namespace jax_mpk
