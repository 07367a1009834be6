"""Failure records from the ``OnFailure`` destination: re-dispatch the failed event with the next attempt
number, or mark the run FAILED once its attempts are used up. Errors a retry cannot fix are only logged."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from trainer import logs
from trainer.coordination import FAILED
from trainer.protocol import CombineEvent, FailureRecord
from trainer.services import Services

log = logging.getLogger(__name__)

NOT_RETRIED = ("InvalidEventError", "CoordinationConflictError")
START_MAX_ATTEMPTS = 3


def handle_failure(record: FailureRecord, services: Services) -> dict[str, Any]:
    """Re-dispatch a failed event with the next attempt number, or fail the run once attempts are used up."""
    if record.error_type in NOT_RETRIED:
        logs.event(log, "failed_event_not_retried", level=logging.ERROR, error=record.error_message)
        return {"status": "ignored", "reason": f"{record.error_type} is not retried"}
    failed = record.failed
    if failed is None:
        return _retry_start(record, services)
    logs.bind_more(run_id=failed.run_id, round=failed.round_index)
    run = services.status.get_run(failed.run_id)
    unfinished_fan_out = (
        isinstance(failed, CombineEvent) and run is not None and run.awaits_fan_out_after(failed.round_index)
    )
    if run is None or not (run.is_current(failed.round_index) or unfinished_fan_out):
        logs.event(log, "stale_failure_ignored", error=record.error_message)
        return {"status": "ignored"}
    kind = "combine" if isinstance(failed, CombineEvent) else f"worker {failed.worker_index}"
    if failed.attempt < run.config.max_attempts:
        retry = dataclasses.replace(failed, attempt=failed.attempt + 1)
        services.invoker.invoke_async([retry.to_wire()])
        logs.event(
            log, "failed_event_redispatched", kind=kind, attempt=retry.attempt, error=record.error_message
        )
        return {"status": "redispatched", "attempt": retry.attempt}
    reason = f"{kind} of round {failed.round_index} failed {failed.attempt} times; last error: {record.error_message}"
    services.status.fail_run(failed.run_id, reason)
    logs.event(log, "run_failed", level=logging.ERROR, reason=reason, failed_request_id=record.request_id)
    return {"status": FAILED.lower(), "reason": reason}


def _retry_start(record: FailureRecord, services: Services) -> dict[str, Any]:
    """A start (direct or S3) that failed part-way is safe to send again: starting is idempotent."""
    if record.start_payload is None or record.attempt >= START_MAX_ATTEMPTS:
        logs.event(
            log, "start_failed", level=logging.ERROR, error=record.error_message, attempt=record.attempt
        )
        return {"status": "ignored", "reason": "the start failed and is not retried"}
    retry = {**record.start_payload, "attempt": record.attempt + 1}
    services.invoker.invoke_async([retry])
    logs.event(log, "failed_start_redispatched", attempt=record.attempt + 1, error=record.error_message)
    return {"status": "redispatched", "attempt": record.attempt + 1}
