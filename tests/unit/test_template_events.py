"""The sample events in events/ are what the deployed template delivers, and the handler accepts each of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer import protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENT_FILES = sorted((REPO_ROOT / "events").glob("*.json"))


def test_events_directory_has_every_invocation_kind():
    names = {path.stem for path in EVENT_FILES}

    assert {"start", "worker", "combine", "s3_put", "failure_record"} <= names


@pytest.mark.parametrize("path", EVENT_FILES, ids=[path.name for path in EVENT_FILES])
def test_every_sample_event_is_accepted_by_parse_event(path):
    raw = json.loads(path.read_text())

    assert isinstance(raw, dict), "sam local invoke -e needs a JSON object"
    protocol.parse_event(raw)


def test_s3_put_event_matches_the_templates_start_object_filter():
    record = json.loads((REPO_ROOT / "events" / "s3_put.json").read_text())["Records"][0]
    template = (REPO_ROOT / "template.yaml").read_text()

    key = record["s3"]["object"]["key"]

    assert f"Value: {protocol.START_PREFIX}\n" in template
    assert f"Value: {protocol.START_SUFFIX}\n" in template
    assert key.startswith(protocol.START_PREFIX) and key.endswith(protocol.START_SUFFIX)


def test_failure_record_survives_the_sqs_queue_the_template_delivers_it_through():
    # The trainer's OnFailure destination is FailureQueue; Lambda polls it and hands the trainer an SQS event
    # whose record body is the destination record, serialized as a JSON string.
    record = json.loads((REPO_ROOT / "events" / "failure_record.json").read_text())
    sqs_event = {"Records": [{"eventSource": "aws:sqs", "body": json.dumps(record)}]}

    unwrapped = json.loads(sqs_event["Records"][0]["body"])

    assert isinstance(protocol.parse_event(unwrapped), protocol.FailureRecord)
