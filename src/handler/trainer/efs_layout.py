"""Every path under the EFS mount, and atomic file writes.

Layout (``<root>`` is ``EFS_ROOT``)::

    <root>/datasets/<dataset>/{train_x,train_y,test_x,test_y}.npy, manifest.json
    <root>/runs/<run>/config.json                       resolved training configuration
    <root>/runs/<run>/weights/round-000012-<token>.npz  global weights at the start of round 12
    <root>/runs/<run>/updates/round-000012/worker-0003.npz   worker 3's update for round 12
    <root>/runs/<run>/partial/round-000012/worker-0003.npz   local state of a worker continued in a chained call
    <root>/runs/<run>/outer/round-000012-<token>.npz    outer-optimizer (Nesterov) momentum before round 12
    <root>/runs/<run>/reduce/round-000012/slice-0003.npz    reducer 3's slice of round 13's weights (sharded runs)
    <root>/runs/<run>/final.keras                       the trained model

Writers create a temporary name in the target's directory, fsync, then rename it into place; readers and the
combiner only ever look at final names, so a crash never leaves a half-written file where one is counted.

Results are write-once: an update, a reducer's slice, and ``final.keras``, are published with a hard link that fails when the name
exists (the first finished copy wins, a duplicate never replaces a file another invocation may be reading); the
next round's weights carry the token of the combine that wrote them, and the commit records the winner's.
Only a worker's partial state, which only that worker's own continuation reads, is replaced in place.

The dataset folder's names (:data:`DATASETS_DIR`, :data:`MANIFEST_FILE`, :data:`DATASET_ARRAYS`,
:data:`DATASET_FORMAT_VERSION`), :data:`TMP_PREFIX` and :func:`fsync_directory` are the trainer's side of the
contract with ``prep``, which writes the folder; ``prep.stage`` keeps its own copy because the staging function
is a self-contained zip, and ``tests/unit/test_dataset_contract.py`` checks that the two agree.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import InvalidEventError, LayoutError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TMP_PREFIX = ".tmp-"  # a name being written; never counted
DATASETS_DIR = "datasets"  # <root>/datasets/<dataset>/
MANIFEST_FILE = "manifest.json"
DATASET_FORMAT_VERSION = 1  # the manifest's format_version this trainer reads
DATASET_ARRAYS = ("train_x", "train_y", "test_x", "test_y")  # each listed in the manifest's "arrays"
_META_KEY = "__meta__"
_UPDATE_RE = re.compile(r"^worker-(\d{4})\.npz$")
_ROUND_FILE_RE = re.compile(r"^round-(\d{6})(?:-([A-Za-z0-9_-]{1,64})\.npz)?$")


def check_name(kind: str, value: object) -> str:
    """Reject anything that is not a plain name (no ``/``, ``..``, spaces or NULs) before it becomes a path."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidEventError(f"{kind} must match [A-Za-z0-9_-]{{1,64}}, got {value!r}")
    return value


# A folder per round, a file per worker (or, for "reduce", per reducer), no token; the others are token-named files.
PER_WORKER_KINDS = ("updates", "partial", "local", "reduce")


@dataclass(frozen=True)
class EfsLayout:
    root: Path

    def dataset_dir(self, dataset: str) -> Path:
        return self.root / DATASETS_DIR / check_name("dataset", dataset)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / check_name("run", run_id)

    def config_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "config.json"

    def weights_path(self, run_id: str, round_index: int, token: str) -> Path:
        return self.run_dir(run_id) / "weights" / f"round-{round_index:06d}-{check_name('token', token)}.npz"

    def updates_dir(self, run_id: str, round_index: int) -> Path:
        return self.run_dir(run_id) / "updates" / f"round-{round_index:06d}"

    def update_path(self, run_id: str, round_index: int, worker_index: int) -> Path:
        return self.updates_dir(run_id, round_index) / f"worker-{worker_index:04d}.npz"

    def reduce_dir(self, run_id: str, round_index: int) -> Path:
        return self.run_dir(run_id) / "reduce" / f"round-{round_index:06d}"

    def slice_path(self, run_id: str, round_index: int, reducer_index: int) -> Path:
        """Reducer ``reducer_index``'s slice of the weights after ``round_index`` (write-once)."""
        return self.reduce_dir(run_id, round_index) / f"slice-{reducer_index:04d}.npz"

    def partial_path(self, run_id: str, round_index: int, worker_index: int) -> Path:
        return (
            self.run_dir(run_id) / "partial" / f"round-{round_index:06d}" / f"worker-{worker_index:04d}.npz"
        )

    def local_state_path(self, run_id: str, round_index: int, worker_index: int) -> Path:
        """A worker's optimizer state (SGD momentum) to start ``round_index`` from, written by its previous round
        (``local_optimizer`` "keep")."""
        return self.run_dir(run_id) / "local" / f"round-{round_index:06d}" / f"worker-{worker_index:04d}.npz"

    def outer_state_path(self, run_id: str, round_index: int, token: str) -> Path:
        return self.run_dir(run_id) / "outer" / f"round-{round_index:06d}-{check_name('token', token)}.npz"

    def final_model_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "final.keras"

    def finished_updates(self, run_id: str, round_index: int) -> list[int]:
        """Worker indices whose update file for this round is complete (final name present)."""
        directory = self.updates_dir(run_id, round_index)
        if not directory.is_dir():
            return []
        found = (_UPDATE_RE.fullmatch(entry.name) for entry in directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def round_files(self, run_id: str) -> Iterator[tuple[str, int, str | None, Path]]:
        """Every round-scoped entry of a run as ``(kind, round, token, path)``: kind is ``weights``, ``outer``
        (token set), ``updates``, ``partial``, ``local`` or ``reduce`` (a round's folder, token None); temporary
        files are skipped."""
        run_dir = self.run_dir(run_id)
        for kind in ("weights", "outer", *PER_WORKER_KINDS):
            directory = run_dir / kind
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                match = _ROUND_FILE_RE.fullmatch(entry.name)
                if match and (match.group(2) is None) == (kind in PER_WORKER_KINDS):
                    yield kind, int(match.group(1)), match.group(2), entry

    def temporary_files(self, run_id: str) -> Iterator[Path]:
        """Temporary files a killed writer left anywhere in the run's folder."""
        return (path for path in self.run_dir(run_id).rglob(f"{TMP_PREFIX}*") if path.is_file())


def new_token() -> str:
    """A name for the files one combine writes (unique per invocation)."""
    return uuid.uuid4().hex[:16]


def write_bytes(path: Path, data: bytes, once: bool = False) -> bool:
    """Write ``data`` to a temporary file beside ``path``, fsync it and put it in place; True if it was.

    With ``once`` it is published with a hard link, which fails if ``path`` exists: a file, once there, never
    changes (the first finished writer wins and this returns False for the others).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if once:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # after a link it is the second name of the published file; after a replace, gone
    fsync_directory(path.parent)
    return True


def publish_file(tmp: Path, path: Path) -> bool:
    """Publish a finished temporary file (one a library wrote, e.g. Keras's ``model.save``) at ``path`` once:
    fsync it, link it into place unless ``path`` exists, remove the temporary name. True if this call did."""
    try:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_directory(path.parent)
    return True


def fsync_directory(directory: Path) -> None:
    """Make renames and new names in ``directory`` durable; a no-op where the file system cannot."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LayoutError(f"{path}: missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc})") from exc


def save_arrays(
    path: Path, arrays: Sequence[np.ndarray], meta: dict[str, Any] | None = None, once: bool = False
) -> int:
    """Write a list of arrays plus JSON metadata as one ``.npz``, atomically. Returns bytes written: 0 when
    ``once`` is set and the file was already there (it is left as it was)."""
    buffer = io.BytesIO()
    named = {f"a{index:04d}": np.asarray(array) for index, array in enumerate(arrays)}
    named[_META_KEY] = np.frombuffer(json.dumps(meta or {}, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buffer, **named)
    data = buffer.getvalue()
    return len(data) if write_bytes(path, data, once=once) else 0


def load_arrays(path: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Read what :func:`save_arrays` wrote; a missing or damaged file raises :class:`LayoutError`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(key for key in archive.files if key != _META_KEY)
            arrays = [archive[key] for key in keys]
            meta = json.loads(archive[_META_KEY].tobytes()) if _META_KEY in archive.files else {}
    except FileNotFoundError as exc:
        raise LayoutError(f"{path}: missing") from exc
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise LayoutError(f"{path}: unreadable array archive ({exc})") from exc
    return arrays, meta


def load_members(path: Path, indices: Sequence[int]) -> tuple[list[np.ndarray], int]:
    """Only the arrays ``indices`` (positions in the list :func:`save_arrays` wrote) of an ``.npz``: each is one
    contiguous member of the file. Returns them and the bytes their members occupy (what was read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [f"a{index:04d}" for index in indices]
            missing = [name for name in names if name not in archive.files]
            if missing:
                raise LayoutError(f"{path}: has no array(s) {missing[:3]}; it holds {len(archive.files) - 1}")
            arrays = [archive[name] for name in names]
            size = sum(archive.zip.getinfo(f"{name}.npy").compress_size for name in names)
    except FileNotFoundError as exc:
        raise LayoutError(f"{path}: missing") from exc
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise LayoutError(f"{path}: unreadable array archive ({exc})") from exc
    return arrays, size


def load_meta(path: Path) -> dict[str, Any]:
    """Only the JSON metadata of what :func:`save_arrays` wrote (the arrays are not read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(archive[_META_KEY].tobytes()) if _META_KEY in archive.files else {}
    except FileNotFoundError as exc:
        raise LayoutError(f"{path}: missing") from exc
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise LayoutError(f"{path}: unreadable array archive ({exc})") from exc


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
