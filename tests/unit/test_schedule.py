"""The run plan: shards partition each epoch, rounds split shards, the learning rate decays."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import TrainConfig
from trainer.schedule import Schedule


def test_workers_cover_each_epoch_exactly_once_across_rounds() -> None:
    schedule = Schedule(TrainConfig(workers=3, epochs=2, rounds_per_epoch=2), num_train=100)
    assert schedule.total_rounds == 4
    for epoch in range(2):
        rounds = range(epoch * 2, epoch * 2 + 2)
        seen = np.concatenate([schedule.worker_indices(r, w) for r in rounds for w in range(3)])
        assert sorted(seen.tolist()) == list(range(100))


def test_each_epoch_draws_a_new_permutation_from_the_seed() -> None:
    schedule = Schedule(TrainConfig(workers=2, epochs=2, seed=7), num_train=50)
    assert not np.array_equal(schedule.worker_indices(0, 0), schedule.worker_indices(1, 0))
    again = Schedule(TrainConfig(workers=2, epochs=2, seed=7), num_train=50)
    assert np.array_equal(schedule.worker_indices(1, 1), again.worker_indices(1, 1))


def test_local_steps_sets_the_rounds_per_epoch() -> None:
    schedule = Schedule(TrainConfig(workers=2, batch_size=10, local_steps=3), num_train=200)  # shard 100
    assert schedule.rounds_per_epoch == 4  # ceil(100 / 30)
    assert len(schedule.worker_indices(0, 0)) == 30
    assert len(schedule.worker_indices(3, 0)) == 10


def test_evaluation_happens_at_epoch_ends_and_at_the_end() -> None:
    schedule = Schedule(TrainConfig(epochs=2, rounds_per_epoch=3), num_train=100)
    assert [schedule.evaluates_after(r) for r in range(6)] == [False, False, True, False, False, True]
    every = Schedule(TrainConfig(epochs=1, rounds_per_epoch=5, eval_every=2), num_train=100)
    assert [every.evaluates_after(r) for r in range(5)] == [False, True, False, True, True]


def test_epochs_done_counts_completed_epochs() -> None:
    schedule = Schedule(TrainConfig(epochs=2, rounds_per_epoch=2), num_train=100)
    assert [schedule.epochs_done_after(r) for r in range(4)] == [0, 1, 1, 2]


def test_cosine_schedule_decays_from_lr_and_constant_stays() -> None:
    cosine = Schedule(TrainConfig(lr=0.1, epochs=4), num_train=100)
    rates = [cosine.learning_rate(r) for r in range(4)]
    assert rates[0] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0
    constant = Schedule(TrainConfig(lr=0.1, epochs=4, lr_schedule="constant"), num_train=100)
    assert {constant.learning_rate(r) for r in range(4)} == {0.1}
