"""Expression emission for the CUDA megakernel: the C++ statements that compute a kernel's expression nodes at
symbolic indices, and the per-kernel context every task-body kind renders into (its pointer parameters, its
device function's signature). The kinds themselves are in :mod:`jax_mpk.bodies`; the source around them in
:mod:`jax_mpk.codegen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .graph import Acc, Elementwise, Load, Node, Piecewise, Reduce, Reindex, fold_loads, topological
from .indexmap import Affine, IndexMap, linear_form
from .kernels import Kernel, Tensor
from .layout import DTYPES, PROFILE_STAMPS, SCALAR_OP_OF, DType, NodeOp, ReduceKind, TensorKind, dtype_code
from .target import Target

THREADS = 512
# Strided positions of a row whose loads a thread issues together before using any (a cooperative reduction,
# a product's computed row: Emitter.open_position_groups). Output loops are not grouped: batching 2-4
# positions' values before their global stores raised the kernel's register count and broke the load schedule
# of the GEMV variants, which share it (again on branch elements-in-flight: the tied LM head 124 -> 227 us).
FOLD_UNROLL = 4
ROW_REDUCTION = 256  # reductions at least this long are done by the whole block, row by row; shorter inline
# A concatenation whose pieces are this small is computed piece by piece at clamped indices and selected, without
# a branch (Emitter._piecewise_selected); larger ones branch, so that only the piece an element lies in is computed.
SELECTED_PIECES_MAX_NODES = 64
SELECTED_PIECES_MAX_FOLD = 16

STORAGE = {code: info.cuda_storage for code, info in DTYPES.items()}
VALUE = {code: info.cuda_value for code, info in DTYPES.items()}
_ROUND = {code: info.cuda_round for code, info in DTYPES.items() if info.cuda_round}
_REDUCER = {
    ReduceKind.SUM: "reduce::Sum", ReduceKind.PROD: "reduce::Prod", ReduceKind.MAX: "reduce::Max",
    ReduceKind.MIN: "reduce::Min", ReduceKind.AND: "reduce::And", ReduceKind.OR: "reduce::Or",
}  # fmt: skip


@dataclass
class _Fold:
    acc: str  # accumulator variable
    acc_t: str  # its value type (ArgBest's value type for arg-reductions)
    reducer: str  # the reduce:: combiner type
    arg: bool
    result: str  # expression of the reduced value
    outer: list[str]  # the index it was folded at (with rows side by side: the row's names in the loop)


@dataclass(frozen=True)
class Tiling:
    """How a body kind wants its kernels' domains cut into tiles (``tasks.tile_domain`` applies it): dims every
    tile holds whole (some only while enough tiles remain), dims cut into single indices, the unit of the ranges
    along the last dim, and whether the last dim is cut into such ranges even when fewer tiles are wanted than it
    has units."""

    whole: frozenset[int] = frozenset()
    single: frozenset[int] = frozenset()
    last_unit: int = 1
    split_last: bool = False
    # dims held whole only while the tiles still keep at least half the kernel's workers busy (else cut like
    # the others): the query heads of a KV head share one pass over its keys and values at batch 8, but at
    # batch 1 that left Llama-1B's P.V on 32 tasks for 132 SMs, 4 us per layer slower than 64 tasks of 2 heads
    whole_if_busy: frozenset[int] = frozenset()
    # > 0: the widest range along the last dim, even if that takes more than one round of tasks (a product's
    # shared rows keep their accumulators for the tile in shared memory: wider, they stream one by one)
    max_last: int = 0


class NotRowForm(Exception):
    """A reduction is read at an index that is not its row: fall back to the flat form."""


class KernelBody:
    """One kernel being rendered as a device function of (params, task, smem, tensor pointers...): what a body
    kind renders into."""

    def __init__(self, kernel: Kernel, tasks, target: Target, merge_counter: int = -1, profile: bool = False):
        self.kernel, self.tasks = kernel, tasks
        # what the kinds render for: its shared memory budget and the knobs that choose between their forms
        # (warp_ring, element_loads_first, staging_loads_first, rows_loads_first, comm_copies, attention_warps,
        # score_loads_first)
        self.target = target
        self.profile = profile  # a JAX_MPK_PROFILE build: the body stamps its phases (mark_phase)
        self.merge_counter = merge_counter  # split attention: the event of its first group's merge counter
        # Pointer parameters: (tensor, constant element offset). Constant offsets (the layer index into
        # stacked weights, a static cache slot) travel in the pointer, so that repeated layers render the
        # same text and share one variant.
        self.tensors: list[tuple[Tensor, int]] = []
        self.tensor_names: dict[tuple, str] = {}
        self.uses_ring = False

    def pointer_name(self, tensor: Tensor, element_offset: int = 0) -> str:
        key = (id(tensor.buffer), element_offset)
        if key not in self.tensor_names:
            self.tensor_names[key] = f"b{len(self.tensors)}"
            self.tensors.append((tensor, element_offset))
        return self.tensor_names[key]

    # what a prefetch renderer asks its slots (codegen's buffer slots before the wait; the body itself after it)
    pointer = pointer_name

    def forget_pointers(self) -> None:
        """Back to no pointer parameters (a kind that gave up half-way)."""
        self.tensors, self.tensor_names = [], {}

    def signature(self) -> str:
        params = [f"char* b{i}" for i in range(len(self.tensors))]
        if self.merge_counter >= 0:  # a parameter, not a number in the text: every layer's kernel shares one variant
            params.append("int64_t merge_counter")
        return f"__device__ __noinline__ void VARIANT(const MegakernelParams& p, const TaskRecord& t, char* smem{''.join(', ' + q for q in params)})"

    def arguments(self, pointer) -> list[str]:
        """What a call passes for the signature's parameters, ``pointer(tensor, offset)`` naming a tensor's."""
        return [pointer(t, offset) for t, offset in self.tensors] + ([str(self.merge_counter)] if self.merge_counter >= 0 else [])

    def tile_size(self, dim: int) -> str:
        """The task's tile extent along ``dim``. (As a number where every task of the kernel shares it, the index
        divisions fold, -6% SASS instructions, but the step did not get faster: session 10, notes.)"""
        return f"(t.hi[{dim}] - t.lo[{dim}])"

    def tile_count(self, rank: int) -> str:
        """Elements of the task's tile over its first ``rank`` dims."""
        return " * ".join(f"(index_t){self.tile_size(d)}" for d in range(rank)) or "1"

    def mark_phase(self, em: Emitter, stamp: str) -> None:
        """In a profiling build, the time the block reached this point (after a barrier) as the task's ``stamp``
        (one of layout.PROFILE_STAMPS)."""
        assert stamp in PROFILE_STAMPS, stamp
        if self.profile:
            em.emit(f"mark_phase(layout::kStamp{stamp.title().replace('_', '')});")

    def finish(self, em: Emitter, smem: int, prefetch):
        """(device function text, shared memory bytes, prefetch renderer or None)."""
        body = "\n".join("  " + line for line in em.lines)
        text = f"{self.signature()} {{\n{body}\n}}\n"
        return text, smem, prefetch


def is_row_reduction(node: Node, minimum: int = ROW_REDUCTION) -> bool:
    """Reductions whose fold reads at least ``minimum`` values are done by the whole block, row by row; short
    ones (split-K sums) inline. A fold over a nested fold reads their product: a per-head norm of 128 sums of
    4 split-K partials is 512 loads, which one thread per element made the 8 us of Qwen3's key append."""
    return isinstance(node, Reduce) and fold_loads(node) >= minimum


def folds_side_by_side(node: Reduce) -> bool:
    """Whether ``Emitter.row_reductions_together`` can fold ``node`` for several rows at once: a float sum,
    product, max or min (one float accumulator per row)."""
    return node.kind in (ReduceKind.SUM, ReduceKind.PROD, ReduceKind.MAX, ReduceKind.MIN) and all(
        VALUE[dtype_code(n.dtype)] == "float" for n in (node, node.children[0]))


def read_only(tensor: Tensor) -> bool:
    return tensor.buffer.kind == TensorKind.INPUT


def linear(const: int, coefs, idx) -> str:
    terms = [f"{c} * (index_t){i}" if c != 1 else f"(index_t){i}" for c, i in zip(coefs, idx) if c != 0]
    if const or not terms:
        terms.append(str(const))
    return " + ".join(terms)


class Emitter:
    """Emits C++ statements computing expression nodes at symbolic indices (strings), with memoization
    per scope (a loop body or a branch)."""

    def __init__(self, body: KernelBody, rows_prefix):
        self.body, self.rows_prefix = body, rows_prefix
        self.lines: list[str] = []
        self.depth = 0
        self.scopes: list[dict] = [{}]
        self.counter = 0
        self.acc: str | None = None
        self.reductions: dict[int, str] = {}
        self.reduction_rows: dict[int, list[str]] = {}  # the row index each row reduction was computed at
        self.row_reads: dict[int, list[str]] | None = None  # set: a probe recording where row reductions are read
        self.scratch = "smem"  # char* to shared memory that block reductions may use
        self.row_reduction_min = ROW_REDUCTION
        # Load uid -> the array element a loop over a task's rows preloaded it into (preload_row_loads), read
        # in place of the load while the loop that computes the rows' values is emitted
        self.preloaded: dict[int, str] = {}
        # Row reductions that this body computes before the values but after their operands (a rows body's norm
        # with Target.rows_loads_first): operands_first passes them by, and a concatenation that reads them is
        # still cheap to compute piece by piece (reading one is a lookup)
        self.reduced_later: frozenset[int] = frozenset()

    def is_row_reduction(self, node: Node) -> bool:
        return is_row_reduction(node, self.row_reduction_min)

    # ---------------------------------------------------------------------------------------- output
    def emit(self, line: str) -> None:
        self.lines.append("  " * self.depth + line)

    def push(self) -> None:
        self.depth += 1
        self.scopes.append({})

    def pop(self) -> None:
        self.depth -= 1
        self.scopes.pop()

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def delinearize(self, flat: str, sizes: list[str], offsets: list[str]) -> list[str]:
        names, rest = [], flat
        for d in range(len(sizes)):
            name = self.fresh("i")
            inner = " * ".join(sizes[d + 1 :]) or "1"
            self.emit(f"const index_t {name} = {offsets[d]} + ({rest}) / ({inner}) % {sizes[d]};" if d else
                      f"const index_t {name} = {offsets[d]} + ({rest}) / ({inner});")
            names.append(name)
        return names

    def tile_index(self, flat: str, dims, extents: list[int] | None = None) -> list[str]:
        """Domain indices of position ``flat`` of the task's tile restricted to ``dims`` (row-major); with
        ``extents``, the tile's sizes along ``dims`` when every task of the kernel has those (numbers fold
        where the tile's t.hi - t.lo cost an integer division per index)."""
        dims = list(dims)
        sizes = [str(e) for e in extents] if extents is not None else [self.body.tile_size(d) for d in dims]
        return self.delinearize(flat, sizes, [f"t.lo[{d}]" for d in dims])

    def rounded(self, expr: str, code: DType) -> str:
        name = self.fresh("v")
        fn = _ROUND.get(code)
        self.emit(f"const {VALUE[code]} {name} = {fn}({expr});" if fn else f"const {VALUE[code]} {name} = {expr};")
        return name

    # ---------------------------------------------------------------------------------------- indices
    def map_index(self, index_map: IndexMap, idx: list[str]) -> list[str]:
        cur, shape = list(idx), list(index_map.in_shape)
        for stage in index_map.stages:
            if isinstance(stage, Affine):
                new = []
                for row, off in zip(stage.matrix, stage.offset):
                    terms = [(a, c) for a, c in zip(row, cur) if a != 0]
                    if not terms:
                        new.append(str(off))
                    elif len(terms) == 1 and terms[0][0] == 1 and off == 0:
                        new.append(terms[0][1])
                    else:
                        parts = [c if a == 1 else f"{a} * {c}" for a, c in terms]
                        if off:
                            parts.append(str(off))
                        name = self.fresh("i")
                        self.emit(f"const index_t {name} = {' + '.join(parts)};")
                        new.append(name)
                cur = new
            else:
                lin = self.fresh("l")
                strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
                self.emit(f"const index_t {lin} = {linear(0, strides, cur)};")
                cur = self.delinearize(lin, [str(s) for s in stage.out_shape], ["0"] * len(stage.out_shape))
            shape = list(stage.out_shape)
        return cur

    # ----------------------------------------------------------------------------------------- values
    def value(self, node: Node, idx: list[str]) -> str:
        if node.uid in self.preloaded:  # (preload_row_loads) computed before this loop, with all it reads
            return self.preloaded[node.uid]
        name = self._known(node, idx)
        if name is None:
            # elementwise operands first, deepest first, so that a chain of hundreds of fused operations
            # does not recurse once per link
            for operand in self._unknown_elementwise_operands(node, idx):
                self.scopes[-1][(operand.uid, tuple(idx))] = self._compute(operand, idx)
            name = self.scopes[-1][(node.uid, tuple(idx))] = self._compute(node, idx)
        return name

    def _known(self, node, idx: list[str]):
        """What this scope or an enclosing one computed of ``node`` (or of a key tuple: _remember's) at ``idx``."""
        key = (*node, tuple(idx)) if isinstance(node, tuple) else (node.uid, tuple(idx))
        return next((scope[key] for scope in reversed(self.scopes) if key in scope), None)

    def _remember(self, key: tuple, idx: list[str], value) -> None:
        """Keeps ``value`` under ``key`` at ``idx`` in this scope, for _known (index names emitted once)."""
        self.scopes[-1][(*key, tuple(idx))] = value

    def _unknown_elementwise_operands(self, node: Node, idx: list[str]) -> list[Node]:
        """Elementwise nodes below ``node`` (through elementwise nodes, at the same index) not yet computed,
        children before parents in the order the recursive computation would emit them."""
        order, seen, stack = [], {node.uid}, [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if expanded:
                order.append(current)
                continue
            stack.append((current, True))
            for child in reversed(current.children if isinstance(current, Elementwise) else ()):
                fresh = child.uid not in seen and child.uid not in self.preloaded
                if isinstance(child, Elementwise) and fresh and self._known(child, idx) is None:
                    seen.add(child.uid)
                    stack.append((child, False))
        return order[:-1]  # node itself last

    def element_offset(self, tensor: Tensor, index_map: IndexMap, idx: list[str], dyn) -> tuple[str, str]:
        """(pointer parameter, element offset expression) of ``tensor[map(idx) + dyn]``."""
        strides = [math.prod(tensor.shape[d + 1 :]) for d in range(len(tensor.shape))]
        form = linear_form(index_map, tensor.shape)
        if form is None:
            const, offset = 0, linear(0, strides, self.map_index(index_map, idx))
        else:
            const, coefs = form
            offset = linear(0, coefs, idx)
        for dim, value, hi in dyn:
            offset = f"{offset} + {strides[dim]} * static_cast<index_t>(ops::dynamic_offset({value}, {hi}))"
        pointer = self.body.pointer_name(tensor, const)
        if tensor.buffer.kind == TensorKind.COMM and not self.body.target.comm_copies:  # slot r only on rank r
            slot = math.prod(tensor.buffer.shape) // tensor.buffer.shape[0]
            element = self.fresh("c")
            self.emit(f"const index_t {element} = {offset};")
            return f"comm::on_rank(p, {pointer}, {element} / {slot})", f"{element} % {slot}"
        return pointer, offset

    def store(self, tensor: Tensor, pointer: str, offset: str, value: str) -> str:
        """The statement storing ``value`` at ``tensor``'s ``pointer[offset]``: with comm_copies, a
        communication buffer's slot goes to every rank's copy (reads of it are local)."""
        storage = STORAGE[dtype_code(tensor.buffer.dtype)]
        if tensor.buffer.kind == TensorKind.COMM and self.body.target.comm_copies:
            return f"comm::store_everywhere<{storage}>(p, {pointer}, {offset}, {value});"
        return f"ops::store<{storage}>({pointer}, {offset}, {value});"

    def load_value(self, tensor: Tensor, index_map: IndexMap, idx: list[str], dtype, dyn=()) -> str:
        code = dtype_code(tensor.buffer.dtype)
        fn = "ops::load_readonly" if read_only(tensor) else "ops::load"
        name = self.fresh("x")
        ptr, offset = self.element_offset(tensor, index_map, idx, dyn)
        self.emit(f"const {VALUE[code]} {name} = {fn}<{STORAGE[code]}>({ptr}, {offset});")
        target = dtype_code(dtype)
        if VALUE[target] != VALUE[code]:
            return self.rounded(f"ops::convert<{VALUE[target]}>({name})", target)
        return name

    def _compute(self, node: Node, idx: list[str]) -> str:
        code = dtype_code(node.dtype)
        vt = VALUE[code]
        if isinstance(node, Load):
            dyn = [(d, self.value(c, idx), hi) for d, c, hi in zip(node.dims, node.children, node.his)]
            return self.load_value(node.tensor, node.map, idx, node.dtype, dyn)
        if isinstance(node, Acc):
            return self.acc
        if isinstance(node, Reindex):
            mapped = self._known(("mapped", node.uid), idx)  # operands_first went through it
            return self.value(node.children[0], mapped if mapped is not None else self.map_index(node.map, idx))
        if isinstance(node, Reduce):
            return self._reduce(node, idx)
        if isinstance(node, Piecewise):
            return self._piecewise(node, idx)
        assert isinstance(node, Elementwise), node
        op = node.op
        if op == NodeOp.CONST:
            return literal(node.params[0], code)
        if op == NodeOp.IOTA:
            return self.rounded(f"static_cast<{vt}>({idx[node.params[0]]})", code)
        args = [self.value(c, idx) for c in node.children]
        if op == NodeOp.CONVERT:
            return self.rounded(f"ops::convert<{vt}>({args[0]})", code)
        if op in SCALAR_OP_OF:
            return self.rounded(f"ops::{SCALAR_OP_OF[op].cpp_name}({', '.join(args)})", code)
        if op == NodeOp.SELECT_N:
            pred, cases = args[0], args[1:]
            if dtype_code(node.children[0].dtype) == DType.BOOL:
                return self.rounded(f"({pred} ? {cases[1]} : {cases[0]})", code)
            expr = cases[-1]
            for i in reversed(range(len(cases) - 1)):
                expr = f"({pred} <= {i} ? {cases[i]} : {expr})"
            return self.rounded(expr, code)
        if op == NodeOp.CLAMP:
            return self.rounded(f"ops::clamp({args[0]}, {args[1]}, {args[2]})", code)
        if op == NodeOp.INTEGER_POW:
            return self.rounded(f"ops::integer_pow({args[0]}, {int(node.params[0])})", code)
        if op == NodeOp.ROUND:
            fn = "ops::round_half_even" if int(node.params[0]) == 1 else "ops::round_half_away"
            return self.rounded(f"{fn}({args[0]})", code)
        raise NotImplementedError(f"codegen for {op!r}")

    def _piecewise(self, node: Piecewise, idx: list[str]) -> str:
        code = dtype_code(node.dtype)
        result = self.fresh("pw")
        axis_index = idx[node.axis]
        if self._pieces_cheap(node):
            return self._piecewise_selected(node, idx, result)
        self.emit(f"{VALUE[code]} {result};")
        for k, child, lo, hi in _pieces(node):
            keyword = "if" if k == 0 else "} else if"
            self.emit(f"{keyword} ({axis_index} < {hi}) {{")
            self.push()
            shifted = list(idx)
            shifted[node.axis] = f"({axis_index} - {lo})"
            self.emit(f"{result} = {self.value(child, shifted)};")
            self.pop()
        self.emit("}")
        return result

    def _piecewise_selected(self, node: Piecewise, idx: list[str], result: str) -> str:
        """Every piece computed at its index clamped into its range, then one select: no branch, so the loads
        of all pieces (and of what comes after) are in flight together. As branches, a RoPE's rotate-half
        concatenation kept its loads (split-K partials, the frequency table) one behind another, as ptxas moves
        no load across a branch."""
        axis_index = idx[node.axis]
        pieces = [(hi, self.value(child, self._piece_index(node, idx, k, lo, hi)))
                  for k, child, lo, hi in _pieces(node)]
        expr = pieces[-1][1]
        for hi, value in reversed(pieces[:-1]):
            expr = f"({axis_index} < {hi} ? {value} : {expr})"
        self.emit(f"const {VALUE[dtype_code(node.dtype)]} {result} = {expr};")
        return result

    def _piece_index(self, node: Piecewise, idx: list[str], k: int, lo: int, hi: int) -> list[str]:
        """Where piece ``k`` (positions [lo, hi) along the axis) of a selected piecewise ``node`` reads for
        ``idx``: the position clamped into its range, shifted to the piece's start. Emitted once in a scope
        (operands_first goes through the pieces before _piecewise_selected selects among them)."""
        known = self._known(("piece", node.uid, k), idx)
        if known is not None:
            return known
        axis_index = idx[node.axis]
        shifted = list(idx)
        shifted[node.axis] = self.fresh("at")
        low = "0" if lo == 0 else f"{axis_index} < {lo} ? 0 : "
        inside = f"({axis_index} < {hi} ? {axis_index} - {lo} : {hi - lo - 1})"
        self.emit(f"const index_t {shifted[node.axis]} = {inside if lo == 0 else low + inside};")
        self._remember(("piece", node.uid, k), idx, shifted)
        return shifted

    def _pieces_cheap(self, node: Piecewise) -> bool:
        """Whether computing every piece of ``node`` whatever the index costs little: at most
        SELECTED_PIECES_MAX_NODES nodes below it, folds of at most SELECTED_PIECES_MAX_FOLD elements (a split-K
        product's partial sums), no row reduction of a staging (read at one index only) and no read of another
        device's communication buffer."""
        seen, stack = set(), list(node.children)
        while stack:
            current = stack.pop()
            if current.uid in seen or current.uid in self.reduced_later:
                continue
            seen.add(current.uid)
            if len(seen) > SELECTED_PIECES_MAX_NODES:
                return False
            if isinstance(current, Reduce):
                if math.prod(current.children[0].shape[len(current.shape):]) > SELECTED_PIECES_MAX_FOLD:
                    return False
                if self.rows_prefix is not None and self.is_row_reduction(current):
                    return False
            if isinstance(current, Load) and current.tensor.buffer.kind == TensorKind.COMM:
                return False
            stack.extend(current.children)
        return True

    # ------------------------------------------------------------------------------------- reductions
    def _reduce(self, node: Reduce, idx: list[str]) -> str:
        if self.rows_prefix is not None and self.is_row_reduction(node):
            if self.row_reads is not None:  # a probe: where is it read?
                if self.row_reads.setdefault(node.uid, list(idx)) != list(idx):
                    raise NotRowForm  # read at two indices
                return self.fresh("probe")
            if node.uid not in self.reductions or list(idx) != self.reduction_rows[node.uid]:
                raise NotRowForm
            return self.reductions[node.uid]
        fold = self._fold(node, idx, cooperative=False)  # short: each thread loops over it alone
        return self.rounded(fold.result, dtype_code(node.dtype))

    def row_reduction(self, node: Reduce, row: list[str]) -> None:
        """Cooperative reduction of one row: every thread folds a strided share, then the block combines."""
        fold = self._fold(node, row, cooperative=True)
        if fold.arg:
            self.emit(f"{fold.acc} = reduce::block_arg_reduce({fold.acc}, reinterpret_cast<{fold.acc_t}*>({self.scratch}), "
                      f"reinterpret_cast<int32_t*>({self.scratch} + 4 * {THREADS}));")
        else:
            self.emit(f"{fold.acc} = reduce::block_reduce<{fold.reducer}>({fold.acc}, "
                      f"reinterpret_cast<{fold.acc_t}*>({self.scratch}));")
        self.reductions[node.uid] = self.rounded(fold.result, dtype_code(node.dtype))
        self.reduction_rows[node.uid] = list(row)

    def row_reductions_together(self, node: Reduce, rows: int, row_outer) -> None:
        """Cooperative reduction of ``rows`` rows at once (a batch's rows that one product task stages): one
        accumulator per row, the rows' loads of a position issued together (``row_outer()`` emits the row
        index of loop variable ``row`` and returns it, the same names for every row), one pair of barriers for
        all rows. Each row's partials and their combination are ``row_reduction``'s, in the same order (equal bits,
        unless nvcc contracts a multiply-add differently in the two loops). The caller checks
        ``folds_side_by_side`` first (a refusal here would leave half-emitted code)."""
        assert folds_side_by_side(node), node
        fold = self._fold(node, [], cooperative=True, rows=rows, row_outer=row_outer)
        self.emit(f"reduce::block_reduce_rows<{fold.reducer}, {fold.acc_t}, {rows}>({fold.acc}, "
                  f"reinterpret_cast<{fold.acc_t}*>({self.scratch}));")
        fn = _ROUND.get(dtype_code(node.dtype))
        if fn:
            self.emit(f"for (int row = 0; row < {rows}; ++row) {fold.acc}[row] = {fn}({fold.acc}[row]);")
        self.reductions[node.uid] = f"{fold.acc}[row]"  # read inside a loop over the rows named `row`
        self.reduction_rows[node.uid] = list(fold.outer)

    def preload_row_loads(self, root: Node, row_index, rows: int, var: str = "row",
                          reduced_first: frozenset[int] = frozenset()) -> None:
        """Emits a loop over a task's ``rows`` that issues every load ``root`` reads at ``row_index()`` (the
        row's index, emitted inside a loop over ``row``) through elementwise operations and views, into one
        register array per load, so that the loop computing the rows' values next reads them there
        (``preloaded``, until the caller resets it). A branch in a row's value (a NaN-propagating max, a
        division's slow path) kept the next row's load waiting for it, as ptxas moves no load across a branch:
        P.V's softmax staging at batch 8 made 3 passes of 8 serial L2 round trips (~12 us a task). Only loads
        read at one index, and nowhere else that the values' loop computes (folds, gathers), are preloaded.
        ``reduced_first``: row reductions the caller computes between this preload and the values' loop (they
        are looked up there, as computed ones are); then every largest part of ``root`` that reads none of them
        and loads something (a residual plus its split-K partials, a gather) is computed here, not only the
        loads, so that all of the values' loads are in flight while the block reduces. The caller must not let
        ``value`` see ``preloaded`` while it folds them."""
        saved, self.lines = self.lines, []
        self.emit("#pragma unroll")
        self.emit(f"for (int {var} = 0; {var} < {rows}; ++{var}) {{")
        self.push()
        found: dict[int, tuple[Node, list[tuple]]] = {}
        waits = self._reads_reductions(root, reduced_first) if reduced_first else set()  # only after them
        stack, seen = [(root, tuple(row_index()))], set()
        while stack:
            node, at = stack.pop()
            if (node.uid, at) in seen:
                continue
            seen.add((node.uid, at))
            early = reduced_first and node.uid not in waits and self._loads_below(node)
            if (isinstance(node, Load) and not node.children) or early:
                found.setdefault(node.uid, (node, []))[1].append(at)
            elif isinstance(node, Reindex):
                stack.append((node.children[0], tuple(self.map_index(node.map, list(at)))))
            elif isinstance(node, Elementwise):
                stack.extend((c, at) for c in reversed(node.children))
        arrays, elsewhere = [], self._read_elsewhere(root, reduced_first)
        for uid, (node, ats) in found.items():
            if len(ats) == 1 and uid not in elsewhere:
                arrays.append((uid, self.fresh("pre"), VALUE[dtype_code(node.dtype)], self.value(node, list(ats[0]))))
        for _, array, _, name in arrays:
            self.emit(f"{array}[{var}] = {name};")
        self.pop()
        self.emit("}")
        loop, self.lines = self.lines, saved
        if not arrays:
            return
        for uid, array, value_t, _ in arrays:
            self.emit(f"{value_t} {array}[{rows}];")
            self.preloaded[uid] = f"{array}[{var}]"
        self.lines += loop

    def _read_elsewhere(self, root: Node, reduced_first: frozenset[int] = frozenset()) -> set[int]:
        """Nodes below ``root`` that computing it reads through anything but elementwise operations and views:
        inside a fold, a concatenation, a gather's operand or index (row reductions already computed, or in
        ``reduced_first``, are only looked up)."""
        elsewhere, stack, seen = set(), [(root, False)], set()
        while stack:
            node, opaque = stack.pop()
            looked_up = isinstance(node, Reduce) and (node.uid in self.reductions or node.uid in reduced_first)
            if (node.uid, opaque) in seen or looked_up:
                continue
            seen.add((node.uid, opaque))
            if opaque:
                elsewhere.add(node.uid)
            inside = opaque or not isinstance(node, (Elementwise, Reindex))
            stack.extend((c, inside) for c in node.children)
        return elsewhere

    def _reads_reductions(self, root: Node, reductions: frozenset[int]) -> set[int]:
        """The nodes below ``root`` whose value reads one of the row ``reductions`` (not yet computed)."""
        waits: set[int] = set()
        for node in topological([root]):
            if node.uid in reductions or any(c.uid in waits for c in node.children if c.uid not in self.reductions):
                waits.add(node.uid)
        return waits

    def _loads_below(self, node: Node) -> bool:
        """Whether computing ``node`` loads anything (a row reduction already computed is looked up)."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n.uid in seen or n.uid in self.reductions:
                continue
            seen.add(n.uid)
            if isinstance(n, Load):
                return True
            stack.extend(n.children)
        return False

    def _fold(self, node: Reduce, outer: list[str], cooperative: bool, rows: int = 0, row_outer=None) -> _Fold:
        """Emit an accumulator and the loop folding ``node``'s child over its inner positions: all of them,
        or (``cooperative``) this thread's share, positions threadIdx.x + k * THREADS, their loads issued
        together before any is used (_fold_positions_together). With ``rows``, one accumulator per row, the rows
        folded side by side (``row_reductions_together``), their loads first (preload_row_loads)."""
        child = node.children[0]
        inner = child.shape[len(node.shape) :]
        code = dtype_code(child.dtype)
        arg = node.kind in (ReduceKind.ARGMAX, ReduceKind.ARGMIN)
        acc_t = "int32_t" if code == DType.BOOL else VALUE[code]  # shuffles take no bool
        reducer = (
            f"reduce::ArgBest<{str(node.kind == ReduceKind.ARGMAX).lower()}, {acc_t}>"
            if arg
            else f"{_REDUCER[node.kind]}<{acc_t}>"
        )
        if not rows:  # (rows side by side: each row's outer index is only known inside the loop over them)
            self._hoist_broadcast_reductions(child, len(node.shape), outer)
        acc = self.fresh("red")
        length = math.prod(inner)
        init = f"{reducer}::init()"
        if node.kind == ReduceKind.SUM and length == 1 and acc_t == "float":
            init = "-0.0f"  # XLA: a sum of one element is that element (a single -0 stays -0); x + -0 == x
        if rows:
            self.emit(f"{acc_t} {acc}[{rows}];")
            self.emit(f"for (int row = 0; row < {rows}; ++row) {acc}[row] = {init};")
        else:
            self.emit(f"{reducer} {acc} = {init};" if arg else f"{acc_t} {acc} = {init};")
        per_thread = -(-length // THREADS)
        if cooperative and not rows and per_thread > 1:
            return self._fold_positions_together(node, child, inner, acc, acc_t, reducer, arg, outer)
        if cooperative:
            self.emit(f"#pragma unroll {min(FOLD_UNROLL, per_thread)}")
            self.emit(f"for (index_t j0 = 0; j0 < {length}; j0 += {THREADS}) {{")
            self.push()
            self.emit("const index_t j = j0 + threadIdx.x;")
            self.emit(f"if (j < {length}) {{")
        else:
            self.emit(f"for (index_t j = 0; j < {length}; ++j) {{")
        self.push()
        jidx = self.delinearize("j", [str(s) for s in inner], ["0"] * len(inner))
        item_t = reducer if arg else acc_t
        if rows:
            # every row's loads first, then their values, then the folds (see preload_row_loads)
            self.preload_row_loads(child, lambda: list(row_outer()) + jidx, rows)
            items = self.fresh("item")
            self.emit(f"{item_t} {items}[{rows}];")
            self.emit("#pragma unroll")
            self.emit(f"for (int row = 0; row < {rows}; ++row) {{")
            self.push()
            outer = row_outer()
        v = self.value(child, list(outer) + jidx)
        item = f"{{static_cast<{acc_t}>({v}), static_cast<int32_t>(j)}}" if arg else f"static_cast<{acc_t}>({v})"
        if rows:
            self.emit(f"{items}[row] = {item_t}{item};" if arg else f"{items}[row] = {item};")
            self.pop()
            self.emit("}")
            self.preloaded = {}
            self.emit("#pragma unroll")
            self.emit(f"for (int row = 0; row < {rows}; ++row) {acc}[row] = {reducer}::combine({acc}[row], {items}[row]);")
        else:
            self.emit(f"{acc} = {reducer}::combine({acc}, {item});")
        self.pop()
        self.emit("}")
        if cooperative:
            self.pop()
            self.emit("}")
        result = f"{acc}.index" if arg else f"static_cast<{VALUE[dtype_code(node.dtype)]}>({acc})"
        return _Fold(acc, acc_t, reducer, arg, result, list(outer))

    def open_position_groups(self, name: str, length: int):
        """Opens a loop over a thread's positions ``name`` of a block-strided range of ``length``, FOLD_UNROLL of
        them at a time, for code that loads every position of a group first (preload_row_loads over ``u``).
        Returns the group size, a function that emits (inside a loop over ``u``) the position, clamped to the
        range (loads in bounds), and returns its name, and the test a position must pass to be used: None when
        every group is full (ptxas answers such a test by sinking the position's load below it). The caller
        closes the loop (pop, then "}")."""
        group = min(FOLD_UNROLL, -(-length // THREADS))
        step = group * THREADS
        self.emit(f"for (index_t {name}0 = 0; {name}0 < {length}; {name}0 += {step}) {{")
        self.push()
        at = f"{name}0 + u * {THREADS} + threadIdx.x"

        def position() -> str:
            self.emit(f"const index_t {name} = min({at}, (index_t){length - 1});")
            return name

        return group, position, None if length % step == 0 else f"{at} < {length}"

    def _fold_positions_together(self, node: Reduce, child: Node, inner, acc: str, acc_t: str, reducer: str,
                                 arg: bool, outer: list[str]) -> _Fold:
        """A block's fold of one row, a group of a thread's positions at a time (open_position_groups): first
        every position's loads, then their values, then the folds in position order (the bits of the
        one-position loop). One at a time, a fold or a value's branch (a NaN-propagating max) between two
        positions' loads kept the second waiting."""
        group, position, guard = self.open_position_groups("j", math.prod(inner))

        def index() -> list[str]:
            return list(outer) + self.delinearize(position(), [str(s) for s in inner], ["0"] * len(inner))

        self.preload_row_loads(child, index, group, var="u")
        items, item_t = self.fresh("item"), reducer if arg else acc_t
        self.emit(f"{item_t} {items}[{group}];")
        self.emit("#pragma unroll")
        self.emit(f"for (int u = 0; u < {group}; ++u) {{")
        self.push()
        v = self.value(child, index())
        self.emit(f"{items}[u] = {reducer}{{static_cast<{acc_t}>({v}), static_cast<int32_t>(j)}};" if arg
                  else f"{items}[u] = static_cast<{acc_t}>({v});")  # fmt: skip
        self.pop()
        self.emit("}")
        self.preloaded = {}
        fold = f"{acc} = {reducer}::combine({acc}, {items}[u]);"
        self.emit("#pragma unroll")
        self.emit(f"for (int u = 0; u < {group}; ++u) {fold if guard is None else f'if ({guard}) {fold}'}")
        self.pop()
        self.emit("}")
        result = f"{acc}.index" if arg else f"static_cast<{VALUE[dtype_code(node.dtype)]}>({acc})"
        return _Fold(acc, acc_t, reducer, arg, result, list(outer))

    def _hoist_broadcast_reductions(self, child: Node, outer_rank: int, outer: list[str]) -> None:
        """Compute before a fold's loop the reductions its child reads broadcast along the folded dims (a
        softmax's max inside its sum; the largest chunk max inside split attention's merge): inside the loop
        they would be recomputed at every iteration."""
        for node in topological([child]):
            if not (isinstance(node, Reindex) and isinstance(node.children[0], Reduce)):
                continue
            reduced = node.children[0]
            prefix = IndexMap.affine(node.shape, reduced.shape, [[int(c == r) for c in range(len(node.shape))]
                                                                 for r in range(len(reduced.shape))])  # fmt: skip
            if len(reduced.shape) == outer_rank and node.map.to_words() == prefix.to_words():
                self.value(reduced, list(outer))

    def operands_first(self, roots: list[Node], idx: list[str]) -> None:
        """Computes every operand the elementwise expressions ``roots`` read at ``idx`` that is not itself
        elementwise there (loads, reindexed and piecewise operands, a thread's own folds), before any elementwise
        operation of theirs (Target.element_loads_first). ptxas moves no load across a branch, and a
        transcendental's slow path is one: RoPE's cos between the key append's three sums of split-K partials
        made their loads three L2 round trips one after another."""
        operands, seen, stack = [], set(), [(root, tuple(idx)) for root in reversed(roots)]
        while stack:
            node, at = stack.pop()
            if (node.uid, at) in seen or self._known(node, list(at)) is not None or node.uid in self.preloaded:
                continue
            seen.add((node.uid, at))
            if isinstance(node, Elementwise):
                stack.extend((child, at) for child in reversed(node.children))
            elif isinstance(node, Reindex):  # through it, at its index (kept for _compute: the names match)
                mapped = self.map_index(node.map, list(at))
                self._remember(("mapped", node.uid), list(at), mapped)
                stack.append((node.children[0], tuple(mapped)))
            elif isinstance(node, Piecewise) and self._pieces_cheap(node):  # through every piece, as selected
                for k, child, lo, hi in reversed(_pieces(node)):
                    stack.append((child, tuple(self._piece_index(node, list(at), k, lo, hi))))
            elif not isinstance(node, Acc) and node.uid not in self.reduced_later:
                operands.append((node, at))
        if operands:
            self.emit("// JAX_MPK_ELEMENT_LOADS_FIRST: the operands first, then the arithmetic")
        for node, at in operands:
            self.value(node, list(at))

    # ------------------------------------------------------------------------------------------ stores
    def elements(self, count: str, element) -> None:
        """Every thread computes, then stores, the kernel's outputs at its share of ``count`` tile positions.

        ``element(e)`` emits the domain index of position ``e`` and returns it. All outputs' values are
        computed before the first store: a store may alias any later load as far as the compiler knows, so
        a store between them would make the second output's loads wait for the first one's. (Each element's
        loads still wait for the previous element's stores; issuing a thread's 2-8 elements' loads first did not
        make a step faster: session 10, notes.)
        """
        self.emit(f"for (index_t e = threadIdx.x; e < {count}; e += {THREADS}) {{")
        self.push()
        idx = element("e")
        if self.body.target.element_loads_first:
            self.operands_first(self.output_roots(), idx)
        self.store_outputs(idx)
        self.pop()
        self.emit("}")

    def output_roots(self) -> list[Node]:
        """The expressions an element of the kernel stores: its outputs' values and dynamic offsets."""
        return [root for out in self.body.kernel.outputs for root in (out.node, *(n for _, n, _ in out.dyn))]

    def store_outputs(self, idx: list[str]) -> None:
        """Computes every output's value at domain index ``idx``, then stores them (see ``elements``)."""
        stores = []
        for out in self.body.kernel.outputs:
            value = self.value(out.node, idx)
            dyn = [(dim, self.value(node, idx), hi) for dim, node, hi in out.dyn]
            ptr, offset = self.element_offset(out.tensor, out.map, idx, dyn)
            stores.append(self.store(out.tensor, ptr, offset, value))
        for line in stores:
            self.emit(line)


def _pieces(node: Piecewise) -> list[tuple[int, Node, int, int]]:
    """(k, child, lo, hi) of every piece of ``node`` that holds positions [lo, hi) along its axis (hi > lo)."""
    bounds = [*node.los, node.shape[node.axis]]
    return [(k, child, bounds[k], bounds[k + 1]) for k, child in enumerate(node.children) if bounds[k + 1] > bounds[k]]


def literal(value: float, code: DType) -> str:
    if code in (DType.F32, DType.BF16, DType.F16):
        if math.isnan(value):
            return "__int_as_float(0x7fc00000)"
        if math.isinf(value):
            return "__int_as_float(0x7f800000)" if value > 0 else "__int_as_float(0xff800000)"
        return f"{float(np.float32(value))!r}f"
    if code == DType.BOOL:
        return "true" if value else "false"
    if code in (DType.U32, DType.U8):
        return f"{int(value)}u"
    return f"static_cast<int32_t>({int(value)})"
