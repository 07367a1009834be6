"""Real delivery: duplicated, late, lost and failed events, crashes between side effects, resumes in between.

Each test drives the public handler (events in; DynamoDB items and EFS files out) through a scenario that broke
an earlier version, and checks the guarantee the README states.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from typing import Any

import keras
import numpy as np
import pytest

from trainer import watchdog
from trainer import worker as worker_flow
from trainer.errors import (
    DatasetChangedError,
    DivergenceError,
    InvalidEventError,
    InvocationError,
    LayoutError,
)
from trainer.protocol import parse_event
from trainer_harness import (
    Crash,
    FakeContext,
    Harness,
    Throttled,
    failure_record,
    run_files,
    start_event,
    write_synthetic_dataset,
)

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)  # past any watchdog bound


# --- 1, 2: starts and stops ---------------------------------------------------------------------------------


def test_a_start_without_run_retried_from_its_failure_record_continues_the_same_run(harness: Harness) -> None:
    event = {key: value for key, value in start_event().items() if key != "run"}
    context = FakeContext(aws_request_id="abcdef12-0000-4000-8000-000000000000")
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event, context)  # created run-abcdef12, then could not fan out
    record = failure_record(event, request_id=context.aws_request_id)
    assert harness.invoke(record)["status"] == "redispatched"
    assert harness.invoker.queue[0] == {**event, "run": "run-abcdef12", "attempt": 2}
    harness.drain()
    assert harness.run("run-abcdef12").state == "SUCCEEDED"
    assert harness.status.list_active_run_ids() == []
    assert [path.name for path in (harness.efs_root / "runs").iterdir()] == ["run-abcdef12"]  # one run only


def test_a_start_whose_attempts_are_used_up_is_revived_then_failed_with_the_reason(harness: Harness) -> None:
    event = start_event("gone")
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event)
    assert harness.run("gone").state == "RUNNING"  # nothing was sent: it would wait forever
    record = failure_record({**event, "attempt": 3}, message="TooManyRequestsException")
    # Used up: the watchdog takes over at once (its workers may or may not have been sent, so the run is not
    # failed yet): re-sent under a new generation within the watchdog's budget ...
    assert harness.invoke(record)["status"] == "resent"
    assert harness.run("gone").generation == 2 and len(harness.invoker.queue) == 3
    while harness.run("gone").active:  # ... and when every re-send is lost too, the watchdog fails it
        harness.invoker.queue.clear()
        assert watchdog.check_runs(harness.services, now=LATER)["actions"]["gone"] in ("resent", "failed")
    run = harness.run("gone")
    assert run.state == "FAILED" and "3 watchdog re-sends did not get it going" in run.reason
    assert harness.status.list_active_run_ids() == []


def test_a_failed_stop_is_sent_again(harness: Harness) -> None:
    harness.invoke(start_event())
    stop = {"stop": True, "run": "t1"}
    assert harness.invoke(failure_record(stop)) == {"status": "redispatched", "attempt": 2}
    assert harness.invoker.queue[-1] == {**stop, "attempt": 2}
    assert harness.invoke(harness.invoker.queue.pop())["status"] == "stop_requested"


# --- 3, 7, 8, 13: write-once results, clean-up, completed rounds --------------------------------------------


def test_the_first_finished_copy_of_a_worker_wins_and_is_never_replaced(harness: Harness) -> None:
    harness.invoke(start_event(workers=2, epochs=1, rounds_per_epoch=1))
    event = parse_event(harness.invoker.queue[0])
    run = harness.run("t1")
    assert worker_flow.train_share(event, run, harness.services, FakeContext()) is None
    path = harness.layout.update_path("t1", 0, event.worker_index)
    first = os.stat(path)
    assert worker_flow.train_share(event, run, harness.services, FakeContext()) is None  # a concurrent copy
    second = os.stat(path)
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)


def test_a_late_worker_copy_writes_nothing_once_its_round_is_combined(harness: Harness) -> None:
    harness.invoke(start_event(workers=2))
    late = parse_event(harness.invoker.queue[0])
    stale_run = harness.run("t1")
    for _ in range(3):  # round 0's workers and combine
        harness.invoke(harness.invoker.queue.popleft())
    assert harness.run("t1").round_index == 1
    result = worker_flow.train_share(late, stale_run, harness.services, FakeContext())
    assert result is not None and result["status"] == "ignored"
    assert not harness.layout.updates_dir("t1", 0).exists()


def test_a_round_recovered_after_its_commit_is_complete_and_leftovers_are_cleaned(harness: Harness) -> None:
    harness.invoke(start_event(workers=2))
    for _ in range(2):
        harness.invoke(harness.invoker.queue.popleft())
    combine = harness.invoker.queue.popleft()
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(combine)  # committed round 0, then could not fan out round 1
    record = harness.status.get_round("t1", 0)
    assert record.completed and record.metrics is not None and record.committed_token
    weights_dir = harness.layout.run_dir("t1") / "weights"
    (weights_dir / "round-000001-killedcombine.npz").write_bytes(b"a killed combine's leftover")
    old_tmp = weights_dir / ".tmp-round-000001.npz.dead"
    old_tmp.write_bytes(b"half")
    os.utime(old_tmp, (1, 1))
    harness.invoke(failure_record(combine))  # re-dispatched: finishes the fan-out
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"
    assert all(record.completed for record in harness.status.list_rounds("t1"))
    assert run_files(harness, "t1") == ["config.json", "final.keras"]


def test_plans_with_more_rounds_than_sort_keys_order_are_refused(harness: Harness) -> None:
    with pytest.raises(InvalidEventError, match="at most 999999 are supported"):
        harness.invoke(start_event("huge", workers=1, epochs=10_000, rounds_per_epoch=101))
    assert harness.status.get_run("huge") is None


# --- 4: failure records of healthy runs ---------------------------------------------------------------------


def test_a_failed_copy_of_a_worker_that_registered_does_not_fail_the_run(harness: Harness) -> None:
    harness.invoke(start_event(max_attempts=1))
    worker = harness.invoker.queue.popleft()
    harness.invoke(worker)  # one copy registered; another copy of the same event crashed
    assert harness.invoke(failure_record(worker))["status"] in (
        "ignored",
        "redispatched",
    )  # only re-registers
    assert harness.run("t1").state == "RUNNING"
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"


def test_a_failure_record_from_before_a_resume_does_not_fail_the_resumed_run(harness: Harness) -> None:
    harness.invoke(start_event(max_attempts=1))
    old_worker = harness.invoker.queue[0]
    harness.invoker.queue.clear()
    harness.invoke({"stop": True, "run": "t1"})
    harness.invoke({"start": True, "run": "t1", "resume": True})
    assert harness.run("t1").generation == 2
    assert harness.invoke(failure_record(old_worker))["status"] == "ignored"
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"


# --- 5: the watchdog ----------------------------------------------------------------------------------------


def test_the_watchdog_resends_a_round_whose_events_were_all_lost(harness: Harness) -> None:
    harness.invoke(start_event(workers=2))
    harness.invoke(harness.invoker.queue.popleft())  # one worker trained; the other event is lost
    harness.invoker.queue.clear()
    assert watchdog.check_runs(harness.services)["actions"] == {}  # not silent for long enough yet
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"t1": "resent"}
    assert harness.run("t1").generation == 2
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"
    kept = [
        result for event, result in harness.results if event.get("generation") == 2 and "workerno" in event
    ]
    assert kept[0]["status"] == "trained"  # the worker that had trained was not trained again


def test_the_watchdog_recovers_a_combine_killed_after_its_claim(harness: Harness) -> None:
    harness.invoke(start_event(workers=2))
    for _ in range(2):
        harness.invoke(harness.invoker.queue.popleft())
    assert harness.invoker.queue.popleft().get("combine")  # claimed and invoked, then lost
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"t1": "resent"}
    harness.drain()
    assert harness.run("t1").state == "SUCCEEDED"


def test_the_watchdog_fails_a_run_after_its_resends_are_used_up(harness: Harness) -> None:
    harness.invoke(start_event(max_attempts=2))
    for _ in range(2):
        harness.invoker.queue.clear()
        assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"t1": "resent"}
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"t1": "failed"}
    run = harness.run("t1")
    assert run.state == "FAILED" and "2 watchdog re-sends did not get it going" in run.reason


def test_the_watchdog_leaves_a_run_with_a_recent_heartbeat_alone(harness: Harness) -> None:
    harness.invoke(start_event(workers=1))
    worker = harness.invoker.queue.popleft()
    clock = iter([900_000, 900_000] + [0] * 100)
    assert harness.invoke(worker, FakeContext(remaining_ms=lambda: next(clock)))["status"] == "continued"
    heartbeat = harness.run("t1").last_progress_at
    soon = heartbeat + dt.timedelta(seconds=harness.services.environment.stalled_after_s - 1)
    assert watchdog.check_runs(harness.services, now=soon)["actions"] == {}  # a chained round is alive
    assert harness.invoke({"watchdog": True})["status"] == "checked"  # the scheduled event


# --- 6, 9, 10, 14: damaged or changed state fails clearly, at once -------------------------------------------


def test_a_dataset_prepared_again_mid_run_fails_the_run_without_retries(harness: Harness) -> None:
    harness.invoke(start_event())
    dataset = harness.efs_root / "datasets" / "cifar10"
    for path in dataset.iterdir():
        path.unlink()
    dataset.rmdir()
    write_synthetic_dataset(dataset, num_train=250, seed=1)
    worker = harness.invoker.queue.popleft()
    with pytest.raises(DatasetChangedError, match="changed since run 't1' started"):
        harness.invoke(worker)
    run = harness.run("t1")
    assert run.state == "FAILED" and "DatasetChangedError" in run.reason
    assert harness.invoke(failure_record(worker, "DatasetChangedError"))["status"] == "ignored"
    assert not harness.layout.updates_dir("t1", 0).exists()


def test_a_diverged_loss_fails_the_run_at_once_with_advice(harness: Harness, monkeypatch) -> None:
    harness.invoke(start_event(lr=10.0, workers=1, epochs=1, rounds_per_epoch=1))
    monkeypatch.setattr(keras.Model, "train_on_batch", lambda *args, **kwargs: {"loss": float("nan")})
    worker = harness.invoker.queue.popleft()
    with pytest.raises(DivergenceError, match="lower 'lr'"):
        harness.invoke(worker)
    assert harness.run("t1").state == "FAILED" and "lower 'lr'" in harness.run("t1").reason
    sent = len(harness.invoker.sent)
    assert harness.invoke(failure_record(worker, "DivergenceError"))["status"] == "ignored"
    assert len(harness.invoker.sent) == sent  # not retried


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda item: item.update(
                config=item["config"]
                .replace('"weights": null', '"weights": "/etc/x"')
                .replace('"model": "vgg19_bn"', '"model": "vgg19"')
            ),
            "weights must be None, 'imagenet' or a path relative to EFS_ROOT",
        ),
        (lambda item: item.pop("schema"), "written by another version"),
    ],
    ids=["crafted-weights-path", "older-version"],
)
def test_a_run_item_that_is_not_a_valid_run_is_refused_clearly(
    harness: Harness, table: Any, change, message
) -> None:
    harness.invoke(start_event())
    item = table.get_item(Key={"pk": "RUN#t1", "sk": "RUN"})["Item"]
    change(item)
    table.put_item(Item=item)
    worker = harness.invoker.queue.popleft()
    with pytest.raises(LayoutError, match=message):
        harness.invoke(worker)
    assert not harness.layout.updates_dir("t1", 0).exists()


# --- the whole: a seeded random schedule ---------------------------------------------------------------------


class Chaos:
    """Every side effect of a flow may, at random (seeded), crash the invocation just before or just after it."""

    SIDE_EFFECTS = (
        "create_run",
        "resume_run",
        "register_worker",
        "claim_combine",
        "register_reducer",
        "claim_commit",
        "commit_round",
        "mark_fanned_out",
        "finish_run",
        "heartbeat",
        "request_stop",
    )

    def __init__(self, harness: Harness, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
        from trainer import combine, reduce, runs
        from trainer import worker as worker_module

        self.rng, self.armed, self.crash_rate = rng, False, 0.08
        for name in self.SIDE_EFFECTS:
            monkeypatch.setattr(harness.status, name, self.wrap(getattr(harness.status, name)))
        monkeypatch.setattr(harness.invoker, "invoke_async", self.wrap(harness.invoker.invoke_async))
        for module in (worker_module, combine, reduce, runs):
            monkeypatch.setattr(module, "save_arrays", self.wrap(module.save_arrays))
        monkeypatch.setattr(combine, "publish_file", self.wrap(combine.publish_file))

    def wrap(self, effect):
        def crashing(*args: Any, **kwargs: Any) -> Any:
            if self.armed and self.rng.random() < self.crash_rate:
                raise Crash(f"killed before {effect.__name__}")
            result = effect(*args, **kwargs)
            if self.armed and self.rng.random() < self.crash_rate:
                raise Crash(f"killed after {effect.__name__}")
            return result

        return crashing


def deliver_chaotically(harness: Harness, chaos: Chaos, run_id: str, rng: np.random.Generator) -> list[str]:
    """Deliver the run's events in random order, some twice, some late, some crashing (their failure records
    follow, as the OnFailure destination sends them; a failure record that crashes three times is lost, as in
    the dead-letter queue), with resumes and the scheduled watchdog in between. Returns what happened."""
    queue, story = harness.invoker.queue, []
    record_failures: dict[int, int] = {}
    chaos.armed = True
    for _ in range(2_000):
        if not queue:
            if not harness.status.get_run(run_id).active:
                chaos.armed = False
                return story
            story.append("watchdog")  # nothing queued for an active run: the schedule finds it
            with contextlib.suppress(Crash):
                watchdog.check_runs(harness.services, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
            continue
        event = queue[int(rng.integers(len(queue)))]  # any queued event may be delivered next: late ones too
        queue.remove(event)
        if rng.random() < 0.03:
            story.append("resume")
            queue.append({"start": True, "run": run_id, "resume": True})
        for _copy in range(2 if rng.random() < 0.2 else 1):
            try:
                harness.invoke(event)
            except Crash as exc:
                story.append(str(exc))
                if "requestPayload" in event:  # the SQS consumer failed: redelivered, then dead-lettered
                    record_failures[id(event)] = record_failures.get(id(event), 0) + 1
                    if record_failures[id(event)] < 3:
                        queue.append(event)
                    continue
                queue.append(failure_record(event, "Crash", message=str(exc)))
            except Exception as exc:  # the trainer's own errors: Lambda sends their failure records too
                story.append(type(exc).__name__)
                queue.append(failure_record(event, type(exc).__name__, message=str(exc)))
    raise AssertionError(f"run {run_id} never ended: {story[-20:]}")


@pytest.mark.parametrize(
    "sharding",
    [{"workers": 2}, {"workers": 3, "reducers": 2, "outer_momentum": 0.9}],
    ids=["combine", "sharded-reduce"],
)
def test_random_delivery_schedules_end_every_run_correctly(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, sharding: dict[str, Any]
) -> None:
    config = {**sharding, "epochs": 1, "rounds_per_epoch": 2, "max_attempts": 3}
    harness.invoke(start_event("reference", **{**config, "reducers": 1}))  # one combine: the reference
    harness.drain()
    reference = harness.final_weights("reference")
    chaos = Chaos(harness, monkeypatch, np.random.default_rng(2026))
    outcomes = []
    for seed in range(12):
        run_id = f"chaos{seed}"
        chaos.crash_rate = 0.05 if seed < 8 else 0.3  # the last ones exhaust attempts
        harness.invoker.queue.append(start_event(run_id, **config))
        story = deliver_chaotically(harness, chaos, run_id, np.random.default_rng(seed))
        run = harness.run(run_id)
        outcomes.append(run.state)
        records = harness.status.list_rounds(run_id)
        assert all(record.completed == (record.round_index < run.round_index) for record in records), story
        if run.state == "SUCCEEDED":
            assert run.round_index == run.total_rounds == len(records) == 2
            assert run_files(harness, run_id) == ["config.json", "final.keras"], story
            for got, want in zip(harness.final_weights(run_id), reference, strict=True):
                np.testing.assert_array_equal(got, want)  # no round applied twice, no duplicate counted
        else:
            assert run.state == "FAILED" and run.reason, story
            assert "failed 3 times" in run.reason or "watchdog" in run.reason, run.reason
            kept = [(kind, round_index) for kind, round_index, _, _ in harness.layout.round_files(run_id)]
            assert all(round_index >= run.round_index - 1 for _, round_index in kept), (kept, story)
    # Which runs exhaust their attempts depends on the seeds; that both outcomes occur shows both were checked.
    assert outcomes[:8].count("SUCCEEDED") >= 5 and "FAILED" in outcomes, outcomes


def test_the_local_watchdog_event_names_one_run_and_the_silence_that_counts(harness: Harness) -> None:
    harness.invoke(start_event("a", workers=1))
    harness.invoke(start_event("b", workers=1))
    harness.invoker.queue.clear()  # both runs lost their events
    result = harness.invoke({"watchdog": True, "run": "a", "stalled_after_s": 0})
    assert result["actions"] == {"a": "resent"}
    assert harness.run("a").generation == 2 and harness.run("b").generation == 1


@pytest.mark.parametrize(
    "event",
    [
        {"watchdog": True, "stalled_after_s": -1},
        {"watchdog": True, "stalled_after_s": True},
        {"watchdog": True, "run": "../x"},
        {"watchdog": False},
        {"watchdog": True, "extra": 1},
    ],
    ids=["negative", "boolean", "hostile-run", "false", "unknown-key"],
)
def test_a_malformed_watchdog_event_is_refused_and_changes_nothing(harness: Harness, event) -> None:
    harness.invoke(start_event(workers=1))
    before = harness.run("t1")
    with pytest.raises(InvalidEventError):
        harness.invoke(event)
    assert harness.run("t1") == before


def test_a_start_the_accounts_concurrency_cannot_run_is_refused_before_anything_is_written(
    harness: Harness,
) -> None:
    class SmallAccount:
        def get_function_concurrency(self, **kwargs: Any) -> dict[str, Any]:
            return {}  # the trainer reserves none

        def get_account_settings(self) -> dict[str, Any]:
            return {"AccountLimit": {"ConcurrentExecutions": 10, "UnreservedConcurrentExecutions": 3}}

    harness.services.lambda_api = SmallAccount()
    with pytest.raises(InvalidEventError, match=r"needs 4 concurrent executions.*L-B99A9384"):
        harness.invoke(start_event("big", workers=3))
    assert harness.status.get_run("big") is None and not (harness.efs_root / "runs").exists()
    harness.invoke(start_event("fits", workers=2))  # 3 executions fit
    assert harness.run("fits").state == "RUNNING"
