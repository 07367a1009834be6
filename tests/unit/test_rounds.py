"""The trainer's flows through the real handler, with DynamoDB Local and a temporary EFS folder.

Asynchronous invocations are queued by the harness, so each test controls delivery: in order, twice, or with
one event lost and replaced by its failure record.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from trainer import worker as worker_flow
from trainer.efs_layout import load_arrays
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError
from trainer.protocol import parse_event
from trainer_harness import FakeContext, Harness, failure_record, race, start_event


def kinds(harness: Harness) -> list[str]:
    return [
        "combine" if "combine" in event else "worker" for event, _ in harness.results if "start" not in event
    ]


def test_run_trains_every_round_and_finishes(harness: Harness) -> None:
    result = harness.invoke(start_event())
    assert result == {"status": "started", "run": "t1", "workers": 3, "total_rounds": 4}
    harness.drain()

    item = harness.run("t1")
    assert item.state == "SUCCEEDED" and item.round_index == 4 and item.epochs_done == 2
    rounds = harness.status.list_rounds("t1")
    assert [record.round_index for record in rounds] == [0, 1, 2, 3]
    assert all(record.done == {0, 1, 2} and record.completed for record in rounds)
    evaluated = [record.metrics.test_accuracy is not None for record in rounds]
    assert evaluated == [False, True, False, True]  # epoch ends
    assert rounds[-1].metrics.train_loss < rounds[0].metrics.train_loss
    assert kinds(harness) == (["worker"] * 3 + ["combine"]) * 4

    run_dir = harness.layout.run_dir(
        "t1"
    )  # a finished run keeps its configuration and its model, nothing else
    assert sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file()) == [
        "config.json",
        "final.keras",
    ]
    model = keras.models.load_model(harness.layout.final_model_path("t1"))
    probabilities = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_every_event_delivered_twice_gives_the_same_weights_as_once(harness: Harness) -> None:
    harness.invoke(start_event("once", epochs=1))
    harness.drain()
    harness.invoke(start_event("twice", epochs=1))
    harness.drain(duplicate=True)
    assert harness.run("twice").state == "SUCCEEDED"
    combines = [result for event, result in harness.results if "combine" in event and event["run"] == "twice"]
    assert [result["status"] for result in combines] == ["combined", "ignored", "combined", "ignored"]
    for once, twice in zip(harness.final_weights("once"), harness.final_weights("twice"), strict=True):
        np.testing.assert_array_equal(once, twice)


def test_same_seed_reproduces_the_final_weights(harness: Harness) -> None:
    for run_id in ("seed-a", "seed-b"):
        harness.invoke(start_event(run_id, epochs=1, augment=True, seed=3))
        harness.drain()
    for a, b in zip(harness.final_weights("seed-a"), harness.final_weights("seed-b"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_workers_finishing_together_start_exactly_one_combine(harness: Harness) -> None:
    harness.invoke(start_event(workers=4, epochs=1, rounds_per_epoch=1))
    workers = list(harness.invoker.queue)
    harness.invoker.queue.clear()
    run = harness.status.get_run("t1")
    for event in workers:  # train all four first, so that their registrations can race
        worker_flow.train_share(parse_event(event), run, harness.services, FakeContext())
    results = race(len(workers), lambda index: harness.invoke(workers[index]))
    assert sum(result.get("combine") == "invoked" for result in results) == 1
    assert [event.get("combine") for event in harness.invoker.queue] == [True]


def test_worker_out_of_time_continues_in_a_chained_invocation_with_the_same_result(harness: Harness) -> None:
    harness.invoke(start_event("plain", workers=2, epochs=1, rounds_per_epoch=1))
    harness.drain()

    harness.invoke(start_event("chained", workers=2, epochs=1, rounds_per_epoch=1))
    worker = harness.invoker.queue.popleft()
    clock = iter([900_000, 900_000] + [0] * 100)  # the plan sees plenty of time, then none
    result = harness.invoke(worker, FakeContext(remaining_ms=lambda: next(clock)))
    assert result["status"] == "continued" and result["next_step"] >= 1
    continuation = harness.invoker.queue[-1]
    assert (
        continuation["resume_step"] == result["next_step"] and continuation["workerno"] == worker["workerno"]
    )
    assert harness.layout.partial_path("chained", 0, worker["workerno"]).exists()
    harness.drain()
    assert harness.run("chained").state == "SUCCEEDED"
    assert not harness.layout.partial_path("chained", 0, worker["workerno"]).exists()
    for a, b in zip(harness.final_weights("plain"), harness.final_weights("chained"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stop_request_finishes_the_round_then_stops_and_resume_completes(harness: Harness) -> None:
    harness.invoke(start_event())
    assert harness.invoke({"stop": True, "run": "t1"})["status"] == "stop_requested"
    harness.drain()
    item = harness.run("t1")
    assert item.state == "STOPPED" and item.round_index == 1

    assert harness.invoke({"start": True, "run": "t1", "resume": True})["status"] == "resumed"
    harness.drain()
    item = harness.run("t1")
    assert item.state == "SUCCEEDED" and item.round_index == 4 and item.generation == 2


def test_failed_worker_is_redispatched_then_the_run_fails_after_max_attempts(harness: Harness) -> None:
    harness.invoke(start_event(max_attempts=2))
    worker = harness.invoker.queue.popleft()
    record = failure_record(worker)
    record["responsePayload"]["errorMessage"] = "worker ran out of memory"
    assert harness.invoke(record) == {"status": "redispatched", "attempt": 2}
    retry = harness.invoker.queue[-1]
    assert retry == {**worker, "attempt": 2}

    record["requestPayload"] = retry
    result = harness.invoke(record)
    assert result["status"] == "failed" and "failed 2 times" in result["reason"]
    item = harness.run("t1")
    assert item.state == "FAILED" and "out of memory" in item.reason
    harness.drain()  # the remaining workers find the run failed and do nothing
    assert all(result["status"] == "ignored" for event, result in harness.results[-2:])


def test_duplicate_start_is_a_no_op_and_a_different_config_is_refused(harness: Harness) -> None:
    harness.invoke(start_event())
    assert harness.invoke(start_event())["status"] == "duplicate"
    assert len(harness.invoker.queue) == 3
    with pytest.raises(CoordinationConflictError, match="another configuration"):
        harness.invoke(start_event(lr=0.1))


def test_stale_and_future_worker_events_are_ignored(harness: Harness) -> None:
    harness.invoke(start_event())
    future = {"workerno": 0, "workers": 3, "epochsdone": 0, "run": "t1", "round": 2}
    assert harness.invoke(future)["status"] == "ignored"
    assert not harness.layout.updates_dir("t1", 2).exists()
    harness.drain()
    assert harness.invoke({**future, "round": 0})["status"] == "ignored"


def test_stray_combine_before_every_worker_registered_is_ignored(harness: Harness) -> None:
    harness.invoke(start_event(max_attempts=1))
    combine = {"combine": True, "workers": 3, "epochsdone": 0, "run": "t1", "round": 0}
    assert harness.invoke(combine)["status"] == "ignored"
    assert harness.run("t1").round_index == 0 and harness.run("t1").state == "RUNNING"
    assert not list((harness.layout.run_dir("t1") / "weights").glob("round-000001-*"))
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"


def test_combine_fails_loudly_when_registered_updates_are_missing(harness: Harness) -> None:
    harness.invoke(start_event())
    for _ in range(3):
        harness.invoke(harness.invoker.queue.popleft())
    combine = harness.invoker.queue.popleft()
    harness.layout.update_path("t1", 0, 1).unlink()
    with pytest.raises(LayoutError, match=r"\['worker-0001.npz'\] are missing"):
        harness.invoke(combine)
    assert harness.run("t1").round_index == 0


def test_start_without_dataset_writes_nothing(harness: Harness) -> None:
    with pytest.raises(LayoutError, match="make preprocess"):
        harness.invoke(start_event(dataset="missing"))
    assert harness.status.get_run("t1") is None
    assert not (harness.efs_root / "runs").exists()


def test_events_for_an_unknown_run_are_refused(harness: Harness) -> None:
    with pytest.raises(InvalidEventError, match="does not exist"):
        harness.invoke({"workerno": 0, "workers": 3, "epochsdone": 0, "run": "ghost", "round": 0})
    with pytest.raises(InvalidEventError, match="nothing to resume"):
        harness.invoke({"start": True, "run": "ghost", "resume": True})


@pytest.mark.parametrize(
    "event",
    [
        {"start": True, "workers": 0},
        {"start": True, "workers": 3, "run": "../escape"},
        {"workerno": 5, "workers": 3, "epochsdone": 0, "run": "t1", "round": 0},
        {"combine": True, "workers": 3, "epochsdone": -1, "run": "t1", "round": 0},
        {"Records": "nope"},
        "not a dict",
    ],
    ids=[
        "workers-zero",
        "run-escape",
        "worker-out-of-range",
        "epochs-negative",
        "records-not-list",
        "string",
    ],
)
def test_malformed_events_change_nothing(harness: Harness, event: Any) -> None:
    with pytest.raises(InvalidEventError):
        harness.invoke(event)
    assert harness.status.table.scan()["Items"] == []
    assert not (harness.efs_root / "runs").exists()
    assert not harness.invoker.sent


def test_outer_momentum_and_float16_updates_train(harness: Harness) -> None:
    harness.invoke(start_event(outer_lr=0.7, outer_momentum=0.5, update_dtype="float16"))
    harness.drain()
    rounds = harness.status.list_rounds("t1")
    assert harness.run("t1").state == "SUCCEEDED"
    assert rounds[-1].metrics.train_loss < rounds[0].metrics.train_loss


def test_kept_optimizer_state_carries_each_workers_momentum_to_its_next_round(harness: Harness) -> None:
    harness.invoke(start_event(workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="keep"))
    for _ in range(2):  # both round-0 workers, not yet the combine
        harness.invoke(harness.invoker.queue.popleft())
    kept = [harness.layout.local_state_path("t1", 1, worker) for worker in range(2)]
    states = [load_arrays(path)[0] for path in kept]
    model_momentum = [array for array in states[0] if array.ndim > 0 and array.size > 1]
    assert model_momentum and any(np.abs(array).max() > 0 for array in model_momentum)
    assert not all(np.array_equal(a, b) for a, b in zip(states[0], states[1], strict=True))  # per worker

    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"
    assert not (harness.layout.run_dir("t1") / "local").exists() or not any(
        (harness.layout.run_dir("t1") / "local").iterdir()
    )


def test_round_one_worker_starts_from_the_momentum_its_round_zero_left(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer import training

    harness.invoke(start_event(workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="keep"))
    starts: list[list[np.ndarray]] = []  # the optimizer state each share starts from, in delivery order
    kept_files: list[list[np.ndarray] | None] = []
    original = training.train_steps
    path = harness.layout.local_state_path("t1", 1, 0)

    def spy(model, *args, **kwargs):
        starts.append(training.optimizer_state(model))
        kept_files.append(load_arrays(path)[0] if path.exists() else None)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(training, "train_steps", spy)
    harness.drain()
    assert len(starts) == 4  # round 0: workers 0, 1; round 1: workers 0, 1
    assert kept_files[2] is not None
    for restored, written in zip(starts[2], kept_files[2], strict=True):
        if restored.ndim > 0 and restored.size > 1:  # the momentum buffers (not the step counter or the rate)
            np.testing.assert_array_equal(restored, written)
    momentum = [array for array in starts[2] if array.ndim > 0 and array.size > 1]
    assert any(np.abs(array).max() > 0 for array in momentum)
    assert all(np.abs(array).max() == 0 for array in starts[0] if array.ndim > 0 and array.size > 1)


def test_keep_and_reset_train_different_models(harness: Harness) -> None:
    harness.invoke(start_event("reset", workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="reset"))
    harness.invoke(start_event("keep", workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="keep"))
    harness.drain()
    reset, keep = harness.final_weights("reset"), harness.final_weights("keep")
    assert not all(np.array_equal(a, b) for a, b in zip(reset, keep, strict=True))


def test_kept_optimizer_states_count_in_the_workers_efs_bytes(harness: Harness) -> None:
    harness.invoke(start_event("reset", workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="reset"))
    harness.invoke(start_event("keep", workers=2, epochs=1, rounds_per_epoch=2, local_optimizer="keep"))
    harness.drain()
    reset, keep = harness.status.list_rounds("reset"), harness.status.list_rounds("keep")
    # round 0: keep writes each worker's next state; round 1 (the last): it reads them and writes none
    written = keep[0].metrics.worker_bytes_written - reset[0].metrics.worker_bytes_written
    read = keep[1].metrics.worker_bytes_read - reset[1].metrics.worker_bytes_read
    assert written > 300_000  # two states of the 79,318-parameter model's momentum (float32)
    assert (
        abs(read - written) < 100
    )  # the two read in round 1 (the files' JSON metadata differ by a few bytes)
    last_round_extra = keep[1].metrics.worker_bytes_written - reset[1].metrics.worker_bytes_written
    assert abs(last_round_extra) < 100  # only the updates (their JSON metadata vary by a few bytes)
