"""Convert CIFAR-10 in the official python layout into NumPy arrays and a manifest, atomically.

Input (see ``../shared/cifar10/README.md``): a folder ``cifar-10-batches-py/`` holding ``data_batch_1`` …
``data_batch_5``, ``test_batch`` and ``batches.meta``, each a pickled dict with bytes keys: ``b"data"``
(uint8, N x 3072, channel-planar: 1024 red, 1024 green, 1024 blue values, row-major) and ``b"labels"``
(N ints 0-9); ``batches.meta`` has ``b"label_names"``. It may come as a ``.tar.gz`` (what users download),
``.tar.xz``, ``.tar.bz2`` or ``.tar``, as that folder, or as the folder's parent.

Output, in ``out_dir``: ``train_x.npy`` (N, 32, 32, 3) uint8 NHWC, ``train_y.npy`` (N,) uint8, ``test_x.npy``,
``test_y.npy`` and ``manifest.json`` (see :mod:`prep.manifest`). Plain ``.npy`` files, so a worker can
``np.load(path, mmap_mode="r")`` and read only its shard. Pixels stay uint8; scaling happens at training time.

How (the full archive takes seconds and a few hundred MB):

- Archives are streamed: one pass through the decompressor, one tar member at a time. Each batch is
  decoded and converted to NHWC on its own, so at most one batch's pickle is in memory next to the
  converted images; the array files are then written batch by batch, hashing as they go.
- Pickles are loaded by an unpickler that accepts only the few NumPy and ``_codecs`` globals a CIFAR-10
  batch uses, so a hostile archive cannot run code.
- Every batch is validated (keys, dtype, 3072 bytes per image, one label 0-9 per image, each batch exactly
  once) before anything is written; errors name the source, the batch and the problem.
- The arrays are written into ``.tmp-<name>-<random>/`` beside ``out_dir``, fsynced, and renamed into place
  (:func:`prep.stage.replace_directory`); any failure removes the temporary folder and leaves the previous
  dataset as it was.
- The manifest records the sha256 of the source. Running again on the same source returns the existing
  manifest without rebuilding, unless ``force=True``.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import io
import logging
import lzma
import os
import pickle
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
import tqdm

from prep import download, manifest, stage
from prep.errors import PrepError

logger = logging.getLogger(__name__)

SOURCE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
BATCH_NAMES = (*TRAIN_BATCHES, TEST_BATCH)
META_FILE = "batches.meta"
KNOWN_FILES = (*BATCH_NAMES, META_FILE)  # also the order in which a folder source is hashed

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)  # height, width, channels (NHWC per image)
IMAGE_BYTES = 32 * 32 * 3
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DEFAULT_OUT_DIR = Path(".local/efs/datasets/cifar10")
DEFAULT_CACHE_DIR = Path(".local/cache")
CHUNK_BYTES = 1024 * 1024

# Failures of the compressed stream or the tar structure while reading an archive.
_ARCHIVE_READ_ERRORS = (EOFError, OSError, tarfile.TarError, lzma.LZMAError, zlib.error)


# --- Public API ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedDataset:
    manifest: dict[str, Any]
    out_dir: Path
    rebuilt: bool  # False when an existing dataset from the same source was reused
    duration_s: float


def prepare(
    source: Path | None,
    out_dir: Path,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Prepare CIFAR-10 from ``source`` into ``out_dir`` and return the manifest.

    ``source`` is an archive, a ``cifar-10-batches-py/`` folder or its parent; None downloads the official
    archive into ``cache_dir`` (default ``.local/cache``) from ``url`` (default ``$CIFAR10_URL`` or the
    official URL). If ``out_dir`` already holds a complete dataset made from the same source, nothing is
    done and its manifest is returned, unless ``force``. Raises :class:`PrepError`.
    """
    return prepare_dataset(source, out_dir, force=force, cache_dir=cache_dir, url=url).manifest


def prepare_dataset(
    source: Path | None,
    out_dir: Path,
    *,
    force: bool = False,
    cache_dir: Path | None = None,
    url: str | None = None,
) -> PreparedDataset:
    """:func:`prepare`, also saying whether it rebuilt and how long it took (for the CLI)."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    problem = stage.describe_unreplaceable(out_dir)
    if problem:
        raise PrepError(f"{problem} (choose a new or empty output folder)")
    if source is None:
        source = download.fetch_archive(download.resolve_url(url), Path(cache_dir or DEFAULT_CACHE_DIR))
    reader = open_source(Path(source))

    existing = None if force else manifest.read_complete_manifest(out_dir)
    if existing is not None:
        source_sha256 = reader.sha256()
        if existing["source"]["sha256"] == source_sha256:
            logger.info("dataset_up_to_date", extra={"out_dir": str(out_dir)})
            return PreparedDataset(existing, out_dir, rebuilt=False, duration_s=time.monotonic() - started)
    else:
        source_sha256 = None

    decoded = decode_source(reader, expected_sha256=source_sha256)
    result = write_dataset(decoded, out_dir)
    duration_s = time.monotonic() - started
    logger.info(
        "dataset_prepared",
        extra={"out_dir": str(out_dir), "duration_s": round(duration_s, 3),
                          "train_images": len(decoded.train_labels), "test_images": len(decoded.test_labels)},
    )  # fmt: skip
    return PreparedDataset(result, out_dir, rebuilt=True, duration_s=duration_s)


# --- Sources: where the pickles come from -------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte read through it (and reports each read's size)."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], object] | None = None) -> None:
        self._raw = raw
        self._on_read = on_read
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self.digest.update(memoryview(buffer)[:count])
            if self._on_read:
                self._on_read(count)
        return count or 0


def _progress(total: int, description: str) -> tqdm.tqdm:
    """A byte progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=None, leave=False)


class ArchiveSource:
    """A tar archive, compressed with gzip, xz or bzip2 or not at all (detected from its first bytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.read_sha256: str | None = None  # of every byte members() read; set once it is exhausted

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with (
            open(self.path, "rb") as handle,
            _progress(self.path.stat().st_size, f"hashing {self.name}") as bar,
        ):
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                bar.update(len(chunk))
        return digest.hexdigest()

    def members(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``(member path, contents)`` for each member named like a CIFAR-10 file, in archive order.

        The whole file is read exactly once; after the last member the stream is read to its end, so the
        compression's own checksum is verified and :attr:`read_sha256` covers every byte.
        """
        self.read_sha256 = None
        with (
            open(self.path, "rb") as raw_file,
            _progress(self.path.stat().st_size, f"decoding {self.name}") as bar,
        ):
            hashing = _HashingReader(raw_file, on_read=bar.update)
            buffered = io.BufferedReader(hashing, buffer_size=CHUNK_BYTES)
            stream = self._decompressed(buffered)
            try:
                # Opened apart from the `with` below, to tell "not a tar" from "truncated" errors.
                tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115
            except EOFError as exc:
                raise PrepError(f"{self.path}: truncated archive ({exc})") from exc
            except _ARCHIVE_READ_ERRORS as exc:
                raise PrepError(
                    f"{self.path}: not a tar archive ({exc}); expected a .tar.gz or .tar.xz of CIFAR-10, "
                    f"or a {SOURCE_FOLDER}/ folder"
                ) from exc
            try:
                with tar:
                    for member in tar:
                        if Path(member.name).name not in KNOWN_FILES:
                            continue
                        if not member.isfile():
                            raise PrepError(f"{self.path}: {member.name} is not a regular file")
                        yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]
                while stream.read(CHUNK_BYTES):  # the tar end blocks, then the compressor's trailer
                    pass
                while buffered.read(CHUNK_BYTES):  # anything after the compressed stream
                    pass
            except _ARCHIVE_READ_ERRORS as exc:
                raise PrepError(f"{self.path}: truncated or corrupt archive ({exc})") from exc
            self.read_sha256 = hashing.digest.hexdigest()

    def _decompressed(self, buffered: io.BufferedReader) -> IO[bytes]:
        magic = buffered.peek(6)[:6]
        if magic.startswith(b"\x1f\x8b"):
            return gzip.GzipFile(fileobj=buffered, mode="rb")
        if magic.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMAFile(buffered, mode="rb")
        if magic.startswith(b"BZh"):
            return bz2.BZ2File(buffered, mode="rb")
        return buffered  # an uncompressed tar, or not a tar at all (tarfile will say)


class FolderSource:
    """An extracted ``cifar-10-batches-py/`` folder; its sha256 is that of the files concatenated in
    :data:`KNOWN_FILES` order (``batches.meta`` only if present)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory
        self.name = directory.name
        self.read_sha256: str | None = None  # of the files members() read; set once it is exhausted
        missing = [name for name in BATCH_NAMES if not (directory / name).is_file()]
        if missing:
            raise PrepError(f"{directory}: missing batch file(s) {', '.join(missing)}")
        self.files = [directory / name for name in KNOWN_FILES if (directory / name).is_file()]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for path in self.files:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
        return digest.hexdigest()

    def members(self) -> Iterator[tuple[str, bytes]]:
        digest = hashlib.sha256()
        total = sum(path.stat().st_size for path in self.files)
        with _progress(total, f"decoding {self.name}") as bar:
            for path in self.files:
                try:
                    payload = path.read_bytes()
                except OSError as exc:
                    raise PrepError(f"{path}: cannot read ({exc})") from exc
                digest.update(payload)
                bar.update(len(payload))
                yield path.name, payload
                del payload  # let the batch be freed before the next file is read
        self.read_sha256 = digest.hexdigest()


Source = ArchiveSource | FolderSource


def open_source(path: Path) -> Source:
    """Classify ``path``: an archive file, a batches folder, or a folder holding ``cifar-10-batches-py/``."""
    if path.is_file():
        return ArchiveSource(path)
    if path.is_dir():
        if any((path / name).exists() for name in KNOWN_FILES):
            return FolderSource(path)
        if (path / SOURCE_FOLDER).is_dir():
            return FolderSource(path / SOURCE_FOLDER)
        raise PrepError(
            f"{path}: folder holds no CIFAR-10 batches (expected {', '.join(BATCH_NAMES)} "
            f"or a {SOURCE_FOLDER}/ subfolder)"
        )
    raise PrepError(f"{path}: no such file or folder")


# --- Decoding and validation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # (n, 32, 32, 3) uint8, C-contiguous
    labels: np.ndarray  # (n,) uint8, values 0-9


@dataclass(frozen=True)
class DecodedSource:
    name: str
    sha256: str
    label_names: tuple[str, ...]
    train: tuple[Batch, ...]  # data_batch_1 … data_batch_5, in that order
    test: Batch

    @property
    def train_labels(self) -> np.ndarray:
        return np.concatenate([batch.labels for batch in self.train])

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels


# NumPy 1 pickles name numpy.core.multiarray, NumPy 2 numpy._core.multiarray; asking an array and a
# scalar how they pickle finds the functions without importing the deprecated path.
_RECONSTRUCT_ARRAY = np.empty(0).__reduce__()[0]
_RECONSTRUCT_SCALAR = np.uint8(0).__reduce__()[0]
# Every global a CIFAR-10 pickle (Python 2 or 3, NumPy 1 or 2) refers to; anything else is refused.
ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
    ("numpy.core.multiarray", "scalar"): _RECONSTRUCT_SCALAR,
    ("numpy._core.multiarray", "scalar"): _RECONSTRUCT_SCALAR,
}


class _BatchUnpickler(pickle.Unpickler):
    """Loads a CIFAR-10 batch, so that a hostile archive cannot make the unpickler run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def load_pickle(payload: bytes, where: str) -> dict[str, Any]:
    """Unpickle a batch or meta file into a dict with str keys (CIFAR-10 pickles use bytes keys)."""
    try:
        loaded = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise PrepError(f"{where}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, dict):
        raise PrepError(f"{where}: expected a pickled dict, got {type(loaded).__name__}")
    return {
        key.decode("latin-1") if isinstance(key, bytes) else str(key): value for key, value in loaded.items()
    }


def decode_batch(payload: bytes, where: str) -> Batch:
    """Validate one pickled batch and convert its channel-planar rows to NHWC images."""
    fields = load_pickle(payload, where)
    missing = [key for key in ("data", "labels") if key not in fields]
    if missing:
        raise PrepError(
            f"{where}: pickle has no {' or '.join(repr(key) for key in missing)} key (keys: {sorted(fields)})"
        )
    data, raw_labels = fields["data"], fields["labels"]

    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        found = f"{data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise PrepError(f"{where}: 'data' must be a uint8 array, got {found}")
    try:
        labels = np.asarray(raw_labels)
    except (ValueError, TypeError) as exc:
        raise PrepError(f"{where}: 'labels' is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0:
        raise PrepError(
            f"{where}: 'labels' must be a non-empty list of integers, got {labels.dtype} {labels.shape}"
        )
    count = labels.shape[0]
    if data.shape != (count, IMAGE_BYTES):
        raise PrepError(
            f"{where}: 'data' has shape {data.shape}, expected ({count}, {IMAGE_BYTES}): "
            f"one row of {IMAGE_BYTES} bytes (32 x 32 pixels x 3 channels) per label"
        )
    out_of_range = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise PrepError(
            f"{where}: {out_of_range.size} label(s) outside 0-{NUM_CLASSES - 1}, "
            f"first labels[{first}] = {labels[first]}"
        )
    # Row = 1024 red, 1024 green, 1024 blue values -> (n, channel, row, col) -> (n, row, col, channel).
    images = np.ascontiguousarray(data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1))
    return Batch(images=images, labels=labels.astype(np.uint8))


def decode_label_names(payload: bytes, where: str) -> tuple[str, ...]:
    fields = load_pickle(payload, where)
    names = fields.get("label_names")
    if (
        not isinstance(names, list)
        or len(names) != NUM_CLASSES
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise PrepError(f"{where}: 'label_names' must be a list of {NUM_CLASSES} names, got {names!r:.200}")
    return tuple(name.decode() if isinstance(name, bytes) else name for name in names)


def decode_source(reader: Source, *, expected_sha256: str | None = None) -> DecodedSource:
    """Read every batch from ``reader`` once, validate it, and check that each appears exactly once."""
    batches: dict[str, Batch] = {}
    label_names: tuple[str, ...] | None = None
    seen: dict[str, str] = {}  # base name -> member path, to report duplicates
    for member_path, payload in reader.members():
        base = Path(member_path).name
        where = f"{reader.path}: {member_path}"
        if base in seen:
            places = seen[base] if seen[base] == member_path else f"{seen[base]} and {member_path}"
            raise PrepError(f"{reader.path}: {base} appears twice ({places}); expected each batch once")
        seen[base] = member_path
        if base == META_FILE:
            label_names = decode_label_names(payload, where)
        else:
            batches[base] = decode_batch(payload, where)
        del payload
    missing = [name for name in BATCH_NAMES if name not in batches]
    if missing:
        raise PrepError(f"{reader.path}: missing batch file(s) {', '.join(missing)}")
    if expected_sha256 is not None and reader.read_sha256 != expected_sha256:
        raise PrepError(f"{reader.path}: changed while it was being read; run again")
    return DecodedSource(
        name=reader.name,
        sha256=reader.read_sha256,  # type: ignore[arg-type]  # set once members() is exhausted
        label_names=label_names or LABEL_NAMES,
        train=tuple(batches[name] for name in TRAIN_BATCHES),
        test=batches[TEST_BATCH],
    )


# --- Writing ------------------------------------------------------------------------------------------


def write_npy(path: Path, parts: Sequence[np.ndarray]) -> dict[str, Any]:
    """Write the concatenation of ``parts`` (same dtype and trailing shape) as one ``.npy`` file, part by
    part, without building the concatenated array; fsync it. Returns its manifest entry."""
    dtype = parts[0].dtype
    shape = (sum(len(part) for part in parts), *parts[0].shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    digest = hashlib.sha256()
    with open(path, "xb") as handle:
        header_buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(header_buffer, header)
        for block in (
            header_buffer.getbuffer(),
            *(memoryview(np.ascontiguousarray(p)).cast("B") for p in parts),
        ):
            handle.write(block)
            digest.update(block)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest.array_entry(path.stem, shape, dtype.name, digest.hexdigest())


def write_dataset(decoded: DecodedSource, out_dir: Path) -> dict[str, Any]:
    """Write the four arrays and the manifest into a temporary folder, then swap it in for ``out_dir``."""
    train_labels, test_labels = decoded.train_labels, decoded.test_labels
    try:
        with stage.temporary_directory_beside(out_dir) as build_dir:
            arrays = {
                "train_x": write_npy(build_dir / "train_x.npy", [batch.images for batch in decoded.train]),
                "train_y": write_npy(build_dir / "train_y.npy", [train_labels]),
                "test_x": write_npy(build_dir / "test_x.npy", [decoded.test.images]),
                "test_y": write_npy(build_dir / "test_y.npy", [test_labels]),
            }
            result = manifest.build_manifest(
                label_names=decoded.label_names,
                arrays=arrays,
                class_counts={
                    "train": np.bincount(train_labels, minlength=NUM_CLASSES).tolist(),
                    "test": np.bincount(test_labels, minlength=NUM_CLASSES).tolist(),
                },
                source_name=decoded.name,
                source_sha256=decoded.sha256,
            )
            stage.write_file_synced(build_dir / manifest.MANIFEST_FILE, manifest.encode_manifest(result))
            stage.fsync_directory(build_dir)
            stage.replace_directory(build_dir, out_dir)
    except OSError as exc:
        raise PrepError(
            f"{out_dir}: could not write the dataset ({exc}); the previous one is unchanged"
        ) from exc
    return result
