"""Staging function: copy a prepared dataset from S3 into EFS, verify it, and swap it into place atomically.

Deployed as a zip function (``CodeUri: src/prep/``, ``Handler: stage.lambda_handler``) that runs in the VPC
with the file system mounted at ``EFS_ROOT`` (default ``/mnt/efs``). In the zip this file is a top-level
module, so it imports only the standard library and boto3; locally it is ``prep.stage``. Event::

    {"stage": {"bucket": "my-bucket", "prefix": "datasets/cifar10", "dataset": "cifar10"}}

Steps, each failing with a :class:`StagingError` that names the object or file and the problem:

1. Read ``s3://bucket/prefix/manifest.json`` and check its structure.
2. For each array: ``head_object`` (it must exist), then read its ``.npy`` header with a ranged GET; the
   header must agree with the manifest's shape and dtype, and the object's size must be exactly the header
   plus ``prod(shape) * itemsize`` bytes. Nothing has been written yet.
3. Stream each object into ``<EFS_ROOT>/datasets/.tmp-<dataset>-<random>/`` while hashing it; the bytes
   received must match ``head_object``'s size (and ETag) and the sha256 must match the manifest.
4. Write the manifest last, fsync, and rename the folder to ``<EFS_ROOT>/datasets/<dataset>/``.

A dataset that an active run trains on is never replaced by different data (a run pins its dataset's manifest
digest and would fail): with ``STATUS_TABLE`` set, step 1 also asks the status table's ``ActiveRuns`` index which
active runs use the dataset, and refuses if any does and the new manifest differs from the one on EFS. Staging
the same manifest again is always allowed (it changes no byte a run reads).

Any failure removes the temporary folder and re-raises, so Lambda records a failure and the previous
dataset stays as it was. The handler returns ``{"dataset", "directory", "files", "bytes", "seconds"}``.

This module also owns what the dataset folder looks like (:data:`ARRAY_NAMES`, :data:`MANIFEST_FILE`,
:data:`FORMAT_VERSION`) and the atomic-folder helpers (:func:`temporary_directory_beside`,
:func:`replace_directory`, ...). ``prep.cifar`` reuses both: they live here because this module has to stay
self-contained in the Lambda zip, and one copy cannot drift from another. The trainer, a separate image, keeps
its reader's side in ``trainer.efs_layout``; ``tests/unit/test_dataset_contract.py`` checks that the two agree.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

logger = logging.getLogger(__name__)

# --- The dataset folder -------------------------------------------------------------------------------

EFS_ROOT_ENV = "EFS_ROOT"
STATUS_TABLE_ENV = "STATUS_TABLE"
DEFAULT_EFS_ROOT = "/mnt/efs"
# The status table's side of the contract (trainer.coordination owns it; the zip cannot import the trainer and
# tests/unit/test_dataset_contract.py checks that these agree): the sparse index of active runs and the run
# item's attributes read here.
ACTIVE_INDEX = "ActiveRuns"
ACTIVE_ATTRIBUTE = "active"
CONFIG_ATTRIBUTE = "config"
DATASETS_DIR = "datasets"  # <EFS_ROOT>/datasets/<dataset>/
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")  # each stored as <name>.npy

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# S3's own rule for bucket names (3-63 characters; lower case, digits, dots and hyphens).
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PREFIX_CHARS = 900  # S3 keys are at most 1,024 bytes; leave room for "/train_x.npy"

TMP_PREFIX = ".tmp-"  # <parent>/.tmp-<name>-<random>/ : a folder being built
OLD_PREFIX = ".old-"  # <parent>/.old-<name>-<random>/ : the previous folder during a replace

CHUNK_BYTES = 8 * 1024 * 1024
NPY_MAGIC = b"\x93NUMPY"
NPY_PREFIX_BYTES = 65_536 + 12  # enough for any version 1 header (its length field is 16 bits)
# dtype names a manifest may use, with the .npy descriptor and item size they imply.
NPY_DTYPES = {"uint8": ("|u1", 1), "int8": ("|i1", 1), "int32": ("<i4", 4), "int64": ("<i8", 8),
              "float16": ("<f2", 2), "float32": ("<f4", 4), "float64": ("<f8", 8)}  # fmt: skip


class StagingError(Exception):
    """The event, an S3 object or the EFS copy is not what the manifest promises; nothing was replaced."""


@dataclass(frozen=True)
class StageRequest:
    """A validated ``{"stage": {...}}`` event."""

    bucket: str
    prefix: str  # without leading or trailing "/"; "" means the bucket's top level
    dataset: str  # folder name under <EFS_ROOT>/datasets/

    def key(self, file_name: str) -> str:
        return f"{self.prefix}/{file_name}" if self.prefix else file_name

    def uri(self, file_name: str) -> str:
        return f"s3://{self.bucket}/{self.key(file_name)}"


@dataclass(frozen=True)
class ArrayEntry:
    """One entry of the manifest's ``arrays`` section."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str


@dataclass(frozen=True)
class RemoteArray:
    """An array object checked against the manifest (steps 1-2), ready to download."""

    entry: ArrayEntry
    size_bytes: int
    etag: str


# --- Lambda entry point -------------------------------------------------------------------------------


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """Parse the event, stage the dataset, return the summary; failures are logged and re-raised."""
    logging.getLogger().setLevel(
        os.environ.get("LOG_LEVEL", "INFO")
    )  # Lambda's root logger starts at WARNING
    efs_root = Path(os.environ.get(EFS_ROOT_ENV, DEFAULT_EFS_ROOT))
    table_name = os.environ.get(STATUS_TABLE_ENV)
    try:
        request = parse_stage_event(event)
        return stage_dataset(
            request,
            s3_client=boto3.client("s3"),
            efs_root=efs_root,
            status_table=boto3.resource("dynamodb").Table(table_name) if table_name else None,
        )
    except StagingError as exc:
        logger.error("staging_failed", extra={"error": str(exc)})
        raise
    except Exception:
        logger.exception("staging_failed_unexpectedly")
        raise


def parse_stage_event(event: Any) -> StageRequest:
    """Check the event's shape and every value before any of them becomes an S3 key or a path."""
    if not isinstance(event, Mapping) or not isinstance(event.get("stage"), Mapping):
        raise StagingError(
            f'event must be {{"stage": {{"bucket", "prefix", "dataset"}}}}, got {event!r:.200}'
        )
    body = event["stage"]
    expected = {"bucket", "prefix", "dataset"}
    if set(body) != expected:
        raise StagingError(f"stage event keys must be {sorted(expected)}, got {sorted(map(str, body))}")
    bucket, prefix, dataset = body["bucket"], body["prefix"], body["dataset"]
    if not isinstance(bucket, str) or not BUCKET_PATTERN.fullmatch(bucket):
        raise StagingError(
            f"stage.bucket must be an S3 bucket name ([a-z0-9.-], 3-63 characters), got {bucket!r}"
        )
    if not isinstance(dataset, str) or not NAME_PATTERN.fullmatch(dataset):
        raise StagingError(f"stage.dataset must match [A-Za-z0-9_-]{{1,64}}, got {dataset!r}")
    return StageRequest(bucket=bucket, prefix=check_prefix(prefix), dataset=dataset)


def check_prefix(prefix: Any) -> str:
    """Return an S3 key prefix without surrounding slashes; reject ``..``, control characters, long values."""
    if not isinstance(prefix, str):
        raise StagingError(f"S3 prefix must be a string, got {prefix!r}")
    if ".." in prefix or len(prefix) > MAX_PREFIX_CHARS or any(ord(char) < 32 for char in prefix):
        raise StagingError(
            f"S3 prefix must have no '..' or control characters and at most {MAX_PREFIX_CHARS} characters, "
            f"got {prefix!r:.120}"
        )
    return prefix.strip("/")


# --- Staging ------------------------------------------------------------------------------------------


def stage_dataset(
    request: StageRequest, *, s3_client: Any, efs_root: Path, status_table: Any = None
) -> dict[str, Any]:
    """Copy ``s3://bucket/prefix/{manifest.json, *.npy}`` to ``<efs_root>/datasets/<dataset>/`` (see module doc).
    ``status_table``: the status table (a boto3 ``Table``) to ask which active runs use the dataset."""
    started = time.monotonic()
    target = efs_root / DATASETS_DIR / request.dataset
    problem = describe_unreplaceable(target)
    if problem:
        raise StagingError(problem)

    manifest_bytes = _read_object(s3_client, request, MANIFEST_FILE)
    entries = parse_manifest(manifest_bytes, request.uri(MANIFEST_FILE))
    if status_table is not None and _manifest_on_efs(target) not in (None, manifest_bytes):
        users = active_runs_using(status_table, request.dataset)
        if users:
            raise StagingError(
                f"dataset {request.dataset!r} is in use by active run(s) {users}; they would fail on different "
                "data. Stage under another dataset name, or wait until they end (or stop them)"
            )
    remote_arrays = [_inspect_array(s3_client, request, entries[name]) for name in ARRAY_NAMES]

    with temporary_directory_beside(target) as build_dir:
        for remote in remote_arrays:
            _download_verified(s3_client, request, remote, build_dir / remote.entry.file)
        write_file_synced(build_dir / MANIFEST_FILE, manifest_bytes)
        fsync_directory(build_dir)
        replace_directory(build_dir, target)

    summary = {
        "dataset": request.dataset,
        "directory": str(target),
        "files": [remote.entry.file for remote in remote_arrays] + [MANIFEST_FILE],
        "bytes": sum(remote.size_bytes for remote in remote_arrays) + len(manifest_bytes),
        "seconds": round(time.monotonic() - started, 3),
    }
    logger.info("dataset_staged", extra=summary)
    return summary


def _manifest_on_efs(target: Path) -> bytes | None:
    try:
        return (target / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        return None


def active_runs_using(status_table: Any, dataset: str) -> list[str]:
    """Ids of the active runs whose configuration names ``dataset`` (from the sparse ``ActiveRuns`` index)."""
    users: list[str] = []
    kwargs: dict[str, Any] = {
        "IndexName": ACTIVE_INDEX,
        "KeyConditionExpression": "#active = :one",
        "ExpressionAttributeNames": {"#active": ACTIVE_ATTRIBUTE},
        "ExpressionAttributeValues": {":one": "1"},
    }
    while True:
        page = status_table.query(**kwargs)
        for key in page.get("Items", []):
            item = status_table.get_item(Key={"pk": key["pk"], "sk": key["sk"]}, ConsistentRead=True).get(
                "Item"
            )
            if not item or item.get(ACTIVE_ATTRIBUTE) != "1":
                continue
            try:
                used = json.loads(item.get(CONFIG_ATTRIBUTE, "{}")).get("dataset")
            except (TypeError, ValueError, AttributeError):
                used = None
            if used in (dataset, None):  # an unreadable configuration counts as a user: never guess
                users.append(str(key["pk"]).removeprefix("RUN#"))
        if "LastEvaluatedKey" not in page:
            return sorted(users)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def parse_manifest(raw: bytes, where: str) -> dict[str, ArrayEntry]:
    """Check a manifest's format version and ``arrays`` section; return the entries by array name."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StagingError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise StagingError(f"{where}: format_version must be {FORMAT_VERSION}, got {version!r}")
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict) or set(ARRAY_NAMES) - set(arrays):
        found = sorted(arrays) if isinstance(arrays, dict) else arrays
        raise StagingError(f"{where}: 'arrays' must hold {list(ARRAY_NAMES)}, got {found!r:.200}")
    return {name: _parse_array_entry(name, arrays[name], where) for name in ARRAY_NAMES}


def _parse_array_entry(name: str, raw: Any, where: str) -> ArrayEntry:
    problem = None
    if not isinstance(raw, dict):
        problem = f"must be an object, got {raw!r:.100}"
    elif raw.get("file") != f"{name}.npy":
        problem = f"file must be {name + '.npy'!r}, got {raw.get('file')!r:.100}"
    elif not isinstance(raw.get("shape"), list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in raw["shape"]
    ):
        problem = f"shape must be a list of non-negative integers, got {raw.get('shape')!r:.100}"
    elif raw.get("dtype") not in NPY_DTYPES:
        problem = f"dtype must be one of {sorted(NPY_DTYPES)}, got {raw.get('dtype')!r:.100}"
    elif not isinstance(raw.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        problem = f"sha256 must be 64 lower-case hex digits, got {raw.get('sha256')!r:.100}"
    if problem:
        raise StagingError(f"{where}: arrays.{name}.{problem}")
    return ArrayEntry(name, raw["file"], tuple(raw["shape"]), raw["dtype"], raw["sha256"])


def _inspect_array(s3_client: Any, request: StageRequest, entry: ArrayEntry) -> RemoteArray:
    """Steps 2: the object exists, its header matches the manifest, and its size is exactly what it implies."""
    uri = request.uri(entry.file)
    head = _s3_call(s3_client, "head_object", uri, Bucket=request.bucket, Key=request.key(entry.file))
    size_bytes, etag = int(head["ContentLength"]), head["ETag"]
    if size_bytes < len(NPY_MAGIC) + 4:
        raise StagingError(f"{uri}: {size_bytes} bytes, too small for a .npy file (wrong size)")
    response = _s3_call(
        s3_client,
        "get_object",
        uri,
        Bucket=request.bucket,
        Key=request.key(entry.file),
        Range=f"bytes=0-{NPY_PREFIX_BYTES - 1}",
        IfMatch=etag,
    )
    header = parse_npy_header(response["Body"].read(), uri)
    descriptor, item_size = NPY_DTYPES[entry.dtype]
    if header.descr != descriptor or header.fortran_order or header.shape != entry.shape:
        raise StagingError(
            f"{uri}: header says shape {list(header.shape)} dtype {header.descr!r}, "
            f"the manifest says shape {list(entry.shape)} dtype {entry.dtype} ({descriptor!r})"
        )
    expected_bytes = header.header_bytes + math.prod(entry.shape) * item_size
    if size_bytes != expected_bytes:
        raise StagingError(
            f"{uri}: {size_bytes} bytes, expected {expected_bytes} for shape {list(entry.shape)} "
            f"{entry.dtype} (wrong size: truncated or padded upload?)"
        )
    return RemoteArray(entry=entry, size_bytes=size_bytes, etag=etag)


def _download_verified(s3_client: Any, request: StageRequest, remote: RemoteArray, path: Path) -> None:
    """Step 3: stream the object to ``path`` while hashing; check size and sha256; fsync."""
    uri = request.uri(remote.entry.file)
    started = time.monotonic()
    key = request.key(remote.entry.file)
    response = _s3_call(s3_client, "get_object", uri, Bucket=request.bucket, Key=key, IfMatch=remote.etag)
    digest = hashlib.sha256()
    received = 0
    try:
        with open(path, "xb") as handle:
            for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise StagingError(f"{path}: could not write {uri} to EFS ({exc})") from exc
    if received != remote.size_bytes:
        raise StagingError(
            f"{uri}: received {received} bytes, head_object said {remote.size_bytes} (transfer cut short?)"
        )
    if digest.hexdigest() != remote.entry.sha256:
        raise StagingError(
            f"{path}: sha256 {digest.hexdigest()} does not match the manifest's {remote.entry.sha256} ({uri})"
        )
    logger.info(
        "object_staged",
        extra={"key": key, "size_bytes": received,
               "duration_s": round(time.monotonic() - started, 3)},
    )  # fmt: skip


def _read_object(s3_client: Any, request: StageRequest, file_name: str) -> bytes:
    uri = request.uri(file_name)
    response = _s3_call(s3_client, "get_object", uri, Bucket=request.bucket, Key=request.key(file_name))
    return response["Body"].read()


def _s3_call(s3_client: Any, operation: str, uri: str, **kwargs: Any) -> Any:
    """Call ``s3_client.<operation>``; turn its errors into a :class:`StagingError` that names the object."""
    try:
        return getattr(s3_client, operation)(**kwargs)
    except s3_client.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in {"404", "NoSuchKey", "NotFound"}:
            raise StagingError(f"{uri}: not found (was the dataset uploaded to this prefix?)") from exc
        if code in {"403", "AccessDenied", "Forbidden"}:
            raise StagingError(
                f"{uri}: access denied (may the staging function's role read this prefix?)"
            ) from exc
        if code in {"412", "PreconditionFailed"}:
            raise StagingError(f"{uri}: the object changed while it was being staged; run again") from exc
        raise StagingError(f"{uri}: {code or 'error'} {error.get('Message', exc)}") from exc


@dataclass(frozen=True)
class NpyHeader:
    descr: str
    fortran_order: bool
    shape: tuple[int, ...]
    header_bytes: int  # magic, version, length field and the header dictionary: where the data starts


def parse_npy_header(prefix: bytes, where: str) -> NpyHeader:
    """Read a ``.npy`` header (format versions 1-3) from the first bytes of a file, without NumPy."""
    if not prefix.startswith(NPY_MAGIC) or len(prefix) < 10:
        raise StagingError(f"{where}: not a .npy file (no NUMPY magic)")
    major = prefix[6]
    if major == 1:
        (length,) = struct.unpack("<H", prefix[8:10])
        start = 10
    elif major in (2, 3):
        (length,) = struct.unpack("<I", prefix[8:12])
        start = 12
    else:
        raise StagingError(f"{where}: unsupported .npy format version {major}")
    text = prefix[start : start + length]
    try:
        fields = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin-1"))
        descr, fortran_order, shape = fields["descr"], fields["fortran_order"], tuple(fields["shape"])
    except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise StagingError(f"{where}: unreadable .npy header ({exc!r})") from exc
    if len(text) != length or not isinstance(descr, str):
        raise StagingError(f"{where}: truncated or malformed .npy header")
    return NpyHeader(descr=descr, fortran_order=bool(fortran_order), shape=shape, header_bytes=start + length)


# --- Atomic folders (shared with prep.cifar) ----------------------------------------------------------


def describe_unreplaceable(target: Path) -> str | None:
    """Why ``target`` must not be replaced by a dataset folder, or None when it may be.

    A folder may be replaced if it does not exist, is empty, or holds a ``manifest.json`` (we wrote it).
    Anything else might be someone's files, and replacing it would delete them.
    """
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target}: exists and is not a folder"
    if (target / MANIFEST_FILE).is_file() or not any(target.iterdir()):
        return None
    return f"{target}: folder is not empty and holds no {MANIFEST_FILE}; refusing to replace it"


@contextlib.contextmanager
def temporary_directory_beside(target: Path) -> Iterator[Path]:
    """A new empty folder ``.tmp-<name>-<random>`` next to ``target`` (same file system, so renames are
    atomic); whatever is left of it afterwards, on success or failure, is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = target.with_name(f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:12]}")
    build_dir.mkdir()
    try:
        yield build_dir
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def replace_directory(new_dir: Path, target: Path) -> None:
    """Put the complete folder ``new_dir`` at ``target``; an existing ``target`` is replaced only now.

    Without an existing target this is one ``rename``. Otherwise the old folder is first renamed to
    ``.old-<name>-<random>`` and the new one renamed into place; if that second rename fails the old one is
    renamed back. (POSIX cannot rename over a non-empty folder, so there is a moment between the two
    renames without ``target``; a crash in it leaves the complete old dataset in the ``.old-`` folder.)
    The old folder is deleted last; on NFS/EFS files still open elsewhere may keep it alive, which only
    logs a warning because the new dataset is already in place.
    """
    if not target.exists():
        os.rename(new_dir, target)
        fsync_directory(target.parent)
        return
    backup = target.with_name(f"{OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:12]}")
    os.rename(target, backup)
    try:
        os.rename(new_dir, target)
    except BaseException:
        os.rename(backup, target)
        raise
    fsync_directory(target.parent)
    if backup.is_symlink():  # target was a link to a folder elsewhere: drop the link, keep that folder
        backup.unlink()
    shutil.rmtree(backup, ignore_errors=True)
    if backup.exists():
        logger.warning("old_dataset_not_removed", extra={"path": str(backup)})


def write_file_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    """Make renames and new names in ``directory`` durable; a no-op where the file system cannot."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
