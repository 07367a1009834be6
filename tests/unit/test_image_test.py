"""The image test's own logic, without Docker: every sample event has a documented result, and a wrong result,
a raised handler or a missing fan-out each fail the check."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_runner():
    spec = importlib.util.spec_from_file_location(
        "image_test_run", REPO_ROOT / "tools" / "image_test" / "run.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["image_test_run"] = module
    spec.loader.exec_module(module)
    return module


runner = _load_runner()
START = next(expectation for expectation in runner.EXPECTATIONS if expectation.event == "start.json")
FAN_OUT = [
    {"workerno": index, "workers": 6, "epochsdone": 0, "run": "vgg19-bn-6w", "round": 0} for index in range(6)
]
STARTED = {"status": "started", "run": "vgg19-bn-6w", "workers": 6, "total_rounds": 120}


def test_every_sample_event_has_a_documented_result():
    events = {path.name for path in (REPO_ROOT / "events").glob("*.json")}

    assert events == {expectation.event for expectation in runner.EXPECTATIONS}


def test_documented_result_with_its_fan_out_passes():
    assert runner.check(START, STARTED, FAN_OUT) == []


@pytest.mark.parametrize(
    ("result", "invoked", "expected"),
    [
        pytest.param(
            {**STARTED, "status": "duplicate"}, FAN_OUT, 'returned {"status": "duplicate"', id="wrong-status"
        ),
        pytest.param(
            {"errorType": "LayoutError", "errorMessage": "manifest.json: missing"},
            [],
            "the handler raised LayoutError: manifest.json: missing",
            id="handler-raised",
        ),
        pytest.param(STARTED, FAN_OUT[:5], "invoked 5 event(s)", id="a-worker-not-invoked"),
        pytest.param(STARTED, [*FAN_OUT, FAN_OUT[0]], "invoked 7 event(s)", id="a-worker-invoked-twice"),
    ],
)
def test_a_result_other_than_documented_fails(result, invoked, expected):
    problems = runner.check(START, result, invoked)

    assert any(expected in problem for problem in problems), problems


def test_only_runs_the_events_before_it_in_its_phase():
    chosen = runner.selected(Path("events/combine.json"))

    assert [expectation.event for expectation in chosen] == [
        "failure_record.json",
        "worker.json",
        "combine.json",
    ]


def test_only_rejects_an_unknown_event():
    with pytest.raises(runner.ImageTestError, match="expected one of events/"):
        runner.selected(Path("events/nope.json"))


def test_the_recording_invoke_api_accepts_the_trainers_fan_out(tmp_path):
    """The image test's stand-in for the Lambda API runs without Docker: what the trainer in the container sends
    is delivered to the recorder and kept in the function's history."""
    import boto3

    from localrun import environment

    with runner.recorder_api(tmp_path, "127.0.0.1") as (recorder, endpoint_url):
        client = boto3.client("lambda", **environment.client_settings(endpoint_url))
        client.invoke(FunctionName=runner.FUNCTION_ID, InvocationType="Event", Payload=json.dumps(FAN_OUT[0]))
        assert recorder.wait_idle(30)
        assert [completed.event for completed in recorder.history] == [FAN_OUT[0]]
