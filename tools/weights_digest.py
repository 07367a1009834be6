"""Print a sha256 of a model's weights, to show that two runs trained the same model bit for bit.

    .venv/bin/python tools/weights_digest.py .local/efs/runs/<run>/final.keras
    .venv/bin/python tools/weights_digest.py <weights .npz written by the trainer>

The digest covers each array's dtype, shape and bytes in order (``model.get_weights()`` for a ``.keras`` file),
not the file's bytes: ``final.keras`` is a zip with timestamps and optimizer state, which may differ between two
runs whose weights are identical.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def digest(arrays: Iterable[np.ndarray]) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(str(array.dtype).encode())
        hasher.update(str(array.shape).encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()


def weights_of(path: Path) -> list[np.ndarray]:
    if path.suffix == ".keras":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras

        return keras.models.load_model(path).get_weights()
    sys.path.insert(0, str(REPO_ROOT / "src" / "handler"))
    from trainer.efs_layout import load_arrays

    return load_arrays(path)[0]


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: weights_digest.py FILE.keras|FILE.npz ...", file=sys.stderr)
        return 2
    for name in paths:
        arrays = weights_of(Path(name))
        print(f"{digest(arrays)}  {len(arrays)} arrays  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
