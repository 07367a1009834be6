"""A pool of long-lived worker processes that run one function's invocations, with Lambda's deadlines.

- **Warm reuse.** A process imports the handler once and serves invocation after invocation, so module-level
  caches survive (like a warm Lambda container). Idle processes are reused most-recently-used first.
- **Cold starts.** A process is started only when an invocation finds no idle one, up to ``concurrency``
  processes; at most ``concurrency`` invocations run at once, further callers wait for a slot.
- **Deadlines.** An invocation that is still running ``timeout_s`` after it started is killed with SIGKILL
  (``Task timed out after N seconds``). A process that dies mid-invocation is a failure too. Either way the
  process is discarded and the next invocation starts a fresh, cold one.

Processes are started with the ``spawn`` context: forking a parent that imported TensorFlow is unsafe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from localrun import bootstrap, reports, settings

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0  # how long close() waits for a process to exit before SIGKILL

_CONTEXT = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class InvocationResult:
    """How one invocation ended. ``payload`` is JSON text: the handler's result, or the error object."""

    request_id: str
    payload: str
    function_error: str | None = None  # "Unhandled" when the invocation failed, as in X-Amz-Function-Error
    pid: int | None = None
    cold: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.function_error is None

    def error(self) -> dict[str, Any]:
        """The error object (``errorMessage``, ``errorType``, ``stackTrace``); empty when the invocation succeeded."""
        return {} if self.ok else json.loads(self.payload)


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    pid: int
    invocations: int = 0


class WorkerPool:
    """Runs invocations of one function in at most ``function.concurrency`` worker processes."""

    def __init__(
        self,
        function: settings.FunctionSettings,
        log_path: Path | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        self.function = function
        self.concurrency = function.concurrency
        # Lambda allows 10 s of init; TensorFlow's import on a busy laptop can take longer, so allow the timeout.
        self.init_timeout_s = function.timeout_s if init_timeout_s is None else init_timeout_s
        self._spec = bootstrap.RuntimeSpec(
            handler=function.handler,
            code_dir=Path(function.code_dir).resolve(),
            function_name=function.name,
            function_arn=function.arn,
            memory_mb=function.memory_mb,
            environment=dict(function.environment),
            unset_environment=tuple(function.unset_environment),
            log_path=log_path,
        )
        self._slots = threading.BoundedSemaphore(function.concurrency)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # a stack: the most recently used process is reused first
        self._busy: set[int] = set()  # pids of processes running an invocation (or starting)
        self._workers: dict[int, _Worker] = {}
        self._closed = False
        self.processes_started = 0

    # --- public -----------------------------------------------------------------------------------

    def invoke(
        self, payload: str, request_id: str | None = None, kill_after_s: float | None = None
    ) -> InvocationResult:
        """Run one invocation to its end (result, error, timeout or crash). Blocks while all slots are busy.

        ``kill_after_s`` (fault injection) SIGKILLs the process that many seconds after the handler started.
        """
        request_id = request_id or str(uuid.uuid4())
        with self._slots:
            if self._closed:
                return _failure(request_id, "Runtime.Unavailable", "the local runtime is shutting down")
            started = time.monotonic()
            checked_out = self._checkout(request_id)
            if isinstance(checked_out, InvocationResult):
                return checked_out  # the init phase failed
            worker, cold = checked_out
            result = self._run(worker, request_id, payload, cold, kill_after_s)
            result = _with_duration(result, time.monotonic() - started)
            if self._spec.log_path is not None:  # what Lambda writes to the log stream: what `cost` reads
                reports.append_report(
                    self._spec.log_path, request_id, result.duration_s, self.function.memory_mb
                )
            log.info(
                "invocation_finished",
                extra={
                    "request_id": request_id,
                    "pid": worker.pid,
                    "cold": cold,
                    "duration_s": round(result.duration_s, 3),
                    "error_type": result.error().get("errorType"),
                },
            )
            return result

    def live_pids(self) -> list[int]:
        """Pids of the worker processes that exist now (idle or busy)."""
        with self._lock:
            return sorted(pid for pid, worker in self._workers.items() if worker.process.is_alive())

    def close(self) -> None:
        """Stop every worker process (busy ones by SIGKILL, idle ones by closing their pipe) and wait for them."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
            busy = set(self._busy)
            self._idle.clear()
        for worker in workers:
            if worker.pid in busy:
                worker.process.kill()  # like Lambda, a running invocation gets no chance to finish
            else:  # busy pipes belong to their invoking threads, which see the death and clean up
                with contextlib.suppress(OSError):
                    worker.conn.close()  # an idle worker sees EOF and exits on its own
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        with self._lock:
            self._workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- processes --------------------------------------------------------------------------------

    def _checkout(self, request_id: str) -> tuple[_Worker, bool] | InvocationResult:
        """Take the most recently used idle process (warm), or start a cold one; the caller holds a slot."""
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                self._busy.add(worker.pid)
                return worker, False
        started = self._start_worker(request_id)
        return started if isinstance(started, InvocationResult) else (started, True)

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker.pid)
            if self._closed or not worker.process.is_alive():
                self._discard(worker)
            else:
                self._idle.append(worker)

    def _start_worker(self, request_id: str) -> _Worker | InvocationResult:
        """Start a process and wait for its init phase; an init failure is the invocation's result."""
        parent_conn, child_conn = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=bootstrap.main,
            args=(child_conn, self._spec),
            name=f"localrun-{self.function.name}",
            daemon=True,  # multiprocessing stops it if this interpreter exits without close()
        )
        process.start()
        child_conn.close()
        self.processes_started += 1
        ready = _receive(parent_conn, process, time.monotonic() + self.init_timeout_s)
        if not isinstance(ready, bootstrap.Ready):
            _kill(process, parent_conn)
            message = (
                f"Init timed out after {self.init_timeout_s:.2f} seconds"
                if ready is _TIMED_OUT
                else f"Runtime exited during init with {_exit_description(process)}"
            )
            return _failure(request_id, "Runtime.InitError", message)
        if ready.error is not None:
            _kill(process, parent_conn)
            return _failure(request_id, ready.error["errorType"], ready.error["errorMessage"], ready.error)
        worker = _Worker(process=process, conn=parent_conn, pid=ready.pid)
        with self._lock:
            closed = self._closed
            if not closed:
                self._workers[worker.pid] = worker
                self._busy.add(worker.pid)
        if closed:  # close() ran while this process was starting
            _kill(process, parent_conn)
            return _failure(request_id, "Runtime.Unavailable", "the local runtime is shutting down")
        log.info(
            "worker_started",
            extra={"pid": worker.pid, "init_duration_s": round(ready.init_duration_s, 3)},
        )
        return worker

    def _run(
        self, worker: _Worker, request_id: str, payload: str, cold: bool, kill_after_s: float | None
    ) -> InvocationResult:
        timeout_s = self.function.timeout_s
        request = bootstrap.InvocationRequest(request_id, payload, deadline_s=time.time() + timeout_s)
        started = time.monotonic()
        deadline = started + timeout_s
        kill_at = None if kill_after_s is None else started + kill_after_s
        try:
            worker.conn.send(request)
        except OSError:
            reply: object = _CRASHED
        else:
            reply = _receive(worker.conn, worker.process, min(deadline, kill_at or deadline))
        worker.invocations += 1
        meta = {"pid": worker.pid, "cold": cold}

        if isinstance(reply, bootstrap.InvocationReply):
            self._checkin(worker)
            return InvocationResult(request_id, reply.payload, "Unhandled" if reply.error else None, **meta)

        self._retire(worker)
        if reply is _TIMED_OUT and (kill_at is None or kill_at >= deadline):
            log.warning("invocation_timed_out", extra={"request_id": request_id, "pid": worker.pid})
            return _failure(
                request_id, "Sandbox.Timedout", f"Task timed out after {timeout_s:.2f} seconds", **meta
            )
        if self._closed:
            return _failure(request_id, "Runtime.Unavailable", "the local runtime is shutting down", **meta)
        description = "signal: killed" if reply is _TIMED_OUT else _exit_description(worker.process)
        log.warning(
            "worker_exited",
            extra={"request_id": request_id, "pid": worker.pid, "exit": description},
        )
        return _failure(request_id, "Runtime.ExitError", f"Runtime exited with error: {description}", **meta)

    def _retire(self, worker: _Worker) -> None:
        """Kill a process that timed out, crashed or was targeted by a fault; the next invocation starts cold."""
        _kill(worker.process, worker.conn)
        with self._lock:
            self._busy.discard(worker.pid)
            self._discard(worker)

    def _discard(self, worker: _Worker) -> None:
        self._workers.pop(worker.pid, None)
        with contextlib.suppress(OSError):
            worker.conn.close()


# Sentinels returned by _receive when no message arrived.
_TIMED_OUT = object()
_CRASHED = object()


def _receive(conn: Connection, process: BaseProcess, deadline: float) -> object:
    """The next message from a worker, or ``_TIMED_OUT`` at ``deadline`` (monotonic), or ``_CRASHED``."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _TIMED_OUT
        ready = wait([conn, process.sentinel], timeout=remaining)
        if conn in ready:  # read the pipe first: a worker may reply and then exit
            try:
                return conn.recv()
            except (EOFError, OSError):
                process.join(1.0)
                return _CRASHED
        if process.sentinel in ready:
            process.join(1.0)
            return _CRASHED


def _kill(process: BaseProcess, conn: Connection) -> None:
    if process.is_alive():
        process.kill()
    process.join()
    with contextlib.suppress(OSError):
        conn.close()


def _exit_description(process: BaseProcess) -> str:
    """Describe how a process ended, in the words of Lambda's ``Runtime exited with error: ...``."""
    code = process.exitcode
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
        except ValueError:
            return f"signal: {-code}"
    return f"exit status {code}"


def _failure(
    request_id: str,
    error_type: str,
    message: str,
    error: Mapping[str, Any] | None = None,
    pid: int | None = None,
    cold: bool = False,
) -> InvocationResult:
    body = dict(error) if error else {"errorMessage": message, "errorType": error_type, "stackTrace": []}
    return InvocationResult(request_id, json.dumps(body), "Unhandled", pid=pid, cold=cold)


def _with_duration(result: InvocationResult, duration_s: float) -> InvocationResult:
    return dataclasses.replace(result, duration_s=duration_s)
