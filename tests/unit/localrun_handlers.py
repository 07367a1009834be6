"""Toy Lambda handlers for the local runtime's tests (never the real trainer), and helpers to run them.

``handle`` does what the event's ``action`` says (echo, sleep, fail, crash, invoke itself, report the time left)
and writes one JSON "note" per invocation into ``$NOTES_DIR``, so a test can see what ran where.
``fake_trainer`` keeps a run item and round items in the status table like the real trainer does, cheaply, so
the CLI can be tested end to end in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HANDLER = "localrun_handlers.handle"
INVOCATIONS = 0  # module state: survives between invocations of a warm process


def handle(event: Any, context: Any) -> Any:
    global INVOCATIONS
    INVOCATIONS += 1
    action = event.get("action", "echo") if isinstance(event, Mapping) else "echo"
    record = _failure_record(event)
    if record is not None:
        action = "fail" if record["requestPayload"].get("fail_records_too") else "echo"
    started = time.time()
    _write_note(event, context, started)
    if action == "sleep":
        time.sleep(float(event["seconds"]))
    elif action == "fail":
        raise ValueError(f"failing on purpose: {event.get('message', 'no message')}")
    elif action == "crash":
        os._exit(3)
    elif action == "invoke":
        import boto3  # a plain client: the endpoint comes from AWS_ENDPOINT_URL_LAMBDA

        boto3.client("lambda").invoke(
            FunctionName=os.environ["AWS_LAMBDA_FUNCTION_NAME"],
            InvocationType="Event",
            Payload=json.dumps(event["next"]).encode(),
        )
    elif action == "not_json":
        return {1, 2, 3}
    return {
        "event": event,
        "pid": os.getpid(),
        "invocations": INVOCATIONS,
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "started": started,
        "finished": time.time(),
        "environment": {name: os.environ.get(name) for name in event.get("show_env", [])},
    }


def _failure_record(event: Any) -> dict[str, Any] | None:
    """The OnFailure record in ``event``, delivered as is or as an SQS message body; else None."""
    if isinstance(event, Mapping) and "Records" in event:
        event = json.loads(event["Records"][0]["body"])
    return event if isinstance(event, Mapping) and "requestPayload" in event else None


def _write_note(event: Any, context: Any, started: float) -> None:
    notes_dir = os.environ.get("NOTES_DIR")
    if not notes_dir:
        return
    note = {"event": event, "pid": os.getpid(), "request_id": context.aws_request_id, "started": started}
    path = Path(notes_dir) / f"{time.time_ns()}-{os.getpid()}.json"
    path.write_text(json.dumps(note))


def read_notes(notes_dir: Path) -> list[dict[str, Any]]:
    """Every invocation's note, in the order the invocations started."""
    return [json.loads(path.read_text()) for path in sorted(notes_dir.glob("*.json"))]


# --- a fake trainer for the CLI tests ----------------------------------------------------------------------


def fake_trainer(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Start / round / stop events through the real status table class; ``FAKE_ROUND_S`` seconds per round."""
    from trainer import coordination, protocol
    from trainer.errors import CoordinationConflictError

    status = coordination.StatusTable.from_name(os.environ["STATUS_TABLE"])
    if "requestPayload" in event or "Records" in event:
        return {"ignored": "failure record"}
    run_id = event["run"]
    if event.get("stop"):
        status.request_stop(run_id)
        return {"stop": True}
    if event.get("start") and event.get("resume"):
        run = status.resume_run(run_id)
        _invoke_self({"fake_round": run.round_index, "run": run_id})
        return {"resumed": True}
    if event.get("start"):
        config = protocol.parse_start(event).config
        status.create_run(coordination.RunStatus.new(run_id, config, num_train=1_000))
        _invoke_self({"fake_round": 0, "run": run_id})
        return {"started": True}

    round_index = int(event["fake_round"])
    run = status.get_run(run_id)
    # Marker files let a test time its Ctrl-C.
    Path(os.environ["EFS_ROOT"], f"{run_id}-round-{round_index}.started").touch()
    time.sleep(float(os.environ.get("FAKE_ROUND_S", "0")))
    done = round_index + 1
    epochs_done = done // run.schedule.rounds_per_epoch
    accuracy = round(0.1 + 0.1 * done, 2)
    metrics = coordination.RoundMetrics(
        epochs_done=epochs_done,
        samples=run.num_train,
        train_loss=round(2.0 / done, 3),
        duration_s={"load": 0.5, "compute": 2.0},
        bytes_read=0,
        bytes_written=0,
        test_accuracy=accuracy,
    )
    last = done >= run.total_rounds
    while True:  # as the real combine: a stop requested meanwhile ends the run after this round
        new_state = (
            coordination.STOPPED if run.state == coordination.STOP_REQUESTED and not last else run.state
        )
        try:
            status.commit_round(
                run,
                epochs_done,
                new_state,
                f"t{done}",
                coordination.RunSummary(test_accuracy=accuracy),
                metrics,
            )
            break
        except CoordinationConflictError:
            run = status.get_run(run_id)
    Path(os.environ["EFS_ROOT"], f"{run_id}-round-{round_index}.done").touch()
    if new_state == coordination.STOPPED:
        return {"stopped": True}
    if last:
        final_model = str(Path(os.environ["EFS_ROOT"]) / "runs" / run_id / "final.keras")
        status.finish_run(status.get_run(run_id), coordination.RunSummary(final_model=final_model))
        return {"round": round_index}
    _invoke_self({"fake_round": done, "run": run_id})
    return {"round": round_index}


def _invoke_self(event: dict[str, Any]) -> None:
    import boto3

    boto3.client("lambda").invoke(
        FunctionName=os.environ["AWS_LAMBDA_FUNCTION_NAME"], InvocationType="Event", Payload=json.dumps(event)
    )


# --- test-side helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    handler: str = HANDLER,
    timeout_s: float = 30.0,
    concurrency: int = 2,
    maximum_retry_attempts: int = 0,
    failure_destination: str = "lambda",
    faults: Any = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Any, Any, Path]]:
    """A toy function behind a running Invoke API (no DynamoDB): yields ``(function, api, notes_dir)``."""
    from localrun import runtime, settings

    notes_dir = tmp_path / f"notes-{uuid.uuid4().hex[:6]}"
    notes_dir.mkdir()
    toy = settings.FunctionSettings(
        name="toy",
        handler=handler,
        code_dir=HERE,
        timeout_s=timeout_s,
        environment={"NOTES_DIR": str(notes_dir), **(extra_env or {})},
        concurrency=concurrency,
        maximum_retry_attempts=maximum_retry_attempts,
        retry_delay_s=0.1,
        failure_destination=failure_destination,
    )
    local = runtime.LocalRuntime(
        toy, efs_root=tmp_path / "efs", table_name="unused", with_dynamodb=False, fault_plan=faults
    )
    with local:
        yield local.function, local.api, notes_dir
