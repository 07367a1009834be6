"""The sharded reduce's plan: how many reducers a run uses, and which part of every update each one owns.

A model's weights (``model.get_weights()`` order) are seen as one flat vector; slice ``k`` of ``K`` is the
elements ``[k * L // K, (k + 1) * L // K)`` of it (``L`` = the parameter count), so the slices cover the vector
once and differ in size by at most one element. Within a slice, the elements of trainable weights (deltas, in the
run's ``update_dtype``) come first, then those of non-trainable weights (BatchNorm statistics, float32 values):
a slice is two flat arrays, ``trainable`` and ``statistics``.

A sharded worker writes its update as one ``.npz`` member per slice (the two arrays' bytes, back to back), so
reducer ``k`` reads one contiguous member of every update: ``N x L / K`` elements, flat in ``N`` when ``K`` grows
with ``N``. The element-wise arithmetic of the average and the outer update does not depend on how the vector is
cut, so a sharded round computes the same bits as a single combine.

:func:`reducer_count` resolves the ``reducers`` key (0 = auto) in one place: one combine while every update of
a round fits :data:`REDUCE_READ_BUDGET_BYTES`, else enough reducers that each reads at most that much.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REDUCE_READ_BUDGET_BYTES = 512 * 2**20  # update bytes one combine or reducer reads at most (auto)
MAX_REDUCERS = 256  # the reducers key's upper bound (as many as workers, at most)


def reducer_count(requested: int, workers: int, parameters: int, update_itemsize: int) -> int:
    """Reducers a round uses: ``requested`` if set (at most one per parameter), else 1 while the round's
    updates fit :data:`REDUCE_READ_BUDGET_BYTES`, else ``ceil(updates / budget)``; 1 means the single combine."""
    if parameters <= 0:  # a run item from before the count was stored: the combine it started with
        return 1
    if requested:
        return max(1, min(requested, parameters))
    update_bytes = workers * parameters * update_itemsize
    return max(1, min(MAX_REDUCERS, workers, math.ceil(update_bytes / REDUCE_READ_BUDGET_BYTES)))


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of weight ``index`` (flattened) that belong to a slice."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class SlicePlan:
    """The flat layout of a model's weights and its cut into ``slices`` pieces."""

    shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]
    slices: int

    @classmethod
    def of(cls, shapes: Sequence[Sequence[int]], trainable: Sequence[bool], slices: int) -> SlicePlan:
        if len(shapes) != len(trainable):
            raise ValueError(f"{len(shapes)} weight shapes but {len(trainable)} trainable flags")
        plan = cls(
            tuple(tuple(int(d) for d in shape) for shape in shapes), tuple(map(bool, trainable)), slices
        )
        if not 1 <= slices <= max(1, plan.total):
            raise ValueError(f"slices must be between 1 and the {plan.total} weights' elements, got {slices}")
        return plan

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def bounds(self, k: int) -> tuple[int, int]:
        if not 0 <= k < self.slices:
            raise ValueError(f"slice must be between 0 and {self.slices - 1}, got {k}")
        return self.total * k // self.slices, self.total * (k + 1) // self.slices

    def segments(self, k: int, trainable: bool) -> list[Segment]:
        """The pieces of weights (trainable or not) that fall in slice ``k``, in weight order."""
        low, high = self.bounds(k)
        found, offset = [], 0
        for index, size in enumerate(self.sizes):
            start, stop = max(low, offset), min(high, offset + size)
            if start < stop and self.trainable[index] == trainable:
                found.append(Segment(index, start - offset, stop - offset))
            offset += size
        return found

    def weight_indices(self, k: int) -> list[int]:
        """Every weight (trainable or not) with elements in slice ``k``."""
        return sorted({s.index for part in (True, False) for s in self.segments(k, part)})

    def cut(
        self, arrays: Sequence[np.ndarray], k: int, trainable: bool, dtype: np.dtype | None = None
    ) -> np.ndarray:
        """The flat part of slice ``k`` from full arrays (``arrays[i]`` may be None where slice ``k`` has
        nothing of weight ``i``); cast to ``dtype`` if given."""
        pieces = [
            np.asarray(arrays[s.index]).reshape(-1)[s.start : s.stop] for s in self.segments(k, trainable)
        ]
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return flat.astype(dtype, copy=False) if dtype is not None else flat

    def trainable_positions(self) -> dict[int, int]:
        """Weight index -> position in a list over trainable weights only (the outer momentum's order)."""
        return {index: n for n, index in enumerate(i for i, t in enumerate(self.trainable) if t)}

    def expand(self, trainable_arrays: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
        """A list over trainable weights only, placed at their weight indices (None elsewhere)."""
        full: list[np.ndarray | None] = [None] * len(self.shapes)
        for index, n in self.trainable_positions().items():
            full[index] = trainable_arrays[n]
        return full

    def paste(self, targets: Sequence[np.ndarray], flat: np.ndarray, k: int, trainable: bool) -> None:
        """Write the flat part of slice ``k`` into full (flattened-in-place) target arrays."""
        offset = 0
        for segment in self.segments(k, trainable):
            length = segment.stop - segment.start
            targets[segment.index].reshape(-1)[segment.start : segment.stop] = flat[offset : offset + length]
            offset += length
        if offset != flat.size:
            raise ValueError(
                f"slice {k} holds {flat.size} {'trainable' if trainable else 'statistic'} "
                f"elements, expected {offset}"
            )

    def lengths(self, k: int) -> tuple[int, int]:
        """Elements of the trainable and the statistics part of slice ``k``."""
        return tuple(sum(s.stop - s.start for s in self.segments(k, part)) for part in (True, False))  # type: ignore[return-value]


def encode_update(
    update: Sequence[np.ndarray], trainable: Sequence[bool], slices: int
) -> tuple[list[np.ndarray], dict[str, object]]:
    """An update's arrays as a sharded worker writes them (one packed member per slice), and the metadata that
    describes the layout; with one slice, the arrays as they are (the combine's format) and no metadata."""
    if slices == 1:
        return list(update), {}
    plan = SlicePlan.of([array.shape for array in update], trainable, slices)
    members = [
        pack(
            plan.cut(update, k, trainable=True),
            plan.cut(update, k, trainable=False, dtype=np.dtype(np.float32)),
        )
        for k in range(slices)
    ]
    layout = {"shapes": [list(shape) for shape in plan.shapes], "trainable": list(plan.trainable)}
    return members, {"slices": slices, "layout": layout}


def pack(trainable_part: np.ndarray, statistics_part: np.ndarray) -> np.ndarray:
    """One slice of an update as bytes: the trainable part, then the statistics part (float32)."""
    return np.concatenate(
        [
            np.ascontiguousarray(trainable_part).view(np.uint8),
            np.ascontiguousarray(statistics_part, dtype=np.float32).view(np.uint8),
        ]
    )


def unpack(
    member: np.ndarray, lengths: tuple[int, int], delta_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """The two parts of a packed slice; a member of the wrong size is a ``ValueError``."""
    trainable_bytes = lengths[0] * np.dtype(delta_dtype).itemsize
    expected = trainable_bytes + lengths[1] * 4
    if member.dtype != np.uint8 or member.ndim != 1 or member.size != expected:
        raise ValueError(f"a slice member of {member.size} bytes ({member.dtype}), expected {expected} uint8")
    return member[:trainable_bytes].view(delta_dtype), member[trainable_bytes:].view(np.float32)
