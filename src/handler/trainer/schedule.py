"""The plan of a run: how many rounds, which examples each worker trains on in a round, and at what rate.

A round is one combine. Each epoch draws a permutation of the training set seeded by ``(seed, epoch)`` and
splits it into ``workers`` shards; each shard is split into ``rounds_per_epoch`` chunks, and in round ``r`` worker
``k`` trains on chunk ``r % rounds_per_epoch`` of shard ``k`` of epoch ``r // rounds_per_epoch``. With
``local_steps`` set, a chunk is ``local_steps * batch_size`` examples instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainer.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    config: TrainConfig
    num_train: int  # training examples in use (after train_samples)

    @property
    def shard_size(self) -> int:
        """Examples in the smallest worker shard of an epoch."""
        return self.num_train // self.config.workers

    @property
    def rounds_per_epoch(self) -> int:
        if self.config.local_steps:
            return max(1, math.ceil(self.shard_size / (self.config.local_steps * self.config.batch_size)))
        return self.config.rounds_per_epoch

    @property
    def total_rounds(self) -> int:
        return self.config.epochs * self.rounds_per_epoch

    def epoch_of(self, round_index: int) -> int:
        return round_index // self.rounds_per_epoch

    def epochs_done_after(self, round_index: int) -> int:
        """Completed epochs once ``round_index`` is combined."""
        return (round_index + 1) // self.rounds_per_epoch

    def is_epoch_end(self, round_index: int) -> bool:
        return (round_index + 1) % self.rounds_per_epoch == 0

    def is_last(self, round_index: int) -> bool:
        return round_index + 1 >= self.total_rounds

    def evaluates_after(self, round_index: int) -> bool:
        """Evaluate on the test set after this round: every ``eval_every`` rounds, each epoch end, and at the end."""
        if self.is_last(round_index):
            return True
        if self.config.eval_every:
            return (round_index + 1) % self.config.eval_every == 0
        return self.is_epoch_end(round_index)

    def learning_rate(self, round_index: int, step: int = 0, steps: int = 1) -> float:
        """The local learning rate at local step ``step`` of ``steps`` in a round: a linear warm-up over
        ``warmup_epochs`` (at most half the run), then constant or cosine decay to 0 over the rest of the run.
        It depends on the run's position only, so every worker uses the same rate at the same point."""
        position = round_index + min(step, steps) / max(1, steps)  # in rounds, fractional
        # At most half the run warms up, so that a short run (the default 1 epoch of warm-up, epochs 1) decays too.
        warmup = min(self.config.warmup_epochs * self.rounds_per_epoch, self.total_rounds / 2)
        if position < warmup:
            return self.config.lr * min(1.0, (position + 1 / max(1, steps)) / warmup)
        if self.config.lr_schedule == "constant":
            return self.config.lr
        progress = (position - warmup) / max(1e-9, self.total_rounds - warmup)
        return 0.5 * self.config.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def worker_indices(self, round_index: int, worker_index: int) -> np.ndarray:
        """Indices into the training set that ``worker_index`` trains on in ``round_index``, in order."""
        epoch = self.epoch_of(round_index)
        permutation = np.random.default_rng([self.config.seed, epoch]).permutation(self.num_train)
        shard = np.array_split(permutation, self.config.workers)[worker_index]
        chunk = round_index % self.rounds_per_epoch
        if self.config.local_steps:
            size = self.config.local_steps * self.config.batch_size
            return shard[chunk * size : (chunk + 1) * size]
        return np.array_split(shard, self.rounds_per_epoch)[chunk]

    def steps(self, num_examples: int) -> int:
        """Local steps (mini-batches, the last one possibly short) to train on ``num_examples`` examples."""
        return max(1, math.ceil(num_examples / self.config.batch_size))
