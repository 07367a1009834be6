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
  batch uses, so a hostile archive cannot run code. Arrays are rebuilt only as NumPy's own pickles do it
  (``_reconstruct`` of an empty ``ndarray``, then its state with the raw bytes, which must match the shape),
  so a pickle cannot call ``ndarray`` or ``dtype`` itself to conjure memory it does not carry.
- Input is bounded before it is read: a member or file over :data:`MAX_MEMBER_BYTES` (64 MiB; a batch is
  30-45 MB) or a pickle of more than :data:`MAX_PICKLE_OPCODES` opcodes is refused, and ``labels`` must be a
  list of at most :data:`MAX_BATCH_IMAGES` ints before anything is converted, so a small archive that
  claims or expands to a huge batch fails with :class:`PrepError` instead of exhausting memory.
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
import math
import os
import pickle
import pickletools
import re
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

MAX_BATCH_IMAGES = 10_000  # every official batch holds exactly this many
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a batch pickle is about 30 MB (Python 2) or 45 MB (Python 3 protocol 2)
MAX_PICKLE_OPCODES = 250_000  # a batch pickle has about 90,000 (two or three per image)

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
                        _check_size(f"{self.path}: {member.name}", member.size)
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
                    _check_size(str(path), path.stat().st_size)
                    payload = path.read_bytes()
                except OSError as exc:
                    raise PrepError(f"{path}: cannot read ({exc})") from exc
                digest.update(payload)
                bar.update(len(payload))
                yield path.name, payload
                del payload  # let the batch be freed before the next file is read
        self.read_sha256 = digest.hexdigest()


Source = ArchiveSource | FolderSource


def _check_size(where: str, size_bytes: int) -> None:
    """Refuse a file too big to be a CIFAR-10 batch before reading it."""
    if size_bytes > MAX_MEMBER_BYTES:
        raise PrepError(
            f"{where}: {size_bytes} bytes, more than the {MAX_MEMBER_BYTES} (64 MiB) a CIFAR-10 batch can "
            f"take (each holds {MAX_BATCH_IMAGES} images, about 30 MB)"
        )


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


# How NumPy pickles an array (protocol 2, NumPy 1 or 2, Python 2 or 3):
#   _reconstruct(numpy.ndarray, (0,), b"b")                      an empty array, then BUILD with its state
#   (1, shape, dtype, is_fortran, raw bytes)                     -> ndarray.__setstate__
# and a dtype: numpy.dtype("u1", False, True), then BUILD with (3, "|", None, None, None, -1, -1, 0).
# The unpickler hands out stand-ins for these globals, which accept exactly that and nothing else: numpy.ndarray
# cannot be called, only named as _reconstruct's subtype; the array is made from the raw bytes the pickle
# carries (whose length must match shape x itemsize), never from a shape alone; a dtype is a plain bool, int,
# uint or float one with no fields, subarray or flags from the pickle.
_DTYPE_CODE = "[biuf][1248]"
_DTYPE_STATE_TAIL = (None, None, None, -1, -1, 0)  # subarray, names, fields, elsize, alignment, flags
_BYTE_ORDERS = ("|", "<", ">", "=")
MAX_ARRAY_DIMS = 4


class _PickledArrayType:
    """What ``numpy.ndarray`` resolves to: only a marker for :func:`_reconstruct_array`."""

    def __call__(self, *args: Any) -> None:
        raise pickle.UnpicklingError(
            f"refusing to call numpy.ndarray{args!r:.100}; arrays are only rebuilt from the bytes they carry"
        )

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _PickledArrayType()


class _PickledDtype:
    """A ``numpy.dtype`` being unpickled; :attr:`dtype` is the NumPy dtype once its state is checked."""

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        name = code.decode("latin-1") if isinstance(code, bytes) else code
        if not isinstance(name, str) or not re.fullmatch(_DTYPE_CODE, name) or (align, copy) != (False, True):
            raise pickle.UnpicklingError(
                f"refusing numpy.dtype{(code, align, copy)!r:.100}; expected a bool, int, uint or float code"
            )
        self.dtype = np.dtype(name)

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 8 and isinstance(state[1], bytes):
            state = (state[0], state[1].decode("latin-1"), *state[2:])  # Python 2 str, loaded as bytes
        if (
            not isinstance(state, tuple)
            or len(state) != 8
            or state[0] != 3
            or state[1] not in _BYTE_ORDERS
            or state[2:] != _DTYPE_STATE_TAIL
        ):
            raise pickle.UnpicklingError(f"refusing dtype state {state!r:.100}; expected (3, '|', None, ...)")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _PickledArray:
    """An ``ndarray`` being unpickled; :attr:`array` is set from its state (shape, dtype and raw bytes)."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise pickle.UnpicklingError(
                f"refusing array state {state!r:.100}; expected (1, shape, dtype, fortran, bytes)"
            )
        _, shape, dtype, is_fortran, raw = state
        if (
            not isinstance(shape, tuple)
            or len(shape) > MAX_ARRAY_DIMS
            or not all(type(size) is int and size >= 0 for size in shape)
        ):
            raise pickle.UnpicklingError(f"refusing array shape {shape!r:.100}")
        if not isinstance(dtype, _PickledDtype) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError(
                f"refusing array state with a {type(dtype).__name__} dtype and {type(raw).__name__} data"
            )
        needed = math.prod(shape) * dtype.dtype.itemsize
        if len(raw) != needed:
            raise pickle.UnpicklingError(
                f"array of shape {shape} and dtype {dtype.dtype} needs {needed} bytes, the pickle has {len(raw)}"
            )
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if is_fortran else "C")


def _reconstruct_array(subtype: object, shape: object, code: object) -> _PickledArray:
    if subtype is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
        raise pickle.UnpicklingError(
            f"refusing _reconstruct{(subtype, shape, code)!r:.100}; expected (numpy.ndarray, (0,), b'b')"
        )
    return _PickledArray()


def _reconstruct_scalar(dtype: object, raw: object) -> Any:
    if not isinstance(dtype, _PickledDtype) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError(f"refusing numpy scalar{(dtype, raw)!r:.100}")
    return np.frombuffer(raw, dtype.dtype)[0]


def _encode_latin1(text: object, encoding: object) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode{(text, encoding)!r:.100}")
    return codecs.encode(text, "latin-1")


# Every global a CIFAR-10 pickle (Python 2 or 3, NumPy 1 or 2) refers to; anything else is refused.
# NumPy 1 pickles name numpy.core.multiarray, NumPy 2 numpy._core.multiarray.
ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _encode_latin1,  # how Python 3 writes bytes at protocol 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _PickledDtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.multiarray", "scalar"): _reconstruct_scalar,
    ("numpy._core.multiarray", "scalar"): _reconstruct_scalar,
}


class _BatchUnpickler(pickle.Unpickler):
    """Loads a CIFAR-10 batch, so that a hostile archive cannot make the unpickler run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _count_opcodes(payload: bytes, limit: int) -> None:
    """Refuse a pickle of more than ``limit`` opcodes before it runs: each can add an object, so a small
    payload of repeated appends could otherwise build a list of millions."""
    for count, _ in enumerate(pickletools.genops(payload), start=1):
        if count > limit:
            raise pickle.UnpicklingError(f"more than {limit} opcodes; a CIFAR-10 batch has about 90,000")


def _unwrap(value: Any) -> Any:
    if isinstance(value, _PickledArray):
        if value.array is None:
            raise pickle.UnpicklingError("an array was never given its state")
        return value.array
    if isinstance(value, _PickledDtype):
        return value.dtype
    return value


def load_pickle(payload: bytes, where: str) -> dict[str, Any]:
    """Unpickle a batch or meta file into a dict with str keys (CIFAR-10 pickles use bytes keys)."""
    try:
        _count_opcodes(payload, MAX_PICKLE_OPCODES)
        loaded = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
        if not isinstance(loaded, dict):
            raise PrepError(f"{where}: expected a pickled dict, got {type(loaded).__name__}")
        return {
            key.decode("latin-1") if isinstance(key, bytes) else str(key): _unwrap(value)
            for key, value in loaded.items()
        }
    except PrepError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise PrepError(f"{where}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc


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
    labels = _check_labels(raw_labels, where)
    count = labels.shape[0]
    if data.shape != (count, IMAGE_BYTES):
        raise PrepError(
            f"{where}: 'data' has shape {data.shape}, expected ({count}, {IMAGE_BYTES}): "
            f"one row of {IMAGE_BYTES} bytes (32 x 32 pixels x 3 channels) per label"
        )
    # Row = 1024 red, 1024 green, 1024 blue values -> (n, channel, row, col) -> (n, row, col, channel).
    images = np.ascontiguousarray(data.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1))
    return Batch(images=images, labels=labels.astype(np.uint8))


def _check_labels(raw_labels: object, where: str) -> np.ndarray:
    """``labels`` as uint8, once it proved a list of 1 to 10,000 ints (not bools), each 0-9."""
    if not isinstance(raw_labels, list) or not 0 < len(raw_labels) <= MAX_BATCH_IMAGES:
        found = f"a list of {len(raw_labels)}" if isinstance(raw_labels, list) else type(raw_labels).__name__
        raise PrepError(
            f"{where}: 'labels' must be a list of 1 to {MAX_BATCH_IMAGES} integers, got {found:.100}"
        )
    for index, label in enumerate(raw_labels):
        if not isinstance(label, int | np.integer) or isinstance(label, bool):
            raise PrepError(
                f"{where}: 'labels' must hold integers, got labels[{index}] = {label!r:.100} "
                f"({type(label).__name__})"
            )
    out_of_range = [index for index, label in enumerate(raw_labels) if not 0 <= label < NUM_CLASSES]
    if out_of_range:
        first = out_of_range[0]
        raise PrepError(
            f"{where}: {len(out_of_range)} label(s) outside 0-{NUM_CLASSES - 1}, "
            f"first labels[{first}] = {raw_labels[first]}"
        )
    return np.array(raw_labels, dtype=np.uint8)


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
