"""Event parsing and validation: good sample events parse; each malformed one names its problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from trainer import protocol
from trainer.config import TrainConfig
from trainer.errors import InvalidEventError

EVENTS = Path(__file__).resolve().parents[2] / "events"


def load(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / f"{name}.json").read_text())


def mutated(name: str, path: tuple[Any, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    """A sample event with one field changed (or removed)."""
    event = copy.deepcopy(load(name))
    target = event
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return event


def test_sample_events_parse_to_their_kinds() -> None:
    assert isinstance(protocol.parse_event(load("start")), protocol.StartEvent)
    assert protocol.parse_event(load("worker")) == protocol.WorkerEvent("vgg19-bn-6w", 14, 3, 6, 3)
    assert protocol.parse_event(load("combine")) == protocol.CombineEvent("vgg19-bn-6w", 14, 6, 3)
    assert protocol.parse_event(load("stop")) == protocol.StopEvent("vgg19-bn-6w")
    s3 = protocol.parse_event(load("s3_put"))
    assert s3 == protocol.S3StartEvent("lambdatrain-123456789012-us-east-1", "start/vgg19-bn-6w.json")
    failure = protocol.parse_event(load("failure_record"))
    assert isinstance(failure, protocol.FailureRecord)
    assert failure.failed == protocol.WorkerEvent("vgg19-bn-6w", 14, 3, 6, 3)
    assert failure.error_message == "worker 3 ran out of memory"


def test_start_event_fills_defaults_and_keeps_given_values() -> None:
    event = protocol.parse_event({"start": True, "workers": 6, "lr": 1})
    assert event.config == TrainConfig(workers=6, lr=1.0)
    assert event.run_id is None and not event.resume


def test_wire_format_round_trips() -> None:
    worker = protocol.WorkerEvent("r", 2, 1, 4, 0, attempt=2, resume_step=5)
    assert protocol.parse_event(worker.to_wire()) == worker
    combine = protocol.CombineEvent("r", 2, 4, 1, attempt=3)
    assert protocol.parse_event(combine.to_wire()) == combine


def test_s3_key_is_url_decoded_and_names_the_run() -> None:
    with pytest.raises(InvalidEventError, match="run id derived from the S3 key"):
        protocol.parse_event(mutated("s3_put", ("Records", 0, "s3", "object", "key"), "start/a+b.json"))
    nested = protocol.parse_event(
        mutated("s3_put", ("Records", 0, "s3", "object", "key"), "start/team/run%2D1.json")
    )
    assert nested.key == "start/team/run-1.json" and nested.run_id == "team-run-1"


def test_resume_event_takes_no_configuration() -> None:
    assert protocol.parse_event({"start": True, "run": "r", "resume": True}).resume
    with pytest.raises(InvalidEventError, match=r"remove \['epochs'\]"):
        protocol.parse_event({"start": True, "run": "r", "resume": True, "epochs": 3})


BAD_EVENTS = [
    ("not-an-object", ["start"], "must be a JSON object"),
    ("unknown-kind", {"hello": 1}, "unrecognised event"),
    ("start-not-true", mutated("start", ("start",), "yes"), "start must be true"),
    ("workers-missing", mutated("start", ("workers",), None, delete=True), "missing 'workers'"),
    ("workers-zero", mutated("start", ("workers",), 0), "workers must be between 1 and 256"),
    ("workers-million", mutated("start", ("workers",), 10**6), "workers must be between 1 and 256"),
    ("workers-string", mutated("start", ("workers",), "6"), "workers must be int"),
    ("workers-bool", mutated("start", ("workers",), True), "workers must be int, got boolean"),
    ("epochs-negative", mutated("start", ("epochs",), -1), "epochs must be between"),
    ("lr-nan", mutated("start", ("lr",), float("nan")), "lr must be a finite number"),
    ("model-unknown", mutated("start", ("model",), "resnet50"), "model must be one of"),
    ("config-key-unknown", mutated("start", ("learning_rate",), 0.1), "unknown configuration key"),
    ("run-traversal", mutated("start", ("run",), "../x"), "run must match"),
    ("run-slash", mutated("worker", ("run",), "a/b"), "run must match"),
    ("run-too-long", mutated("start", ("run",), "x" * 65), "run must match"),
    ("dataset-traversal", mutated("start", ("dataset",), ".."), "dataset must match"),
    ("weights-absolute", mutated("start", ("weights",), "/etc/passwd"), "weights is only supported"),
    ("worker-index-too-big", mutated("worker", ("workerno",), 6), "workerno must be between 0 and 5"),
    ("worker-round-float", mutated("worker", ("round",), 1.5), "round must be an integer"),
    ("worker-missing-run", mutated("worker", ("run",), None, delete=True), "missing key(s) ['run']"),
    ("worker-extra-key", mutated("worker", ("lr",), 0.1), "unknown key(s) ['lr']"),
    ("combine-not-true", mutated("combine", ("combine",), 1), "combine must be true"),
    ("combine-epochs-negative", mutated("combine", ("epochsdone",), -7), "epochsdone must be between"),
    (
        "s3-other-prefix",
        mutated("s3_put", ("Records", 0, "s3", "object", "key"), "models/x.json"),
        "not a start object",
    ),
    (
        "s3-not-json-suffix",
        mutated("s3_put", ("Records", 0, "s3", "object", "key"), "start/x.txt"),
        "not a start object",
    ),
    ("s3-two-records", {"Records": [{}, {}]}, "exactly one record"),
    ("sqs-body-not-json", {"Records": [{"eventSource": "aws:sqs", "body": "{oops"}]}, "not JSON"),
    ("sqs-body-not-record", {"Records": [{"eventSource": "aws:sqs", "body": "{}"}]}, "destination record"),
    (
        "failure-bad-payload",
        mutated("failure_record", ("requestPayload", "workerno"), -1),
        "workerno must be",
    ),
    ("s3-wrong-source", mutated("s3_put", ("Records", 0, "eventSource"), "aws:sns"), "ObjectCreated record"),
]


@pytest.mark.parametrize(
    ("event", "message"), [case[1:] for case in BAD_EVENTS], ids=[case[0] for case in BAD_EVENTS]
)
def test_malformed_event_is_rejected_with_a_clear_message(event: Any, message: str) -> None:
    with pytest.raises(InvalidEventError) as caught:
        protocol.parse_event(event)
    assert message in str(caught.value)


def test_weights_path_must_stay_under_efs_root() -> None:
    with pytest.raises(InvalidEventError, match="relative to EFS_ROOT"):
        protocol.parse_event({"start": True, "workers": 1, "model": "vgg19", "weights": "../../etc/passwd"})


def test_failure_record_inside_an_sqs_message_is_unwrapped() -> None:
    sqs = {
        "Records": [{"eventSource": "aws:sqs", "messageId": "m", "body": json.dumps(load("failure_record"))}]
    }
    assert protocol.parse_event(sqs) == protocol.parse_event(load("failure_record"))


def test_failure_of_a_start_event_has_nothing_to_retry() -> None:
    record = protocol.parse_event(mutated("failure_record", ("requestPayload",), load("s3_put")))
    assert record.failed is None and record.error_message == "worker 3 ran out of memory"


def test_s3_start_object_body_must_be_json() -> None:
    with pytest.raises(InvalidEventError, match="not valid JSON"):
        protocol.parse_start_object(b"\xff not json", "start/x.json")
