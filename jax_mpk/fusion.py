"""Fusion: partition the op graph into kernels, assign buffers, and decide what is updated in place.

Decisions, in order:
1. What is stored ("materialized"): inputs, constants, results, every heavy node (dot, update-slice), the
   operands that heavy nodes and dynamic loads address at random, and reductions that more than one kernel
   would otherwise recompute. Everything else is inlined into the kernels that use it (elementwise chains,
   views, concatenations, and reductions with the elementwise work around them: RMSNorm, softmax).
2. In-place updates: a dynamic_update_slice writes into its operand's buffer when no kernel that still needs
   the old value depends on it; a chain of updates from an input to a result aliases that input to the result
   (zero-copy KV-cache update under donation). Otherwise the operand is copied first.
3. Epilogues: an elementwise consumer that reads a dot's result at the same index (residual add) becomes that
   dot kernel's epilogue, unless (GPU plans) it reads two products that could run side by side (SwiGLU).
4. GPU plans, as the target's passes (``PASSES``): a row kernel (RMSNorm, softmax, the SwiGLU product) that only
   a matrix product reads is computed in that product's staging of its activation row instead of being stored
   (:mod:`jax_mpk.dot_staging`); attention split along its keys (:mod:`jax_mpk.attention`).

Over 600 lines because decisions 1-3 read and write one state (what is stored, the buffers and their versions,
the in-place chains) in one walk of the op graph (``_Fuser``); the GPU passes, which only rewrite its kernels,
live in their own modules.
"""

from __future__ import annotations

import functools
import heapq
import math

import numpy as np

from .attention import split_attention
from .bodies.dot import rows_fit_beside_ring
from .dot_staging import compute_rows_in_dot_staging
from .capture import Captured
from .graph import (
    HEAVY, LEAVES, Acc, Comm, Dot, DynLoad, Elementwise, Load, Node, Piecewise, Reduce, Reindex, Source, UpdateSlice,
    clone, consumers, substitute, topological,
)  # fmt: skip
from .indexmap import IndexMap, Shape
from .kernels import WORKSPACE_ALIGN, Buffer, DotSpec, Kernel, KernelGraph, KernelOutput, Tensor, make_load
from .layout import NodeOp, ReduceKind, TensorKind
from .lowering import move_axes_last, reindex, transpose_map
from .target import Target


def fuse(captured: Captured, target: Target | None = None) -> KernelGraph:
    """Kernels for ``captured``: target-neutral (no target, or the CPU executor's), or for a GPU, whose SM count
    splits matrix products too narrow to give every SM a tile of whole cache lines along K
    (_split_narrow_products), followed by the target's passes (PASSES)."""
    return _Fuser(captured, target).run()


class _Fuser:
    def __init__(self, captured: Captured, target: Target | None):
        self.captured = captured
        self.target = target
        self.num_workers = target.num_workers if target is not None and target.fuses_for_gpu else None
        self.n_args = len(captured.inputs)
        self.outputs = list(captured.outputs)

    # ------------------------------------------------------------------------------------------ driver
    def run(self) -> KernelGraph:
        self._separate_outputs()
        self.forced: set[int] = set()  # nodes that must be stored whatever the heuristics say
        self._split_long_reductions()
        if self.num_workers:
            self._split_narrow_products()
            if self.target.comm_copies:
                self._exchange_split_partials()
        self._index_graph()
        self.materialized = self._choose_materialized()
        self.chain_buffer_output = self._alias_update_chains()
        self._make_updates_in_place()
        self._index_graph()
        self.absorbed = self._choose_epilogues()
        self.tensors: dict[int, Tensor] = {}
        self.buffers: list[Buffer] = []
        self._assign_buffers()
        kernels = [self._build_kernel(n) for n in self.order if self._is_kernel_root(n)]
        kernels = self._order_kernels(kernels)
        kernels = self._order_kernels(_store_products_into_slots(_merge_into_consumers(kernels)))
        for name in self.target.fusion_passes if self.target is not None else ():
            kernels = self._order_kernels(PASSES[name](self, kernels))
        for i, kernel in enumerate(kernels):
            kernel.index = i
        return KernelGraph(
            kernels=kernels,
            buffers=self.buffers,
            input_specs=[(n.shape, np.dtype(n.dtype)) for n in self.captured.inputs]
            + [(c.shape, np.dtype(c.dtype)) for c in self.captured.consts],
            output_specs=[(n.shape, np.dtype(n.dtype)) for n in self.outputs],
            aliases=dict(self.aliases),
            workspace_bytes=self.workspace_bytes,
            num_ranks=self.captured.mesh.num_ranks if self.captured.mesh else 1,
            comm_bytes=self.comm_bytes,
            rank_input=self.captured.rank_input,
            target=self.target,
        )

    def _index_graph(self) -> None:
        """Topological order, users and uid lookup of the current graph (after every rewrite of it)."""
        self.order = topological(self.outputs)
        self.users = consumers(self.order)
        self.by_uid = {n.uid: n for n in self.order}

    def _replace_nodes(self, rewrite) -> None:
        """Swap every node for which ``rewrite(node)`` returns a replacement, in its users and the results."""
        order = topological(self.outputs)
        users = consumers(order)
        for node in order:
            replacement = rewrite(node)
            if replacement is None:
                continue
            for user in users[node.uid]:
                user.children = tuple(replacement if c is node else c for c in user.children)
            self.outputs = [replacement if o is node else o for o in self.outputs]

    # ----------------------------------------------------------------------------- what gets stored
    def _separate_outputs(self) -> None:
        """Each result gets a node of its own that can own the result buffer (copies where needed)."""
        seen = set()
        for j, node in enumerate(self.outputs):
            in_comm = isinstance(node, UpdateSlice) and isinstance(node.children[0], Comm)
            if isinstance(node, Source) or in_comm or node.uid in seen:
                node = _copy(node)
                self.outputs[j] = node
            seen.add(node.uid)

    def _split_long_reductions(self) -> None:
        """A few rows of a very long reduction (argmax over a vocabulary) would run on a few SMs: reduce
        chunks of each row in parallel into a stored partial result, then reduce the partials."""

        def rewrite(node: Node) -> Node | None:
            if not isinstance(node, Reduce):
                return None
            length = math.prod(node.children[0].shape[len(node.shape) :])
            chunk = _chunk_size(length)
            if length < LONG_REDUCTION or math.prod(node.shape) > 64 or chunk is None:
                return None
            return _split_reduction(node, chunk, self.forced)

        self._replace_nodes(rewrite)

    def _split_narrow_products(self) -> None:
        """x @ W with few rows and a row-major weight W[K, N]: a task must read whole cache lines of W rows
        (SPLIT_K_COLUMNS columns at least) to stream at full bandwidth, and N / SPLIT_K_COLUMNS tiles leave
        most SMs idle; and a task's rows share one pass over its weight tile only while they fit in shared
        memory beside the weight ring (bodies.dot.rows_fit_beside_ring: at most 2048 long for 8 rows on
        Hopper): longer, each row streamed the tile again (Qwen3-8B at batch 8: 8 times the MLP's weight
        bytes, 38 ms a step). Split K into S slices computed as a batched product of float32 partial sums,
        followed by a sum over the slices that fuses into the consumer (RoPE, the residual add, the SwiGLU
        gate)."""

        def rewrite(node: Node) -> Node | None:
            slices = self._k_slices(node) if isinstance(node, Dot) else 1
            return _split_k(node, slices) if slices > 1 else None

        self._replace_nodes(rewrite)

    def _exchange_split_partials(self) -> None:
        """psum(x) where x is a split-K product's sum over its slices (a row-parallel O or down projection): the
        float32 partials themselves are exchanged, [ranks, S, ...] instead of [ranks, ...], and the psum sums
        over ranks and slices at once. The product then stores its partial tiles straight into the slots
        (_store_products_into_slots), so the one-task sum of the slices before the exchange goes: one
        dependency level less per psum. With every rank keeping a copy of every slot (Target.comm_copies) the
        consumer reads them locally. In a low-precision type this drops the program's rounding of each rank's
        sum before the exchange (docs/float_contract.md)."""

        def rewrite(node: Node) -> Node | None:
            summed_view = _sum_over_a_view(node, UpdateSlice)
            if summed_view is None:
                return None
            moved, update = summed_view
            slots, value, rank, *zeros = update.children
            if not (isinstance(slots, Comm) and isinstance(value, Reindex)):
                return None
            if not _same_map(value.map, IndexMap.reshape(value.shape, value.children[0].shape), value.shape):
                return None
            if not _same_map(moved.map, transpose_map(moved.shape, [*range(1, len(slots.shape)), 0]), moved.shape):
                return None
            total = value.children[0]
            if isinstance(total, Elementwise) and total.op == NodeOp.CONVERT:
                total = total.children[0]
            partials = _split_k_partials(total)
            if partials is None:
                return None
            ranks, shape = slots.shape[0], tuple(node.shape)
            exchanged = Comm(shape=(ranks, *partials.shape), dtype=partials.dtype, source=slots.source)
            mine = reindex(partials, (1, *partials.shape), IndexMap.reshape((1, *partials.shape), partials.shape))
            stored = UpdateSlice(shape=exchanged.shape, dtype=partials.dtype,
                                 children=(exchanged, mine, rank, *zeros, zeros[0]), source=update.source)  # fmt: skip
            summed = Reduce(shape=shape, dtype=partials.dtype, children=(move_axes_last(stored, [0, 1]),),
                            kind=ReduceKind.SUM, n_inner=2, source=node.source)  # fmt: skip
            if np.dtype(node.dtype) == np.dtype(summed.dtype):
                return summed
            return Elementwise(shape=shape, dtype=node.dtype, children=(summed,), op=NodeOp.CONVERT, source=node.source)

        self._replace_nodes(rewrite)

    def _k_slices(self, dot: Dot) -> int:
        if len(dot.k_shape) != 1 or not dot.shape or math.prod(dot.shape[:-1]) > 16:
            return 1
        weight, weight_map = dot.children[1], dot.rhs_map
        while isinstance(weight, Reindex):
            weight_map, weight = weight_map.then(weight.map), weight.children[0]
        if not isinstance(weight, Source):  # weights: an argument or a constant, never written by the graph
            return 1
        strides = [math.prod(weight.shape[d + 1 :]) for d in range(len(weight.shape))]
        origin = weight_map.apply([0] * len(weight_map.in_shape))
        one_column = [int(d == len(dot.shape) - 1) for d in range(len(weight_map.in_shape))]
        n_step = sum(s * (a - b) for s, a, b in zip(strides, weight_map.apply(one_column), origin))
        k, n = dot.k_shape[0], dot.shape[-1]
        if n_step != 1 or k < 1024 or n % SPLIT_K_COLUMNS:
            return 1
        tiles, rows = n // SPLIT_K_COLUMNS, math.prod(dot.shape[:-1])

        def fit(length: int) -> bool:
            return rows_fit_beside_ring(rows, length, self.target.shared_memory_bytes)

        can_fit = fit(SPLIT_K_MIN_SLICE)  # never, without room for the ring (99 KB a CTA on sm_89)
        slices = 1
        while k % (slices * 2) == 0 and k // (slices * 2) >= SPLIT_K_MIN_SLICE:
            if tiles * slices * 2 > self.num_workers and (fit(k // slices) or not can_fit):
                break
            slices *= 2
        return slices

    def _choose_materialized(self) -> set[int]:
        keep = {n.uid for n in self.order if isinstance(n, (*LEAVES, *HEAVY)) or n.store} | self.forced
        keep |= {n.uid for n in self.outputs}
        for node in self.order:
            if isinstance(node, Dot):
                keep |= {_strip_views(c).uid for c in node.children}
            if isinstance(node, (DynLoad, UpdateSlice)):
                keep.add(node.children[0].uid)
        while True:  # work that several kernels would recompute is stored once instead, unless it is cheap
            shared = {n.uid for n in self._nodes_in_several_kernels(keep) if not self._cheap(n, keep)}
            # store only the outermost shared values: what lies below them is then computed once, inside
            # the kernel that stores them
            frontier = {uid for uid in shared if any(u.uid not in shared for u in self.users[uid])}
            if frontier <= keep:
                return keep
            keep |= frontier

    def _cheap(self, node: Node, keep: set[int]) -> bool:
        """Recomputing ``node`` costs about what loading it would: no reduction, no gather, and at most
        two stored values read."""
        computed = [node] + [self.by_uid[uid] for uid in self._region(node, keep)]
        if any(isinstance(n, (Reduce, DynLoad)) for n in computed):
            return False
        return len({c.uid for n in computed for c in n.children if c.uid in keep}) <= 2

    def _nodes_in_several_kernels(self, keep: set[int]) -> list[Node]:
        count: dict[int, int] = {}
        for root in self.order:
            if root.uid in keep and not isinstance(root, LEAVES):
                for uid in self._region(root, keep):
                    count[uid] = count.get(uid, 0) + 1
        return [self.by_uid[uid] for uid, c in count.items() if c > 1]

    def _region(self, root: Node, keep: set[int]) -> set[int]:
        """uids of the unstored nodes a kernel rooted at ``root`` computes inline."""
        region, stack = set(), list(root.children)
        while stack:
            node = stack.pop()
            if node.uid in keep or node.uid in region:
                continue
            region.add(node.uid)
            stack.extend(node.children)
        return region

    # ----------------------------------------------------------------------------------- in place
    def _alias_update_chains(self) -> dict[int, int]:
        """Update chains input -> ... -> result j: write them in result j's buffer, aliased to the input."""
        self.aliases: dict[int, int] = {}
        self.in_place: set[int] = set()
        chain_output: dict[int, int] = {}
        for j, node in enumerate(self.outputs):
            chain = []
            while isinstance(node, UpdateSlice):
                chain.append(node)
                node = node.children[0]
            if not chain or not isinstance(node, Source) or node.index >= self.n_args:
                continue
            root = node
            if (root.shape, np.dtype(root.dtype)) != (self.outputs[j].shape, np.dtype(self.outputs[j].dtype)):
                continue
            if root.index in self.aliases or not all(self._can_update_in_place(u) for u in chain):
                continue
            self.aliases[root.index] = j
            self.in_place |= {u.uid for u in chain}
            chain_output[root.uid] = j
        return chain_output

    def _can_update_in_place(self, update: UpdateSlice) -> bool:
        """No kernel that reads the old value may depend on the update, and the old value is no result."""
        operand = update.children[0]
        if operand.uid in {o.uid for o in self.outputs}:
            return False
        if any(isinstance(u, UpdateSlice) and u is not update and u.children[0] is operand for u in self.users[operand.uid]):
            return False  # two updates of one value cannot both own its buffer
        if any(operand.uid in self._region_with_leaves(c) for c in update.children[1:]):
            return False  # the update's own tiles would read what other tiles of it overwrite
        readers = self._kernel_readers().get(operand.uid, [])
        return not any(root is not update and _depends_on(root, update) for root in readers)

    def _region_with_leaves(self, node: Node) -> set[int]:
        """uids computed inline for ``node`` plus the stored values they read."""
        region = {node.uid} | self._region(node, self.materialized) if node.uid not in self.materialized else set()
        stored = {c.uid for uid in region for c in self.by_uid[uid].children if c.uid in self.materialized}
        return region | stored | ({node.uid} if node.uid in self.materialized else set())

    def _kernel_readers(self) -> dict[int, list[Node]]:
        """stored uid -> roots of the kernels that read it (computed once, after materialization is fixed)."""
        if not hasattr(self, "_readers"):
            self._readers: dict[int, list[Node]] = {}
            for root in self.order:
                if root.uid in self.materialized and not isinstance(root, LEAVES):
                    computed = [root] + [self.by_uid[uid] for uid in self._region(root, self.materialized)]
                    stored = {c.uid for n in computed for c in n.children if c.uid in self.materialized}
                    for uid in stored:
                        self._readers.setdefault(uid, []).append(root)
        return self._readers

    def _make_updates_in_place(self) -> None:
        for node in list(self.order):
            if not isinstance(node, UpdateSlice) or node.uid in self.in_place:
                continue
            operand = node.children[0]
            if isinstance(operand, Source) or not self._can_update_in_place(node):
                copy = _copy(operand)
                self.materialized.add(copy.uid)
                node.children = (copy,) + node.children[1:]
            self.in_place.add(node.uid)

    # ------------------------------------------------------------------------------------- epilogues
    def _choose_epilogues(self) -> dict[int, Dot]:
        """root uid -> the dot whose accumulator the root's kernel computes itself."""
        outputs = {o.uid for o in self.outputs}
        absorbed: dict[int, Dot] = {}
        taken: set[int] = set()
        kernel_roots = [r for r in self.order if r.uid in self.materialized and not isinstance(r, LEAVES)]
        regions = {r.uid: self._region(r, self.materialized) for r in kernel_roots}
        for root in kernel_roots:
            if isinstance(root, HEAVY):
                continue
            region = regions[root.uid]
            dots = self._dots_read_pointwise(root)
            if self.num_workers and _has_independent_pair(dots):
                # silu(x @ Wg) * (x @ Wu): absorbing one product would make it wait for the other instead of
                # running beside it; on the GPU the pointwise root is computed by its consumer's staging
                continue
            for dot in dots:
                if (
                    dot.uid not in outputs
                    and dot.uid not in taken
                    and tuple(dot.shape) == tuple(root.shape)
                    and self._computed_only_by(dot, root, region)
                ):
                    absorbed[root.uid] = dot
                    taken.add(dot.uid)
                    break
        for dot_uid in taken:
            self.materialized.discard(dot_uid)
        return absorbed

    def _computed_only_by(self, dot: Dot, root: Node, region: set[int]) -> bool:
        """Every unstored value computed from ``dot`` lies in root's kernel. A value that another kernel also
        computes (``m = (a @ b) * 2`` used by ``m + 1`` and returned as ``m.T``) needs the product stored."""
        stack, seen = [dot], set()
        while stack:
            for user in self.users[stack.pop().uid]:
                if user is root or user.uid in seen:
                    continue
                if user.uid not in region:
                    return False
                seen.add(user.uid)
                stack.append(user)
        return True

    def _dots_read_pointwise(self, root: Node) -> list[Dot]:
        """Stored dots reached from root through elementwise nodes only (read at the root's own index),
        and nowhere through a view or reduction."""
        pointwise, other, stack = [], set(), [(root, True)]
        seen = set()
        while stack:
            node, same_index = stack.pop()
            if (node.uid, same_index) in seen:
                continue
            seen.add((node.uid, same_index))
            if node is not root and node.uid in self.materialized:
                if isinstance(node, Dot) and same_index:
                    pointwise.append(node)
                elif isinstance(node, Dot):
                    other.add(node.uid)
                continue
            keeps_index = same_index and isinstance(node, Elementwise)
            stack.extend((c, keeps_index) for c in node.children)
        return list({d.uid: d for d in pointwise if d.uid not in other}.values())

    # --------------------------------------------------------------------------------------- buffers
    def _assign_buffers(self) -> None:
        offset = comm_offset = 0
        result_of = {o.uid: j for j, o in enumerate(self.outputs)}
        for node in self.order:
            if node.uid not in self.materialized:
                continue
            if isinstance(node, UpdateSlice):
                self.tensors[node.uid] = Tensor(self.tensors[node.children[0].uid].buffer, node.shape, node.uid)
                continue
            if isinstance(node, Source) and node.uid in self.chain_buffer_output:
                j = self.chain_buffer_output[node.uid]
                buffer = Buffer(TensorKind.OUTPUT, j, node.shape, node.dtype, f"out{j}")
            elif isinstance(node, Source):
                name = f"in{node.index}" if node.index < self.n_args else f"const{node.index - self.n_args}"
                buffer = Buffer(TensorKind.INPUT, node.index, node.shape, node.dtype, name)
            elif isinstance(node, Comm):  # each value exchanged has a region of its own, never reused
                # the whole [ranks, ...] tensor: the GPU keeps every rank's slot in every rank's buffer
                buffer = Buffer(TensorKind.COMM, comm_offset, node.shape, node.dtype, f"comm{node.uid}")
                comm_offset += -(-buffer.nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
            else:
                j = result_of.get(self._chain_end(node).uid)
                if j is not None:
                    buffer = Buffer(TensorKind.OUTPUT, j, node.shape, node.dtype, f"out{j}")
                else:
                    buffer = Buffer(TensorKind.WORKSPACE, offset, node.shape, node.dtype, f"t{node.uid}")
                    offset += -(-buffer.nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
            self.buffers.append(buffer)
            self.tensors[node.uid] = Tensor(buffer, node.shape, node.uid)
        self.workspace_bytes = offset
        self.comm_bytes = comm_offset  # of one rank's buffer (one half)


    def _new_workspace_tensor(self, shape: Shape, dtype: np.dtype, name: str) -> Tensor:
        """A workspace buffer made after the graph's own (a GPU pass's partial results), as a tensor of it."""
        buffer = Buffer(TensorKind.WORKSPACE, self.workspace_bytes, tuple(shape), np.dtype(dtype), name)
        self.workspace_bytes += -(-buffer.nbytes // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
        self.buffers.append(buffer)
        return Tensor(buffer, tuple(shape), Node(shape=tuple(shape), dtype=np.dtype(dtype)).uid)

    def _chain_end(self, node: Node) -> Node:
        """The last in-place update of ``node``'s buffer (node itself when it is never updated)."""
        while True:
            updates = [u for u in self.users[node.uid] if isinstance(u, UpdateSlice) and u.children[0] is node]
            if not updates:
                return node
            node = updates[0]

    # --------------------------------------------------------------------------------------- kernels
    def _is_kernel_root(self, node: Node) -> bool:
        return node.uid in self.materialized and not isinstance(node, LEAVES)

    def _build_kernel(self, root: Node) -> Kernel:
        builder = _ExprBuilder(self.tensors, self.materialized, self.absorbed.get(root.uid))
        tensor = self.tensors[root.uid]
        if isinstance(root, UpdateSlice):
            return self._update_kernel(root, builder)
        if isinstance(root, Dot):
            dot, expr = root, Acc(shape=root.shape, dtype=root.dtype)
        else:
            dot, expr = self.absorbed.get(root.uid), builder.value(root)
        output = KernelOutput(expr, tensor, IndexMap.identity(root.shape))
        spec = builder.dot_spec(dot) if dot is not None else None
        return Kernel(_kernel_name(expr, dot), tuple(root.shape), [output], spec, root.source or (dot and dot.source) or "")

    def _update_kernel(self, root: UpdateSlice, builder: _ExprBuilder) -> Kernel:
        operand, update, *starts = root.children
        domain = tuple(update.shape)
        offset, dyn = [0] * len(domain), []
        for dim, start in enumerate(starts):
            hi = operand.shape[dim] - update.shape[dim]
            value = start.params[0] if isinstance(start, Elementwise) and start.op == NodeOp.CONST else None
            if value is not None:
                offset[dim] = min(max(int(value), 0), hi)
            else:
                index = builder.expr(start)
                index = Reindex(shape=domain, dtype=index.dtype, children=(index,), map=IndexMap.affine(domain, (), []))
                dyn.append((dim, index, hi))
        rank = len(domain)
        out_map = IndexMap.affine(domain, operand.shape, [[int(r == c) for c in range(rank)] for r in range(rank)], offset)
        output = KernelOutput(builder.expr(update), self.tensors[root.uid], out_map, tuple(dyn))
        return Kernel("update_slice(" + _kernel_name(output.node, None) + ")", domain, [output], None, root.source)

    def _order_kernels(self, kernels: list[Kernel]) -> list[Kernel]:
        """Topological order over stored values, with every reader of an old version of a buffer placed
        before the kernel that overwrites it in place. Kernels are taken level by level (level: the longest
        chain of kernels before it), so independent kernels such as the Q, K and V projections sit side by
        side in the schedule and run concurrently; ties keep the graph's own order."""
        writes = {t.version: k for k in kernels for t in k.written_tensors()}
        position = {id(k): i for i, k in enumerate(kernels)}
        after: dict[int, set[int]] = {id(k): set() for k in kernels}  # kernel -> kernels that must precede
        readers: dict[int, list[Kernel]] = {}  # version -> the kernels that read it
        for kernel in kernels:
            for version in {t.version for t in kernel.read_tensors()}:
                readers.setdefault(version, []).append(kernel)
                producer = writes.get(version)
                if producer is not None and producer is not kernel:
                    after[id(kernel)].add(id(producer))
        for kernel in kernels:
            for out in kernel.outputs:  # any output: a merged kernel may write its in-place update second
                if not isinstance(self.by_uid.get(out.tensor.version), UpdateSlice):  # (GPU passes' tensors: new)
                    continue
                old = self.by_uid[out.tensor.version].children[0].uid
                for reader in readers.get(old, ()):
                    if reader is not kernel:
                        after[id(kernel)].add(id(reader))
                producer = writes.get(old)
                if producer is not None and producer is not kernel:
                    after[id(kernel)].add(id(producer))
        by_id = {id(k): k for k in kernels}
        pending = {kid: len(deps) for kid, deps in after.items()}
        followers: dict[int, list[int]] = {kid: [] for kid in after}
        for kid, deps in after.items():
            for dep in deps:
                followers[dep].append(kid)
        level = {kid: 0 for kid in after}
        ready = [(0, position[kid], kid) for kid, n in pending.items() if n == 0]
        heapq.heapify(ready)
        ordered = []
        while ready:
            _, _, kid = heapq.heappop(ready)
            ordered.append(by_id[kid])
            by_id[kid].level = level[kid]
            for nxt in followers[kid]:
                pending[nxt] -= 1
                level[nxt] = max(level[nxt], level[kid] + 1)
                if pending[nxt] == 0:
                    heapq.heappush(ready, (level[nxt], position[nxt], nxt))
        assert len(ordered) == len(kernels), "cycle between in-place updates (jax_mpk bug)"
        return ordered



class _ExprBuilder:
    """Rewrites the unstored part of a kernel's graph into its expression; stored values become loads."""

    def __init__(self, tensors: dict[int, Tensor], materialized: set[int], absorbed: Dot | None):
        self.tensors, self.materialized, self.absorbed = tensors, materialized, absorbed
        self.memo: dict[int, Node] = {}

    def value(self, node: Node) -> Node:
        """Expression computing ``node`` (even when node itself is stored: it is the kernel's root)."""
        return self._rewrite(node, force_compute=True)

    def expr(self, node: Node) -> Node:
        """Expression for ``node`` as a kernel reads it: a load when it is stored."""
        return self._rewrite(node)

    def _rewrite(self, node: Node, force_compute: bool = False) -> Node:
        """Children before parents with an explicit stack: a chain of hundreds of fused elementwise operations
        must not hit Python's recursion limit."""
        stack = [(node, force_compute)]
        while stack:
            current, force = stack[-1]
            if (current.uid, force) in self.memo:
                stack.pop()
                continue
            pending = [c for c in self._inlined_children(current, force) if (c.uid, False) not in self.memo]
            if pending:
                stack.extend((c, False) for c in pending)
                continue
            stack.pop()
            self.memo[(current.uid, force)] = self._rewrite_one(current, force)
        return self.memo[(node.uid, force_compute)]

    def _inlined_children(self, node: Node, force_compute: bool) -> tuple[Node, ...]:
        """The children whose expressions ``node``'s expression is built from."""
        if (self.absorbed is not None and node is self.absorbed) or (
            node.uid in self.materialized and not force_compute
        ):
            return ()
        if isinstance(node, Reindex):
            return node.children[:1]
        if isinstance(node, DynLoad):
            return node.children[1:]
        if isinstance(node, (Elementwise, Reduce, Piecewise)):
            return node.children
        return ()

    def _rewrite_one(self, node: Node, force_compute: bool) -> Node:
        """``node``'s expression, its children's already in the memo."""
        rewritten = lambda child: self.memo[(child.uid, False)]  # noqa: E731
        if self.absorbed is not None and node is self.absorbed:
            return Acc(shape=node.shape, dtype=node.dtype)
        if node.uid in self.materialized and not force_compute:
            return make_load(self.tensors[node.uid], IndexMap.identity(node.shape), node.dtype)
        if isinstance(node, Reindex):
            child = rewritten(node.children[0])
            if isinstance(child, Load) and not child.dims:
                return make_load(child.tensor, node.map.then(child.map), node.dtype)
            return Reindex(shape=node.shape, dtype=node.dtype, children=(child,), map=node.map)
        if isinstance(node, DynLoad):
            operand, *indices = node.children
            return Load(
                shape=node.shape,
                dtype=node.dtype,
                children=tuple(rewritten(i) for i in indices),
                tensor=self.tensors[operand.uid],
                map=node.map,
                dims=node.dims,
                his=node.his,
            )
        if isinstance(node, (Elementwise, Reduce, Piecewise)):
            return clone(node, tuple(rewritten(c) for c in node.children))
        raise AssertionError(f"unstored heavy node {node!r} (jax_mpk bug)")

    def dot_spec(self, dot: Dot) -> DotSpec:
        operands = []
        for child, map_ in zip(dot.children, (dot.lhs_map, dot.rhs_map)):
            base = child
            while isinstance(base, Reindex) and base.uid not in self.materialized:
                map_ = map_.then(base.map)
                base = base.children[0]
            load = make_load(self.tensors[base.uid], map_, base.dtype)
            operands.append((load.tensor, load.map))
        (lhs, lhs_map), (rhs, rhs_map) = operands
        return DotSpec(tuple(dot.k_shape), lhs, lhs_map, rhs, rhs_map, np.dtype(dot.dtype))


LONG_REDUCTION = 1 << 15  # reductions at least this long are split into chunks
SPLIT_K_COLUMNS = 64  # narrowest column tile of a bf16 weight that reads whole 128-byte lines
SPLIT_K_MIN_SLICE = 256  # shortest K slice (each slice adds a float32 partial result to store and sum again)


def _split_k(dot: Dot, slices: int) -> Node:
    """sum over s of dot(lhs, rhs) restricted to K slice s: a float32 batched product, then a reduction."""
    k = dot.k_shape[0]
    chunk = k // slices
    rank = len(dot.shape)
    partial_shape = (slices,) + tuple(dot.shape)
    combined = partial_shape + (chunk,)
    # (s, domain..., k') -> (domain..., s * chunk + k')
    to_old = [[0] * (rank + 2) for _ in range(rank + 1)]
    for d in range(rank):
        to_old[d][1 + d] = 1
    to_old[rank][0], to_old[rank][rank + 1] = chunk, 1
    index_map = IndexMap.affine(combined, tuple(dot.shape) + (k,), to_old)
    partial = Dot(shape=partial_shape, dtype=np.dtype("float32"), children=dot.children, k_shape=(chunk,),
                  lhs_map=index_map.then(dot.lhs_map), rhs_map=index_map.then(dot.rhs_map), source=dot.source)  # fmt: skip
    moved = Reindex(shape=tuple(dot.shape) + (slices,), dtype=partial.dtype, children=(partial,),
                    map=IndexMap.affine(tuple(dot.shape) + (slices,), partial_shape, _rotate(rank)))  # fmt: skip
    total = Reduce(shape=tuple(dot.shape), dtype=partial.dtype, children=(moved,), kind=ReduceKind.SUM, n_inner=1,
                   source=dot.source)  # fmt: skip
    if np.dtype(dot.dtype) == np.dtype("float32"):
        return total
    return Elementwise(shape=tuple(dot.shape), dtype=dot.dtype, children=(total,), op=NodeOp.CONVERT, source=dot.source)


def _sum_over_a_view(node: Node, kind: type) -> tuple[Reindex, Node] | None:
    """(view, x) when ``node`` sums the last dim of a view of a node x of type ``kind`` (a psum's sum over the
    slots, a split-K product's over its slices), else None."""
    if not (isinstance(node, Reduce) and node.kind == ReduceKind.SUM and node.n_inner == 1):
        return None
    view = node.children[0]
    if not (isinstance(view, Reindex) and isinstance(view.children[0], kind)):
        return None
    return view, view.children[0]


def _split_k_partials(node: Node) -> Dot | None:
    """The batched product of float32 partials [S, ...] whose sum over S ``node`` is, as _split_k makes it."""
    summed_view = _sum_over_a_view(node, Dot)
    if summed_view is None:
        return None
    moved, partials = summed_view
    rank = len(node.shape)
    rotation = IndexMap.affine(tuple(moved.shape), tuple(partials.shape), _rotate(rank))
    if partials.shape[1:] != node.shape or not _same_map(moved.map, rotation, moved.shape):
        return None
    return partials


def _rotate(rank: int) -> list[list[int]]:
    """Matrix taking (domain..., s) to (s, domain...)."""
    matrix = [[0] * (rank + 1) for _ in range(rank + 1)]
    matrix[0][rank] = 1
    for d in range(rank):
        matrix[1 + d][d] = 1
    return matrix


@functools.cache  # asked for every reduction of every layer
def _chunk_size(length: int) -> int | None:
    """A divisor of ``length`` near 4096 (chunks of a split reduction), or None."""
    divisors = [d for d in range(1024, 16385) if length % d == 0]
    return min(divisors, key=lambda d: abs(d - 4096)) if divisors else None


def _split_reduction(node: Reduce, chunk: int, forced: set[int]) -> Node:
    """reduce(x) over [rows, L] as reduce(reduce(x over [rows, L/chunk, chunk])); for arg-reductions the
    winning chunk's partial position is gathered back. Partial results are added to ``forced``."""
    child = node.children[0]
    outer = tuple(node.shape)
    chunks = math.prod(child.shape[len(outer) :]) // chunk
    split_shape = outer + (chunks, chunk)
    split = Reindex(shape=split_shape, dtype=child.dtype, children=(child,),
                    map=IndexMap.reshape(split_shape, tuple(child.shape)), source=node.source)  # fmt: skip
    partial_shape = outer + (chunks,)

    def reduce(kind, operand, shape, dtype):
        return Reduce(shape=shape, dtype=dtype, children=(operand,), kind=kind, n_inner=1, source=node.source)

    arg = {ReduceKind.ARGMAX: ReduceKind.MAX, ReduceKind.ARGMIN: ReduceKind.MIN}
    if node.kind not in arg:
        partial = reduce(node.kind, split, partial_shape, node.dtype)
        forced.add(partial.uid)
        return reduce(node.kind, partial, outer, node.dtype)
    best = reduce(arg[node.kind], split, partial_shape, child.dtype)
    position = reduce(node.kind, split, partial_shape, node.dtype)
    forced |= {best.uid, position.uid}
    winner = reduce(node.kind, best, outer, node.dtype)  # first chunk holding the extreme
    rank = len(outer)
    to_partial = [[int(r == c) for c in range(rank)] for r in range(rank)] + [[0] * rank]
    within = DynLoad(shape=outer, dtype=node.dtype, children=(position, winner),
                     map=IndexMap.affine(outer, partial_shape, to_partial), dims=(rank,), his=(chunks - 1,),
                     source=node.source)  # fmt: skip
    base = Elementwise(shape=outer, dtype=node.dtype, children=(winner, _constant(chunk, node)), op=NodeOp.MUL)
    return Elementwise(shape=outer, dtype=node.dtype, children=(base, within), op=NodeOp.ADD, source=node.source)


# The rewrites a target may ask for after the target-neutral fusion (Target.fusion_passes), by name.
PASSES = {
    "rows_in_dot_staging": lambda fuser, kernels: compute_rows_in_dot_staging(kernels, fuser.target.stage_shared_rows,
                                                                                  fuser.target.comm_copies,
                                                                                  fuser.target.stage_shared_pointwise),
    "split_attention": lambda fuser, kernels: split_attention(kernels, fuser.num_workers, fuser.target.shared_memory_bytes,
                                                          fuser._new_workspace_tensor),
}


def _constant(value, like: Node) -> Node:
    scalar = Elementwise(shape=(), dtype=like.dtype, op=NodeOp.CONST, params=(float(value),))
    return Reindex(shape=like.shape, dtype=like.dtype, children=(scalar,), map=IndexMap.affine(like.shape, (), []))


def _merge_into_consumers(kernels: list[Kernel]) -> list[Kernel]:
    """Multi-output fusion: a pointwise kernel A whose value T a later kernel B (same domain) reads is
    folded into B, which computes T inline where it needs it and also stores T over its own tiles
    (the residual sum stored by the RMSNorm that reads it). One dependency level less per merge."""
    merged: list[Kernel] = list(kernels)
    position = {id(k): i for i, k in enumerate(merged)}
    removed: set[int] = set()
    readers_of: dict[int, list[Kernel]] = {}  # version -> kernels that read it (a model has thousands of kernels)
    for k in kernels:
        for version in {t.version for t in k.read_tensors()}:
            readers_of.setdefault(version, []).append(k)
    for a in kernels:
        if not _mergeable_producer(a):
            continue
        out = a.outputs[0]
        readers = [k for k in readers_of.get(out.tensor.version, ()) if id(k) not in removed and k is not a]
        if not readers:
            continue
        b = min(readers, key=lambda k: position[id(k)])
        loads = [n for n in b.nodes() if isinstance(n, Load) and n.tensor.version == out.tensor.version]
        if b.dot is not None or tuple(b.domain) != tuple(a.domain) or any(n.dims for n in loads):
            continue
        if any(not n.map.is_identity for n in loads) and any(isinstance(n, Reduce) for n in a.nodes()):
            continue  # B would redo A's reduction at every position it reads (a sort's ranks)
        between = merged[position[id(a)] + 1 : position[id(b)]]
        inputs = {id(t.buffer) for t in a.read_tensors()}
        if any(id(o.tensor.buffer) in inputs for k in between for o in k.outputs):
            continue  # A's inputs are overwritten in place before B would read them
        inline = {
            n.uid: out.node
            if n.map.is_identity
            else Reindex(shape=n.shape, dtype=n.dtype, children=(out.node,), map=n.map)
            for n in loads
        }
        b.outputs = [KernelOutput(substitute(o.node, inline), o.tensor, o.map,
                                  tuple((d, substitute(x, inline), hi) for d, x, hi in o.dyn)) for o in b.outputs]  # fmt: skip
        b.outputs.append(KernelOutput(out.node, out.tensor, out.map))
        b.name = f"{a.name}|{b.name}"
        removed.add(id(a))
        for version in {t.version for t in a.read_tensors()}:  # B now reads what A read
            listed = readers_of.setdefault(version, [])
            if not any(k is b for k in listed):
                listed.append(b)
    return [k for k in merged if id(k) not in removed]


def _store_products_into_slots(kernels: list[Kernel]) -> list[Kernel]:
    """A collective's contribution stored straight where the other devices read it: a product kernel A whose
    result only an update kernel U copies into a communication buffer's slot (``psum(x @ w)``: U writes this
    rank's slot), converted or not on the way (a vocabulary-parallel head's float32 logits, all-gathered),
    stores it there itself, through U's map and dynamic offsets, and U goes: one dependency level less per
    collective of a product."""
    readers: dict[int, list[Kernel]] = {}  # version -> kernels that read it
    for k in kernels:
        for version in {t.version for t in k.read_tensors()}:
            readers.setdefault(version, []).append(k)
    writer = {o.tensor.version: k for k in kernels for o in k.outputs}
    removed: set[int] = set()
    for u in kernels:
        if len(u.outputs) != 1 or u.dot is not None or u.outputs[0].tensor.buffer.kind != TensorKind.COMM:
            continue
        out = u.outputs[0]
        copied = _copied_load(out.node)
        if copied is None or copied[0].tensor.buffer.kind != TensorKind.WORKSPACE:
            continue
        load, to_tensor, conversions = copied
        a = writer.get(load.tensor.version)
        if a is None or a.dot is None or len(a.outputs) != 1 or not a.outputs[0].map.is_identity or a.outputs[0].dyn:
            continue
        if readers.get(load.tensor.version) != [u] or math.prod(a.domain) != math.prod(u.domain):
            continue
        as_u = IndexMap.reshape(tuple(a.domain), tuple(u.domain))  # A's domain index -> U's, row-major
        in_order = IndexMap.reshape(tuple(u.domain), tuple(a.domain))
        if any(tuple(to_tensor(i)) != tuple(in_order.apply(i)) for i in _probes(tuple(u.domain))):
            continue  # U reads A's result in another order than row-major (a transpose)
        dyn = tuple((d, Reindex(shape=tuple(a.domain), dtype=x.dtype, children=x.children,
                                map=IndexMap.affine(tuple(a.domain), (), [])), hi) for d, x, hi in out.dyn)  # fmt: skip
        value = a.outputs[0].node
        for converted in reversed(conversions):  # the innermost conversion first
            value = Elementwise(shape=tuple(a.domain), dtype=converted.dtype, children=(value,), op=NodeOp.CONVERT,
                                source=converted.source)  # fmt: skip
        a.outputs = [KernelOutput(value, out.tensor, as_u.then(out.map), dyn)]
        a.name = f"{a.name}|{u.name}"
        removed.add(id(u))
    return [k for k in kernels if id(k) not in removed]


def _copied_load(node: Node) -> tuple[Load, object, list[Elementwise]] | None:
    """(load, index function of the copy's domain to the loaded tensor, the conversions from the outermost) when
    ``node`` is a plain load seen through views and type conversions only, else None."""
    to_node, conversions = (lambda index: tuple(index)), []
    while True:
        if isinstance(node, Reindex):
            to_node = (lambda f, m: lambda index: m.apply(f(index)))(to_node, node.map)
        elif isinstance(node, Elementwise) and node.op == NodeOp.CONVERT:
            conversions.append(node)
        else:
            break
        node = node.children[0]
    if not isinstance(node, Load) or node.dims:
        return None
    return node, (lambda index: node.map.apply(to_node(index))), conversions


def _probes(shape: Shape) -> list[tuple[int, ...]]:
    """The origin, a unit step along every dim longer than 1, and the last index: enough to tell two reshapes or
    affine maps from ``shape`` apart."""
    return [tuple(0 for _ in shape), tuple(s - 1 for s in shape)] + [
        tuple(int(d == e) for e in range(len(shape))) for d in range(len(shape)) if shape[d] > 1]


def _same_map(first: IndexMap, second: IndexMap, shape: Shape) -> bool:
    """Whether two maps from ``shape`` agree (on ``_probes``: both are affine or reshapes here)."""
    return all(first.apply(i) == second.apply(i) for i in _probes(shape))


def _mergeable_producer(kernel: Kernel) -> bool:
    if kernel.dot is not None or len(kernel.outputs) != 1:
        return False
    out = kernel.outputs[0]
    return out.map.is_identity and not out.dyn and tuple(out.tensor.shape) == tuple(kernel.domain)


def _copy(node: Node) -> Node:
    return Reindex(shape=node.shape, dtype=node.dtype, children=(node,), map=IndexMap.identity(node.shape), source=node.source)


def _strip_views(node: Node) -> Node:
    while isinstance(node, Reindex):
        node = node.children[0]
    return node


def _has_independent_pair(dots: list[Dot]) -> bool:
    return any(not _depends_on(a, b) and not _depends_on(b, a) for i, a in enumerate(dots) for b in dots[i + 1 :])


def _depends_on(node: Node, target: Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n.uid in seen:
            continue
        seen.add(n.uid)
        stack.extend(n.children)
    return False


def _kernel_name(expr: Node, dot: Dot | None) -> str:
    labels = []
    for node in topological([expr]):
        if isinstance(node, (Load, Reindex, Acc)) or (isinstance(node, Elementwise) and node.op == NodeOp.CONST):
            continue
        label = node.describe().split("(")[0]
        if label not in labels:
            labels.append(label)
    prefix = ["dot"] if dot is not None else []
    body = prefix + labels
    return "+".join(body[:6]) + ("+..." if len(body) > 6 else "") if body else "copy"
