"""Combining worker updates: a sample-weighted average, then the outer (server) update.

A worker's update holds, for each entry of ``model.get_weights()``: the *delta* (local - global) of a trainable
weight, or the local *value* of a BatchNorm statistic. The combine averages both, weighted by the examples each
worker trained on, and then

- plain averaging (``outer_lr`` 1, ``outer_momentum`` 0; the parameter-server update of the paper):
  ``w <- w + mean_delta``
- outer SGD with Nesterov momentum (``outer_momentum`` m > 0, with the momentum buffer ``b`` kept on EFS):
  ``b <- m * b + mean_delta``;  ``w <- w + outer_lr * (mean_delta + m * b)``

BatchNorm statistics are replaced by their average.

:class:`RunningAverage` adds one update at a time into float64 accumulators, so a combine holds a few model
copies whatever the worker count; :func:`average_updates` is the same arithmetic over a list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WorkerUpdate:
    arrays: list[np.ndarray]  # deltas (trainable) or values (statistics), in model.get_weights() order
    samples: int
    mean_loss: float


@dataclass(frozen=True)
class Averaged:
    arrays: list[np.ndarray]  # float32 mean delta or mean statistic per weight
    samples: int
    mean_loss: float


class RunningAverage:
    """The sample-weighted mean of updates added one at a time (each weighted by ``samples / total_samples``,
    so the total must be known first: it is in every update's metadata)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], total_samples: int) -> None:
        if total_samples <= 0:
            raise ValueError("updates report no trained examples")
        self.shapes = [tuple(shape) for shape in shapes]
        self.total_samples = total_samples
        self.accumulators = [np.zeros(shape, dtype=np.float64) for shape in self.shapes]
        self.loss_sum = 0.0
        self.added_samples = 0
        self.count = 0

    def add(self, update: WorkerUpdate) -> None:
        got = [tuple(array.shape) for array in update.arrays]
        if got != self.shapes:
            raise ValueError(
                f"update {self.count} has array shapes {got[:3]}..., expected {self.shapes[:3]}..."
            )
        weight = update.samples / self.total_samples
        for accumulator, array in zip(self.accumulators, update.arrays, strict=True):
            accumulator += array.astype(np.float64) * weight
        self.loss_sum += update.mean_loss * update.samples
        self.added_samples += update.samples
        self.count += 1

    def result(self) -> Averaged:
        if not self.count:
            raise ValueError("no updates to average")
        if self.added_samples != self.total_samples:
            raise ValueError(
                f"the updates hold {self.added_samples} examples, their metadata announced {self.total_samples}"
            )
        return Averaged(
            arrays=[accumulator.astype(np.float32) for accumulator in self.accumulators],
            samples=self.total_samples,
            mean_loss=self.loss_sum / self.total_samples,
        )


def average_updates(updates: Sequence[WorkerUpdate], shapes: Sequence[tuple[int, ...]]) -> Averaged:
    """Sample-weighted mean of every array; checks that each update matches the model's shapes."""
    if not updates:
        raise ValueError("no updates to average")
    average = RunningAverage(shapes, sum(update.samples for update in updates))
    for update in updates:
        average.add(update)
    return average.result()


def apply_outer_update(
    weights: Sequence[np.ndarray],
    averaged: Sequence[np.ndarray],
    trainable: Sequence[bool],
    outer_lr: float,
    outer_momentum: float,
    momentum: Sequence[np.ndarray] | None,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """New global weights (and the new momentum buffer over trainable weights, if momentum is on)."""
    new_weights: list[np.ndarray] = []
    new_momentum: list[np.ndarray] | None = [] if outer_momentum > 0 else None
    trainable_position = 0
    for weight, mean, is_trainable in zip(weights, averaged, trainable, strict=True):
        if not is_trainable:
            new_weights.append(mean.astype(weight.dtype))
            continue
        step = mean
        if new_momentum is not None:
            previous = momentum[trainable_position] if momentum is not None else np.zeros_like(mean)
            buffer = outer_momentum * previous + mean
            new_momentum.append(buffer.astype(np.float32))
            step = mean + outer_momentum * buffer
        new_weights.append((weight + outer_lr * step).astype(weight.dtype))
        trainable_position += 1
    return new_weights, new_momentum
