"""tools/weights_digest.py: equal weights give equal digests, any change in values, dtype or shape does not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from trainer.efs_layout import save_arrays

SPEC = importlib.util.spec_from_file_location(
    "weights_digest", Path(__file__).resolve().parents[2] / "tools" / "weights_digest.py"
)
weights_digest = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(weights_digest)


def test_digest_depends_on_values_dtype_and_shape_only(tmp_path):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)]
    save_arrays(tmp_path / "a.npz", arrays, {"round": 1})
    save_arrays(tmp_path / "b.npz", arrays, {"round": 2})  # other metadata: the same weights
    same = weights_digest.digest(weights_digest.weights_of(tmp_path / "a.npz"))
    assert (
        same
        == weights_digest.digest(weights_digest.weights_of(tmp_path / "b.npz"))
        == weights_digest.digest(arrays)
    )
    assert weights_digest.digest([arrays[0].reshape(3, 2), arrays[1]]) != same
    assert weights_digest.digest([arrays[0].astype(np.float64), arrays[1]]) != same
    changed = [arrays[0].copy(), arrays[1]]
    changed[0][0, 0] = np.nextafter(np.float32(0), np.float32(1))
    assert weights_digest.digest(changed) != same
