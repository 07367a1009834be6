"""A learnable stand-in for CIFAR-10, written by ``prep``'s own writer, for tests and benchmarks.

Each image's class is its brightness band (pixels ``22 * label + U[0, 40)``), so a tiny model learns it in a few
rounds. The folder is what :func:`prep.cifar.write_dataset` writes from a real archive: the same ``.npy`` files,
a manifest with sha256s that ``prep`` and the staging function accept, the same atomic swap into place.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from prep import cifar

IMAGES_PER_PART = 4_096  # images drawn per call, so that 50,000 never hold int64 pixels at once
BAND_WIDTH = 22  # brightness step between classes
NOISE_LEVELS = 40  # pixel noise: U[0, NOISE_LEVELS)
LABEL_NAMES = tuple(f"class{index}" for index in range(cifar.NUM_CLASSES))


def write_synthetic_dataset(directory: Path, num_train: int = 240, num_test: int = 80, seed: int = 0) -> None:
    """Write ``num_train`` + ``num_test`` images in the layout ``prep`` writes to ``directory`` (replaced)."""
    rng = np.random.default_rng(seed)
    train = _split(rng, num_train)
    test = _split(rng, num_test)
    description = f"synthetic brightness bands: train={num_train} test={num_test} seed={seed}"
    decoded = cifar.DecodedSource(
        name="synthetic",
        sha256=hashlib.sha256(description.encode()).hexdigest(),
        label_names=LABEL_NAMES,
        train=train,
        test=cifar.Batch(
            np.concatenate([part.images for part in test]), np.concatenate([part.labels for part in test])
        ),
    )
    cifar.write_dataset(decoded, Path(directory))


def _split(rng: np.random.Generator, count: int) -> tuple[cifar.Batch, ...]:
    """Balanced, shuffled labels, then their images drawn part by part (the same numbers as in one draw)."""
    labels = (np.arange(count) % cifar.NUM_CLASSES).astype(np.uint8)
    rng.shuffle(labels)
    parts = []
    for start in range(0, count, IMAGES_PER_PART):
        part_labels = labels[start : start + IMAGES_PER_PART]
        noise = rng.integers(0, NOISE_LEVELS, (len(part_labels), *cifar.IMAGE_SHAPE))
        images = (noise + part_labels[:, None, None, None] * BAND_WIDTH).astype(np.uint8)
        parts.append(cifar.Batch(images, part_labels))
    return tuple(parts) or (cifar.Batch(np.zeros((0, *cifar.IMAGE_SHAPE), np.uint8), labels),)
