"""Download the official CIFAR-10 archive into a cache folder: resumable, md5-verified, reused when complete.

``<cache>/cifar-10-python.tar.gz.part`` grows while downloading; an interrupted run leaves it in place and
the next run asks the server for the rest (HTTP ``Range``). Only a file whose md5 matches is renamed to
``<cache>/cifar-10-python.tar.gz``, and a later run reuses that file (after checking its md5 again) without
touching the network. The URL can be overridden with ``--url`` or the ``CIFAR10_URL`` environment variable
(a mirror, or a local server in tests); the md5 stays that of the official archive.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import tqdm

from prep import stage
from prep.errors import PrepError

logger = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # of the official archive, 170,498,071 bytes
URL_ENV = "CIFAR10_URL"
PARTIAL_SUFFIX = ".part"
CHUNK_BYTES = 1024 * 1024
TIMEOUT_S = 60.0  # per connection attempt and per read
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def resolve_url(url: str | None = None) -> str:
    """``url`` if given, else ``$CIFAR10_URL``, else the official archive's URL."""
    return url or os.environ.get(URL_ENV) or CIFAR10_URL


def fetch_archive(
    url: str, cache_dir: Path, *, expected_md5: str | None = None, timeout_s: float = TIMEOUT_S
) -> Path:
    """Return the path of a verified copy of ``url`` in ``cache_dir``, downloading only what is missing.

    ``expected_md5`` defaults to the official archive's (:data:`CIFAR10_MD5`, read at call time).
    """
    expected_md5 = expected_md5 or CIFAR10_MD5
    file_name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    if not file_name or file_name in {".", ".."}:
        raise PrepError(f"{url}: the URL names no file to download")
    final = cache_dir / file_name
    partial = final.with_name(file_name + PARTIAL_SUFFIX)

    if final.is_file():
        if file_md5(final) == expected_md5:
            logger.info("archive_reused", extra={"path": str(final)})
            return final
        logger.warning("cached_archive_md5_mismatch", extra={"path": str(final)})
        final.unlink()

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepError(f"{cache_dir}: cannot create the download cache ({exc})") from exc
    _download_resumable(url, partial, timeout_s)

    actual_md5 = file_md5(partial)
    if actual_md5 != expected_md5:
        partial.unlink()
        raise PrepError(
            f"{url}: md5 of the download is {actual_md5}, expected {expected_md5}; "
            "the file was removed, run again to download it afresh"
        )
    os.replace(partial, final)
    stage.fsync_directory(cache_dir)
    logger.info("archive_downloaded", extra={"path": str(final), "size_bytes": final.stat().st_size})
    return final


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _download_resumable(url: str, partial: Path, timeout_s: float) -> None:
    """Append the rest of ``url`` to ``partial`` (or write it whole); errors keep what arrived."""
    offset = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": "lambdatrain-cifar10-prep"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing after `offset`: the partial file is already whole
            logger.info("download_already_complete", extra={"size_bytes": offset})
            return
        raise PrepError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrepError(f"{url}: cannot connect ({reason}); run again to retry") from exc

    with response:
        if response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                raise PrepError(
                    f"{url}: server resumed at byte {start}, asked for {offset}; delete {partial}"
                )
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none); start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        try:
            with (
                open(partial, mode) as handle,
                tqdm.tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=partial.name, disable=None
                ) as progress,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    handle.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise PrepError(
                f"{url}: download interrupted after {received} bytes ({exc!r}); run again to resume"
            ) from exc
    if total is not None and received != total:
        raise PrepError(f"{url}: got {received} of {total} bytes; run again to resume")


def _range_start(content_range: str) -> int | None:
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    return int(match.group(1)) if match else None
