"""Failed events: failure records from the ``OnFailure`` destination, and errors that end a run at once.

A failure record re-dispatches the failed event with the next attempt number, or marks the run FAILED once its
attempts are used up. Records that no longer matter are ignored: errors a retry cannot fix (see
``errors.TrainingError.retryable``), events of an older generation (from before a resume), a worker whose other
copy already registered, a round already committed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from trainer import errors, logs
from trainer.coordination import FAILED
from trainer.protocol import (
    CombineEvent,
    Event,
    FailureRecord,
    S3StartEvent,
    StartEvent,
    WorkerEvent,
    default_run_id,
    parse_event,
)
from trainer.services import Services

log = logging.getLogger(__name__)

REPLAY_MAX_ATTEMPTS = 3  # starts, resumes and stops (idempotent events) are sent at most this often


def handle_failure(record: FailureRecord, services: Services) -> dict[str, Any]:
    """Re-dispatch a failed event with the next attempt number, or fail the run once attempts are used up."""
    if not errors.is_retryable(record.error_type):
        logs.event(log, "failed_event_not_retried", level=logging.ERROR, error=record.error_message)
        return {"status": "ignored", "reason": f"{record.error_type} is not retried"}
    failed = record.failed
    if failed is None:
        return _replay(record, services)
    logs.bind_more(run_id=failed.run_id, round=failed.round_index)
    stale = _why_stale(failed, services)
    if stale:
        logs.event(log, "stale_failure_ignored", reason=stale, error=record.error_message)
        return {"status": "ignored", "reason": stale}
    run = services.status.get_run(failed.run_id)
    kind = "combine" if isinstance(failed, CombineEvent) else f"worker {failed.worker_index}"
    if failed.attempt < run.config.max_attempts:
        retry = dataclasses.replace(failed, attempt=failed.attempt + 1)
        services.invoker.invoke_async([retry.to_wire()])
        logs.event(
            log, "failed_event_redispatched", kind=kind, attempt=retry.attempt, error=record.error_message
        )
        return {"status": "redispatched", "attempt": retry.attempt}
    reason = f"{kind} of round {failed.round_index} failed {failed.attempt} times; last error: {record.error_message}"
    services.status.fail_run(failed.run_id, reason, round_index=run.round_index, generation=run.generation)
    logs.event(log, "run_failed", level=logging.ERROR, reason=reason, failed_request_id=record.request_id)
    return {"status": FAILED.lower(), "reason": reason}


def _why_stale(failed: WorkerEvent | CombineEvent, services: Services) -> str | None:
    """Why a failed worker or combine event no longer matters, or None if it still has work to do."""
    run = services.status.get_run(failed.run_id)
    if run is None:
        return "the run does not exist"
    if failed.generation < run.generation:
        return f"sent in generation {failed.generation}; the run is in generation {run.generation}"
    if isinstance(failed, CombineEvent):
        if run.is_current(failed.round_index) or run.awaits_follow_up(failed.round_index):
            return None
        return f"run is {run.state} at round {run.round_index}"
    if not run.is_current(failed.round_index):
        return f"run is {run.state} at round {run.round_index}"
    record = services.status.get_round(failed.run_id, failed.round_index)
    if record is not None and failed.worker_index in record.done:
        return f"worker {failed.worker_index} already registered for round {failed.round_index}"
    return None


def _replay(record: FailureRecord, services: Services) -> dict[str, Any]:
    """A start (direct or S3), resume or stop that failed part-way is sent again (they are idempotent); once
    its attempts are used up, a run it left active with nothing sent is marked FAILED."""
    payload = dict(record.replay_payload or {})
    if not payload:
        logs.event(log, "failed_event_not_retried", level=logging.ERROR, error=record.error_message)
        return {"status": "ignored", "reason": "the failed event is not one this function sends"}
    if "start" in payload and "run" not in payload and record.request_id:
        payload["run"] = default_run_id(record.request_id)  # the id the first attempt gave the run
    if record.attempt < REPLAY_MAX_ATTEMPTS:
        payload["attempt"] = record.attempt + 1
        services.invoker.invoke_async([payload])
        logs.event(
            log,
            "failed_event_redispatched",
            kind="replay",
            attempt=payload["attempt"],
            error=record.error_message,
        )
        return {"status": "redispatched", "attempt": payload["attempt"]}
    reason = f"{_describe(payload)} failed {record.attempt} times; last error: {record.error_message}"
    logs.event(log, "replay_attempts_exhausted", level=logging.ERROR, reason=reason)
    try:
        event = parse_event(payload)
    except errors.InvalidEventError:
        return {"status": "ignored", "reason": reason}
    run_id = event.run_id if isinstance(event, StartEvent | S3StartEvent) else None
    run = services.status.get_run(run_id) if run_id else None
    if run is not None and run.active and run.fanned_out < run.round_index:  # it never got its workers out
        services.status.fail_run(run.run_id, reason, round_index=run.round_index, generation=run.generation)
        logs.event(log, "run_failed", level=logging.ERROR, reason=reason, failed_request_id=record.request_id)
        return {"status": FAILED.lower(), "reason": reason}
    return {"status": "ignored", "reason": reason}


def _describe(payload: dict[str, Any]) -> str:
    if "stop" in payload:
        return "the stop"
    if payload.get("resume"):
        return "the resume"
    return "the start"


def fail_for_error(event: Event, error: errors.TrainingError, services: Services) -> None:
    """An error that ends the run (``error.fails_run``) while working on ``event``: mark the run FAILED now,
    unless the event's round or generation has passed (then the error belongs to a stale copy)."""
    if not error.fails_run or not isinstance(event, WorkerEvent | CombineEvent):
        return
    reason = f"{type(error).__name__} in round {event.round_index}: {error}"
    if services.status.fail_run(
        event.run_id, reason, round_index=event.round_index, generation=event.generation
    ):
        logs.event(log, "run_failed", level=logging.ERROR, reason=reason)
