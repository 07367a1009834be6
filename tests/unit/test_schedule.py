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
    cosine = Schedule(TrainConfig(lr=0.1, epochs=4, warmup_epochs=0), num_train=100)
    rates = [cosine.learning_rate(r) for r in range(4)]
    assert rates[0] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0
    constant = Schedule(TrainConfig(lr=0.1, epochs=4, lr_schedule="constant", warmup_epochs=0), num_train=100)
    assert {constant.learning_rate(r) for r in range(4)} == {0.1}


def test_warmup_rises_linearly_by_step_then_cosine_decays_to_zero() -> None:
    schedule = Schedule(TrainConfig(lr=0.1, epochs=4, rounds_per_epoch=2, warmup_epochs=1), num_train=100)
    # warm-up: rounds 0-1, 10 steps each; the first step already trains (1/20 of lr)
    assert schedule.learning_rate(0, 0, 10) == pytest.approx(0.1 / 20)
    assert schedule.learning_rate(0, 9, 10) == pytest.approx(0.1 / 2)
    assert schedule.learning_rate(1, 9, 10) == pytest.approx(0.1)
    after = [schedule.learning_rate(r, s, 10) for r in range(2, 8) for s in range(10)]
    assert after[0] == pytest.approx(0.1)
    assert after == sorted(after, reverse=True) and 0 < after[-1] < 0.001


def test_rate_depends_on_the_position_in_the_run_not_on_how_it_is_cut_into_rounds() -> None:
    one = Schedule(TrainConfig(lr=0.1, epochs=2, rounds_per_epoch=1, warmup_epochs=0.5), num_train=100)
    four = Schedule(TrainConfig(lr=0.1, epochs=2, rounds_per_epoch=4, warmup_epochs=0.5), num_train=100)
    # step 5 of 8 in round 1 of a 1-round epoch = step 1 of 2 in round 6 of a 4-round epoch (13/16 of the run)
    assert one.learning_rate(1, 5, 8) == pytest.approx(four.learning_rate(6, 1, 2))
    assert one.learning_rate(0, 2, 8) == pytest.approx(four.learning_rate(1, 0, 2))  # in the warm-up


def test_a_warm_up_longer_than_half_the_run_is_cut_to_half() -> None:
    short = Schedule(TrainConfig(lr=0.1, epochs=1, rounds_per_epoch=4, warmup_epochs=1), num_train=100)
    assert short.learning_rate(1, 9, 10) == pytest.approx(0.1)  # the peak at half the run
    assert short.learning_rate(3, 9, 10) < 0.01  # then the cosine decays
