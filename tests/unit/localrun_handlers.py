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
    """Start / round / stop events over the real table layout; ``FAKE_ROUND_S`` seconds per round."""
    import boto3

    table = boto3.resource("dynamodb").Table(os.environ["STATUS_TABLE"])
    if "requestPayload" in event or "Records" in event:
        return {"ignored": "failure record"}
    run_id = event["run"]
    key = {"pk": f"RUN#{run_id}", "sk": "RUN"}
    if event.get("stop"):
        with contextlib.suppress(table.meta.client.exceptions.ConditionalCheckFailedException):
            table.update_item(
                Key=key,
                UpdateExpression="SET #s = :stop",
                ConditionExpression="#s = :running",
                ExpressionAttributeNames={"#s": "state"},
                ExpressionAttributeValues={":stop": "STOP_REQUESTED", ":running": "RUNNING"},
            )
        return {"stop": True}
    if event.get("start") and event.get("resume"):
        run = table.update_item(
            Key=key,
            UpdateExpression="SET #s = :running",
            ExpressionAttributeNames={"#s": "state"},
            ExpressionAttributeValues={":running": "RUNNING"},
            ReturnValues="ALL_NEW",
        )["Attributes"]
        _invoke_self({"fake_round": int(run["round"]), "run": run_id})
        return {"resumed": True}
    if event.get("start"):
        rounds_per_epoch = int(event.get("rounds_per_epoch", 1))
        table.put_item(
            Item={
                **key,
                "state": "RUNNING",
                "round": 0,
                "total_rounds": int(event.get("epochs", 1)) * rounds_per_epoch,
                "rounds_per_epoch": rounds_per_epoch,
                "epochsdone": 0,
                "workers": int(event["workers"]),
            }
        )
        _invoke_self({"fake_round": 0, "run": run_id})
        return {"started": True}

    round_index = int(event["fake_round"])
    run = table.get_item(Key=key, ConsistentRead=True)["Item"]
    if run["state"] == "STOP_REQUESTED":
        table.update_item(
            Key=key,
            UpdateExpression="SET #s = :stopped",
            ExpressionAttributeNames={"#s": "state"},
            ExpressionAttributeValues={":stopped": "STOPPED"},
        )
        return {"stopped": True}
    # Marker files let a test time its Ctrl-C.
    Path(os.environ["EFS_ROOT"], f"{run_id}-round-{round_index}.started").touch()
    time.sleep(float(os.environ.get("FAKE_ROUND_S", "0")))
    done = round_index + 1
    epochs_done = done // int(run["rounds_per_epoch"])
    accuracy = f"{0.1 + 0.1 * done:.2f}"
    table.put_item(
        Item={
            "pk": key["pk"],
            "sk": f"ROUND#{round_index:06d}",
            "round": round_index,
            "epochsdone": epochs_done,
            "train_loss": _decimal(f"{2.0 / done:.3f}"),
            "test_accuracy": _decimal(accuracy),
            "duration_s": {"load": _decimal("0.5"), "compute": _decimal("2.0")},
            "completed_at": "2026-01-01T00:00:00+00:00",
        }
    )
    Path(os.environ["EFS_ROOT"], f"{run_id}-round-{round_index}.done").touch()
    last = done >= int(run["total_rounds"])
    final_model = str(Path(os.environ["EFS_ROOT"]) / "runs" / run_id / "final.keras")
    finish = ", #s = :succeeded, final_model = :f" if last else ""  # never clobber a STOP_REQUESTED
    table.update_item(
        Key=key,
        UpdateExpression=f"SET #r = :r, epochsdone = :e, test_accuracy = :a{finish}",
        ExpressionAttributeNames={"#r": "round", **({"#s": "state"} if last else {})},
        ExpressionAttributeValues={
            ":r": done,
            ":e": epochs_done,
            ":a": _decimal(accuracy),
            **({":succeeded": "SUCCEEDED", ":f": final_model} if last else {}),
        },
    )
    if not last:
        _invoke_self({"fake_round": done, "run": run_id})
    return {"round": round_index}


def _invoke_self(event: dict[str, Any]) -> None:
    import boto3

    boto3.client("lambda").invoke(
        FunctionName=os.environ["AWS_LAMBDA_FUNCTION_NAME"], InvocationType="Event", Payload=json.dumps(event)
    )


def _decimal(text: str) -> Any:
    from decimal import Decimal

    return Decimal(text)


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
    """A toy function behind a running Invoke API: yields ``(function, api, notes_dir)``."""
    from localrun import environment, function, lambda_api, pool

    notes_dir = tmp_path / f"notes-{uuid.uuid4().hex[:6]}"
    notes_dir.mkdir()
    with lambda_api.LambdaApiServer([]) as api:
        config = pool.FunctionConfig(
            name="toy",
            handler=handler,
            code_dir=HERE,
            timeout_s=timeout_s,
            environment=environment.handler_environment(
                function_name="toy",
                efs_root=tmp_path / "efs",
                status_table="unused",
                lambda_endpoint_url=api.endpoint_url,
                dynamodb_endpoint_url="http://127.0.0.1:9",
                memory_mb=pool.DEFAULT_MEMORY_MB,
                extra={"NOTES_DIR": str(notes_dir), **(extra_env or {})},
            ),
            unset_environment=environment.UNSET_FOR_HANDLER,
        )
        async_config = function.AsyncConfig(
            maximum_retry_attempts=maximum_retry_attempts,
            retry_delay_s=0.1,
            failure_destination=failure_destination,
        )
        with function.LocalFunction(config, concurrency, async_config, faults) as local_function:
            api.add_function(local_function)
            yield local_function, api, notes_dir
