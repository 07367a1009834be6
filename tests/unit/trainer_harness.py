"""An in-process Lambda harness for the trainer's tests, and a learnable synthetic dataset.

The harness runs the real handler (``app.lambda_handler``) and keeps every asynchronous invocation it makes in a
queue, so a test decides the delivery order, duplicates events, or drops one, and then drains the queue.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prep import synthetic
from trainer.coordination import RunStatus

NUM_CLASSES = 10


def write_synthetic_dataset(directory: Path, num_train: int = 240, num_test: int = 80, seed: int = 0) -> None:
    synthetic.write_synthetic_dataset(directory, num_train, num_test, seed)


@dataclasses.dataclass
class FakeContext:
    """The attributes of Lambda's Python context; ``remaining_ms`` is a clock the test controls."""

    function_name: str = "lambdatrain-trainer"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:lambdatrain-trainer"
    memory_limit_in_mb: str = "10240"  # a string, as in the real runtime
    aws_request_id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/lambdatrain-trainer"
    log_stream_name: str = "test"
    remaining_ms: Callable[[], int] = lambda: 900_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms()


def race(count: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` for ``i < count`` in threads released at the same instant; their results in order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        results[index] = action(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


class QueueInvoker:
    def __init__(self) -> None:
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.sent: list[dict[str, Any]] = []

    def invoke_async(self, payloads):
        self.queue.extend(payloads)
        self.sent.extend(payloads)


class Harness:
    """Drive the real handler; asynchronous invocations land in ``invoker.queue``."""

    def __init__(self, efs_root: Path, table: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        import app
        from trainer import config
        from trainer import services as trainer_services
        from trainer.coordination import StatusTable
        from trainer.efs_layout import EfsLayout

        self.app = app
        self.efs_root = efs_root
        self.invoker = QueueInvoker()
        self.status = StatusTable(table)
        self.layout = EfsLayout(efs_root)
        monkeypatch.setenv("EFS_ROOT", str(efs_root))
        monkeypatch.setenv("STATUS_TABLE", table.name)
        monkeypatch.setenv("SAFETY_MARGIN_S", "0")
        self.services = trainer_services.Services(
            layout=self.layout, status=self.status, invoker=self.invoker, environment=config.load()
        )
        self.results: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def invoke(self, event: dict[str, Any], context: FakeContext | None = None) -> dict[str, Any]:
        result = self.app.handle(event, context or FakeContext(), self.services)
        self.results.append((event, result))
        return result

    def drain(self, duplicate: bool = False, limit: int = 500) -> None:
        """Deliver queued events in order until none is left (each twice with ``duplicate``)."""
        for _ in range(limit):
            if not self.invoker.queue:
                return
            event = self.invoker.queue.popleft()
            self.invoke(event)
            if duplicate:
                self.invoke(event)
        raise AssertionError(f"queue still not empty after {limit} deliveries")

    def run(self, run_id: str) -> RunStatus:
        run = self.status.get_run(run_id)
        assert run is not None, f"run {run_id} has no item"
        return run

    def final_weights(self, run_id: str) -> list[np.ndarray]:
        """The weights of the run's exported model (a SUCCEEDED run keeps only config.json and final.keras)."""
        import keras

        return keras.models.load_model(self.layout.final_model_path(run_id)).get_weights()


TINY = {"model": "vgg19_bn", "width": 0.0625, "batch_size": 32, "lr": 0.05, "augment": False}


def start_event(run_id: str = "t1", **overrides: Any) -> dict[str, Any]:
    """A start event for a tiny, fast run (3 workers, 2 epochs x 2 rounds unless overridden)."""
    return {
        "start": True,
        "run": run_id,
        "workers": 3,
        "epochs": 2,
        "rounds_per_epoch": 2,
        **TINY,
        **overrides,
    }


FAILURE_RECORD = {
    "version": "1.0",
    "timestamp": "2026-11-27T12:00:00.000Z",
    "requestContext": {"requestId": "r-1", "functionArn": "arn", "condition": "RetriesExhausted"},
    "requestPayload": {},
    "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
    "responsePayload": {"errorMessage": "boom", "errorType": "InvocationError"},
}


def failure_record(
    payload: dict[str, Any],
    error_type: str = "InvocationError",
    request_id: str = "r-1",
    message: str = "boom",
) -> dict[str, Any]:
    """What the OnFailure destination delivers when ``payload`` (invoked as ``request_id``) failed."""
    record = copy.deepcopy(FAILURE_RECORD)
    record["timestamp"] = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")  # when it failed: now
    record["requestPayload"] = payload
    record["requestContext"]["requestId"] = request_id
    record["responsePayload"]["errorType"] = error_type
    record["responsePayload"]["errorMessage"] = message
    return record


# --- scenario helpers shared by the delivery tests ------------------------------------------------------------


class Crash(Exception):
    """A sandbox that died: not one of the trainer's errors, so Lambda and the trainer retry it."""


class Throttled:
    """Within the block, every asynchronous invocation the handler makes is refused (as a throttled Invoke)."""

    def __init__(self, harness: Harness) -> None:
        self.invoker = harness.invoker

    def __enter__(self) -> None:
        def refuse(*args: Any) -> None:
            from trainer.errors import InvocationError

            raise InvocationError("TooManyRequestsException")

        self.invoker.invoke_async = refuse

    def __exit__(self, *exc_info: object) -> None:
        del self.invoker.invoke_async  # back to the class's method


def deliver_until(harness: Harness, predicate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Deliver queued events until the next one satisfies ``predicate``; pop and return that one."""
    for _ in range(200):
        if predicate(harness.invoker.queue[0]):
            return harness.invoker.queue.popleft()
        harness.invoke(harness.invoker.queue.popleft())
    raise AssertionError("no such event was queued")


def run_files(harness: Harness, run_id: str) -> list[str]:
    """Every file under the run's EFS folder, relative to it."""
    run_dir = harness.layout.run_dir(run_id)
    return sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file())


BUCKET = "lambdatrain-123456789012-us-east-1"  # the bucket of S3-started runs in the tests (moto)


def s3_event(key: str) -> dict[str, Any]:
    """``events/s3_put.json`` for the start object ``key``."""
    event = json.loads((Path(__file__).resolve().parents[2] / "events" / "s3_put.json").read_text())
    event["Records"][0]["s3"]["object"]["key"] = key
    return event
