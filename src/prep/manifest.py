"""The dataset manifest: building it, and telling whether a prepared folder is complete.

``manifest.json`` is what the trainer reads to find and trust the arrays::

    {"format_version": 1, "dataset": "cifar10", "label_names": ["airplane", ...],
     "arrays": {"train_x": {"file": "train_x.npy", "shape": [N, 32, 32, 3], "dtype": "uint8",
                            "sha256": "..."}, "train_y": {...}, "test_x": {...}, "test_y": {...}},
     "class_counts": {"train": [10 ints], "test": [10 ints]},
     "source": {"name": "cifar-10-python.tar.gz", "sha256": "..."},
     "created_at": "2026-11-27T12:00:00Z"}

The folder's file names and format version are defined once, in :mod:`prep.stage` (the staging function
must stay self-contained), and re-exported here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prep import stage

logger = logging.getLogger(__name__)

FORMAT_VERSION = stage.FORMAT_VERSION
MANIFEST_FILE = stage.MANIFEST_FILE
ARRAY_NAMES = stage.ARRAY_NAMES
DATASET_NAME = "cifar10"


def array_entry(name: str, shape: Sequence[int], dtype: str, sha256: str) -> dict[str, Any]:
    """The manifest's description of one array file."""
    return {"file": f"{name}.npy", "shape": [int(dim) for dim in shape], "dtype": dtype, "sha256": sha256}


def build_manifest(
    *,
    label_names: Sequence[str],
    arrays: Mapping[str, dict[str, Any]],
    class_counts: Mapping[str, Sequence[int]],
    source_name: str,
    source_sha256: str,
) -> dict[str, Any]:
    """Assemble the manifest (keys in the documented order; ``created_at`` is now, in UTC)."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": DATASET_NAME,
        "label_names": list(label_names),
        "arrays": {name: arrays[name] for name in ARRAY_NAMES},
        "class_counts": {split: [int(count) for count in counts] for split, counts in class_counts.items()},
        "source": {"name": source_name, "sha256": source_sha256},
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def read_complete_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete dataset in ``directory``, or None if there is none to reuse.

    Complete means: a readable manifest of this format version whose four array files exist with the
    shape and dtype it records (checked from the ``.npy`` headers; the data is not re-hashed). Anything
    else returns None so that the caller rebuilds.
    """
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        arrays = manifest["arrays"]
        if manifest["format_version"] != FORMAT_VERSION or not isinstance(manifest["source"]["sha256"], str):
            return None
        for name in ARRAY_NAMES:
            entry = arrays[name]
            on_disk = np.load(directory / entry["file"], mmap_mode="r", allow_pickle=False)
            if list(on_disk.shape) != entry["shape"] or on_disk.dtype.name != entry["dtype"]:
                logger.warning("existing_array_mismatch", extra={"file": entry["file"]})
                return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        logger.warning("existing_dataset_unreadable", extra={"path": str(path), "error": str(exc)})
        return None
    return manifest
