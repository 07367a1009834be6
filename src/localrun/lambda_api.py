"""The AWS Lambda Invoke API on 127.0.0.1, so boto3's own ``lambda`` client reaches local functions.

``POST /2015-03-31/functions/{FunctionName}/invocations`` with the ``X-Amz-Invocation-Type`` header:

- ``Event``: 202, empty body; the event is queued (:meth:`LocalFunction.invoke_async`).
- ``RequestResponse`` (default): 200 with the handler's JSON result; a failed invocation is still 200, with
  ``X-Amz-Function-Error: Unhandled`` and the body ``{"errorMessage", "errorType", "stackTrace"}``.
- ``DryRun``: 204.

API errors are JSON with the ``x-amzn-ErrorType`` header, which botocore turns into ``ClientError`` codes:
unknown function -> 404 ``ResourceNotFoundException``; a body that is not JSON, or a ``Content-Length`` that is
missing, not a whole number or negative -> 400 ``InvalidRequestContentException``; a payload over Lambda's
limit (6 MB for ``RequestResponse``, 1 MB for ``Event``) -> 413 ``RequestTooLargeException``.

The body is read only after ``Content-Length`` has been checked against that limit, so a request claiming a
huge body is answered from its headers alone (and its connection closed). Every socket read and write of a
request has a timeout (:data:`REQUEST_TIMEOUT_S`), so a client that stalls mid-request is disconnected
instead of holding a thread forever; a synchronous invocation may still run for as long as its function.

The handler needs no change to use it: set ``AWS_ENDPOINT_URL_LAMBDA`` to :attr:`LambdaApiServer.endpoint_url`
and a plain ``boto3.client("lambda")`` sends its requests here. Requests are not authenticated.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import threading
import urllib.parse
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from localrun import function as function_module
from localrun.errors import LocalRuntimeError, PortInUseError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
# Lambda's payload quotas: 6 MB for synchronous requests, 1 MB for asynchronous ones (256 KB before 2025).
MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_ASYNC_PAYLOAD_BYTES = 1024 * 1024
REQUEST_TIMEOUT_S = 10.0  # longest wait for the next bytes of a request (or for the client to take a reply)
CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")  # ASCII digits only: int() would also take "+5", " 5", "1_0"
SHUTDOWN_POLL_S = 0.1  # how often the serving thread checks for close()


class LambdaApiServer:
    """Serves the Invoke API for ``functions`` on ``host:port`` (port 0 picks a free one) in a thread."""

    def __init__(
        self,
        functions: Iterable[function_module.LocalFunction],
        host: str = LOOPBACK,
        port: int = 0,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.functions = {fn.name: fn for fn in functions}
        self.request_timeout_s = request_timeout_s
        try:
            self._server = _Server((host, port), _InvokeHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {host} is already in use; pass another --port, or --port 0 for a free one"
                ) from exc
            raise LocalRuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.api = self
        self._thread: threading.Thread | None = None

    def add_function(self, function: function_module.LocalFunction) -> None:
        """Serve another function (its environment may need :attr:`endpoint_url`, known only after binding)."""
        self.functions[function.name] = function

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint_url(self) -> str:
        """The value for ``AWS_ENDPOINT_URL_LAMBDA`` or ``boto3.client("lambda", endpoint_url=...)``."""
        return f"http://{self._server.server_address[0]}:{self.port}"

    def start(self) -> LambdaApiServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_S},
            name="localrun-lambda-api",
            daemon=True,
        )
        self._thread.start()
        log.info("lambda_api_started", extra={"endpoint_url": self.endpoint_url})
        return self

    def close(self) -> None:
        """Stop accepting requests (the functions are closed by their owner)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LambdaApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request blocked in a long synchronous invocation never delays shutdown
    api: LambdaApiServer


class _InvokeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore expects
    server: _Server

    def setup(self) -> None:
        # StreamRequestHandler.setup() applies `timeout` to the socket; handle_one_request() then drops a
        # connection whose read or write times out, whether in the headers, the body or between requests.
        self.timeout = self.server.api.request_timeout_s
        super().setup()

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4())
        url = urllib.parse.urlsplit(self.path)
        invocation_type = self.headers.get("X-Amz-Invocation-Type", function_module.REQUEST_RESPONSE)
        limit = (
            MAX_ASYNC_PAYLOAD_BYTES if invocation_type == function_module.EVENT else MAX_SYNC_PAYLOAD_BYTES
        )
        body = self._read_body(limit, f" for the {invocation_type} invocation type", required=True)
        if body is None:
            return None  # answered already
        match = INVOKE_PATH.match(url.path)
        if match is None:
            return self._send_error(
                HTTPStatus.NOT_FOUND, "UnknownOperationException", f"unknown operation {url.path}"
            )
        name = _function_name(urllib.parse.unquote(match["name"]))
        qualifier = urllib.parse.parse_qs(url.query).get("Qualifier", ["$LATEST"])[0]
        function = self.server.api.functions.get(name)
        if function is None or qualifier != "$LATEST":
            arn = f"arn:aws:lambda:us-east-1:000000000000:function:{name}"
            known = ", ".join(sorted(self.server.api.functions)) or "none"
            return self._send_error(
                HTTPStatus.NOT_FOUND,
                "ResourceNotFoundException",
                f"Function not found: {arn}:{qualifier} (local functions: {known})",
            )

        payload = body.decode("utf-8", errors="replace") if body.strip() else "{}"
        try:
            json.loads(payload)
        except json.JSONDecodeError as exc:
            return self._send_error(
                HTTPStatus.BAD_REQUEST,
                "InvalidRequestContentException",
                f"Could not parse request body into json: {exc}",
            )

        if invocation_type == function_module.EVENT:
            request_id = function.invoke_async(payload)
            return self._send(HTTPStatus.ACCEPTED, b"", {"x-amzn-RequestId": request_id})
        if invocation_type == "DryRun":
            return self._send(HTTPStatus.NO_CONTENT, b"", {"x-amzn-RequestId": request_id})
        if invocation_type != function_module.REQUEST_RESPONSE:
            return self._send_error(
                HTTPStatus.BAD_REQUEST,
                "InvalidParameterValueException",
                f"X-Amz-Invocation-Type must be Event, RequestResponse or DryRun, got {invocation_type!r}",
            )
        result = function.invoke(payload)
        headers = {"x-amzn-RequestId": result.request_id, "X-Amz-Executed-Version": "$LATEST"}
        if result.function_error:
            headers["X-Amz-Function-Error"] = result.function_error
        return self._send(HTTPStatus.OK, result.payload.encode(), headers)

    def do_GET(self) -> None:
        if self._read_body(MAX_SYNC_PAYLOAD_BYTES, "", required=False) is None:
            return
        self._send_error(
            HTTPStatus.NOT_FOUND, "UnknownOperationException", f"unknown operation GET {self.path}"
        )

    do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", extra={"line": format % args})

    def _read_body(self, limit: int, limit_reason: str, *, required: bool) -> bytes | None:
        """The body, once ``Content-Length`` proved sound and at most ``limit``; else answer and return None.

        Without a readable length the request's end is unknown, and over the limit the body is left unread, so
        both answers close the connection (its remaining bytes must not be taken for the next request).
        """
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers or (required and not lengths):
            return self._refuse_unread(
                HTTPStatus.BAD_REQUEST,
                "InvalidRequestContentException",
                "Content-Length header is required (chunked transfer encoding is not supported)",
            )
        if not lengths:
            return b""
        if len(set(lengths)) > 1 or not CONTENT_LENGTH.fullmatch(lengths[0]):
            received = lengths[0] if len(set(lengths)) == 1 else ", ".join(lengths)
            return self._refuse_unread(
                HTTPStatus.BAD_REQUEST,
                "InvalidRequestContentException",
                f"Content-Length must be a whole number of bytes, got {received!r}",
            )
        length = int(lengths[0])
        if length > limit:
            return self._refuse_unread(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes{limit_reason} (Content-Length: {length})",
            )
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client closed mid-body; nobody is left to answer
            self.close_connection = True
            return None
        return body

    def _refuse_unread(self, status: HTTPStatus, code: str, message: str) -> None:
        self.close_connection = True
        self._send_error(status, code, message, {"Connection": "close"})

    def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_error(
        self, status: HTTPStatus, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"Type": "User", "message": message}).encode()
        headers = {"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4()), **(headers or {})}
        self._send(status, body, headers)


def _function_name(name: str) -> str:
    """Accept a name, a partial ARN (``123456789012:function:name``) or a full ARN, with ``:qualifier``."""
    if ":function:" in name:
        name = name.split(":function:", 1)[1]
    return name.split(":", 1)[0]
