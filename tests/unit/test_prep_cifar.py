"""prep.cifar: decoding CIFAR-10 into arrays, validation of bad input, atomic and idempotent writes.

Every source is built in ``tmp_path`` from ``tests/fixtures/cifar10-tiny.tar.gz`` (200 train + 100 test
images in the official layout; see ``tests/fixtures/make_fixture.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from prep import cifar, manifest, stage
from prep.errors import PrepError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
FOLDER = "cifar-10-batches-py"
ARRAY_FILES = ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy")


# --- Helpers: build sources from the fixture ----------------------------------------------------------


def fixture_members() -> dict[str, bytes]:
    """Base name -> contents of every file in the fixture, in archive order."""
    with tarfile.open(FIXTURE, "r:gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def write_archive(
    path: Path, members: list[tuple[str, bytes]] | dict[str, bytes], mode: str = "w:gz"
) -> Path:
    items = members.items() if isinstance(members, dict) else members
    with tarfile.open(path, mode) as tar:
        for name, payload in items:
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_folder(parent: Path, members: dict[str, bytes]) -> Path:
    folder = parent / FOLDER
    folder.mkdir(parents=True)
    for name, payload in members.items():
        (folder / name).write_bytes(payload)
    return folder


def load_batch(payload: bytes) -> dict[bytes, object]:
    return pickle.loads(payload, encoding="bytes")


def edit_batch(
    members: dict[str, bytes], name: str, edit: Callable[[dict[bytes, object]], None]
) -> dict[str, bytes]:
    """A copy of ``members`` whose batch ``name`` was unpickled, changed by ``edit`` and pickled again."""
    batch = load_batch(members[name])
    edit(batch)
    return {**members, name: pickle.dumps(batch, protocol=2)}


def direct_decode(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The reference: plain pickle.load and a channel-planar -> NHWC reshape, written independently."""
    train = [load_batch(members[f"data_batch_{i}"]) for i in range(1, 6)]
    test = load_batch(members["test_batch"])

    def images(batch: dict[bytes, object]) -> np.ndarray:
        data = np.asarray(batch[b"data"])
        return np.stack([data[i].reshape(3, 32, 32).transpose(1, 2, 0) for i in range(len(data))])

    return {
        "train_x": np.concatenate([images(b) for b in train]),
        "train_y": np.concatenate([np.asarray(b[b"labels"], dtype=np.uint8) for b in train]),
        "test_x": images(test),
        "test_y": np.asarray(test[b"labels"], dtype=np.uint8),
    }


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` with its contents, to compare before and after a failure."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Temporary or backup folders left next to a dataset."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((stage.TMP_PREFIX, stage.OLD_PREFIX)))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def members() -> dict[str, bytes]:
    return fixture_members()


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """A dataset already prepared from the fixture, in ``tmp_path/datasets/cifar10``."""
    out_dir = tmp_path / "datasets" / "cifar10"
    cifar.prepare(FIXTURE, out_dir)
    return out_dir


# --- Round trip ---------------------------------------------------------------------------------------


def make_tar_gz(tmp_path: Path, members: dict[str, bytes]) -> Path:
    return FIXTURE  # the fixture is the .tar.gz users download, in miniature


def make_tar_xz(tmp_path: Path, members: dict[str, bytes]) -> Path:
    return write_archive(tmp_path / "cifar-10-python.tar.xz", members, mode="w:xz")


def make_folder(tmp_path: Path, members: dict[str, bytes]) -> Path:
    return write_folder(tmp_path / "src", members)


def make_parent_folder(tmp_path: Path, members: dict[str, bytes]) -> Path:
    return write_folder(tmp_path / "src", members).parent


@pytest.mark.parametrize(
    "make_source",
    [make_tar_gz, make_tar_xz, make_folder, make_parent_folder],
    ids=["tar.gz", "tar.xz", "folder", "parent-folder"],
)
def test_arrays_equal_a_direct_decode_of_the_pickles(tmp_path, members, make_source):
    source = make_source(tmp_path, members)
    out_dir = tmp_path / "out"

    result = cifar.prepare(source, out_dir)

    expected = direct_decode(members)
    for name, array in expected.items():
        loaded = np.load(out_dir / f"{name}.npy", mmap_mode="r")
        assert loaded.dtype == np.uint8 and loaded.shape == array.shape, name
        np.testing.assert_array_equal(loaded, array, err_msg=name)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*ARRAY_FILES, "manifest.json"])
    assert json.loads((out_dir / "manifest.json").read_text()) == result


def test_manifest_has_exactly_the_documented_keys_and_true_checksums(tmp_path):
    out_dir = tmp_path / "out"
    result = cifar.prepare(FIXTURE, out_dir)

    assert list(result) == [
        "format_version", "dataset", "label_names", "arrays", "class_counts", "source", "created_at",
    ]  # fmt: skip
    assert result["format_version"] == 1 and result["dataset"] == "cifar10"
    assert result["label_names"] == list(cifar.LABEL_NAMES)
    shapes = {"train_x": [200, 32, 32, 3], "train_y": [200], "test_x": [100, 32, 32, 3], "test_y": [100]}
    for name, shape in shapes.items():
        entry = result["arrays"][name]
        assert set(entry) == {"file", "shape", "dtype", "sha256"}
        assert entry == {
            "file": f"{name}.npy",
            "shape": shape,
            "dtype": "uint8",
            "sha256": sha256_file(out_dir / entry["file"]),
        }
    assert result["class_counts"] == {"train": [20] * 10, "test": [10] * 10}
    assert result["source"] == {"name": "cifar10-tiny.tar.gz", "sha256": sha256_file(FIXTURE)}
    assert result["created_at"].endswith("Z") and "T" in result["created_at"]


def test_folder_source_hash_covers_the_batch_files_in_canonical_order(tmp_path, members):
    folder = write_folder(tmp_path, members)
    result = cifar.prepare(folder, tmp_path / "out")
    concatenated = b"".join(members[name] for name in cifar.KNOWN_FILES)
    assert result["source"] == {"name": FOLDER, "sha256": hashlib.sha256(concatenated).hexdigest()}


def test_pixels_land_in_nhwc_order(tmp_path, members):
    """Channel-planar row -> (row, col, channel): red plane first, then green, then blue."""

    def plant_pixels(batch):
        data = np.array(batch[b"data"])
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
        data[0, 5 * 32 + 7] = 200  # red, row 5, column 7
        data[0, 1024 + 31 * 32 + 0] = 201  # green, row 31, column 0
        batch[b"data"] = data

    out_dir = tmp_path / "out"
    cifar.prepare(write_folder(tmp_path, edit_batch(members, "data_batch_1", plant_pixels)), out_dir)

    image = np.load(out_dir / "train_x.npy")[0]
    assert image[5, 7].tolist() == [200, 20, 30]
    assert image[31, 0].tolist() == [10, 201, 30]
    assert image[0, 0].tolist() == [10, 20, 30]


def python2_pickle_of_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way Python 2 with NumPy 1 wrote the official download: protocol 2, ``str``
    values as BINSTRING (bytes after ``encoding="bytes"``) and ``numpy.core.multiarray._reconstruct``.
    Python 3 cannot produce this, so the opcodes are written by hand."""
    out = bytearray(b"\x80\x02")  # PROTO 2

    def string(value: bytes) -> None:  # Python 2 str
        out.extend(
            b"U" + bytes([len(value)]) + value
            if len(value) < 256
            else b"T" + struct.pack("<I", len(value)) + value
        )

    def integer(value: int) -> None:
        out.extend(b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value))

    def global_(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    out.extend(b"}(")  # EMPTY_DICT, MARK
    string(b"batch_label"), string(b"training batch 1 of 5")
    string(b"labels"), out.extend(b"](")  # EMPTY_LIST, MARK
    for label in labels:
        integer(label)
    out.extend(b"e")  # APPENDS
    string(b"data")
    global_("numpy.core.multiarray", "_reconstruct")
    global_("numpy", "ndarray"), integer(0), out.extend(b"\x85"), string(b"b"), out.extend(b"\x87R")
    out.extend(b"("), integer(1), integer(len(data)), integer(3072), out.extend(b"\x86")  # (1, shape, ...
    global_("numpy", "dtype"), string(b"u1"), integer(0), integer(1), out.extend(b"\x87R")  # dtype("u1")
    out.extend(b"("), integer(3), string(b"|"), out.extend(b"NNN"), integer(-1), integer(-1), integer(0)
    out.extend(b"tb")  # dtype state, BUILD
    out.extend(b"\x89"), string(data.tobytes()), out.extend(b"tb")  # False, raw bytes) BUILD
    out.extend(b"u.")  # SETITEMS, STOP
    return bytes(out)


def test_decodes_python2_pickles_like_the_official_download():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    payload = python2_pickle_of_batch(data, [3, 0, 9, 1])
    assert np.array_equal(
        pickle.loads(payload, encoding="bytes")[b"data"], data
    )  # the hand-made pickle is sound

    batch = cifar.decode_batch(payload, "data_batch_1")

    assert batch.labels.tolist() == [3, 0, 9, 1] and batch.labels.dtype == np.uint8
    np.testing.assert_array_equal(batch.images, data.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))


# --- Bad input: a clear error, nothing written, the previous dataset intact ----------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


class _ArrayFromShape:
    """Pickles as ``numpy.ndarray(shape, "u1")``: uninitialized memory of any size, no pixel data."""

    def __init__(self, shape):
        self.shape = shape

    def __reduce__(self):
        return (np.ndarray, (self.shape, "u1"))


def _ndarray_called_directly(members):
    batch = {b"data": _ArrayFromShape((40, 3072)), b"labels": [0] * 40}
    return ("tar", {**members, "data_batch_1": pickle.dumps(batch, protocol=2)})


def _pickle_of_appends(members):
    """300,000 appends of 0 to one list: 900 KB that would build a list of any length."""
    payload = b"\x80\x02}(U\x06labels](" + b"K\x00" * 300_000 + b"eu."
    return ("tar", {**members, "data_batch_1": payload})


def _truncated(members):
    data = FIXTURE.read_bytes()
    return ("archive", data[: len(data) // 2])


def _bit_flipped(members):
    data = bytearray(FIXTURE.read_bytes())
    data[len(data) // 2] ^= 0xFF
    return ("archive", bytes(data))


def _gzip_of_text(members):
    return ("archive", gzip.compress(b"just some text, not a tar\n" * 100))


BAD_SOURCES: list[tuple[str, Callable[[dict[str, bytes]], tuple[str, object]], str]] = [
    # id, build(members) -> (kind, payload), error pattern
    ("missing-path", lambda m: ("missing", None), r"nope\.tar\.gz: no such file or folder"),
    ("not-a-tar", lambda m: ("archive", b"hello, world\n" * 100), r"not a tar archive"),
    ("gzip-of-text", _gzip_of_text, r"not a tar archive"),
    ("truncated-archive", _truncated, r"truncated"),
    ("corrupt-archive", _bit_flipped, r"truncated or corrupt archive|not a readable CIFAR-10 pickle"),
    ("missing-batch", lambda m: ("tar", {k: v for k, v in m.items() if k != "data_batch_4"}), r"missing batch file\(s\) data_batch_4"),
    ("duplicate-batch", lambda m: ("tar", [*m.items(), ("data_batch_2", m["data_batch_2"])]), r"data_batch_2 appears twice"),
    ("pickle-without-keys", lambda m: ("tar", edit_batch(m, "data_batch_1", lambda b: b.pop(b"labels"))), r"data_batch_1: pickle has no 'labels' key"),
    ("wrong-data-length", lambda m: ("tar", edit_batch(m, "data_batch_3", lambda b: b.update({b"data": b[b"data"][:, :3000].copy()}))), r"data_batch_3: 'data' has shape \(40, 3000\), expected \(40, 3072\)"),
    ("wrong-data-dtype", lambda m: ("tar", edit_batch(m, "test_batch", lambda b: b.update({b"data": b[b"data"].astype(np.int16)}))), r"test_batch: 'data' must be a uint8 array, got int16 array"),
    ("label-count-mismatch", lambda m: ("tar", edit_batch(m, "data_batch_2", lambda b: b[b"labels"].pop())), r"data_batch_2: 'data' has shape \(40, 3072\), expected \(39, 3072\)"),
    ("labels-out-of-range", lambda m: ("tar", edit_batch(m, "data_batch_5", lambda b: b[b"labels"].__setitem__(3, 10))), r"data_batch_5: 1 label\(s\) outside 0-9, first labels\[3\] = 10"),
    ("ndarray-called-directly", _ndarray_called_directly, r"data_batch_1: not a readable CIFAR-10 pickle .*refusing to call numpy\.ndarray\(\(40, 3072\), 'u1'\)"),
    ("pickle-of-appends", _pickle_of_appends, r"data_batch_1: not a readable CIFAR-10 pickle .*more than 250000 opcodes"),
    ("labels-too-many", lambda m: ("tar", edit_batch(m, "data_batch_2", lambda b: b.update({b"labels": [0] * 10_001}))), r"data_batch_2: 'labels' must be a list of 1 to 10000 integers, got a list of 10001"),
    ("labels-empty", lambda m: ("tar", edit_batch(m, "data_batch_2", lambda b: b.update({b"labels": []}))), r"data_batch_2: 'labels' must be a list of 1 to 10000 integers, got a list of 0"),
    ("labels-an-array", lambda m: ("tar", edit_batch(m, "data_batch_4", lambda b: b.update({b"labels": np.zeros(40, np.int64)}))), r"data_batch_4: 'labels' must be a list of 1 to 10000 integers, got ndarray"),
    ("labels-bools", lambda m: ("tar", edit_batch(m, "test_batch", lambda b: b[b"labels"].__setitem__(7, True))), r"test_batch: 'labels' must hold integers, got labels\[7\] = True \(bool\)"),
    ("labels-floats", lambda m: ("tar", edit_batch(m, "test_batch", lambda b: b[b"labels"].__setitem__(0, 1.0))), r"test_batch: 'labels' must hold integers, got labels\[0\] = 1\.0 \(float\)"),
    ("not-a-pickle", lambda m: ("tar", {**m, "data_batch_3": b"garbage"}), r"data_batch_3: not a readable CIFAR-10 pickle"),
    ("pickle-runs-code", lambda m: ("tar", {**m, "data_batch_1": pickle.dumps(_RunsCode(), protocol=2)}), r"data_batch_1: not a readable CIFAR-10 pickle .*refusing to load global .*getcwd"),
    ("bad-label-names", lambda m: ("tar", {**m, "batches.meta": pickle.dumps({b"label_names": [b"cat"] * 3}, protocol=2)}), r"batches\.meta: 'label_names' must be a list of 10 names"),
    ("folder-missing-batch", lambda m: ("folder", {k: v for k, v in m.items() if k != "test_batch"}), r"cifar-10-batches-py: missing batch file\(s\) test_batch"),
    ("folder-without-batches", lambda m: ("plain-folder", None), r"bad: folder holds no CIFAR-10 batches"),
]  # fmt: skip


def build_bad_source(tmp_path: Path, kind: str, payload: object) -> Path:
    if kind == "missing":
        return tmp_path / "nope.tar.gz"
    if kind == "archive":
        path = tmp_path / "bad.tar.gz"
        path.write_bytes(payload)  # type: ignore[arg-type]
        return path
    if kind == "tar":
        return write_archive(tmp_path / "bad.tar.gz", payload)  # type: ignore[arg-type]
    if kind == "folder":
        return write_folder(tmp_path / "bad", payload)  # type: ignore[arg-type]
    if kind == "plain-folder":  # a folder with files, none of them CIFAR-10's
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "readme.html").write_text("hi")
        return tmp_path / "bad"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("build", "pattern"), [case[1:] for case in BAD_SOURCES], ids=[case[0] for case in BAD_SOURCES]
)
def test_bad_source_fails_clearly_and_leaves_the_previous_dataset_intact(
    tmp_path, members, previous, build, pattern
):
    source = build_bad_source(tmp_path, *build(members))
    before, inode = snapshot(previous), previous.stat().st_ino

    with pytest.raises(PrepError, match=pattern) as raised:
        cifar.prepare(source, previous, force=True)

    assert str(source) in str(raised.value)  # the message names the file
    assert snapshot(previous) == before and previous.stat().st_ino == inode
    assert leftovers(previous.parent) == []


@pytest.mark.parametrize(
    ("build", "pattern"), [case[1:] for case in BAD_SOURCES[:6]], ids=[case[0] for case in BAD_SOURCES[:6]]
)
def test_bad_source_writes_nothing_when_there_was_no_dataset(tmp_path, members, build, pattern):
    source = build_bad_source(tmp_path, *build(members))
    out_dir = tmp_path / "datasets" / "cifar10"

    with pytest.raises(PrepError, match=pattern):
        cifar.prepare(source, out_dir)

    assert not out_dir.exists()
    assert not out_dir.parent.exists() or leftovers(out_dir.parent) == []


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("precious")

    with pytest.raises(PrepError, match=r"mine: folder is not empty and holds no manifest.json"):
        cifar.prepare(FIXTURE, out_dir, force=True)

    assert (out_dir / "notes.txt").read_text() == "precious"


def test_refuses_an_output_path_that_is_a_file(tmp_path):
    out_file = tmp_path / "out"
    out_file.write_text("x")
    with pytest.raises(PrepError, match=r"out: exists and is not a folder"):
        cifar.prepare(FIXTURE, out_file)


# --- Atomicity ----------------------------------------------------------------------------------------


def _fail_on_second_array(monkeypatch):
    original, calls = cifar.write_npy, []

    def write_npy(path, parts):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half an array")
            raise OSError(28, "No space left on device (injected)")
        return original(path, parts)

    monkeypatch.setattr(cifar, "write_npy", write_npy)


def _fail_on_manifest(monkeypatch):
    original = stage.write_file_synced

    def write_file_synced(path, data):
        original(path, data[: len(data) // 2])
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(stage, "write_file_synced", write_file_synced)


def _fail_on_swap(monkeypatch):
    original = os.rename

    def rename(source, target):
        if Path(source).name.startswith(stage.TMP_PREFIX):  # moving the new folder into place
            raise OSError(16, "Device or resource busy (injected)")
        return original(source, target)

    monkeypatch.setattr(stage.os, "rename", rename)


@pytest.mark.parametrize(
    "inject",
    [_fail_on_second_array, _fail_on_manifest, _fail_on_swap],
    ids=["mid-array", "manifest", "final-rename"],
)
def test_failure_mid_write_leaves_the_previous_dataset_intact(
    tmp_path, members, previous, monkeypatch, inject
):
    before = snapshot(previous)
    changed = write_folder(tmp_path, edit_batch(members, "data_batch_1", lambda b: b[b"labels"].reverse()))
    inject(monkeypatch)

    with pytest.raises(PrepError, match=r"could not write the dataset .*injected.*previous one is unchanged"):
        cifar.prepare(changed, previous)

    assert snapshot(previous) == before
    assert leftovers(previous.parent) == []


def test_replacing_a_dataset_swaps_it_and_removes_the_old_one(tmp_path, members, previous):
    changed = write_folder(tmp_path, edit_batch(members, "data_batch_1", lambda b: b[b"labels"].reverse()))
    result = cifar.prepare(changed, previous)
    assert result["source"]["name"] == FOLDER
    assert json.loads((previous / "manifest.json").read_text()) == result
    assert leftovers(previous.parent) == []


# --- Idempotence --------------------------------------------------------------------------------------


def test_same_source_again_is_a_no_op_and_force_rebuilds(tmp_path):
    out_dir = tmp_path / "out"
    first = cifar.prepare_dataset(FIXTURE, out_dir)
    inode = out_dir.stat().st_ino

    second = cifar.prepare_dataset(FIXTURE, out_dir)
    assert (first.rebuilt, second.rebuilt) == (True, False)
    assert second.manifest == first.manifest and out_dir.stat().st_ino == inode

    forced = cifar.prepare_dataset(FIXTURE, out_dir, force=True)
    assert forced.rebuilt and out_dir.stat().st_ino != inode
    assert forced.manifest["arrays"] == first.manifest["arrays"]  # same source, same bytes


def test_a_different_source_rebuilds(tmp_path, members):
    out_dir = tmp_path / "out"
    cifar.prepare(FIXTURE, out_dir)
    xz = write_archive(tmp_path / "same-data.tar.xz", members, mode="w:xz")
    assert cifar.prepare_dataset(xz, out_dir).rebuilt


def test_an_incomplete_dataset_is_rebuilt(tmp_path):
    out_dir = tmp_path / "out"
    cifar.prepare(FIXTURE, out_dir)
    (out_dir / "test_y.npy").unlink()
    assert cifar.prepare_dataset(FIXTURE, out_dir).rebuilt
    assert (out_dir / "test_y.npy").is_file()


def test_source_changing_while_read_is_an_error(tmp_path, monkeypatch, members):
    out_dir = tmp_path / "out"
    cifar.prepare(write_folder(tmp_path, members), out_dir)  # a dataset from another source exists
    monkeypatch.setattr(cifar.ArchiveSource, "sha256", lambda self: "0" * 64)  # what we hashed "before"
    with pytest.raises(PrepError, match=r"changed while it was being read"):
        cifar.prepare(FIXTURE, out_dir)


def test_module_constants_agree_with_the_staging_function():
    assert manifest.ARRAY_NAMES == stage.ARRAY_NAMES
    assert [f"{name}.npy" for name in manifest.ARRAY_NAMES] == list(ARRAY_FILES)
