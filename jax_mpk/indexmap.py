"""Index maps: how one index space reads another (views, broadcasts, reshapes) without moving data.

An :class:`IndexMap` takes an index of ``in_shape`` to an index of ``out_shape`` through a list of stages:
an affine stage ``new = A @ cur + offset`` or a reshape stage (row-major linearize, then delinearize).
Maps compose, and they propagate rectangles backwards (``rect_image``): the bounding box of the indices a
rectangle of the input space reaches, which is how tile-level dependencies are derived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .layout import StageKind

Shape = tuple[int, ...]
Rect = tuple[tuple[int, int], ...]  # per dim: [lo, hi)


@dataclass(frozen=True)
class Affine:
    out_shape: Shape
    matrix: tuple[tuple[int, ...], ...]  # out_rank rows of cur_rank ints
    offset: tuple[int, ...]

    kind = StageKind.AFFINE


@dataclass(frozen=True)
class Reshape:
    out_shape: Shape

    kind = StageKind.RESHAPE


Stage = Affine | Reshape


@dataclass(frozen=True)
class IndexMap:
    in_shape: Shape
    stages: tuple[Stage, ...] = ()

    @property
    def out_shape(self) -> Shape:
        return self.stages[-1].out_shape if self.stages else self.in_shape

    @staticmethod
    def identity(shape: Shape) -> IndexMap:
        return IndexMap(tuple(shape))

    @staticmethod
    def affine(in_shape: Shape, out_shape: Shape, matrix, offset=None) -> IndexMap:
        matrix = tuple(tuple(int(v) for v in row) for row in matrix)
        offset = tuple(int(v) for v in (offset if offset is not None else [0] * len(out_shape)))
        return IndexMap(tuple(in_shape)).then_stage(Affine(tuple(out_shape), matrix, offset))

    @staticmethod
    def reshape(in_shape: Shape, out_shape: Shape) -> IndexMap:
        """Map from a reshaped array (``in_shape``) to the array it was reshaped from (``out_shape``)."""
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        matrix = _reshape_as_affine(in_shape, out_shape)
        if matrix is not None:
            return IndexMap.affine(in_shape, out_shape, matrix)
        return IndexMap(in_shape).then_stage(Reshape(out_shape))

    def then_stage(self, stage: Stage) -> IndexMap:
        return IndexMap(self.in_shape, _simplify(self.in_shape, self.stages + (stage,)))

    def then(self, other: IndexMap) -> IndexMap:
        """This map followed by ``other`` (other.in_shape must equal self.out_shape)."""
        assert tuple(other.in_shape) == tuple(self.out_shape), (other.in_shape, self.out_shape)
        return IndexMap(self.in_shape, _simplify(self.in_shape, self.stages + other.stages))

    @property
    def is_identity(self) -> bool:
        return not self.stages

    def apply(self, index) -> tuple[int, ...]:
        cur, shape = tuple(int(i) for i in index), self.in_shape
        for stage in self.stages:
            if isinstance(stage, Affine):
                cur = tuple(
                    off + sum(a * c for a, c in zip(row, cur)) for row, off in zip(stage.matrix, stage.offset)
                )
            else:
                cur = tuple(int(v) for v in np.unravel_index(np.ravel_multi_index(cur, shape), stage.out_shape))
            shape = stage.out_shape
        return cur

    def rect_image(self, rect: Rect) -> Rect:
        """Bounding rectangle (in out_shape) of the image of ``rect`` (in in_shape)."""
        lo, hi = self.rect_images(np.array([[a for a, _ in rect]], np.int64), np.array([[b for _, b in rect]], np.int64))
        return tuple(zip(lo[0].tolist(), hi[0].tolist()))

    def rect_images(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rect_image` of many rectangles at once, given as their corners ``lo`` and ``hi`` (int64 arrays
        [n, in_rank]): the planner maps every tile of a kernel together. A rectangle empty before some stage
        maps to the all-zero (empty) rectangle of out_shape. The arrays returned are new."""
        if not self.stages:
            return lo.copy(), hi.copy()
        shape, dead = self.in_shape, np.zeros(len(lo), bool)
        for stage in self.stages:
            dead |= np.any(hi <= lo, axis=1)
            if isinstance(stage, Affine):
                matrix = np.array(stage.matrix, np.int64).reshape(len(stage.out_shape), len(shape))
                # each output coordinate's extremes: a coefficient's sign picks the corner that gives them
                at_lo, at_hi = matrix * lo[:, None, :], matrix * (hi - 1)[:, None, :]
                offset = np.array(stage.offset, np.int64)
                lo = np.maximum(offset + np.minimum(at_lo, at_hi).sum(axis=2), 0)
                hi = np.minimum(offset + np.maximum(at_lo, at_hi).sum(axis=2) + 1, np.array(stage.out_shape, np.int64))
            else:
                lo, hi = reshape_rects(lo, hi, shape, stage.out_shape)
            shape = stage.out_shape
        lo[dead], hi[dead] = 0, 0
        return lo, hi

    def to_words(self) -> list[int]:
        words = [len(self.in_shape), *self.in_shape, len(self.stages)]
        for stage in self.stages:
            words += [int(stage.kind), len(stage.out_shape), *stage.out_shape]
            if isinstance(stage, Affine):
                words += [v for row in stage.matrix for v in row] + list(stage.offset)
        return words

    def __repr__(self) -> str:
        if not self.stages:
            return f"id{list(self.in_shape)}"
        parts = []
        for stage in self.stages:
            if isinstance(stage, Affine):
                parts.append(f"affine->{list(stage.out_shape)}")
            else:
                parts.append(f"reshape->{list(stage.out_shape)}")
        return f"{list(self.in_shape)}:" + ",".join(parts)


def linear_form(index_map: IndexMap, tensor_shape) -> tuple[int, list[int]] | None:
    """The element offset of the map's image in a dense tensor of ``tensor_shape`` as (const, coefs), offset =
    const + sum(coef * index), when the map is one affine stage (or the identity); else None."""
    strides = [math.prod(tensor_shape[d + 1 :]) for d in range(len(tensor_shape))]
    if index_map.is_identity:
        return 0, strides
    if len(index_map.stages) != 1 or not isinstance(index_map.stages[0], Affine):
        return None
    stage = index_map.stages[0]
    const = sum(s * o for s, o in zip(strides, stage.offset))
    coefs = [sum(strides[r] * stage.matrix[r][c] for r in range(len(strides))) for c in range(len(index_map.in_shape))]
    return const, coefs


# ----------------------------------------------------------------------------------------------- rects


def rect_volume(rect: Rect) -> int:
    return math.prod(max(hi - lo, 0) for lo, hi in rect)


def overlapping_pairs(a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) for every rect i of ``a`` that overlaps rect j of ``b`` (corners [n, rank]), in row-major order:
    two index arrays."""
    rows, cols = [], []
    if len(a_lo) and len(b_lo):
        step = max(1, (1 << 22) // len(b_lo))  # bounded memory: step x len(b) booleans
        for start in range(0, len(a_lo), step):
            lo, hi = a_lo[start : start + step], a_hi[start : start + step]
            overlap = np.ones((len(lo), len(b_lo)), bool)
            for d in range(a_lo.shape[1]):  # dim by dim: 2-D comparisons beat a reduction over a short last axis
                overlap &= (lo[:, d, None] < b_hi[None, :, d]) & (b_lo[None, :, d] < hi[:, d, None])
            r, c = np.nonzero(overlap)
            rows.append(r + start)
            cols.append(c)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def reshape_rects(lo: np.ndarray, hi: np.ndarray, in_shape: Shape, out_shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """Bounding rects in out_shape of rects in in_shape (corners [n, in_rank]), group by group of dims with
    equal products: a group's rows are a row-major interval of its elements, whose bounding rect stays narrow
    in the group's out dims while the interval lies within one index of the dim, and is whole after that.
    Empty rects give the all-zero rect."""
    n = len(lo)
    new_lo, new_hi = np.zeros((n, len(out_shape)), np.int64), np.zeros((n, len(out_shape)), np.int64)
    for in_dims, out_dims in _reshape_groups(in_shape, out_shape):
        sizes = [in_shape[d] for d in in_dims]
        strides = np.array([math.prod(sizes[k + 1 :]) for k in range(len(sizes))], np.int64)
        first = lo[:, in_dims] @ strides  # the interval [first, last] of the group's linear positions
        last = (hi[:, in_dims] - 1) @ strides
        narrow = np.ones(n, bool)
        for k, d in enumerate(out_dims):
            inner = math.prod(out_shape[e] for e in out_dims[k + 1 :])
            a, b = first // inner, last // inner
            new_lo[:, d] = np.where(narrow, a, 0)
            new_hi[:, d] = np.where(narrow, b + 1, out_shape[d])
            narrow &= a == b
            first, last = first - a * inner, last - a * inner
    empty = np.any(hi <= lo, axis=1)
    new_lo[empty], new_hi[empty] = 0, 0
    return new_lo, new_hi


def _reshape_groups(in_shape: Shape, out_shape: Shape) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims of two shapes with equal element counts (size-1 dims form their own runs)."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            else:
                gj.append(j)
                pj *= out_shape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _reshape_as_affine(in_shape: Shape, out_shape: Shape):
    """Matrix of the reshape when every group maps onto at most one out dim (splits only), else None."""
    if math.prod(in_shape) == 0:
        return None
    matrix = [[0] * len(in_shape) for _ in out_shape]
    for in_dims, out_dims in _reshape_groups(in_shape, out_shape):
        nontrivial = [d for d in out_dims if out_shape[d] != 1]
        if len(nontrivial) > 1:
            return None
        if not nontrivial:
            continue
        stride = 1
        for d in reversed(in_dims):
            matrix[nontrivial[0]][d] = stride
            stride *= in_shape[d]
    return matrix


def _simplify(in_shape: Shape, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Fuse adjacent affine stages, drop identities and reshapes that change nothing."""
    out: list[Stage] = []
    shape = tuple(in_shape)
    for stage in stages:
        if isinstance(stage, Reshape):
            matrix = _reshape_as_affine(shape, stage.out_shape)
            if matrix is not None:
                stage = Affine(stage.out_shape, tuple(map(tuple, matrix)), (0,) * len(stage.out_shape))
        if isinstance(stage, Affine) and out and isinstance(out[-1], Affine):
            prev = out.pop()
            shape = _shape_before(in_shape, out)
            a2 = np.array(stage.matrix, dtype=np.int64).reshape(len(stage.out_shape), len(prev.out_shape))
            a1 = np.array(prev.matrix, dtype=np.int64).reshape(len(prev.out_shape), len(shape))
            offset = a2 @ np.array(prev.offset, dtype=np.int64).reshape(-1) + np.array(stage.offset, dtype=np.int64)
            stage = Affine(stage.out_shape, tuple(map(tuple, (a2 @ a1).tolist())), tuple(offset.tolist()))
        if isinstance(stage, Affine) and out and isinstance(out[-1], Reshape) and _keeps_memory_order(stage, shape):
            stage = Reshape(stage.out_shape)  # a reshape, then moving length-1 dims: one reshape
        if isinstance(stage, Reshape) and out and isinstance(out[-1], Reshape):
            out.pop()
            shape = _shape_before(in_shape, out)
        if _is_identity_stage(stage, shape):
            shape = stage.out_shape
            continue
        out.append(stage)
        shape = stage.out_shape
    return tuple(out)


def _keeps_memory_order(stage: Affine, shape: Shape) -> bool:
    """A permutation without offset that moves only length-1 dims: row-major positions are unchanged. (Not a
    slice from 0, ``x[:2]``: its matrix is the identity too, but it changes the sizes.)"""
    if any(stage.offset) or len(stage.out_shape) != len(shape):
        return False
    sources = []
    for row in stage.matrix:
        ones = [c for c, a in enumerate(row) if a]
        if len(ones) != 1 or row[ones[0]] != 1:
            return False
        sources.append(ones[0])
    if sorted(sources) != list(range(len(shape))) or any(stage.out_shape[r] != shape[c] for r, c in enumerate(sources)):
        return False
    moved = [c for r, c in enumerate(sources) if stage.out_shape[r] != 1]
    return moved == sorted(moved)


def _shape_before(in_shape: Shape, stages: list[Stage]) -> Shape:
    return stages[-1].out_shape if stages else tuple(in_shape)


def _is_identity_stage(stage: Stage, shape: Shape) -> bool:
    if tuple(stage.out_shape) != tuple(shape):
        return False
    if isinstance(stage, Reshape):
        return True
    n = len(shape)
    return all(stage.matrix[r][c] == (1 if r == c else 0) for r in range(n) for c in range(n)) and not any(
        stage.offset
    )
