"""Failed events: failure records from the ``OnFailure`` destination, and errors that end a run at once.

A failure record re-dispatches the failed event with the next attempt number, or marks the run FAILED once its
attempts are used up; work already done (an update written, a round committed) never fails the run: beyond its
attempts it is left to the watchdog. Records that no longer matter are ignored: errors a retry cannot fix (see
``errors.TrainingError.retryable``), events of a removed run or of an older generation (from before a resume or a
re-send), a registered worker that can no longer owe the combine's invocation, a round already committed, a stop
or resume an operator has since overridden. A start or resume whose replays are used up goes to the watchdog.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

from trainer import errors, housekeeping, logs, watchdog
from trainer.coordination import FAILED, RunStatus
from trainer.efs_layout import NAME_PATTERN
from trainer.protocol import (
    CombineEvent,
    Event,
    FailureRecord,
    ReduceEvent,
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
    run = services.status.get_run(failed.run_id)
    stale = _why_stale(failed, run, services)
    if stale:
        if run is not None and run.terminal:  # a killed straggler may have left files behind
            housekeeping.clean_up(run, services.layout)
        logs.event(log, "stale_failure_ignored", reason=stale, error=record.error_message)
        return {"status": "ignored", "reason": stale}
    kind = _kind(failed)
    left_to_do = _left_to_do(failed, run, services)
    budget = run.config.max_attempts * (2 if left_to_do != "training" else 1)
    if failed.attempt < budget:
        retry = dataclasses.replace(failed, attempt=failed.attempt + 1)
        services.invoker.invoke_async([retry.to_wire()])
        logs.event(
            log, "failed_event_redispatched", kind=kind, attempt=retry.attempt, error=record.error_message
        )
        return {"status": "redispatched", "attempt": retry.attempt}
    if left_to_do != "training":
        # The round's work is done (an update written, or the round committed): failing the run would throw it
        # away. What is left is the watchdog's to re-send.
        logs.event(
            log, "failed_event_left_to_watchdog", level=logging.ERROR, kind=kind, error=record.error_message
        )
        return {"status": "ignored", "reason": f"{left_to_do} is left to the watchdog"}
    reason = f"{kind} of round {failed.round_index} failed {failed.attempt} times; last error: {record.error_message}"
    services.status.fail_run(
        failed.run_id, reason, round_index=run.round_index, generation=run.generation, instance=run.instance
    )
    logs.event(log, "run_failed", level=logging.ERROR, reason=reason, failed_request_id=record.request_id)
    return {"status": FAILED.lower(), "reason": reason}


def _kind(failed: WorkerEvent | CombineEvent | ReduceEvent) -> str:
    if isinstance(failed, CombineEvent):
        return "combine"
    if isinstance(failed, ReduceEvent):
        return f"reducer {failed.reducer_index}"
    return f"worker {failed.worker_index}"


def _why_stale(
    failed: WorkerEvent | CombineEvent | ReduceEvent, run: RunStatus | None, services: Services
) -> str | None:
    """Why a failed worker or combine event no longer matters, or None if it still has work to do."""
    if run is None:
        return "the run does not exist"
    if not run.owns(failed):
        return "sent for a removed run of the same id"
    if failed.generation < run.generation:
        return f"sent in generation {failed.generation}; the run is in generation {run.generation}"
    if isinstance(failed, CombineEvent):
        if run.is_current(failed.round_index) or run.awaits_follow_up(failed.round_index):
            return None
        return f"run is {run.state} at round {run.round_index}"
    if isinstance(failed, ReduceEvent):
        if run.awaits_follow_up(failed.round_index):
            return None
        if not run.is_current(failed.round_index):
            return f"run is {run.state} at round {run.round_index}"
        record = services.status.get_round(failed.run_id, failed.round_index)
        # Registered: its retry matters only while it may still be the one to commit (nobody else claimed the
        # commit in this generation; it may have died between its registration and the commit).
        if (
            record is not None
            and failed.reducer_index in record.reduced
            and record.commit_claimed_generation == run.generation
            and record.commit_claimed_by != failed.reducer_index
        ):
            return f"reducer {failed.reducer_index} already registered for round {failed.round_index}"
        return None
    if not run.is_current(failed.round_index):
        return f"run is {run.state} at round {run.round_index}"
    record = services.status.get_round(failed.run_id, failed.round_index)
    if record is not None and failed.worker_index in record.done:
        # Registered. Its retry matters only while it may still be the one to invoke the combine: nobody else
        # claimed it in this generation (it may have died between its registration and its claim or Invoke).
        claimed_elsewhere = (
            record.claimed_generation == run.generation and record.claimed_by != failed.worker_index
        )
        if record.completed or claimed_elsewhere:
            return f"worker {failed.worker_index} already registered for round {failed.round_index}"
    return None


def _left_to_do(failed: WorkerEvent | CombineEvent | ReduceEvent, run: RunStatus, services: Services) -> str:
    """What a retry of ``failed`` would still have to do: ``training`` (or combining, or reducing), or only
    cheap steps (``registration`` of an update or slice already written, the ``follow-up`` of a committed
    round)."""
    if isinstance(failed, CombineEvent):
        return "follow-up" if run.round_index > failed.round_index else "training"
    if isinstance(failed, ReduceEvent):
        if run.round_index > failed.round_index:
            return "follow-up"
        written = services.layout.slice_path(failed.run_id, failed.round_index, failed.reducer_index).exists()
        return "registration" if written else "training"
    if services.layout.update_path(failed.run_id, failed.round_index, failed.worker_index).exists():
        return "registration"
    return "training"


def _replay(record: FailureRecord, services: Services) -> dict[str, Any]:
    """A start (direct or S3), resume or stop that failed part-way is sent again (they are idempotent). Once its
    attempts are used up, a run it left without its workers goes to the watchdog at once: re-sent under a new
    generation within the watchdog's own budget, then FAILED with the reason."""
    payload = dict(record.replay_payload or {})
    if not payload:
        logs.event(log, "failed_event_not_retried", level=logging.ERROR, error=record.error_message)
        return {"status": "ignored", "reason": "the failed event is not one this function sends"}
    if "start" in payload and "run" not in payload and record.request_id:
        payload["run"] = default_run_id(record.request_id)  # the id the first attempt gave the run
    overtaken = _overtaken_by_operator(payload, record, services)
    if overtaken:
        logs.event(log, "stale_failure_ignored", reason=overtaken, error=record.error_message)
        return {"status": "ignored", "reason": overtaken}
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
    run_id = _run_id_of(payload, services)
    run = services.status.get_run(run_id) if run_id else None
    # A start leaves work only while nothing of its run was sent; a resume (a new generation: its workers may or
    # may not have gone out) always does.
    unsent_start = run is not None and run.round_index == 0 and run.fanned_out < 0
    if run is not None and run.active and (payload.get("resume") is True or unsent_start):
        action = watchdog.revive(run, services, cause=reason)
        return {"status": action, "reason": reason}
    return {"status": "ignored", "reason": reason}


def _overtaken_by_operator(payload: dict[str, Any], record: FailureRecord, services: Services) -> str | None:
    """A failed stop or resume is not replayed over what an operator did to the run after it failed."""
    if "stop" not in payload and payload.get("resume") is not True:
        return None
    run_id = payload.get("run")
    run = (
        services.status.get_run(run_id)
        if isinstance(run_id, str) and NAME_PATTERN.fullmatch(run_id)
        else None
    )
    if run is None or run.operator_at is None or record.failed_at is None:
        return None
    try:
        acted = dt.datetime.fromisoformat(run.operator_at)
        failed = dt.datetime.fromisoformat(record.failed_at)
    except ValueError:
        return None
    if acted > failed:
        return f"an operator stopped or resumed run {run_id!r} after this event failed ({run.operator_at})"
    return None


def _run_id_of(payload: dict[str, Any], services: Services) -> str | None:
    """The run a start or resume created or continued (for an S3 start, the one its object names)."""
    try:
        event = parse_event(payload)
        if isinstance(event, S3StartEvent):
            return services.read_start_object(event).run_id or event.run_id
    except errors.TrainingError:
        return None
    return event.run_id if isinstance(event, StartEvent) else None


def _describe(payload: dict[str, Any]) -> str:
    if "stop" in payload:
        return "the stop"
    if payload.get("resume"):
        return "the resume"
    return "the start"


def fail_for_error(event: Event, error: errors.TrainingError, services: Services) -> None:
    """An error that ends the run (``error.fails_run``) while working on ``event``: mark the run FAILED now,
    unless the event's round or generation has passed (then the error belongs to a stale copy)."""
    if not error.fails_run or not isinstance(event, WorkerEvent | CombineEvent | ReduceEvent):
        return
    reason = f"{type(error).__name__} in round {event.round_index}: {error}"
    if services.status.fail_run(
        event.run_id,
        reason,
        round_index=event.round_index,
        generation=event.generation,
        instance=event.instance,
    ):
        logs.event(log, "run_failed", level=logging.ERROR, reason=reason)
