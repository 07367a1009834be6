"""What runs inside each worker process: the local equivalent of Lambda's Python runtime interface client.

A worker process is started with the ``spawn`` context (never forked from a parent that may have imported
TensorFlow). It applies the function's environment, puts the code directory on ``sys.path``, imports the
handler once (the "init" phase; module-level caches such as a built Keras model then survive between
invocations, like a warm Lambda container), reports :class:`Ready`, and then serves
:class:`InvocationRequest` messages one at a time until its pipe closes.

Errors are reported in the shape Lambda's runtime uses, so boto3 and the caller see what they would see in
the cloud: ``{"errorMessage": ..., "errorType": ..., "stackTrace": [...]}``.

Only the standard library is imported here, so a worker costs nothing before the handler's own imports.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

Handler = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a worker process needs to become a function container."""

    handler: str  # "module.function" (SAM's Handler) or "module:function"
    code_dir: Path  # SAM's CodeUri: put first on sys.path
    function_name: str
    function_arn: str
    memory_mb: int
    environment: Mapping[str, str] = field(default_factory=dict)  # set before the handler is imported
    unset_environment: tuple[str, ...] = ()  # removed before the handler is imported
    log_path: Path | None = None  # stdout and stderr (file descriptors 1 and 2) are appended here


@dataclass(frozen=True)
class Ready:
    """Sent once after the init phase; ``error`` is set when the handler could not be loaded."""

    pid: int
    init_duration_s: float
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class InvocationRequest:
    request_id: str
    payload: str  # the event as JSON text, exactly as it arrived
    deadline_s: float  # wall-clock time (time.time()) at which the invocation is killed


@dataclass(frozen=True)
class InvocationReply:
    request_id: str
    payload: str  # JSON text: the handler's result, or the error object when ``error`` is true
    error: bool = False


@dataclass
class LambdaContext:
    """The ``context`` argument, with the attributes of ``awslambdaric``'s ``LambdaContext``.

    ``memory_limit_in_mb`` is a string, as in the real runtime (it comes from an environment variable).
    """

    aws_request_id: str
    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: str
    deadline_s: float
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""
    identity: Any = None
    client_context: Any = None

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline_s - time.time()) * 1000))


def main(conn: Connection, spec: RuntimeSpec) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
    # Ctrl-C belongs to the parent: it decides whether to stop gracefully; workers end by SIGKILL or EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.log_path is not None:
        _redirect_output(spec.log_path)
    for name in spec.unset_environment:
        os.environ.pop(name, None)
    os.environ.update(spec.environment)  # before the import: TF_ENABLE_ONEDNN_OPTS must precede TensorFlow
    sys.path.insert(0, str(spec.code_dir))

    started = time.monotonic()
    handler, init_error = load_handler(spec.handler)
    conn.send(Ready(pid=os.getpid(), init_duration_s=time.monotonic() - started, error=init_error))
    if handler is None:
        return
    while True:
        try:
            request: InvocationRequest = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died: a container is never left behind
        conn.send(invoke(handler, request, spec))


def load_handler(handler: str) -> tuple[Handler | None, dict[str, Any] | None]:
    """Import ``module.function`` (or ``module:function``); return the callable or a Lambda-shaped init error."""
    module_name, separator, function_name = handler.rpartition(":" if ":" in handler else ".")
    if not separator or not module_name or not function_name:
        return None, _runtime_error(
            "Runtime.MalformedHandlerName", f"Bad handler '{handler}': expected 'module.function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        error = _runtime_error("Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}")
        error["stackTrace"] = _user_frames(exc)  # where in the handler's own modules the import failed
        return None, error
    function = getattr(module, function_name, None)
    if not callable(function):
        return None, _runtime_error(
            "Runtime.HandlerNotFound", f"Handler '{function_name}' missing on module '{module_name}'"
        )
    return function, None


def invoke(handler: Handler, request: InvocationRequest, spec: RuntimeSpec) -> InvocationReply:
    """Run one invocation; exceptions become the error object, results must be JSON-serialisable."""
    context = LambdaContext(
        aws_request_id=request.request_id,
        function_name=spec.function_name,
        invoked_function_arn=spec.function_arn,
        memory_limit_in_mb=str(spec.memory_mb),
        deadline_s=request.deadline_s,
        log_group_name=f"/aws/lambda/{spec.function_name}",
        log_stream_name=f"localrun/{os.getpid()}",
    )
    try:
        event = json.loads(request.payload)
        result = handler(event, context)
    except Exception as exc:
        return InvocationReply(request.request_id, json.dumps(handler_error(exc)), error=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        payload = json.dumps(result)
    except (TypeError, ValueError) as exc:
        error = _runtime_error("Runtime.MarshalError", f"Unable to marshal response: {exc}")
        return InvocationReply(request.request_id, json.dumps(error), error=True)
    return InvocationReply(request.request_id, payload)


def handler_error(exc: BaseException) -> dict[str, Any]:
    """The body Lambda returns for an unhandled exception: message, type and the handler's stack frames."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # drop the frame of invoke() itself
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_list(frames),
    }


def _user_frames(exc: BaseException) -> list[str]:
    """The formatted stack frames of ``exc`` outside this module and the import machinery."""
    frames = traceback.extract_tb(exc.__traceback__)
    return traceback.format_list(
        [frame for frame in frames if frame.filename != __file__ and "importlib" not in frame.filename]
    )


def _runtime_error(error_type: str, message: str) -> dict[str, Any]:
    return {"errorMessage": message, "errorType": error_type, "stackTrace": []}


def _redirect_output(log_path: Path) -> None:
    """Send file descriptors 1 and 2 (Python's and native libraries' output) to the run's log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Line buffering: each JSON log line reaches the shared file in one write, never interleaved mid-line.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
