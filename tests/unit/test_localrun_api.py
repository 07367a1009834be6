"""The local Lambda Invoke API, driven by boto3's own Lambda client."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from localrun_handlers import read_notes, serve

from localrun import environment, lambda_api
from localrun.errors import PortInUseError


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[tuple[Any, Any, Path]]:
    with serve(tmp_path) as running:
        yield running


def lambda_client(endpoint_url: str) -> Any:
    settings = environment.client_settings(endpoint_url)
    return boto3.client("lambda", config=Config(retries={"max_attempts": 1}), **settings)


def test_event_invocation_is_accepted_then_runs(toy: tuple[Any, Any, Path]) -> None:
    function, api, notes_dir = toy

    response = lambda_client(api.endpoint_url).invoke(
        FunctionName="toy", InvocationType="Event", Payload=json.dumps({"action": "echo", "tag": "queued"})
    )

    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    assert function.wait_idle(timeout_s=10)
    assert [note["event"]["tag"] for note in read_notes(notes_dir)] == ["queued"]
    assert read_notes(notes_dir)[0]["request_id"] == response["ResponseMetadata"]["RequestId"]


def test_request_response_returns_the_handler_result(toy: tuple[Any, Any, Path]) -> None:
    _, api, _ = toy

    response = lambda_client(api.endpoint_url).invoke(
        FunctionName="toy", Payload=json.dumps({"action": "echo"})
    )

    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    assert response["ExecutedVersion"] == "$LATEST"
    result = json.loads(response["Payload"].read())
    assert result["event"] == {"action": "echo"}
    assert result["request_id"] == response["ResponseMetadata"]["RequestId"]


def test_handler_exception_is_an_unhandled_function_error(toy: tuple[Any, Any, Path]) -> None:
    _, api, _ = toy

    response = lambda_client(api.endpoint_url).invoke(
        FunctionName="toy", Payload=json.dumps({"action": "fail", "message": "bad input"})
    )

    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert set(error) == {"errorMessage", "errorType", "stackTrace"}
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "failing on purpose: bad input")


def test_dry_run_returns_204_without_running(toy: tuple[Any, Any, Path]) -> None:
    function, api, notes_dir = toy

    response = lambda_client(api.endpoint_url).invoke(
        FunctionName="toy", InvocationType="DryRun", Payload=b"{}"
    )

    assert response["StatusCode"] == 204
    assert len(function.history) == 0
    assert read_notes(notes_dir) == []


def test_full_arn_and_empty_payload_are_accepted(toy: tuple[Any, Any, Path]) -> None:
    function, api, _ = toy

    response = lambda_client(api.endpoint_url).invoke(FunctionName=f"{function.config.arn}:$LATEST")

    assert json.loads(response["Payload"].read())["event"] == {}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"FunctionName": "unknown"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "toy", "Qualifier": "7"}, 404, "ResourceNotFoundException"),
        ({"FunctionName": "toy", "Payload": b"{not json"}, 400, "InvalidRequestContentException"),
        (
            {
                "FunctionName": "toy",
                "InvocationType": "Event",
                "Payload": json.dumps({"blob": "x" * (1_048_576 - 11)}),  # 1 MB + 1 byte,
            },
            413,
            "RequestTooLargeException",
        ),
        (
            {"FunctionName": "toy", "Payload": json.dumps({"blob": "x" * (6_291_456 - 11)})},
            413,
            "RequestTooLargeException",
        ),
    ],
    ids=[
        "unknown-function",
        "unknown-qualifier",
        "payload-not-json",
        "async-payload-over-1mb",
        "sync-payload-over-6mb",
    ],
)
def test_bad_requests_are_api_errors(
    toy: tuple[Any, Any, Path], request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    _, api, notes_dir = toy

    with pytest.raises(ClientError) as caught:
        lambda_client(api.endpoint_url).invoke(**request_kwargs)

    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert caught.value.response["Error"]["Message"]
    assert read_notes(notes_dir) == []


def test_async_payload_up_to_1mb_is_accepted(toy: tuple[Any, Any, Path]) -> None:
    """Lambda raised the asynchronous payload limit from 256 KB to 1 MB in 2025."""
    function, api, notes_dir = toy
    payload = json.dumps({"action": "echo", "tag": "big", "blob": "x" * 300_000})
    exactly_the_limit = json.dumps({"blob": "x" * (1_048_576 - 12)})
    assert len(exactly_the_limit) == 1_048_576

    client = lambda_client(api.endpoint_url)
    responses = [
        client.invoke(FunctionName="toy", InvocationType="Event", Payload=body)
        for body in (payload, exactly_the_limit)
    ]

    assert [response["StatusCode"] for response in responses] == [202, 202]
    assert function.wait_idle(timeout_s=10)
    assert sorted(note["event"].get("tag", "") for note in read_notes(notes_dir)) == ["", "big"]


# --- Request framing: Content-Length and stalled clients, over raw HTTP ---------------------------------


def raw_post(
    port: int, headers: dict[str, str], body: bytes = b"", timeout_s: float = 5.0
) -> tuple[http.client.HTTPResponse, bytes]:
    """POST an invocation with exactly ``headers`` (no Content-Length unless given) and ``body``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    connection.putrequest("POST", "/2015-03-31/functions/toy/invocations", skip_accept_encoding=True)
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.endheaders(body or None)
    response = connection.getresponse()
    return response, response.read()


@pytest.mark.parametrize(
    ("headers", "body", "status", "pattern"),
    [
        ({}, b'{"action": "echo"}', 400, r"Content-Length header is required"),
        ({"Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n", 400, r"Content-Length header is required"),
        ({"Content-Length": "abc"}, b"{}", 400, r"Content-Length must be a whole number of bytes, got 'abc'"),
        ({"Content-Length": "-5"}, b"{}", 400, r"Content-Length must be a whole number of bytes, got '-5'"),
        ({"Content-Length": "1_0"}, b"{}", 400, r"got '1_0'"),
        ({"Content-Length": "7000000"}, b"", 413, r"smaller than 6291456 bytes for the RequestResponse"),
        ({"Content-Length": str(10**12), "X-Amz-Invocation-Type": "Event"}, b"", 413, r"smaller than 1048576 bytes for the Event"),
    ],
    ids=["missing", "chunked", "not-a-number", "negative", "underscores", "over-sync-limit", "over-async-limit"],
)  # fmt: skip
def test_bad_content_length_is_refused_without_reading_the_body(
    toy: tuple[Any, Any, Path], headers: dict[str, str], body: bytes, status: int, pattern: str
) -> None:
    """Over the limit, the claimed body is never sent: the answer must come from the headers alone."""
    _, api, notes_dir = toy

    response, answer = raw_post(api.port, headers, body)

    assert response.status == status
    assert response.getheader("x-amzn-ErrorType") == (
        "RequestTooLargeException" if status == 413 else "InvalidRequestContentException"
    )
    assert response.getheader("Connection") == "close"  # the unread bytes cannot start the next request
    assert response.getheader("Content-Type") == "application/json"
    assert re.search(pattern, json.loads(answer)["message"])
    assert read_notes(notes_dir) == []


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /2015-03-31/functions/toy/invocations HTTP/1.1\r\nHost: x\r\n",  # headers never end
        b"POST /2015-03-31/functions/toy/invocations HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",  # body stalls
    ],
    ids=["in-headers", "in-body"],
)
def test_a_stalled_client_is_disconnected_after_the_request_timeout(tmp_path: Path, sent: bytes) -> None:
    with lambda_api.LambdaApiServer([], request_timeout_s=0.5) as api:
        with socket.create_connection(("127.0.0.1", api.port), timeout=5) as stalled:
            stalled.sendall(sent)
            started = time.monotonic()

            assert stalled.recv(1024) == b""  # the server closed the connection without an answer
            assert time.monotonic() - started < 3

        # and it still answers everybody else
        response, _ = raw_post(api.port, {"Content-Length": "2"}, b"{}")
        assert response.status == 404


def test_request_timeout_defaults_to_ten_seconds() -> None:
    with lambda_api.LambdaApiServer([]) as api:
        assert api.request_timeout_s == lambda_api.REQUEST_TIMEOUT_S == 10


def test_handler_invokes_itself_through_the_endpoint_variable(toy: tuple[Any, Any, Path]) -> None:
    function, api, notes_dir = toy
    chained = {"action": "echo", "tag": "chained"}

    response = lambda_client(api.endpoint_url).invoke(
        FunctionName="toy", Payload=json.dumps({"action": "invoke", "next": chained})
    )
    assert "FunctionError" not in response, response["Payload"].read()

    assert function.wait_idle(timeout_s=10)
    assert [note["event"].get("tag") for note in read_notes(notes_dir)] == [None, "chained"]


def test_plain_boto3_client_finds_the_api_through_the_environment(
    toy: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, api, _ = toy
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", api.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", environment.ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", environment.SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", environment.REGION)
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)

    response = boto3.client("lambda").invoke(FunctionName="toy", Payload=b'{"action": "echo"}')

    assert json.loads(response["Payload"].read())["event"] == {"action": "echo"}


def test_port_zero_listens_on_a_free_loopback_port() -> None:
    with lambda_api.LambdaApiServer([], port=0) as api:
        assert api.port > 0
        assert api.endpoint_url == f"http://127.0.0.1:{api.port}"
        with socket.create_connection(("127.0.0.1", api.port), timeout=2):
            pass


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(
            PortInUseError, match=rf"port {port} on 127.0.0.1 is already in use; pass another --port"
        ):
            lambda_api.LambdaApiServer([], port=port)


def test_close_stops_listening(tmp_path: Path) -> None:
    with serve(tmp_path) as (_, api, _):
        port = api.port
    time.sleep(0.1)

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
