"""prep.download against a local HTTP server on 127.0.0.1: caching, resume, md5 checks, HTTP errors."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prep import cifar, download
from prep.errors import PrepError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
PAYLOAD = FIXTURE.read_bytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


@dataclass
class ArchiveServer:
    """Serves PAYLOAD at /cifar-10-python.tar.gz with HTTP Range support, and can misbehave on request."""

    url: str = ""
    ranges: list[str | None] = field(default_factory=list)  # the Range header of each request
    cut_after_bytes: int | None = None  # send this much of the body, then drop the connection (once)
    ignore_range: bool = False  # answer 200 with the whole file even when asked for a range
    status: int | None = None  # answer every request with this error status


def _handler(state: ArchiveServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested = self.headers.get("Range")
            state.ranges.append(requested)
            if state.status:
                self.send_error(state.status)
                return
            match = re.fullmatch(r"bytes=(\d+)-", requested or "")
            start = int(match.group(1)) if match and not state.ignore_range else 0
            if start >= len(PAYLOAD) and match:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = PAYLOAD[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.cut_after_bytes is not None:
                self.wfile.write(body[: state.cut_after_bytes])
                self.wfile.flush()
                state.cut_after_bytes = None
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    state = ArchiveServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-python.tar.gz"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_md5_and_then_reuses_the_cached_file(server, tmp_path):
    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)

    assert path == tmp_path / "cifar-10-python.tar.gz" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "cifar-10-python.tar.gz.part").exists()
    assert download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5) == path
    assert server.ranges == [None]  # the second call did not touch the network


def test_download_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(PAYLOAD[:300_000])

    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)

    assert server.ranges == ["bytes=300000-"]
    assert path.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_what_arrived_and_the_next_run_resumes(server, tmp_path):
    server.cut_after_bytes = 200_000

    with pytest.raises(PrepError, match=r"(interrupted after|got) 200000 .*run again to resume"):
        download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)
    assert (tmp_path / "cifar-10-python.tar.gz.part").stat().st_size == 200_000
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()

    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)
    assert server.ranges == [None, "bytes=200000-"]
    assert path.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_the_beginning(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(b"stale bytes")

    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)

    assert path.read_bytes() == PAYLOAD


def test_partial_file_that_is_already_whole_is_verified_not_refetched(server, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz.part").write_bytes(PAYLOAD)
    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)
    assert path.read_bytes() == PAYLOAD and server.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_md5_mismatch_after_download_removes_the_file(server, tmp_path):
    with pytest.raises(PrepError, match=rf"md5 of the download is {PAYLOAD_MD5}, expected 0{{32}}"):
        download.fetch_archive(server.url, tmp_path, expected_md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_cached_file_with_a_wrong_md5_is_downloaded_again(server, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"corrupted cache")
    path = download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)
    assert path.read_bytes() == PAYLOAD and server.ranges == [None]


def test_http_error_is_reported_with_its_status(server, tmp_path):
    server.status = 404
    with pytest.raises(PrepError, match=r"cifar-10-python.tar.gz: HTTP 404"):
        download.fetch_archive(server.url, tmp_path, expected_md5=PAYLOAD_MD5)


def test_unreachable_server_is_reported(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PrepError, match=r"cannot connect .*run again"):
        download.fetch_archive(
            f"http://127.0.0.1:{port}/cifar-10-python.tar.gz", tmp_path, expected_md5=PAYLOAD_MD5
        )


def test_url_comes_from_the_argument_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv(download.URL_ENV, raising=False)
    assert download.resolve_url(None) == download.CIFAR10_URL
    monkeypatch.setenv(download.URL_ENV, "http://mirror.example/cifar.tar.gz")
    assert download.resolve_url(None) == "http://mirror.example/cifar.tar.gz"
    assert download.resolve_url("http://other.example/c.tar.gz") == "http://other.example/c.tar.gz"


def test_prepare_without_source_downloads_then_converts(server, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "CIFAR10_MD5", PAYLOAD_MD5)
    monkeypatch.setenv(download.URL_ENV, server.url)

    result = cifar.prepare(None, tmp_path / "out", cache_dir=tmp_path / "cache")

    assert result["source"]["name"] == "cifar-10-python.tar.gz"
    assert result["class_counts"]["train"] == [20] * 10
    assert (tmp_path / "cache" / "cifar-10-python.tar.gz").read_bytes() == PAYLOAD


def test_prepare_with_a_download_failing_md5_leaves_the_previous_dataset_intact(
    server, tmp_path, monkeypatch
):
    out_dir = tmp_path / "out"
    cifar.prepare(FIXTURE, out_dir)
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    monkeypatch.setenv(download.URL_ENV, server.url)  # serves the fixture, whose md5 is not the official one

    with pytest.raises(
        PrepError, match=rf"md5 of the download is {PAYLOAD_MD5}, expected {download.CIFAR10_MD5}"
    ):
        cifar.prepare(None, out_dir, cache_dir=tmp_path / "cache", force=True)

    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before
    assert list((tmp_path / "cache").iterdir()) == []
