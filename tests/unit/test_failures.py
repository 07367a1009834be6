"""Crashes between two steps, concurrent duplicates and failure records: every run still finishes correctly.

Each test makes one invocation fail at a chosen point (as a killed sandbox or a throttled API would), delivers the
failure record that Lambda's ``OnFailure`` destination would, and checks that the run completes.
"""

from __future__ import annotations

from typing import Any

import pytest

from trainer import combine as combine_flow
from trainer.errors import InvalidEventError, InvocationError, LayoutError
from trainer_harness import FakeContext, Harness, Throttled, deliver_until, failure_record, start_event


def test_combine_that_dies_after_its_commit_is_finished_by_its_retry(harness: Harness, monkeypatch) -> None:
    harness.invoke(start_event())
    combine = deliver_until(harness, lambda event: event.get("combine"))
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(combine)  # committed round 0, then could not fan out round 1
    item = harness.run("t1")
    assert item.round_index == 1 and item.fanned_out == 0

    assert harness.invoke(failure_record(combine))["status"] == "redispatched"
    assert harness.invoke(harness.invoker.queue.popleft())["status"] == "fanned_out"
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"


def test_continuation_that_dies_after_saving_goes_on_from_the_saved_state(
    harness: Harness, monkeypatch
) -> None:
    harness.invoke(start_event("c", workers=1, epochs=1, rounds_per_epoch=1))
    first = harness.invoker.queue.popleft()
    clock = iter([900_000, 900_000] + [0] * 100)
    assert harness.invoke(first, FakeContext(remaining_ms=lambda: next(clock)))["status"] == "continued"
    continuation = harness.invoker.queue.popleft()
    clock = iter([900_000, 900_000] + [0] * 100)
    with Throttled(harness), pytest.raises(InvocationError):  # saved a later step, then could not chain
        harness.invoke(continuation, FakeContext(remaining_ms=lambda: next(clock)))

    assert harness.invoke(failure_record(continuation))["status"] == "redispatched"
    harness.drain()
    assert harness.run("c").state == "SUCCEEDED"
    continued = [result for event, result in harness.results if event.get("resume_step")]
    assert continued[-1]["status"] == "trained"


def test_resume_while_a_combine_is_running_still_finishes(harness: Harness, monkeypatch) -> None:
    harness.invoke(start_event("s"))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    harness.invoke({"stop": True, "run": "s"})
    real_commit_round = harness.status.commit_round

    def resume_then_commit(*args: Any, **kwargs: Any) -> None:
        if not resumed:  # the operator changes their mind while the combine works
            resumed.append(harness.invoke({"start": True, "run": "s", "resume": True}))
        real_commit_round(*args, **kwargs)

    resumed: list[dict[str, Any]] = []
    monkeypatch.setattr(harness.status, "commit_round", resume_then_commit)
    assert harness.invoke(combine)["status"] == "ignored"  # its generation is gone: it must not commit
    monkeypatch.setattr(harness.status, "commit_round", real_commit_round)
    assert not list((harness.layout.run_dir("s") / "weights").glob("round-000001-*"))  # it left nothing
    harness.drain()
    item = harness.run("s")
    assert item.state == "SUCCEEDED" and item.round_index == 4 and item.generation == 2


def test_a_duplicate_combine_that_loses_the_commit_changes_no_committed_file(
    harness: Harness, monkeypatch
) -> None:
    harness.invoke(start_event("m", outer_momentum=0.5))
    combine = deliver_until(harness, lambda event: event.get("combine") and event["round"] == 1)
    last_update = harness.layout.update_path("m", 1, 2)
    real_load = combine_flow.load_arrays
    seen: dict[str, Any] = {}

    def committed_files() -> dict[str, bytes]:
        run = harness.run("m")
        paths = (
            harness.layout.weights_path("m", 2, run.weights_token),
            harness.layout.outer_state_path("m", 2, run.weights_token),
        )
        return {path.name: path.read_bytes() for path in paths}

    def load_then_let_the_duplicate_finish(path):
        arrays = real_load(path)
        if path == last_update and not seen:
            seen["started"] = True
            seen["first"] = harness.invoke(combine)  # the duplicate commits, cleans up and fans out
            seen["files"] = committed_files()
        return arrays

    monkeypatch.setattr(combine_flow, "load_arrays", load_then_let_the_duplicate_finish)
    second = harness.invoke(combine)  # computes the same round again, then loses the commit
    monkeypatch.setattr(combine_flow, "load_arrays", real_load)
    assert seen["first"]["status"] == "combined" and second["status"] == "ignored"
    assert committed_files() == seen["files"]  # byte for byte what the next round trains from
    weights = sorted(path.name for path in (harness.layout.run_dir("m") / "weights").glob("round-000002-*"))
    assert weights == [
        next(name for name in seen["files"] if name.startswith("round"))
    ]  # the loser's are gone
    assert harness.status.get_round("m", 1).committed_token == harness.run("m").weights_token
    harness.drain()
    assert harness.run("m").state == "SUCCEEDED"


def test_failed_start_is_sent_again_and_completes(harness: Harness, monkeypatch) -> None:
    event = start_event("f")
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event)  # the run item and round-0 weights exist; the fan-out failed
    assert harness.invoke(failure_record(event)) == {"status": "redispatched", "attempt": 2}
    assert harness.invoker.queue[0] == {**event, "attempt": 2}
    harness.drain()
    assert harness.run("f").state == "SUCCEEDED"


@pytest.mark.parametrize("error_type", ["InvalidEventError", "CoordinationConflictError"])
def test_errors_a_retry_cannot_fix_are_not_retried_and_fail_nothing(
    harness: Harness, error_type: str
) -> None:
    harness.invoke(start_event())
    worker = harness.invoker.queue[0]
    sent = len(harness.invoker.sent)
    assert harness.invoke(failure_record(worker, error_type))["status"] == "ignored"
    assert len(harness.invoker.sent) == sent and harness.run("t1").state == "RUNNING"


def test_start_attempts_are_bounded(harness: Harness) -> None:
    event = {**start_event("b"), "attempt": 3}
    assert harness.invoke(failure_record(event))["status"] == "ignored"
    assert not harness.invoker.sent


def test_more_rounds_than_examples_per_shard_is_refused_at_start(harness: Harness) -> None:
    with pytest.raises(InvalidEventError, match="rounds_per_epoch 3 exceeds the 2 examples"):
        harness.invoke(start_event("e", train_samples=6, epochs=1, rounds_per_epoch=3))
    assert harness.status.get_run("e") is None and not (harness.efs_root / "runs").exists()


def test_leftover_run_folder_without_a_run_item_is_refused(harness: Harness) -> None:
    (harness.layout.updates_dir("old", 0)).mkdir(parents=True)
    with pytest.raises(LayoutError, match="already exists but the status table has no run"):
        harness.invoke(start_event("old"))
    assert harness.status.get_run("old") is None
