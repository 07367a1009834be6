"""The sample events in events/ are what the deployed template delivers, and the handler accepts each of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localrun import template as cfn_template
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
    template = cfn_template.load_template(REPO_ROOT / "template.yaml")
    trigger = template["Resources"]["TrainerFunction"]["Properties"]["Events"]["StartObject"]["Properties"]
    rules = {rule["Name"]: rule["Value"] for rule in trigger["Filter"]["S3Key"]["Rules"]}

    assert rules == {"prefix": protocol.START_PREFIX, "suffix": protocol.START_SUFFIX}
    key = record["s3"]["object"]["key"]
    assert key.startswith(rules["prefix"]) and key.endswith(rules["suffix"])


def test_failure_record_survives_the_sqs_queue_the_template_delivers_it_through():
    # The trainer's OnFailure destination is FailureQueue; Lambda polls it and hands the trainer an SQS event
    # whose record body is the destination record, serialized as a JSON string.
    template = cfn_template.load_template(REPO_ROOT / "template.yaml")
    on_failure = template["Resources"]["TrainerFunction"]["Properties"]["EventInvokeConfig"][
        "DestinationConfig"
    ]
    assert on_failure["OnFailure"]["Type"] == "SQS"
    record = json.loads((REPO_ROOT / "events" / "failure_record.json").read_text())
    sqs_event = {"Records": [{"eventSource": "aws:sqs", "messageId": "m-1", "body": json.dumps(record)}]}

    parsed = protocol.parse_event(sqs_event)

    assert isinstance(parsed, protocol.FailureRecord)
    assert parsed.failed == protocol.WorkerEvent("vgg19-bn-6w", 14, 3, 6, 3)
