"""Paths under the mount and atomic writes: never a half-written file under a final name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer import efs_layout
from trainer.efs_layout import EfsLayout, load_arrays, save_arrays
from trainer.errors import InvalidEventError, LayoutError


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "..", "a b", "a\x00b", 7, None])
def test_hostile_names_never_become_paths(tmp_path: Path, name: object) -> None:
    layout = EfsLayout(tmp_path)
    with pytest.raises(InvalidEventError):
        layout.run_dir(name)  # type: ignore[arg-type]
    with pytest.raises(InvalidEventError):
        layout.dataset_dir(name)  # type: ignore[arg-type]


def test_arrays_and_metadata_round_trip(tmp_path: Path) -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.float16)]
    size = save_arrays(tmp_path / "a.npz", arrays, {"samples": 5})
    loaded, meta = load_arrays(tmp_path / "a.npz")
    assert size == (tmp_path / "a.npz").stat().st_size
    assert meta == {"samples": 5}
    for original, read in zip(arrays, loaded, strict=True):
        np.testing.assert_array_equal(original, read)
        assert original.dtype == read.dtype


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "w.npz"
    save_arrays(target, [np.ones(3)], {"version": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(efs_layout.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_arrays(target, [np.zeros(3)], {"version": 2})
    _, meta = load_arrays(target)
    assert meta == {"version": 1}
    assert [entry.name for entry in tmp_path.iterdir()] == ["w.npz"]


def test_combiner_counts_only_final_update_names(tmp_path: Path) -> None:
    layout = EfsLayout(tmp_path)
    save_arrays(layout.update_path("r", 3, 1), [np.ones(2)])
    directory = layout.updates_dir("r", 3)
    (directory / f"{efs_layout.TMP_PREFIX}worker-0002.npz.abc").write_bytes(b"partial")
    (directory / "worker-0004.npz.partial").write_bytes(b"junk")
    assert layout.finished_updates("r", 3) == [1]
    assert layout.finished_updates("r", 9) == []


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 truncated zip", b"not an archive"], ids=["empty", "truncated", "garbage"]
)
def test_damaged_array_file_is_a_layout_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.npz").write_bytes(content)
    with pytest.raises(LayoutError, match=r"bad\.npz"):
        load_arrays(tmp_path / "bad.npz")


def test_missing_file_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="missing"):
        load_arrays(tmp_path / "nope.npz")
