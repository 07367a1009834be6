"""Combining worker updates: a sample-weighted average, then the outer (server) update.

A worker's update holds, for each entry of ``model.get_weights()``: the *delta* (local - global) of a trainable
weight, or the local *value* of a BatchNorm statistic. The combine averages both, weighted by the examples each
worker trained on, and then

- plain averaging (``outer_lr`` 1, ``outer_momentum`` 0; the parameter-server update of the paper):
  ``w <- w + mean_delta``
- outer SGD with Nesterov momentum (``outer_momentum`` m > 0, with the momentum buffer ``b`` kept on EFS):
  ``b <- m * b + mean_delta``;  ``w <- w + outer_lr * (mean_delta + m * b)``

BatchNorm statistics are replaced by their average.
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


def average_updates(updates: Sequence[WorkerUpdate], shapes: Sequence[tuple[int, ...]]) -> Averaged:
    """Sample-weighted mean of every array; checks that each update matches the model's shapes."""
    if not updates:
        raise ValueError("no updates to average")
    total = sum(update.samples for update in updates)
    if total <= 0:
        raise ValueError("updates report no trained examples")
    for position, update in enumerate(updates):
        got = [tuple(array.shape) for array in update.arrays]
        if got != [tuple(shape) for shape in shapes]:
            raise ValueError(
                f"update {position} has array shapes {got[:3]}..., expected {list(shapes)[:3]}..."
            )
    averaged = []
    for index in range(len(shapes)):
        accumulator = np.zeros(shapes[index], dtype=np.float64)
        for update in updates:
            accumulator += update.arrays[index].astype(np.float64) * (update.samples / total)
        averaged.append(accumulator.astype(np.float32))
    mean_loss = sum(update.mean_loss * update.samples for update in updates) / total
    return Averaged(arrays=averaged, samples=total, mean_loss=mean_loss)


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
