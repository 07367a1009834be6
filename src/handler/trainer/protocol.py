"""The trainer's events: one frozen dataclass per kind, and :func:`parse_event` (no I/O here).

Wire keys from the paper stay verbatim (``start``, ``workers``, ``workerno``, ``epochsdone``, ``combine``);
keys this project adds are snake_case (``run``, ``round``, ``attempt``, ``resume``, ``resume_step``,
``generation``). ``generation`` is the run's generation when the event was sent (a resume or a watchdog re-send
starts a new one); events without it come from the first generation.

==================  ===========================================================================================
kind                example
==================  ===========================================================================================
start               ``{"start": true, "workers": 6, "run": "exp1", "epochs": 30, ...TrainConfig keys}``
start (S3)          an ``ObjectCreated`` notification for ``start/<name>.json``; the object body is a start event
worker              ``{"workerno": 3, "workers": 6, "epochsdone": 7, "run": "exp1", "round": 28, "generation": 1}``
combine             ``{"combine": true, "workers": 6, "epochsdone": 7, "run": "exp1", "round": 28, "generation": 1}``
reduce              ``{"reduce": true, "reducer": 2, "reducers": 4, "workers": 64, "epochsdone": 7, "run": "exp1",
                    "round": 28, "generation": 1}`` - slice 2 of 4 of a sharded round (instead of the combine)
stop                ``{"stop": true, "run": "exp1"}`` - finish the current round, then state STOPPED
watchdog            ``{"watchdog": true}`` - the schedule's check for runs whose events were all lost; ``run`` limits
                    it to one run and ``stalled_after_s`` overrides the silence that counts as stalled (what
                    ``lambdatrain local`` sends when it knows that nothing is queued or running)
failure record      what a Lambda ``OnFailure`` destination delivers for a failed event, directly or (as deployed)
                    as the body of the one SQS message of an ``aws:sqs`` event
==================  ===========================================================================================
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.config import MAX_WORKERS, TrainConfig
from trainer.efs_layout import check_name
from trainer.errors import InvalidEventError

START_PREFIX = "start/"
START_SUFFIX = ".json"


@dataclass(frozen=True)
class StartEvent:
    config: TrainConfig
    run_id: str | None = None  # generated when absent
    resume: bool = False
    attempt: int = 1  # > 1 when a failed start is re-dispatched from its failure record


@dataclass(frozen=True)
class S3StartEvent:
    """A start object was uploaded; its body (read by the flow, not here) is a start event."""

    bucket: str
    key: str
    attempt: int = 1

    @property
    def run_id(self) -> str:
        """The default run id: the key between ``start/`` and ``.json``, with ``/`` as ``-``."""
        return self.key[len(START_PREFIX) : -len(START_SUFFIX)].replace("/", "-")


def default_run_id(request_id: str) -> str:
    """The id of a run whose start event names none: from the start's request id, which Lambda keeps across
    its own retries and which a re-dispatched start carries on as ``run``."""
    return f"run-{request_id[:8]}"


@dataclass(frozen=True)
class WorkerEvent:
    run_id: str
    round_index: int
    worker_index: int
    num_workers: int
    epochs_done: int
    attempt: int = 1
    resume_step: int = 0  # > 0: a chained continuation that starts at this local step
    generation: int = 1
    instance: str | None = None  # the run's random id (None: from a sample or an older sender)

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "workerno": self.worker_index,
            "workers": self.num_workers,
            "epochsdone": self.epochs_done,
            "run": self.run_id,
            "round": self.round_index,
            "attempt": self.attempt,
            "generation": self.generation,
        }
        if self.instance is not None:
            wire["instance"] = self.instance
        if self.resume_step:
            wire["resume_step"] = self.resume_step
        return wire


@dataclass(frozen=True)
class CombineEvent:
    run_id: str
    round_index: int
    num_workers: int
    epochs_done: int
    attempt: int = 1
    generation: int = 1
    instance: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "combine": True,
            "workers": self.num_workers,
            "epochsdone": self.epochs_done,
            "run": self.run_id,
            "round": self.round_index,
            "attempt": self.attempt,
            "generation": self.generation,
        }
        if self.instance is not None:
            wire["instance"] = self.instance
        return wire


@dataclass(frozen=True)
class ReduceEvent:
    """Reducer ``reducer_index`` of ``num_reducers`` averages its slice of every update of a sharded round."""

    run_id: str
    round_index: int
    reducer_index: int
    num_reducers: int
    num_workers: int
    epochs_done: int
    attempt: int = 1
    generation: int = 1
    instance: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "reduce": True,
            "reducer": self.reducer_index,
            "reducers": self.num_reducers,
            "workers": self.num_workers,
            "epochsdone": self.epochs_done,
            "run": self.run_id,
            "round": self.round_index,
            "attempt": self.attempt,
            "generation": self.generation,
        }
        if self.instance is not None:
            wire["instance"] = self.instance
        return wire


@dataclass(frozen=True)
class StopEvent:
    run_id: str
    attempt: int = 1


@dataclass(frozen=True)
class WatchdogEvent:
    """The scheduled check: re-send the current round of runs with no progress, or fail them."""

    run_id: str | None = None  # only this run (default: every active run)
    stalled_after_s: float | None = None  # default: from the function's timeout


@dataclass(frozen=True)
class FailureRecord:
    """An ``OnFailure`` destination record: the failed event and why it failed.

    ``failed`` is the failed worker, combine or reduce event; for a failed start (direct or S3), resume or stop it is
    None and ``replay_payload`` holds the raw event, which is re-dispatched as it is (these events are
    idempotent) with a higher ``attempt``.
    """

    failed: WorkerEvent | CombineEvent | ReduceEvent | None
    error_message: str
    error_type: str | None
    request_id: str | None
    replay_payload: dict[str, Any] | None = None
    failed_at: str | None = None  # the record's timestamp: when the invocation failed

    @property
    def attempt(self) -> int:
        if self.failed is not None:
            return self.failed.attempt
        attempt = (self.replay_payload or {}).get("attempt", 1)
        return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1


Event = (
    StartEvent
    | S3StartEvent
    | WorkerEvent
    | CombineEvent
    | ReduceEvent
    | StopEvent
    | WatchdogEvent
    | FailureRecord
)


def parse_event(raw: Any) -> Event:
    """Classify and validate a raw Lambda event. Raises :class:`InvalidEventError` naming the bad key."""
    if not isinstance(raw, Mapping):
        raise InvalidEventError(f"event must be a JSON object, got {type(raw).__name__}")
    if "requestPayload" in raw and "requestContext" in raw:
        return _parse_failure_record(raw)
    if "Records" in raw:
        return _parse_records(raw)
    if "start" in raw:
        return parse_start(raw)
    if "combine" in raw:
        return _parse_combine(raw)
    if "reduce" in raw:
        return _parse_reduce(raw)
    if "workerno" in raw:
        return _parse_worker(raw)
    if "stop" in raw:
        _expect_keys(raw, required={"stop", "run"}, optional={"attempt"})
        _require_true(raw, "stop")
        return StopEvent(
            run_id=check_name("run", raw["run"]), attempt=_int(raw, "attempt", 1, 100, default=1)
        )
    if "watchdog" in raw:
        _expect_keys(raw, required={"watchdog"}, optional={"run", "stalled_after_s"})
        _require_true(raw, "watchdog")
        stalled_after_s = raw.get("stalled_after_s")
        if stalled_after_s is not None and (
            isinstance(stalled_after_s, bool)
            or not isinstance(stalled_after_s, int | float)
            or not 0 <= stalled_after_s <= 86_400
        ):
            raise InvalidEventError(
                f"stalled_after_s must be a number of seconds from 0 to 86400, got {stalled_after_s!r}"
            )
        run_id = check_name("run", raw["run"]) if "run" in raw else None
        return WatchdogEvent(run_id=run_id, stalled_after_s=stalled_after_s)
    raise InvalidEventError(
        f"unrecognised event with keys {sorted(raw)}; expected one of 'start', 'workerno', 'combine', 'reduce', "
        "'stop', "
        "'watchdog', "
        "an S3 'Records' notification or a Lambda destination record"
    )


def parse_start(raw: Any) -> StartEvent:
    """Validate a start event (direct, or the body of a start object)."""
    if not isinstance(raw, Mapping):
        raise InvalidEventError(f"start event must be a JSON object, got {type(raw).__name__}")
    _require_true(raw, "start")
    body = dict(raw)
    body.pop("start")
    run_id = body.pop("run", None)
    if run_id is not None:
        check_name("run", run_id)
    resume = body.pop("resume", False)
    if not isinstance(resume, bool):
        raise InvalidEventError(f"resume must be a boolean, got {resume!r}")
    attempt = _int(body, "attempt", 1, 100, default=1)
    body.pop("attempt", None)
    if resume:
        if body:
            raise InvalidEventError(
                f"a resume event continues the run's own configuration; remove {sorted(body)}"
            )
        return StartEvent(config=TrainConfig(), run_id=run_id, resume=True, attempt=attempt)
    if "workers" not in body:
        raise InvalidEventError("start event is missing 'workers' (an integer from 1 to 256)")
    return StartEvent(config=TrainConfig.from_mapping(body), run_id=run_id, attempt=attempt)


def parse_start_object(body: bytes, key: str) -> StartEvent:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidEventError(f"start object {key!r} is not valid JSON: {exc}") from exc
    return parse_start(raw)


def _parse_worker(raw: Mapping[str, Any]) -> WorkerEvent:
    _expect_keys(
        raw,
        required={"workerno", "workers", "epochsdone", "run", "round"},
        optional={"attempt", "resume_step", "generation", "instance"},
    )
    workers = _int(raw, "workers", 1, MAX_WORKERS)
    event = WorkerEvent(
        run_id=check_name("run", raw["run"]),
        round_index=_int(raw, "round", 0, 10**9),
        worker_index=_int(raw, "workerno", 0, workers - 1),
        num_workers=workers,
        epochs_done=_int(raw, "epochsdone", 0, 10**6),
        attempt=_int(raw, "attempt", 1, 100, default=1),
        resume_step=_int(raw, "resume_step", 0, 10**9, default=0),
        generation=_int(raw, "generation", 1, 10**6, default=1),
        instance=_instance(raw),
    )
    return event


def _parse_combine(raw: Mapping[str, Any]) -> CombineEvent:
    _expect_keys(
        raw,
        required={"combine", "workers", "epochsdone", "run", "round"},
        optional={"attempt", "generation", "instance"},
    )
    _require_true(raw, "combine")
    return CombineEvent(
        run_id=check_name("run", raw["run"]),
        round_index=_int(raw, "round", 0, 10**9),
        num_workers=_int(raw, "workers", 1, MAX_WORKERS),
        epochs_done=_int(raw, "epochsdone", 0, 10**6),
        attempt=_int(raw, "attempt", 1, 100, default=1),
        generation=_int(raw, "generation", 1, 10**6, default=1),
        instance=_instance(raw),
    )


def _parse_reduce(raw: Mapping[str, Any]) -> ReduceEvent:
    _expect_keys(
        raw,
        required={"reduce", "reducer", "reducers", "workers", "epochsdone", "run", "round"},
        optional={"attempt", "generation", "instance"},
    )
    _require_true(raw, "reduce")
    reducers = _int(raw, "reducers", 2, MAX_WORKERS)
    return ReduceEvent(
        run_id=check_name("run", raw["run"]),
        round_index=_int(raw, "round", 0, 10**9),
        reducer_index=_int(raw, "reducer", 0, reducers - 1),
        num_reducers=reducers,
        num_workers=_int(raw, "workers", 1, MAX_WORKERS),
        epochs_done=_int(raw, "epochsdone", 0, 10**6),
        attempt=_int(raw, "attempt", 1, 100, default=1),
        generation=_int(raw, "generation", 1, 10**6, default=1),
        instance=_instance(raw),
    )


def _instance(raw: Mapping[str, Any]) -> str | None:
    return check_name("instance", raw["instance"]) if "instance" in raw else None


def _parse_records(raw: Mapping[str, Any]) -> S3StartEvent | FailureRecord:
    """An S3 notification (a start object) or an SQS message carrying a destination record."""
    records = raw["Records"]
    if not isinstance(records, list) or len(records) != 1 or not isinstance(records[0], Mapping):
        count = len(records) if isinstance(records, list) else type(records).__name__
        raise InvalidEventError(f"a Records event must hold exactly one record object, got {count}")
    unknown = sorted(set(raw) - {"Records", "attempt"})
    if unknown:
        raise InvalidEventError(f"a Records event has unknown key(s) {unknown}")
    if records[0].get("eventSource") == "aws:sqs":
        body = records[0].get("body")
        try:
            message = json.loads(body) if isinstance(body, str) else None
        except json.JSONDecodeError as exc:
            raise InvalidEventError(f"SQS message body is not JSON: {exc}") from exc
        if (
            not isinstance(message, Mapping)
            or "requestPayload" not in message
            or "requestContext" not in message
        ):
            raise InvalidEventError(
                "SQS message body must be a Lambda destination record (requestPayload, ...)"
            )
        return _parse_failure_record(message)
    return _parse_s3(raw)


def _parse_s3(raw: Mapping[str, Any]) -> S3StartEvent:
    attempt = _int(raw, "attempt", 1, 100, default=1)
    records = raw["Records"]
    record = records[0]
    try:
        source = record["eventSource"]
        name = record["eventName"]
        bucket = record["s3"]["bucket"]["name"]
        encoded_key = record["s3"]["object"]["key"]
    except (KeyError, TypeError) as exc:
        raise InvalidEventError(
            f"S3 record is missing {exc}; expected the shape of an s3:ObjectCreated notification"
        ) from exc
    if source != "aws:s3" or not str(name).startswith("ObjectCreated"):
        raise InvalidEventError(f"expected an aws:s3 ObjectCreated record, got {source!r} {name!r}")
    if not isinstance(bucket, str) or not isinstance(encoded_key, str):
        raise InvalidEventError("S3 record bucket name and object key must be strings")
    key = urllib.parse.unquote_plus(encoded_key)
    if not key.startswith(START_PREFIX) or not key.endswith(START_SUFFIX):
        raise InvalidEventError(
            f"S3 key {key!r} is not a start object; expected {START_PREFIX}<name>{START_SUFFIX}"
        )
    event = S3StartEvent(bucket=bucket, key=key, attempt=attempt)
    check_name("run id derived from the S3 key", event.run_id)
    return event


def _parse_failure_record(raw: Mapping[str, Any]) -> FailureRecord:
    payload = raw["requestPayload"]
    context = raw["requestContext"] if isinstance(raw["requestContext"], Mapping) else {}
    response = raw.get("responsePayload")
    error_type = None
    if isinstance(response, Mapping):
        message = str(response.get("errorMessage") or response.get("errorType") or "unknown error")
        error_type = str(response["errorType"]) if response.get("errorType") else None
    else:
        message = str(context.get("condition") or "unknown error")
    failed: WorkerEvent | CombineEvent | ReduceEvent | None = None
    replay_payload = None
    if isinstance(payload, Mapping) and "combine" in payload:
        failed = _parse_combine(payload)
    elif isinstance(payload, Mapping) and "reduce" in payload:
        failed = _parse_reduce(payload)
    elif isinstance(payload, Mapping) and "workerno" in payload:
        failed = _parse_worker(payload)
    elif isinstance(payload, Mapping) and ("start" in payload or "Records" in payload or "stop" in payload):
        replay_payload = dict(payload)
    return FailureRecord(
        failed=failed,
        error_message=message[:1000],
        error_type=error_type,
        request_id=context.get("requestId"),
        replay_payload=replay_payload,
        failed_at=raw["timestamp"] if isinstance(raw.get("timestamp"), str) else None,
    )


def _expect_keys(raw: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - set(raw))
    if missing:
        raise InvalidEventError(f"event is missing key(s) {missing}")
    unknown = sorted(set(raw) - required - optional)
    if unknown:
        raise InvalidEventError(f"event has unknown key(s) {unknown}; allowed: {sorted(required | optional)}")


def _require_true(raw: Mapping[str, Any], key: str) -> None:
    if raw.get(key) is not True:
        raise InvalidEventError(f"{key} must be true, got {raw.get(key)!r}")


def _int(raw: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    if key not in raw and default is not None:
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEventError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise InvalidEventError(f"{key} must be between {low} and {high}, got {value}")
    return value
