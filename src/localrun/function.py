"""One local function with Lambda's invocation semantics: synchronous calls and the asynchronous event queue.

``Event`` invocations are queued and delivered by ``concurrency`` dispatcher threads through the
:class:`~localrun.pool.WorkerPool`. A failed delivery (error, timeout, crash) is retried up to
``maximum_retry_attempts`` times (0-2, like ``EventInvokeConfig.MaximumRetryAttempts``; the template sets 0),
then an ``OnFailure`` destination record (``events/failure_record.json`` shows the shape) is delivered to the
same function as a new ``Event`` invocation: as is (a Lambda destination), or, as ``template.yaml`` deploys it,
as the body of an ``aws:sqs`` event (an SQS destination whose queue triggers the function). A failure record
that fails itself is logged, never re-recorded, so a broken handler cannot loop.

Retries and duplicates keep the original request id, as Lambda does. Faults (:mod:`localrun.faults`) are
applied when an event is queued (duplicate, delay) and on each delivery (kill).
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun import faults as faults_module
from localrun import pool as pool_module
from localrun import settings as settings_module

log = logging.getLogger(__name__)

EVENT = "Event"
REQUEST_RESPONSE = "RequestResponse"
HISTORY_LIMIT = 10_000


@dataclass(frozen=True)
class CompletedInvocation:
    """One finished delivery, kept in :attr:`LocalFunction.history` for tests and the CLI."""

    invocation_type: str  # "Event" or "RequestResponse"
    event: Any
    result: pool_module.InvocationResult
    attempt: int = 1
    failure_record: bool = False  # this delivery was an OnFailure record


@dataclass(order=True)
class _QueuedEvent:
    due: float  # monotonic time at which it may be delivered
    sequence: int
    request_id: str = field(compare=False)
    payload: str = field(compare=False)
    attempt: int = field(default=1, compare=False)
    failure_record: bool = field(default=False, compare=False)


class LocalFunction:
    """A function: a worker pool plus the asynchronous event queue in front of it."""

    def __init__(
        self,
        config: settings_module.FunctionSettings,
        faults: faults_module.FaultPlan | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.config = config
        self.faults = faults or faults_module.FaultPlan()
        self.pool = pool_module.WorkerPool(config, log_path=log_path)
        self.history: collections.deque[CompletedInvocation] = collections.deque(maxlen=HISTORY_LIMIT)
        self._listeners: list[Callable[[CompletedInvocation], None]] = []
        self._queue: list[_QueuedEvent] = []
        self._sequence = itertools.count()
        self._in_flight = 0  # queued + running, asynchronous and synchronous
        self._condition = threading.Condition()
        self._closed = False
        self._dispatchers = [
            threading.Thread(target=self._dispatch_forever, name=f"localrun-dispatch-{index}", daemon=True)
            for index in range(config.concurrency)
        ]
        for thread in self._dispatchers:
            thread.start()

    @property
    def name(self) -> str:
        return self.config.name

    # --- invoking ---------------------------------------------------------------------------------

    def invoke(self, payload: str) -> pool_module.InvocationResult:
        """``RequestResponse``: run the event now (waiting for a free slot) and return how it ended."""
        with self._condition:
            self._in_flight += 1
        try:
            event = _decode(payload)
            kill = self.faults.take(faults_module.KILL, event)
            result = self.pool.invoke(payload, str(uuid.uuid4()), kill_after_s=kill.seconds if kill else None)
            self._record(CompletedInvocation(REQUEST_RESPONSE, event, result))
            return result
        finally:
            self._finish_one()

    def invoke_async(self, payload: str) -> str:
        """``Event``: queue the event and return its request id at once."""
        request_id = str(uuid.uuid4())
        event = _decode(payload)
        if self.faults.take(faults_module.DROP, event):
            return request_id  # accepted, as Lambda's 202 says, and lost
        delay = self.faults.take(faults_module.DELAY, event)
        duplicate = self.faults.take(faults_module.DUPLICATE, event)
        due = time.monotonic() + (delay.seconds if delay else 0.0)
        self._enqueue(_QueuedEvent(due, 0, request_id, payload))
        if duplicate:
            self._enqueue(_QueuedEvent(due + duplicate.seconds, 0, request_id, payload))
        return request_id

    # --- observing --------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[CompletedInvocation], None]) -> None:
        """Call ``listener`` after every finished delivery (from a dispatcher or server thread)."""
        self._listeners.append(listener)

    @property
    def in_flight(self) -> int:
        """Invocations queued or running (retries and failure records still to come included)."""
        with self._condition:
            return self._in_flight

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is queued or running; False if that did not happen within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self) -> None:
        """Drop queued events, stop the dispatchers and every worker process."""
        with self._condition:
            self._closed = True
            dropped = len(self._queue)
            self._in_flight -= dropped
            self._queue.clear()
            self._condition.notify_all()
        if dropped:
            log.warning("queued_events_dropped", extra={"count": dropped})
        self.pool.close()
        for thread in self._dispatchers:
            thread.join(timeout=5.0)

    def __enter__(self) -> LocalFunction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the asynchronous queue -------------------------------------------------------------------

    def _enqueue(self, item: _QueuedEvent) -> None:
        with self._condition:
            if self._closed:
                log.warning("event_dropped_on_shutdown", extra={"request_id": item.request_id})
                return
            item.sequence = next(self._sequence)
            heapq.heappush(self._queue, item)
            self._in_flight += 1
            self._condition.notify_all()

    def _next_due(self) -> _QueuedEvent | None:
        """Block until an event is due (None once closed)."""
        with self._condition:
            while not self._closed:
                if self._queue and self._queue[0].due <= time.monotonic():
                    return heapq.heappop(self._queue)
                timeout = self._queue[0].due - time.monotonic() if self._queue else None
                self._condition.wait(timeout)
            return None

    def _dispatch_forever(self) -> None:
        while (item := self._next_due()) is not None:
            try:
                self._deliver(item)
            except Exception:  # a bug here must not silently stop a dispatcher
                log.exception("dispatch_failed", extra={"request_id": item.request_id})
            finally:
                self._finish_one()

    def _deliver(self, item: _QueuedEvent) -> None:
        event = _decode(item.payload)
        kill = self.faults.take(faults_module.KILL, event)
        result = self.pool.invoke(item.payload, item.request_id, kill_after_s=kill.seconds if kill else None)
        self._record(CompletedInvocation(EVENT, event, result, item.attempt, item.failure_record))
        if result.ok or self._closed:
            return
        if item.attempt <= self.config.maximum_retry_attempts:
            log.warning(
                "event_retry_scheduled",
                extra={"request_id": item.request_id, "attempt": item.attempt + 1},
            )
            due = time.monotonic() + self.config.retry_delay_s
            self._enqueue(_QueuedEvent(due, 0, item.request_id, item.payload, item.attempt + 1))
        elif item.failure_record:
            log.error("failure_record_failed", extra={"request_id": item.request_id, **result.error()})
        elif self.config.deliver_failure_records:
            record = failure_record(self.config.arn, item.request_id, event, item.attempt, result.error())
            if self.config.failure_destination == settings_module.SQS_DESTINATION:
                record = sqs_event(record, self.config.region, f"{self.config.name}-failures")
            self._enqueue(
                _QueuedEvent(time.monotonic(), 0, str(uuid.uuid4()), json.dumps(record), failure_record=True)
            )

    def _record(self, completed: CompletedInvocation) -> None:
        self.history.append(completed)
        for listener in self._listeners:
            try:
                listener(completed)
            except Exception:
                log.exception("listener_failed")

    def _finish_one(self) -> None:
        with self._condition:
            self._in_flight -= 1
            self._condition.notify_all()


def failure_record(
    function_arn: str, request_id: str, event: Any, invoke_count: int, error: dict[str, Any]
) -> dict[str, Any]:
    """What an ``OnFailure`` destination receives after the last attempt failed."""
    now = dt.datetime.now(dt.UTC)
    return {
        "version": "1.0",
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "requestContext": {
            "requestId": request_id,
            "functionArn": f"{function_arn}:$LATEST",
            "condition": "RetriesExhausted",
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": event,
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "responsePayload": {
            "errorMessage": error.get("errorMessage", ""),
            "errorType": error.get("errorType", ""),
        },
    }


def sqs_event(message: Any, region: str, queue_name: str) -> dict[str, Any]:
    """What an SQS event source mapping (batch size 1) hands the function for one message holding ``message``."""
    body = json.dumps(message)
    now_ms = str(int(time.time() * 1000))
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": uuid.uuid4().hex,
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": now_ms,
                    "SenderId": settings_module.ACCOUNT_ID,
                    "ApproximateFirstReceiveTimestamp": now_ms,
                },
                "messageAttributes": {},
                "md5OfBody": hashlib.md5(body.encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{region}:{settings_module.ACCOUNT_ID}:{queue_name}",
                "awsRegion": region,
            }
        ]
    }


def _decode(payload: str) -> Any:
    """The event as JSON (the API has validated it); faults and records need the parsed form."""
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        return payload
