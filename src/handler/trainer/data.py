"""The dataset on EFS: memory-mapped arrays checked against their manifest, batches and augmentation.

Arrays stay uint8 at rest (``prep`` writes them); a worker maps them read-only and copies only its batches.
Normalisation and resizing happen inside the model, so ``final.keras`` takes raw 0-255 pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.efs_layout import DATASET_ARRAYS, DATASET_FORMAT_VERSION, MANIFEST_FILE, read_json
from trainer.errors import LayoutError

log = logging.getLogger(__name__)

_cache: dict[tuple[str, float], Dataset] = {}


@dataclass(frozen=True)
class Dataset:
    train_x: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    train_y: np.ndarray  # (N,) uint8
    test_x: np.ndarray
    test_y: np.ndarray
    label_names: tuple[str, ...]

    def limited(self, train_samples: int, test_samples: int) -> Dataset:
        """The first ``train_samples`` / ``test_samples`` examples (0 keeps all)."""
        train = slice(None, train_samples or None)
        test = slice(None, test_samples or None)
        return Dataset(
            self.train_x[train], self.train_y[train], self.test_x[test], self.test_y[test], self.label_names
        )


def open_dataset(directory: Path) -> Dataset:
    """Map a prepared dataset; cached per manifest version so warm invocations skip the checks."""
    manifest_path = directory / MANIFEST_FILE
    try:
        stamp = manifest_path.stat().st_mtime
    except FileNotFoundError as exc:
        raise LayoutError(f"{manifest_path}: missing; prepare the dataset first (make preprocess)") from exc
    key = (str(directory), stamp)
    if key not in _cache:
        _cache.clear()
        _cache[key] = _load(directory, read_json(manifest_path))
    return _cache[key]


def _load(directory: Path, manifest: dict) -> Dataset:
    if manifest.get("format_version") != DATASET_FORMAT_VERSION:
        raise LayoutError(
            f"{directory}/{MANIFEST_FILE}: format_version {manifest.get('format_version')!r}, "
            f"expected {DATASET_FORMAT_VERSION}"
        )
    arrays = {}
    for name in DATASET_ARRAYS:
        spec = manifest.get("arrays", {}).get(name)
        if not spec:
            raise LayoutError(f"{directory}/{MANIFEST_FILE}: no entry for array {name!r}")
        path = directory / spec["file"]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as exc:
            raise LayoutError(f"{path}: missing") from exc
        except ValueError as exc:
            raise LayoutError(f"{path}: not a valid .npy file ({exc})") from exc
        if list(array.shape) != list(spec["shape"]) or str(array.dtype) != spec["dtype"]:
            raise LayoutError(
                f"{path}: shape {list(array.shape)} {array.dtype}, manifest says {spec['shape']} {spec['dtype']}"
            )
        arrays[name] = array
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 4 or x.shape[-1] != 3 or y.shape != (x.shape[0],):
            raise LayoutError(
                f"{directory}: {split} arrays have shapes {x.shape} and {y.shape}; expected (N,H,W,3), (N,)"
            )
    return Dataset(label_names=tuple(manifest.get("label_names", ())), **arrays)


def gather(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy the rows ``indices`` out of the memory map (sorted reads, original order restored)."""
    order = np.argsort(indices, kind="stable")
    rows = np.empty((len(indices), *images.shape[1:]), dtype=images.dtype)
    rows[order] = images[indices[order]]
    return rows, np.asarray(labels[indices], dtype=np.int32)


def augment(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Random crop after zero padding, and random horizontal flip (the standard CIFAR augmentation)."""
    count, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, size=count)
    dx = rng.integers(0, 2 * padding + 1, size=count)
    rows = dy[:, None] + np.arange(height)[None, :]
    cols = dx[:, None] + np.arange(width)[None, :]
    flips = rng.random(count) < 0.5
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
