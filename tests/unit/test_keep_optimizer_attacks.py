"""Tenth hostile review: ``local_optimizer`` "keep" (each worker's momentum carried to its next round through
``runs/<run>/local/round-(r+1)/worker-k.npz``), the per-step learning rate with linear warm-up, and ``preset``.

Every scenario drives public entry points (``app.handle`` through the harness, ``watchdog.check_runs``, the
operator commands) or the pure ``Schedule``/``TrainConfig``. DEFECT tests are ``xfail(strict=True)`` on the
reviewed code and name the defect; HELD tests pass and stay as regression tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localrun import operations, targets
from trainer import efs_layout, training, watchdog
from trainer import worker as worker_flow
from trainer.config import TrainConfig
from trainer.efs_layout import load_arrays, save_arrays
from trainer.errors import InvalidEventError
from trainer.schedule import Schedule
from trainer_harness import (
    Crash,
    FakeContext,
    Harness,
    deliver_until,
    failure_record,
    run_files,
    start_event,
)

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)  # past any watchdog bound
KEEP = {
    "workers": 2,
    "epochs": 1,
    "rounds_per_epoch": 2,
    "local_optimizer": "keep",
}  # 2 rounds, 2 steps/share


# --- helpers -----------------------------------------------------------------------------------------------------


class HarnessTarget(targets.Target):
    """The operator commands' view of the harness's table and EFS (as in test_delivery_attacks2)."""

    def __init__(self, harness: Harness) -> None:
        self.name = "harness"
        self.status = harness.status
        self.efs_root = harness.efs_root
        self.runs_executed = True

    def option_args(self) -> str:
        return "--state-dir harness"

    def request_stop(self, run_id: str) -> None:
        self.status.request_stop(run_id)


def operator(harness: Harness, command: str, run_id: str, **options: Any) -> int:
    args = argparse.Namespace(command=command, run=run_id, **options)
    return operations.COMMAND_FUNCTIONS[command](HarnessTarget(harness), args)


def reference_weights(harness: Harness, **config: Any) -> list[np.ndarray]:
    """The final weights of an undisturbed run of ``config`` (run id "ref"; the id does not enter training)."""
    harness.invoke(start_event("ref", **config))
    harness.drain()
    assert harness.run("ref").state == "SUCCEEDED"
    return harness.final_weights("ref")


def assert_same_weights(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def differs(got: list[np.ndarray], want: list[np.ndarray]) -> bool:
    return not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def is_worker(round_index: int, worker_index: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("round") == round_index and event.get("workerno") == worker_index


def kept_files(harness: Harness, run_id: str) -> list[str]:
    return [name for name in run_files(harness, run_id) if name.startswith("local/")]


def short_context(full_calls: int = 1) -> FakeContext:
    """A context with time for ``full_calls`` steps, then none (the share continues in a chained invocation)."""
    clock = iter([900_000] * full_calls + [0] * 1000)
    return FakeContext(remaining_ms=lambda: next(clock))


# --- HELD: duplicates, crashes and retries in keep mode reproduce the undisturbed run ---------------------------


def test_held_every_event_delivered_twice_in_keep_mode_trains_the_undisturbed_model(harness: Harness) -> None:
    want = reference_weights(harness, **KEEP)
    harness.invoke(start_event("dup", **KEEP))
    harness.drain(duplicate=True)
    assert harness.run("dup").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("dup"), want)
    assert run_files(harness, "dup") == ["config.json", "final.keras"]


def test_held_a_crash_between_the_kept_state_and_the_update_is_retried_to_the_undisturbed_model(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = reference_weights(harness, **KEEP)
    harness.invoke(start_event("cr", **KEEP))
    real_save = worker_flow.save_arrays
    crashed: list[Path] = []

    def crash_before_the_update(path: Path, *args: Any, **kwargs: Any) -> int:
        if path == harness.layout.update_path("cr", 0, 0) and not crashed:
            crashed.append(path)
            raise Crash("sandbox died after the kept state, before the update")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", crash_before_the_update)
    worker = deliver_until(harness, is_worker(0, 0))
    with pytest.raises(Crash):
        harness.invoke(worker)
    assert harness.layout.local_state_path("cr", 1, 0).exists()  # written first
    assert not harness.layout.update_path("cr", 0, 0).exists()
    assert harness.invoke(failure_record(worker))["status"] == "redispatched"
    harness.drain()
    assert harness.run("cr").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("cr"), want)
    assert run_files(harness, "cr") == ["config.json", "final.keras"]


def test_held_a_retry_on_another_host_keeps_the_first_attempts_momentum_and_the_run_succeeds(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt 1 writes its kept state and dies; attempt 2 (another host: slightly different floating point)
    trains again and writes the update. The kept state is write-once, so round 1 starts from attempt 1's
    momentum beside attempt 2's weights. Both are valid trajectories of the same algorithm (they differ by
    rounding), so this is accepted; the test pins the behaviour: the first kept state is never replaced."""
    harness.invoke(start_event("fp", **KEEP))
    real_save, real_train = worker_flow.save_arrays, training.train_steps
    attempts: list[int] = []

    def crash_once(path: Path, *args: Any, **kwargs: Any) -> int:
        if path == harness.layout.update_path("fp", 0, 0) and len(attempts) == 1:
            attempts.append(1)
            raise Crash("died before the update")
        return real_save(path, *args, **kwargs)

    def other_host(model: Any, *args: Any, **kwargs: Any) -> bool:
        done = real_train(model, *args, **kwargs)
        if len(attempts) >= 2:  # the retry: its rounding differs
            for variable in model.optimizer.variables:
                if variable.name != "iteration" and len(variable.shape) > 0:
                    variable.assign(np.asarray(variable) * np.float32(1.001))
        return done

    monkeypatch.setattr(worker_flow, "save_arrays", crash_once)
    monkeypatch.setattr(training, "train_steps", other_host)
    worker = deliver_until(harness, is_worker(0, 0))
    attempts.append(0)
    with pytest.raises(Crash):
        harness.invoke(worker)
    first, _ = load_arrays(harness.layout.local_state_path("fp", 1, 0))
    assert harness.invoke(failure_record(worker))["status"] == "redispatched"
    harness.invoke(deliver_until(harness, lambda event: event.get("attempt") == 2))
    again, _ = load_arrays(harness.layout.local_state_path("fp", 1, 0))
    assert_same_weights(again, first)  # write-once: attempt 1's state stays
    harness.drain()
    assert harness.run("fp").state == "SUCCEEDED"


def test_held_chained_continuations_in_keep_mode_train_the_undisturbed_model(harness: Harness) -> None:
    config = {**KEEP, "batch_size": 16}  # 4 steps per share
    want = reference_weights(harness, **config)
    harness.invoke(start_event("ch", **config))
    for round_index in (
        0,
        1,
    ):  # worker 1 of each round is cut after one step, and its continuation after one more
        worker = deliver_until(harness, is_worker(round_index, 1))
        assert harness.invoke(worker, short_context(1))["status"] == "continued"
        continuation = deliver_until(harness, is_worker(round_index, 1))
        assert continuation.get("resume_step") == 1
        assert harness.invoke(continuation, short_context(1))["status"] == "continued"
    harness.drain()
    assert harness.run("ch").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("ch"), want)


def test_held_a_failed_run_resumed_in_keep_mode_trains_the_undisturbed_model(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {**KEEP, "rounds_per_epoch": 3, "max_attempts": 1}
    want = reference_weights(harness, **config)
    harness.invoke(start_event("rs", **config))
    harness.invoke(deliver_until(harness, is_worker(1, 0)))  # round 0 done; worker 0 of round 1 writes
    assert harness.layout.local_state_path("rs", 2, 0).exists()
    worker = deliver_until(harness, is_worker(1, 1))
    harness.invoker.queue.clear()
    assert harness.invoke(failure_record(worker))["status"] == "failed"
    assert (harness.run("rs").state, harness.run("rs").round_index) == ("FAILED", 1)
    assert harness.invoke({"start": True, "run": "rs", "resume": True})["status"] == "resumed"
    assert harness.run("rs").generation == 2
    harness.drain()
    assert harness.run("rs").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("rs"), want)
    assert run_files(harness, "rs") == ["config.json", "final.keras"]


def test_held_a_watchdog_resend_in_keep_mode_trains_the_undisturbed_model(harness: Harness) -> None:
    want = reference_weights(harness, **KEEP)
    harness.invoke(start_event("wd", **KEEP))
    harness.invoke(deliver_until(harness, is_worker(1, 1)))  # round 0 done; worker 1 of round 1 trained
    harness.invoker.queue.clear()  # worker 0's event of round 1 is lost
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"wd": "resent"}
    harness.drain()
    assert harness.run("wd").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("wd"), want)


def test_held_disk_full_while_writing_the_kept_state_leaves_nothing_and_the_retry_succeeds(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = reference_weights(harness, **KEEP)
    harness.invoke(start_event("df", **KEEP))
    kept = harness.layout.local_state_path("df", 1, 0)
    real_open = open
    full: list[Path] = []

    def open_on_a_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if "x" in mode and Path(file).parent == kept.parent and not full:
            full.append(Path(file))
            real_write = handle.write

            def write(data: bytes) -> int:
                real_write(data[: len(data) // 2])  # half of it lands, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")

            handle.write = write
        return handle

    monkeypatch.setattr(efs_layout, "open", open_on_a_full_disk, raising=False)
    worker = deliver_until(harness, is_worker(0, 0))
    with pytest.raises(OSError, match="No space left"):
        harness.invoke(worker)
    assert full and not kept.exists() and not list(kept.parent.iterdir())  # no half file, no temporary
    assert not harness.layout.update_path("df", 0, 0).exists()
    assert harness.invoke(failure_record(worker, error_type="OSError"))["status"] == "redispatched"
    harness.drain()
    assert harness.run("df").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("df"), want)


# --- HELD: damaged kept state fails the run clearly -------------------------------------------------------------


def test_held_a_truncated_kept_state_fails_the_run_at_once_naming_the_file(harness: Harness) -> None:
    harness.invoke(start_event("tr", **KEEP, max_attempts=3))
    for _ in range(3):  # round 0's workers and combine
        harness.invoke(harness.invoker.queue.popleft())
    path = harness.layout.local_state_path("tr", 1, 0)
    path.write_bytes(path.read_bytes()[:100])  # truncated (written in place by something else)
    worker = deliver_until(harness, is_worker(1, 0))
    with pytest.raises(Exception, match="unreadable array archive"):
        harness.invoke(worker)
    run = harness.run("tr")
    assert run.state == "FAILED" and "local/round-000001/worker-0000.npz" in run.reason
    record = failure_record(worker, error_type="LayoutError")
    assert harness.invoke(record)["status"] == "ignored"  # not retried


# DEFECT 3: broke on main (xfail strict there); fixed on branch review10.
@pytest.mark.parametrize("damage", ["one_array_short", "wrong_shapes"])
def test_a_kept_state_of_another_configuration_fails_the_run_at_once_and_is_not_retried(
    harness: Harness, damage: str
) -> None:
    """README (errors): a damaged state is a LayoutError: not retried, the run FAILED at once with the reason.

    A kept file that does not fit the model (written by a run of another configuration under the same id, see
    DEFECT 2, or by hand) reaches ``training.restore_optimizer_state``, which raises a bare ValueError (count)
    or Keras's ValueError (shape). Bare exceptions count as retryable: the failure record re-dispatches the
    worker up to ``max_attempts`` times, each failing the same way, before the run fails with "ValueError"."""
    harness.invoke(start_event("cf", **KEEP, max_attempts=3))
    for _ in range(3):
        harness.invoke(harness.invoker.queue.popleft())
    path = harness.layout.local_state_path("cf", 1, 0)
    arrays, meta = load_arrays(path)
    if damage == "one_array_short":
        arrays = arrays[:-1]
    else:
        arrays = [np.zeros((*array.shape, 2), array.dtype) if array.ndim else array for array in arrays]
    path.unlink()
    save_arrays(path, arrays, meta)
    worker = deliver_until(harness, is_worker(1, 0))
    with pytest.raises(Exception) as raised:
        harness.invoke(worker)
    assert type(raised.value).__name__ == "LayoutError", repr(raised.value)
    assert harness.run("cf").state == "FAILED"
    assert (
        harness.invoke(failure_record(worker, error_type=type(raised.value).__name__))["status"] == "ignored"
    )


# --- DEFECTS 1, 2: a late copy's kept state outlives its take-back ---------------------------------------------


# DEFECT 1: broke on main (xfail strict there); fixed on branch review10.
def test_a_late_worker_copy_leaves_no_kept_state_behind_a_succeeded_run(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a SUCCEEDED run keeps config.json and final.keras only; a late copy takes back what it wrote.

    Two copies of worker 0 of round 0 (1 worker, 2 rounds). Copy B passes its re-check; before it writes, copy
    A writes, and the run goes on to SUCCEEDED (commit, round 1, export, clean-up). B then writes its kept
    state for round 1 (the name is free again: clean-up removed it), its update, finds the round over and
    takes back the update only."""
    harness.invoke(start_event("late", workers=1, epochs=1, rounds_per_epoch=2, local_optimizer="keep"))
    worker = harness.invoker.queue.popleft()
    real_save = worker_flow.save_arrays
    inner: list[Any] = []

    def other_copy_finishes_the_run_first(path: Path, *args: Any, **kwargs: Any) -> int:
        if not inner:
            inner.append(None)
            inner.append(harness.invoke(worker))  # copy A
            harness.drain()  # both rounds, SUCCEEDED, clean-up
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", other_copy_finishes_the_run_first)
    assert harness.invoke(worker)["status"] == "ignored"
    assert harness.run("late").state == "SUCCEEDED"
    assert run_files(harness, "late") == ["config.json", "final.keras"]


# DEFECT 1: broke on main (xfail strict there); fixed on branch review10.
def test_rm_while_a_keep_worker_is_in_flight_leaves_no_folder_and_the_id_can_start_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keep-mode form of test_delivery_attacks2's DEFECT B (fixed there for the update alone)."""
    config = {"workers": 2, "epochs": 1, "rounds_per_epoch": 2, "local_optimizer": "keep"}
    harness.invoke(start_event("gone", **config))
    worker = harness.invoker.queue.popleft()
    harness.invoker.queue.clear()
    real_save = worker_flow.save_arrays
    done: list[bool] = []

    def operator_acts_while_the_worker_writes(path: Path, *args: Any, **kwargs: Any) -> int:
        if not done:
            done.append(True)
            assert operator(harness, "stop", "gone", now=True) == 0
            assert operator(harness, "rm", "gone") == 0
            assert not harness.layout.run_dir("gone").exists()
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", operator_acts_while_the_worker_writes)
    assert harness.invoke(worker)["status"] == "ignored"
    assert not harness.layout.run_dir("gone").exists(), run_files(harness, "gone")
    monkeypatch.setattr(worker_flow, "save_arrays", real_save)
    assert harness.invoke(start_event("gone", **config))["status"] == "started"


# DEFECT 2: broke on main (xfail strict there); fixed on branch review10.
def test_a_new_run_of_the_same_id_never_trains_from_the_removed_runs_kept_state(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silent garbage: a new run of the same id trains from a removed run's momentum.

    The old run's worker is in flight; the operator stops it (--now), removes it and starts the id again with
    another configuration before that worker writes. The worker writes its kept state for round 1 (write-once,
    no instance in it) into the new run's folder, its update, sees "removed and started again" and takes back
    the update only. The new run's worker 0 then cannot publish its own kept state (the name is taken) and
    round 1 restores the old run's momentum: the final weights differ from an undisturbed run's. Fixed by
    taking the kept state back too and by stamping it with the run's instance (a foreign one is ignored)."""
    old = {**KEEP, "lr": 0.08}
    new = {**KEEP, "lr": 0.03}  # another configuration of the same model
    want = reference_weights(harness, **new)
    harness.invoke(start_event("again", **old))
    worker = harness.invoker.queue.popleft()  # the old run's worker 0 of round 0, in flight
    harness.invoker.queue.clear()
    real_save = worker_flow.save_arrays
    done: list[bool] = []

    def operator_removes_and_starts_again(path: Path, *args: Any, **kwargs: Any) -> int:
        if not done:
            done.append(True)
            assert operator(harness, "stop", "again", now=True) == 0
            assert operator(harness, "rm", "again") == 0
            assert harness.invoke(start_event("again", **new))["status"] == "started"
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", operator_removes_and_starts_again)
    assert harness.invoke(worker)["status"] == "ignored"  # "removed and started again": takes back its update
    monkeypatch.setattr(worker_flow, "save_arrays", real_save)
    harness.drain()
    assert harness.run("again").state == "SUCCEEDED"
    assert_same_weights(harness.final_weights("again"), want)


# DEFECT 2: broke on main (xfail strict there); fixed on branch review10.
def test_a_kept_state_another_instance_left_under_the_name_is_never_restored(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The window DEFECT 2's take-back cannot close: a removed run's late worker publishes its kept state under
    the new run's name before the new run's worker does (the new one's write-once then fails) and has not yet
    taken it back. The new run's worker 1 of round 1 must not restore it: it goes on from zero momentum with a
    warning, as for a missing state."""
    harness.invoke(start_event("fi", **KEEP))
    run = harness.run("fi")
    path = harness.layout.local_state_path("fi", 1, 1)
    harness.invoke(deliver_until(harness, is_worker(0, 1)))  # writes the genuine state
    arrays, meta = load_arrays(path)
    path.unlink()
    save_arrays(path, [np.full_like(array, 7.0) for array in arrays], {**meta, "instance": "removedrun"})
    harness.drain()
    assert harness.run("fi").state == "SUCCEEDED"
    assert run.instance != "removedrun" and "kept_optimizer_state_foreign" in caplog.text


# --- HELD: what is kept, for which rounds, and when it goes ----------------------------------------------------


def test_held_kept_state_lives_one_round_the_last_round_writes_none_and_success_removes_all(
    harness: Harness,
) -> None:
    harness.invoke(start_event("cl", workers=2, epochs=1, rounds_per_epoch=3, local_optimizer="keep"))
    seen: list[tuple[int, list[str]]] = []
    while harness.invoker.queue:
        event = harness.invoker.queue.popleft()
        harness.invoke(event)
        if event.get("combine"):
            seen.append((event["round"], kept_files(harness, "cl")))
    assert harness.run("cl").state == "SUCCEEDED"
    # after the commit of round r (now at r + 1): the kept states for round r + 1 only; none for round 3
    assert seen[0] == (0, ["local/round-000001/worker-0000.npz", "local/round-000001/worker-0001.npz"])
    assert seen[1] == (1, ["local/round-000002/worker-0000.npz", "local/round-000002/worker-0001.npz"])
    assert seen[2] == (2, [])
    assert run_files(harness, "cl") == ["config.json", "final.keras"]


def test_held_a_stopped_run_keeps_the_kept_states_its_resume_needs(harness: Harness) -> None:
    harness.invoke(start_event("st", **{**KEEP, "rounds_per_epoch": 3}))
    harness.invoke({"stop": True, "run": "st"})
    workers = [event for event in harness.invoker.queue if "workerno" in event]
    harness.drain()
    assert (harness.run("st").state, harness.run("st").round_index) == ("STOPPED", 1)
    for worker in workers:
        harness.invoke(failure_record(worker))  # stale records of a terminal run: clean-up with its status
    assert kept_files(harness, "st") == [
        "local/round-000001/worker-0000.npz",
        "local/round-000001/worker-0001.npz",
    ]
    harness.invoke({"start": True, "run": "st", "resume": True})
    harness.drain()
    assert harness.run("st").state == "SUCCEEDED"
    assert not [result for _, result in harness.results if "kept_optimizer_state_missing" in str(result)]


@pytest.mark.parametrize(
    "config",
    [
        {"workers": 1, "epochs": 2, "rounds_per_epoch": 1},
        {"workers": 2, "epochs": 1, "local_steps": 2},  # 120 examples per shard / 64 -> 2 rounds
        {"workers": 2, "epochs": 1, "rounds_per_epoch": 2, "momentum": 0.0},  # nothing but counters to keep
    ],
    ids=["one_worker", "local_steps", "no_momentum"],
)
def test_held_keep_mode_runs_with_one_worker_local_steps_and_no_momentum(
    harness: Harness, config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    harness.invoke(start_event("k", local_optimizer="keep", **config))
    harness.drain()
    run = harness.run("k")
    assert run.state == "SUCCEEDED", run.reason
    assert run.total_rounds == 2
    assert "kept_optimizer_state_missing" not in caplog.text
    assert run_files(harness, "k") == ["config.json", "final.keras"]


# --- the per-step learning rate ----------------------------------------------------------------------------------


def rates(schedule: Schedule, steps: int) -> list[float]:
    return [schedule.learning_rate(r, s, steps) for r in range(schedule.total_rounds) for s in range(steps)]


@pytest.mark.parametrize(
    ("epochs", "rounds_per_epoch", "warmup", "steps"),
    [
        (1, 1, 0.0, 1),
        (1, 1, 1.0, 1),
        (1, 1, 1.0, 7),
        (2, 4, 1.0, 3),
        (2, 4, 2.0, 3),
        (3, 2, 0.3, 5),
        (4, 1, 0.01, 8),
    ],
)
def test_held_the_rate_is_positive_bounded_and_rises_then_falls_at_every_step(
    epochs: int, rounds_per_epoch: int, warmup: float, steps: int
) -> None:
    config = TrainConfig(lr=0.05, epochs=epochs, rounds_per_epoch=rounds_per_epoch, warmup_epochs=warmup)
    values = rates(Schedule(config, num_train=1000), steps)
    assert all(0 < value <= 0.05 + 1e-12 for value in values)
    peak = values.index(max(values))
    assert values[: peak + 1] == sorted(values[: peak + 1])  # warm-up: non-decreasing
    assert values[peak:] == sorted(values[peak:], reverse=True)  # then non-increasing
    if warmup > 0:
        warmup_rounds = min(warmup * rounds_per_epoch, epochs * rounds_per_epoch / 2)  # at most half the run
        assert values[0] == pytest.approx(min(0.05, 0.05 / (warmup_rounds * steps)))
        assert max(values) == pytest.approx(0.05)  # the peak is reached, even by a warm-up of the whole run
        if epochs * rounds_per_epoch * steps > 1:
            assert values[-1] < 0.05  # and the rate decays after it: no run is all warm-up
    if warmup == 0:
        assert values[0] == 0.05


def test_held_warm_up_ends_continuously_and_a_step_past_the_end_is_clamped() -> None:
    schedule = Schedule(TrainConfig(lr=0.1, epochs=4, rounds_per_epoch=2, warmup_epochs=1), num_train=100)
    assert schedule.learning_rate(1, 9, 10) == pytest.approx(0.1)  # the last warm-up step
    assert schedule.learning_rate(2, 0, 10) == pytest.approx(0.1)  # the first after it (cosine at 0)
    assert schedule.learning_rate(7, 10, 10) == schedule.learning_rate(7, 99, 10)
    assert schedule.learning_rate(7, 9, 10) > 0


@pytest.mark.parametrize(
    "raw",
    [
        {"epochs": 1, "warmup_epochs": 1.5},
        {"warmup_epochs": -0.1},
        {"warmup_epochs": float("nan")},
        {"warmup_epochs": True},
        {"epochs": 1, "preset": "paper", "warmup_epochs": 2},
        {"local_optimizer": "Keep"},
        {"preset": "PAPER"},
        {"preset": ["paper"]},
        {"preset": ""},
    ],
)
def test_held_bad_warm_up_optimizer_mode_and_preset_values_are_refused(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidEventError):
        TrainConfig.from_mapping(raw)


def test_held_the_optimizer_uses_each_steps_rate_also_after_a_continuation(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {**KEEP, "batch_size": 16, "warmup_epochs": 1.0}  # 4 steps per share, rounds 0-1 all warm-up
    harness.invoke(start_event("lr", **config))
    used: list[tuple[tuple[int, ...], float]] = []
    real_train = training.train_steps

    def spy(model: Any, *args: Any, **kwargs: Any) -> bool:
        real_batch = model.train_on_batch

        def train_on_batch(*a: Any, **k: Any) -> Any:
            used.append((tuple(kwargs["augment_seed"][1:]), float(np.asarray(model.optimizer.learning_rate))))
            return real_batch(*a, **k)

        model.train_on_batch = train_on_batch
        try:
            return real_train(model, *args, **kwargs)
        finally:
            del model.train_on_batch

    monkeypatch.setattr(training, "train_steps", spy)
    worker = deliver_until(harness, is_worker(0, 0))
    assert harness.invoke(worker, short_context(2))["status"] == "continued"
    harness.invoke(deliver_until(harness, is_worker(0, 0)))  # the continuation: steps 2 and 3
    schedule = harness.run("lr").schedule
    assert [rate for share, rate in used if share == (0, 0)] == pytest.approx(
        [schedule.learning_rate(0, step, 4) for step in range(4)]
    )


# --- preset ------------------------------------------------------------------------------------------------------


def test_held_a_preset_beside_explicit_keys_resolves_once_and_survives_the_status_round_trip(
    harness: Harness,
) -> None:
    raw = {"preset": "paper", "local_optimizer": "keep", "lr": 0.07}
    config = TrainConfig.from_mapping(raw)
    assert (config.local_optimizer, config.lr, config.warmup_epochs, config.rounds_per_epoch) == (
        "keep",
        0.07,
        0.0,
        1,
    )
    assert TrainConfig.from_mapping(config.to_dict()) == config  # the stored form reads back the same
    event = start_event("pr", workers=2, epochs=1, **raw)
    del event["rounds_per_epoch"]  # the preset's 1 applies
    assert harness.invoke(event)["status"] == "started"
    assert harness.run("pr").config == TrainConfig.from_mapping(
        {k: v for k, v in event.items() if k != "start" and k != "run"}
    )
    assert (
        harness.invoke(event)["status"] == "duplicate"
    )  # a redelivered start is not "another configuration"
    assert json.loads(harness.layout.config_path("pr").read_text())["local_optimizer"] == "keep"


# DEFECT 4: broke on main (xfail strict there); fixed on branch review10.
def test_a_run_stored_before_the_new_keys_resumes_with_the_algorithm_it_started_with(
    harness: Harness,
) -> None:
    """A run item written before cc857b4 has no local_optimizer / warmup_epochs in its stored config;
    RunStatus.from_item filled them with today's defaults (keep, 1 epoch of warm-up): a run resumed (or still
    running) across the upgrade silently switched to kept momentum and a warm-up, which also re-times its
    cosine decay (progress counted from the warm-up's end). Fixed: missing keys read as the values the run
    started with (coordination.LEGACY_CONFIG)."""
    harness.invoke(
        start_event(
            "old", workers=2, epochs=4, rounds_per_epoch=1, local_optimizer="reset", warmup_epochs=0.0
        )
    )
    harness.invoker.queue.clear()
    stored = json.loads(harness.status.table.get_item(Key={"pk": "RUN#old", "sk": "RUN"})["Item"]["config"])
    del stored["local_optimizer"], stored["warmup_epochs"], stored["preset"]  # as cc857b4's parent wrote it
    harness.status.table.update_item(
        Key={"pk": "RUN#old", "sk": "RUN"},
        UpdateExpression="SET #c = :c",
        ExpressionAttributeNames={"#c": "config"},
        ExpressionAttributeValues={":c": json.dumps(stored, sort_keys=True)},
    )
    run = harness.run("old")
    assert (run.config.local_optimizer, run.config.warmup_epochs) == ("reset", 0.0)
    assert run.schedule.learning_rate(2) == pytest.approx(0.5 * run.config.lr)  # cosine at 2/4, as it started
