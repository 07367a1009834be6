"""The dataset folder is a contract between ``prep`` (which writes it) and the trainer (which reads it).

The two sides live in separate deployments (the staging zip holds only ``src/prep``, the trainer image only
``src/handler``), so each keeps its own names; these tests hold them together.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from prep import cifar, manifest, stage, synthetic
from trainer import data, efs_layout

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"


@pytest.mark.parametrize(
    ("prep_side", "trainer_side"),
    [
        (stage.DATASETS_DIR, efs_layout.DATASETS_DIR),
        (stage.MANIFEST_FILE, efs_layout.MANIFEST_FILE),
        (stage.FORMAT_VERSION, efs_layout.DATASET_FORMAT_VERSION),
        (stage.ARRAY_NAMES, efs_layout.DATASET_ARRAYS),
        (stage.TMP_PREFIX, efs_layout.TMP_PREFIX),
    ],
    ids=["datasets-dir", "manifest-file", "format-version", "array-names", "temp-prefix"],
)
def test_prep_and_trainer_name_the_dataset_folder_alike(prep_side: object, trainer_side: object) -> None:
    assert prep_side == trainer_side


def test_trainer_opens_what_prep_writes_from_the_fixture(tmp_path: Path) -> None:
    layout = efs_layout.EfsLayout(tmp_path / "efs")
    written = cifar.prepare(FIXTURE, layout.dataset_dir("cifar10"))

    dataset = data.open_dataset(layout.dataset_dir("cifar10"))

    for name in efs_layout.DATASET_ARRAYS:
        array = getattr(dataset, name)
        assert list(array.shape) == written["arrays"][name]["shape"]
        assert array.dtype.name == written["arrays"][name]["dtype"]
    assert dataset.label_names == tuple(written["label_names"])
    assert set(np.unique(dataset.train_y)) <= set(range(len(dataset.label_names)))


def test_synthetic_dataset_is_one_that_prep_and_the_staging_function_accept(tmp_path: Path) -> None:
    directory = tmp_path / "datasets" / "cifar10"

    synthetic.write_synthetic_dataset(directory, num_train=30, num_test=10, seed=2)

    raw = (directory / stage.MANIFEST_FILE).read_bytes()
    entries = stage.parse_manifest(raw, str(directory))  # what staging checks before it copies
    assert manifest.read_complete_manifest(directory) is not None  # what prep reuses
    for name, entry in entries.items():
        header = stage.parse_npy_header((directory / entry.file).read_bytes(), name)
        assert header.shape == entry.shape
    dataset = data.open_dataset(directory)
    assert dataset.train_x.shape == (30, 32, 32, 3) and dataset.test_y.shape == (10,)


def test_synthetic_images_are_their_class_brightness_band(tmp_path: Path) -> None:
    synthetic.write_synthetic_dataset(tmp_path / "cifar10", num_train=50, num_test=20)

    dataset = data.open_dataset(tmp_path / "cifar10")

    low = dataset.train_y.astype(int) * synthetic.BAND_WIDTH
    pixels = dataset.train_x.reshape(50, -1).astype(int)
    assert np.all(pixels >= low[:, None]) and np.all(pixels < (low + synthetic.NOISE_LEVELS)[:, None])
    assert np.bincount(dataset.train_y, minlength=10).tolist() == [5] * 10


def test_staging_function_imports_only_the_standard_library_and_boto3() -> None:
    tree = ast.parse(Path(stage.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
        for alias in node.names
    }

    assert imported - set(sys.stdlib_module_names) == {"boto3"}


def test_the_staging_function_reads_the_status_table_as_the_trainer_writes_it() -> None:
    from trainer import coordination
    from trainer.config import TrainConfig

    item = coordination.RunStatus.new("r", TrainConfig(dataset="mine"), num_train=10).to_item()
    assert stage.ACTIVE_INDEX == coordination.ACTIVE_INDEX
    assert item[stage.ACTIVE_ATTRIBUTE] == "1"
    assert json.loads(item[stage.CONFIG_ATTRIBUTE])["dataset"] == "mine"
