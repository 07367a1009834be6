"""The memory-mapped dataset: manifest checks, batch gathering and augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer import data
from trainer.errors import LayoutError
from trainer_harness import write_synthetic_dataset


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cifar10"
    write_synthetic_dataset(directory, num_train=50, num_test=20)
    return directory


def test_dataset_maps_arrays_and_limits_samples(dataset_dir: Path) -> None:
    dataset = data.open_dataset(dataset_dir)
    assert dataset.train_x.shape == (50, 32, 32, 3)
    assert isinstance(dataset.train_x, np.memmap)
    limited = dataset.limited(train_samples=10, test_samples=0)
    assert len(limited.train_x) == 10 and len(limited.test_x) == 20


def test_truncated_array_is_refused(dataset_dir: Path) -> None:
    path = dataset_dir / "train_x.npy"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LayoutError, match=r"train_x\.npy"):
        data.open_dataset(dataset_dir)


def test_wrong_shape_against_manifest_is_refused(dataset_dir: Path) -> None:
    np.save(dataset_dir / "test_y.npy", np.zeros(19, np.uint8))
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest) + " ")  # new mtime, no cache hit
    with pytest.raises(LayoutError, match=r"test_y.npy: shape \[19\]"):
        data.open_dataset(dataset_dir)


def test_missing_dataset_says_how_to_prepare_it(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="make preprocess"):
        data.open_dataset(tmp_path / "nothing")


def test_gather_keeps_the_requested_order(dataset_dir: Path) -> None:
    dataset = data.open_dataset(dataset_dir)
    indices = np.array([7, 2, 9])
    images, labels = data.gather(dataset.train_x, dataset.train_y, indices)
    np.testing.assert_array_equal(images, np.asarray(dataset.train_x)[indices])
    np.testing.assert_array_equal(labels, np.asarray(dataset.train_y)[indices])


def test_augment_crops_and_flips_within_the_padded_image() -> None:
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    out = data.augment(images, np.random.default_rng(0), padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    again = data.augment(images, np.random.default_rng(0), padding=2)
    np.testing.assert_array_equal(out, again)
    zero_pad = data.augment(images, np.random.default_rng(1), padding=0)
    for original, augmented in zip(images, zero_pad, strict=True):  # no padding: identity or a mirror image
        assert np.array_equal(original, augmented) or np.array_equal(original[:, ::-1], augmented)
