"""The AWS Lambda Invoke API on 127.0.0.1, so boto3's own ``lambda`` client reaches local functions.

``POST /2015-03-31/functions/{FunctionName}/invocations`` with the ``X-Amz-Invocation-Type`` header:

- ``Event``: 202, empty body; the event is queued (:meth:`LocalFunction.invoke_async`).
- ``RequestResponse`` (default): 200 with the handler's JSON result; a failed invocation is still 200, with
  ``X-Amz-Function-Error: Unhandled`` and the body ``{"errorMessage", "errorType", "stackTrace"}``.
- ``DryRun``: 204.

API errors are JSON with the ``x-amzn-ErrorType`` header, which botocore turns into ``ClientError`` codes:
unknown function -> 404 ``ResourceNotFoundException``; a body that is not JSON -> 400
``InvalidRequestContentException``; a payload over Lambda's limit -> 413 ``RequestTooLargeException``.

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
# Lambda's payload quotas: 6 MB for synchronous requests, 256 KB for asynchronous ones.
MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_ASYNC_PAYLOAD_BYTES = 256 * 1024
SHUTDOWN_POLL_S = 0.1  # how often the serving thread checks for close()


class LambdaApiServer:
    """Serves the Invoke API for ``functions`` on ``host:port`` (port 0 picks a free one) in a thread."""

    def __init__(
        self, functions: Iterable[function_module.LocalFunction], host: str = LOOPBACK, port: int = 0
    ) -> None:
        self.functions = {fn.name: fn for fn in functions}
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

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4())
        url = urllib.parse.urlsplit(self.path)
        body = self._read_body()
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

        invocation_type = self.headers.get("X-Amz-Invocation-Type", function_module.REQUEST_RESPONSE)
        limit = (
            MAX_ASYNC_PAYLOAD_BYTES if invocation_type == function_module.EVENT else MAX_SYNC_PAYLOAD_BYTES
        )
        if len(body) > limit:
            return self._send_error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "RequestTooLargeException",
                f"Request must be smaller than {limit} bytes for the {invocation_type} invocation type",
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
        self._read_body()
        self._send_error(
            HTTPStatus.NOT_FOUND, "UnknownOperationException", f"unknown operation GET {self.path}"
        )

    do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", extra={"line": format % args})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: HTTPStatus, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_error(self, status: HTTPStatus, code: str, message: str) -> None:
        body = json.dumps({"Type": "User", "message": message}).encode()
        self._send(status, body, {"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4())})


def _function_name(name: str) -> str:
    """Accept a name, a partial ARN (``123456789012:function:name``) or a full ARN, with ``:qualifier``."""
    if ":function:" in name:
        name = name.split(":function:", 1)[1]
    return name.split(":", 1)[0]
