"""One worker's local training: mini-batch SGD with momentum from the round's global weights.

The loop is a bare ``model.train_on_batch`` loop over augmented batches, so its throughput is that of Keras
itself. It stops early when the next step would not fit before the Lambda deadline (minus a safety margin for
saving); the caller then saves a :class:`LocalState` and continues in a chained invocation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from trainer import data, logs
from trainer.config import TrainConfig
from trainer.errors import DivergenceError

log = logging.getLogger(__name__)


@dataclass
class LocalState:
    """Where a worker is within its round; saved to EFS when the round continues in another invocation."""

    next_step: int = 0
    loss_sum: float = 0.0  # sum over seen examples of the per-example loss
    samples: int = 0
    compute_s: float = 0.0
    invocations: int = 1
    # What the share's earlier invocations measured (a chained continuation adds its own): handler seconds and
    # EFS bytes, for the round's metrics and the run's GB-second budget.
    handler_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0

    def to_meta(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_meta(cls, meta: dict) -> LocalState:
        required = ("next_step", "loss_sum", "samples", "compute_s", "invocations")
        return cls(**{key: meta[key] for key in cls.__dataclass_fields__ if key in required or key in meta})


@dataclass
class StepTimer:
    """An estimate of one step's duration (slowest recent step, so that the plan errs on the safe side)."""

    recent: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.recent = [*self.recent[-4:], seconds]

    def estimate(self) -> float | None:
        return max(self.recent[1:] or self.recent) if self.recent else None


def reset_optimizer(model: keras.Model, learning_rate: float) -> None:
    """Start a round with zero momentum and the round's learning rate (the same for every worker)."""
    optimizer = model.optimizer
    for variable in optimizer.variables:
        if variable.name != "learning_rate":  # every other optimizer variable is per-round state
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate


def optimizer_state(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(variable) for variable in model.optimizer.variables]


def restore_optimizer_state(model: keras.Model, arrays: list[np.ndarray]) -> None:
    variables = model.optimizer.variables
    if len(arrays) != len(variables):
        raise ValueError(f"optimizer state has {len(arrays)} arrays, the model's optimizer {len(variables)}")
    for variable, value in zip(variables, arrays, strict=True):
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise ValueError(
                f"optimizer variable {variable.path} has shape {variable.shape}, the state {np.shape(value)}"
            )
        variable.assign(value)


def train_steps(
    model: keras.Model,
    dataset: data.Dataset,
    indices: np.ndarray,
    total_steps: int,
    config: TrainConfig,
    state: LocalState,
    augment_seed: tuple[int, ...],
    seconds_left: Callable[[], float],
    margin_s: float,
    learning_rate: Callable[[int], float] | None = None,
) -> bool:
    """Run steps ``state.next_step ... total_steps - 1`` over ``indices``; True when the round's share is done.

    Each step's augmentation is seeded by ``augment_seed + (step,)``, so a continued round draws exactly what an
    uninterrupted one would have. ``learning_rate(step)``, if given, sets the rate before each step.
    """
    timer = StepTimer()
    while state.next_step < total_steps:
        estimate = timer.estimate()
        left = seconds_left() - margin_s
        if left < (1.5 * estimate if estimate is not None else 0.0):
            logs.event(log, "deadline_near", step=state.next_step, seconds_left=round(left + margin_s, 1))
            return False
        step = state.next_step
        began = time.perf_counter()  # the step's time includes reading and augmenting its batch
        batch = indices[step * config.batch_size : (step + 1) * config.batch_size]
        images, labels = data.gather(dataset.train_x, dataset.train_y, batch)
        if config.augment:
            images = data.augment(images, np.random.default_rng([*augment_seed, step]))
        if learning_rate is not None:
            model.optimizer.learning_rate = learning_rate(step)
        loss = model.train_on_batch(images.astype(np.float32), labels, return_dict=True)["loss"]
        elapsed = time.perf_counter() - began
        timer.add(elapsed)
        state.compute_s += elapsed
        state.loss_sum += float(loss) * len(batch)
        state.samples += len(batch)
        state.next_step += 1
        if not np.isfinite(loss):
            raise DivergenceError(
                f"training loss became {loss} at local step {step}: the run diverged; start again with a lower "
                f"'lr' (this run's is {config.lr:g})"
            )
    return True


def evaluate(
    model: keras.Model, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a (memory-mapped) test set."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = np.asarray(images[start : start + batch_size], dtype=np.float32)
        y = np.asarray(labels[start : start + batch_size], dtype=np.int64)
        probabilities = np.asarray(model.predict_on_batch(x), dtype=np.float64)
        loss_sum += float(-np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)).sum())
        correct += int((probabilities.argmax(axis=1) == y).sum())
    count = max(1, len(images))
    return loss_sum / count, correct / count
