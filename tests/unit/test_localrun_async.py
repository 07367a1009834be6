"""Asynchronous invocation: retries, OnFailure records, and the fault-injection hooks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from localrun_handlers import read_notes, serve

from localrun import faults, function, settings


def deliveries(local_function: function.LocalFunction) -> list[function.CompletedInvocation]:
    return [item for item in local_function.history if item.invocation_type == function.EVENT]


def key_tree(value: Any) -> Any:
    """The nested key structure of a JSON value (values dropped), to compare shapes."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    return type(value).__name__


def test_failed_event_is_retried_then_a_failure_record_is_delivered(tmp_path: Path) -> None:
    event = {"action": "fail", "message": "always"}
    with serve(tmp_path, maximum_retry_attempts=2) as (local_function, _, notes_dir):
        request_id = local_function.invoke_async(json.dumps(event))
        assert local_function.wait_idle(timeout_s=10)
        notes = read_notes(notes_dir)

    attempts = [item for item in deliveries(local_function) if not item.failure_record]
    assert [item.attempt for item in attempts] == [1, 2, 3]
    assert {item.result.request_id for item in attempts} == {request_id}  # retries keep the request id
    assert [note["event"] for note in notes[:3]] == [event] * 3
    record = notes[3]["event"]
    assert len(notes) == 4
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": f"{local_function.config.arn}:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == event
    assert record["responseContext"] == {
        "statusCode": 200,
        "executedVersion": "$LATEST",
        "functionError": "Unhandled",
    }
    assert record["responsePayload"] == {
        "errorMessage": "failing on purpose: always",
        "errorType": "ValueError",
    }


def test_sqs_destination_wraps_the_record_as_the_deployed_queue_would(tmp_path: Path) -> None:
    from trainer import protocol

    worker_event = {"action": "fail", "workerno": 1, "workers": 2, "epochsdone": 0, "run": "r1", "round": 0}
    with serve(tmp_path, failure_destination=settings.SQS_DESTINATION) as (local_function, _, notes_dir):
        request_id = local_function.invoke_async(json.dumps(worker_event))
        assert local_function.wait_idle(timeout_s=10)
        delivered = read_notes(notes_dir)[-1]["event"]

    (message,) = delivered["Records"]
    assert message["eventSource"] == "aws:sqs"
    assert message["eventSourceARN"] == "arn:aws:sqs:us-east-1:123456789012:toy-failures"
    record = json.loads(message["body"])
    assert record["requestContext"]["requestId"] == request_id
    assert record["requestPayload"] == worker_event
    # The trainer accepts what either destination delivers (the toy "action" key aside).
    for shape in (delivered, record):
        parsed = protocol.parse_event(_without_action(shape))
        assert isinstance(parsed, protocol.FailureRecord) and parsed.request_id == request_id


def _without_action(event: dict[str, Any]) -> dict[str, Any]:
    if "Records" in event:
        record = json.loads(event["Records"][0]["body"])
        return {"Records": [{**event["Records"][0], "body": json.dumps(_without_action(record))}]}
    return {**event, "requestPayload": {k: v for k, v in event["requestPayload"].items() if k != "action"}}


def test_failure_record_has_the_shape_of_the_sample_event(load_event: Callable[[str], Any]) -> None:
    sample = load_event("failure_record")
    error = {"errorMessage": "worker 3 ran out of memory", "errorType": "MemoryError", "stackTrace": []}

    record = function.failure_record(
        "arn:aws:lambda:us-east-1:123456789012:function:lambdatrain-trainer",
        sample["requestContext"]["requestId"],
        sample["requestPayload"],
        1,
        error,
    )

    assert key_tree(record) == key_tree(sample)
    assert {
        key: record[key] for key in ("requestContext", "requestPayload", "responseContext", "responsePayload")
    } == {
        key: sample[key] for key in ("requestContext", "requestPayload", "responseContext", "responsePayload")
    }


def test_timed_out_event_is_killed_and_its_failure_record_carries_the_timeout(tmp_path: Path) -> None:
    with serve(tmp_path, timeout_s=2.0) as (local_function, _, notes_dir):
        local_function.invoke_async(json.dumps({"action": "sleep", "seconds": 10}))
        assert local_function.wait_idle(timeout_s=10)
        killed, record = deliveries(local_function)

    assert killed.result.error()["errorType"] == "Sandbox.Timedout"
    assert not Path(f"/proc/{killed.result.pid}").exists()
    assert record.failure_record and record.result.ok
    assert record.result.pid != killed.result.pid  # a fresh process replaced the killed one
    assert read_notes(notes_dir)[-1]["event"]["responsePayload"] == {
        "errorMessage": "Task timed out after 2.00 seconds",
        "errorType": "Sandbox.Timedout",
    }


def test_failure_record_that_fails_is_not_recorded_again(tmp_path: Path) -> None:
    with serve(tmp_path) as (local_function, _, _):
        local_function.invoke_async(json.dumps({"action": "fail", "fail_records_too": True}))
        assert local_function.wait_idle(timeout_s=10)

    assert [(item.failure_record, item.result.ok) for item in deliveries(local_function)] == [
        (False, False),
        (True, False),
    ]


def test_synchronous_failure_is_neither_retried_nor_recorded(tmp_path: Path) -> None:
    with serve(tmp_path, maximum_retry_attempts=2) as (local_function, _, _):
        assert not local_function.invoke(json.dumps({"action": "fail"})).ok
        assert local_function.wait_idle(timeout_s=5)

    assert len(local_function.history) == 1


def test_duplicate_fault_delivers_the_event_twice(tmp_path: Path) -> None:
    plan = faults.FaultPlan()
    plan.duplicate(faults.where(tag="twice"))
    with serve(tmp_path, faults=plan) as (local_function, _, notes_dir):
        request_id = local_function.invoke_async(json.dumps({"action": "echo", "tag": "twice"}))
        local_function.invoke_async(json.dumps({"action": "echo", "tag": "twice"}))  # times=1: not this one
        local_function.invoke_async(json.dumps({"action": "echo", "tag": "once"}))
        assert local_function.wait_idle(timeout_s=10)
        notes = read_notes(notes_dir)

    assert sorted(note["event"]["tag"] for note in notes) == ["once", "twice", "twice", "twice"]
    assert [note["request_id"] for note in notes].count(request_id) == 2


def test_delay_fault_holds_the_event_back(tmp_path: Path) -> None:
    plan = faults.FaultPlan()
    plan.delay(faults.where(tag="late"), seconds=1.0)
    with serve(tmp_path, faults=plan) as (local_function, _, notes_dir):
        sent = time.time()
        local_function.invoke_async(json.dumps({"action": "echo", "tag": "late"}))
        local_function.invoke_async(json.dumps({"action": "echo", "tag": "early"}))
        assert local_function.wait_idle(timeout_s=10)
        notes = {note["event"]["tag"]: note["started"] - sent for note in read_notes(notes_dir)}

    assert notes["late"] >= 1.0
    assert notes["early"] < notes["late"]


def test_kill_fault_kills_only_the_matching_invocation(tmp_path: Path) -> None:
    plan = faults.FaultPlan()
    plan.kill(faults.where(tag="victim"), after_s=0.3)
    with serve(tmp_path, faults=plan) as (local_function, _, _):
        local_function.invoke_async(json.dumps({"action": "sleep", "seconds": 5, "tag": "victim"}))
        local_function.invoke_async(json.dumps({"action": "echo", "tag": "bystander"}))
        assert local_function.wait_idle(timeout_s=10)

    outcomes = {
        "record" if item.failure_record else item.event["tag"]: item.result
        for item in deliveries(local_function)
    }
    assert outcomes["victim"].error()["errorMessage"] == "Runtime exited with error: signal: killed"
    assert outcomes["victim"].duration_s < 3
    assert outcomes["bystander"].ok
    assert outcomes["record"].ok


@pytest.mark.parametrize(
    ("spec", "action", "seconds", "matching", "other"),
    [
        (
            "kill:workerno=1,round=0",
            faults.KILL,
            0.0,
            {"workerno": 1, "round": 0},
            {"workerno": 1, "round": 1},
        ),
        ("delay=2.5:combine=true", faults.DELAY, 2.5, {"combine": True, "round": 3}, {"combine": False}),
        ("duplicate=1:run=exp-1", faults.DUPLICATE, 1.0, {"run": "exp-1"}, {"run": "exp-2"}),
        ("kill", faults.KILL, 0.0, {"anything": 1}, None),
    ],
    ids=["kill-worker", "delay-combine", "duplicate-string-value", "kill-everything"],
)
def test_fault_specs_parse(spec: str, action: str, seconds: float, matching: Any, other: Any) -> None:
    fault = faults.parse_fault(spec)

    assert (fault.action, fault.seconds, fault.times) == (action, seconds, 1)
    assert fault.matches(matching)
    if other is not None:
        assert not fault.matches(other)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("explode:x=1", "action must be one of"),
        ("delay=soon:x=1", "seconds must be a number"),
        ("kill:workerno", "expected KEY=VALUE"),
    ],
    ids=["unknown-action", "bad-seconds", "bad-condition"],
)
def test_bad_fault_specs_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        faults.parse_fault(spec)
