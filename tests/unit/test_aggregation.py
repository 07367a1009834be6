"""Averaging worker updates and the outer update, against small hand-computed vectors."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.aggregation import WorkerUpdate, apply_outer_update, average_updates


def update(delta: list[float], stat: list[float], samples: int, loss: float = 1.0) -> WorkerUpdate:
    return WorkerUpdate([np.array(delta, np.float32), np.array(stat, np.float32)], samples, loss)


def test_average_is_weighted_by_samples() -> None:
    averaged = average_updates(
        [update([1, 2], [10, 0], 100, 2.0), update([4, -1], [20, 6], 300, 1.0)], [(2,), (2,)]
    )
    # weights 1/4 and 3/4
    np.testing.assert_allclose(averaged.arrays[0], [0.25 * 1 + 0.75 * 4, 0.25 * 2 - 0.75 * 1])
    np.testing.assert_allclose(averaged.arrays[1], [17.5, 4.5])
    assert averaged.samples == 400
    assert averaged.mean_loss == pytest.approx(0.25 * 2.0 + 0.75 * 1.0)


def test_float16_updates_are_averaged_in_float32() -> None:
    half = WorkerUpdate([np.array([0.5, 1.5], np.float16)], 1, 0.0)
    averaged = average_updates([half, half], [(2,)])
    assert averaged.arrays[0].dtype == np.float32
    np.testing.assert_allclose(averaged.arrays[0], [0.5, 1.5])


def test_plain_averaging_adds_the_mean_delta_and_replaces_statistics() -> None:
    weights = [np.array([1.0, 1.0], np.float32), np.array([0.0, 0.0], np.float32)]
    new, momentum = apply_outer_update(
        weights,
        [np.array([0.5, -0.5], np.float32), np.array([3.0, 4.0], np.float32)],
        [True, False],
        1.0,
        0.0,
        None,
    )
    np.testing.assert_allclose(new[0], [1.5, 0.5])
    np.testing.assert_allclose(new[1], [3.0, 4.0])  # BatchNorm statistics: the average itself
    assert momentum is None


def test_nesterov_outer_update_matches_hand_computation() -> None:
    weights = [np.array([1.0], np.float32), np.array([7.0], np.float32)]
    mean = [np.array([0.2], np.float32), np.array([5.0], np.float32)]
    # round 1: b = 0.9*0 + 0.2 = 0.2; w = 1 + 0.5*(0.2 + 0.9*0.2) = 1.19
    new, momentum = apply_outer_update(weights, mean, [True, False], 0.5, 0.9, None)
    np.testing.assert_allclose(new[0], [1.19], rtol=1e-6)
    np.testing.assert_allclose(momentum[0], [0.2], rtol=1e-6)
    np.testing.assert_allclose(new[1], [5.0])
    # round 2 with delta 0.1: b = 0.9*0.2 + 0.1 = 0.28; w = 1.19 + 0.5*(0.1 + 0.9*0.28) = 1.366
    new2, momentum2 = apply_outer_update(
        new, [np.array([0.1], np.float32), mean[1]], [True, False], 0.5, 0.9, momentum
    )
    np.testing.assert_allclose(momentum2[0], [0.28], rtol=1e-6)
    np.testing.assert_allclose(new2[0], [1.366], rtol=1e-6)


def test_outer_lr_scales_the_step() -> None:
    new, _ = apply_outer_update([np.zeros(3, np.float32)], [np.ones(3, np.float32)], [True], 2.0, 0.0, None)
    np.testing.assert_allclose(new[0], [2.0, 2.0, 2.0])


def test_updates_with_the_wrong_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        average_updates([update([1, 2], [1, 2], 1), update([1, 2, 3], [1, 2], 1)], [(2,), (2,)])


def test_updates_reporting_no_examples_are_refused() -> None:
    with pytest.raises(ValueError, match="no trained examples"):
        average_updates([update([1, 2], [1, 2], 0)], [(2,), (2,)])
