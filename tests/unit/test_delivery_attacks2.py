"""Second hostile review (its scenarios for the trainer; the operator-command ones are in test_operations.py): what is still broken after the first review's fixes (failures.py retry rules,
worker.py's ``_round_moved_on``, clean-up, ``RunStatus.check``, the operator commands).

Every scenario drives public entry points: ``app.handle`` through the harness, ``watchdog.check_runs``,
``localrun.operations`` commands (``cli.main`` for a stack). DEFECT tests fail on the reviewed code; HELD tests
pass and stay as regression tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from localrun import operations, targets
from localrun.errors import OperatorError
from trainer import watchdog
from trainer import worker as worker_flow
from trainer.errors import InvocationError, LayoutError
from trainer_harness import Harness, Throttled, failure_record, run_files, start_event

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)


class HarnessTarget(targets.Target):
    """The operator commands' view of the harness's table and EFS (a local target that a `lambdatrain local`
    serves: what `--state-dir` gives, without a second DynamoDB Local)."""

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


def fail_at_round_0_after_fan_out(harness: Harness, run_id: str) -> None:
    """Round 0 fanned out (fanned_out = 0), then a worker's attempts ran out: FAILED at round 0."""
    harness.invoke(start_event(run_id, max_attempts=1))
    worker = harness.invoker.queue.popleft()
    harness.invoker.queue.clear()
    assert harness.invoke(failure_record(worker))["status"] == "failed"
    run = harness.run(run_id)
    assert (run.state, run.round_index, run.fanned_out) == ("FAILED", 0, 0)


# --- DEFECT A: a resume whose replays are used up is not handed to the watchdog ------------------------------


def test_a_resume_whose_replays_are_used_up_goes_to_the_watchdog_at_once(harness: Harness) -> None:
    """Broken: README "Failures retry what can succeed": "once a start's or resume's replays are used up, its run
    goes to the watchdog at once".

    `_replay` hands a run to `watchdog.revive` only if ``fanned_out < round``. ``fanned_out`` is not per
    generation: a run that FAILED (or was stopped with `stop --now`) after its round was fanned out keeps
    ``fanned_out == round``. Its resume sets it RUNNING under a new generation, then every Invoke of the workers is
    throttled; when the replays are used up the record is "ignored": the run stays RUNNING with nothing queued
    until the scheduled watchdog notices the silence (2 x timeout + 60 s)."""
    fail_at_round_0_after_fan_out(harness, "rs")
    resume = {"start": True, "run": "rs", "resume": True}
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(resume)  # RUNNING in generation 2, no worker sent
    assert harness.run("rs").state == "RUNNING" and not harness.invoker.queue
    result = harness.invoke(failure_record({**resume, "attempt": 3}, message="TooManyRequestsException"))
    assert result["status"] == "resent", result  # observed: ignored
    assert len(harness.invoker.queue) == 3


# --- DEFECT B: `stop --now` + `rm` while a worker is in flight leaves the removed run's folder ----------------


def test_rm_after_stop_now_leaves_no_folder_and_the_id_can_be_started_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: README "Operating runs": `stop --now` -- "invocations in flight find the run inactive and do
    nothing"; `rm` deletes the run's folder. Also "Bad input ... nothing is changed" for a later start.

    A worker in flight finishes its share while the operator runs `stop --now` then `rm` (allowed: the run is
    STOPPED). `_round_moved_on` treats a STOPPED run at the same round as wanting the update, so the worker writes
    it, recreating ``runs/<run>/`` after `rm` deleted it; its re-check then finds no run item and raises, leaving
    the file. A new start with the same id is refused ("already exists but the status table has no run")."""
    harness.invoke(start_event("gone2", workers=2, epochs=1, rounds_per_epoch=1))
    worker = harness.invoker.queue.popleft()
    harness.invoker.queue.clear()
    real_save = worker_flow.save_arrays
    done: list[bool] = []

    def operator_acts_while_the_update_is_written(path: Path, *args: Any, **kwargs: Any) -> int:
        if not done:
            done.append(True)
            assert operator(harness, "stop", "gone2", now=True) == 0
            assert operator(harness, "rm", "gone2") == 0
            assert not harness.layout.run_dir("gone2").exists()
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", operator_acts_while_the_update_is_written)
    assert harness.invoke(worker)["status"] == "ignored"  # the run was removed: it takes back what it wrote
    assert done
    assert not harness.layout.run_dir("gone2").exists(), run_files(harness, "gone2")
    monkeypatch.setattr(worker_flow, "save_arrays", real_save)
    assert (
        harness.invoke(start_event("gone2", workers=2, epochs=1, rounds_per_epoch=1))["status"] == "started"
    )


# --- HELD: the retry rules are bounded, and revive races are settled by the table -----------------------------


def test_held_registration_retries_are_bounded_then_left_to_the_watchdog_which_is_bounded_too(
    harness: Harness,
) -> None:
    """HELD: a worker whose update is written gets 2 x max_attempts re-dispatches, then the watchdog's budget;
    nothing re-dispatches without bound and the run ends FAILED with a reason."""
    harness.invoke(start_event("bd", workers=2, epochs=1, rounds_per_epoch=1, max_attempts=2))
    worker = harness.invoker.queue.popleft()
    harness.invoker.queue.clear()
    harness.invoke(worker)  # update written and registered
    sent = 0
    record = failure_record(worker)
    while True:
        result = harness.invoke(record)
        if result["status"] != "redispatched":
            break
        sent += 1
        record = failure_record(harness.invoker.queue.pop())
    assert sent < 4  # (attempt 1 .. 4): at most 2 x max_attempts deliveries of the event
    for _ in range(5):
        harness.invoker.queue.clear()
        watchdog.check_runs(harness.services, now=LATER)
        if not harness.run("bd").active:
            break
    assert harness.run("bd").state == "FAILED"


def test_held_revive_from_an_exhausted_start_loses_to_a_resume_that_came_first(harness: Harness) -> None:
    """HELD: an exhausted start's revive after a resume bumped the generation does nothing ("moved on")."""
    event = start_event("rr")
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event)
    harness.invoke({"start": True, "run": "rr", "resume": True})
    generation = harness.run("rr").generation
    queued = len(harness.invoker.queue)
    result = harness.invoke(failure_record({**event, "attempt": 3}))
    # fanned_out is 0 now: ignored; either way no second generation is sent on top of the resume's
    assert result["status"] in ("ignored", "moved on")
    assert harness.run("rr").generation == generation and len(harness.invoker.queue) == queued
    harness.drain()
    assert harness.run("rr").state == "SUCCEEDED"


# --- HELD: a run halted mid-round keeps its updates; a stale failure record keeps what a resume needs ------------


def test_held_an_update_written_after_stop_now_is_kept_and_reused_by_the_resume(harness: Harness) -> None:
    harness.invoke(start_event("hs", workers=2, epochs=1, rounds_per_epoch=2, outer_momentum=0.9))
    first, second = harness.invoker.queue.popleft(), harness.invoker.queue.popleft()
    harness.invoke(first)
    harness.invoke(harness.invoker.queue.popleft()) if harness.invoker.queue else None
    harness.invoker.queue.clear()
    harness.invoke(second)
    harness.invoker.queue.clear()  # the combine of round 0 is lost
    assert operator(harness, "stop", "hs", now=True) == 0
    assert harness.layout.update_path("hs", 0, 1).exists()
    harness.invoke(failure_record(second))  # a stale record of the halted run: clean-up keeps round 0
    assert harness.layout.update_path("hs", 0, 0).exists() and harness.layout.update_path("hs", 0, 1).exists()
    harness.invoke({"start": True, "run": "hs", "resume": True})
    harness.drain()
    run = harness.run("hs")
    assert run.state == "SUCCEEDED", run.reason


def test_held_a_run_stopped_by_its_commit_keeps_weights_and_momentum_through_stale_records(
    harness: Harness,
) -> None:
    harness.invoke(start_event("sm", workers=2, epochs=2, rounds_per_epoch=1, outer_momentum=0.9))
    harness.invoke({"stop": True, "run": "sm"})
    workers = list(harness.invoker.queue)
    harness.drain()
    run = harness.run("sm")
    assert (run.state, run.round_index) == ("STOPPED", 1)
    for worker in workers:
        harness.invoke(failure_record(worker))  # stale: terminal run, clean-up with its status
    assert harness.layout.weights_path("sm", 1, run.weights_token).exists(), run_files(harness, "sm")
    assert harness.layout.outer_state_path("sm", 1, run.weights_token).exists(), run_files(harness, "sm")
    harness.invoke({"start": True, "run": "sm", "resume": True})
    harness.drain()
    assert harness.run("sm").state == "SUCCEEDED"


# --- HELD: every run item the trainer writes reads back (RunStatus.check) ----------------------------------------


def test_held_every_state_the_trainer_writes_reads_back(harness: Harness) -> None:
    harness.invoke(start_event("ls", workers=2, epochs=2, rounds_per_epoch=1, local_steps=1, eval_every=1))
    harness.run("ls")  # right after create and fan-out
    harness.invoke({"stop": True, "run": "ls"})
    assert harness.run("ls").state == "STOP_REQUESTED"
    harness.drain()
    assert harness.run("ls").state == "STOPPED"  # after a stop commit
    harness.invoke({"start": True, "run": "ls", "resume": True})
    assert operator(harness, "stop", "ls", now=True) == 0
    assert harness.run("ls").state == "STOPPED"  # after halt_run
    harness.invoker.queue.clear()
    harness.invoke({"start": True, "run": "ls", "resume": True})
    harness.drain()
    run = harness.run("ls")
    assert run.state == "SUCCEEDED" and run.round_index == run.total_rounds
    assert operator(harness, "status", "ls") == 0
    assert operator(harness, "runs", "ls") == 0


# --- HELD: operator commands refuse bad input and change nothing ----------------------------------------------


@pytest.mark.parametrize("run_id", ["../t1", "t1/../t1", "nope", "t1 ", "RUN#t1"])
def test_held_unknown_or_hostile_run_ids_are_refused_and_delete_nothing(
    harness: Harness, run_id: str
) -> None:
    harness.invoke(start_event("t1"))
    harness.invoker.queue.clear()
    operator(harness, "stop", "t1", now=True)
    before = run_files(harness, "t1")
    for command, options in (("status", {}), ("rm", {}), ("stop", {"now": True}), ("stop", {"now": False})):
        with pytest.raises((OperatorError, LayoutError, Exception)):
            operator(harness, command, run_id, **options)
    assert run_files(harness, "t1") == before and harness.run("t1").state == "STOPPED"


def test_held_rm_of_an_active_run_and_stop_now_of_a_finished_run_change_nothing(harness: Harness) -> None:
    harness.invoke(start_event("act", workers=2, epochs=1, rounds_per_epoch=1))
    queued = list(harness.invoker.queue)
    with pytest.raises(OperatorError):
        operator(harness, "rm", "act")
    assert harness.run("act").state == "RUNNING" and harness.layout.run_dir("act").exists()
    harness.drain()
    assert queued and harness.run("act").state == "SUCCEEDED"
    with pytest.raises(OperatorError):
        operator(harness, "stop", "act", now=True)
    run = harness.run("act")
    assert run.state == "SUCCEEDED" and run.reason is None


# --- DEFECT C: after `stop --now` on a stack, the printed `resume` sends an event nothing will run ---------------

from test_operations import (  # noqa: E402  (fixtures of the operator tests: a moto "stack" on DynamoDB Local)
    local_table,  # noqa: F401
    place,  # noqa: F401
    served_state_dir,  # noqa: F401
    stack_place,  # noqa: F401
)

# --- DEFECT D: `rm` on a stack leaves the folder that makes the id unusable, and says nothing about it -------------


class StackLikeTarget(HarnessTarget):
    """What `rm --stack` sees: the table, but no reachable EFS (``efs_root`` None)."""

    def __init__(self, harness: Harness) -> None:
        super().__init__(harness)
        self.efs_root = None


# --- HELD: an exhausted replay's revive and the scheduled watchdog race: one new generation ----------------------


def test_held_revive_from_a_failure_record_and_the_watchdog_racing_send_one_generation(
    harness: Harness,
) -> None:
    from trainer_harness import race

    event = start_event("race", workers=2)
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event)
    record = failure_record({**event, "attempt": 3})
    import time

    time.sleep(2.1)  # silent for 2 s: stalled for a 2 s bound; a heartbeat written by a revive is not
    results = race(
        2,
        lambda i: (
            harness.invoke(record)["status"]
            if i == 0
            else watchdog.check_runs(harness.services, stalled_after_s=2.0)["actions"].get("race")
        ),
    )
    assert sorted(str(r) for r in results).count("resent") == 1, results
    assert harness.run("race").generation == 2 and len(harness.invoker.queue) == 2
    harness.drain()
    assert harness.run("race").state == "SUCCEEDED"


# --- DEFECT E: a worker of a removed run trains into the new run of the same id ----------------------------------


def test_a_worker_in_flight_of_a_removed_run_does_not_register_in_a_new_run_of_the_same_id(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken: README "Operating runs" (`rm` deletes the run; a local id can be started again) and the delivery
    guarantees ("events of an older generation ... are ignored"; each update is trained from the round's global
    weights).

    A worker of run `re` is training when the operator runs `stop --now`, `rm re` and starts a new `re` (another
    seed). The new run is RUNNING at round 0 in generation 1 -- exactly what the old event names -- so
    `_round_moved_on` lets the old worker write its update (a delta from the OLD run's weights) into the new run's
    round 0 and register it; the new run's own worker 0 then finds "update_already_written" and the combine
    averages the foreign update in. Nothing ties an event to its run's incarnation (e.g. created_at or a run
    nonce carried in the event)."""
    harness.invoke(start_event("re", workers=2, epochs=1, rounds_per_epoch=1, seed=0))
    old_worker = harness.invoker.queue.popleft()
    harness.invoker.queue.clear()
    from trainer import training

    real_train = training.train_steps
    acted: list[bool] = []

    def operator_replaces_the_run_meanwhile(*args: Any, **kwargs: Any) -> bool:
        done = real_train(*args, **kwargs)
        if not acted:
            acted.append(True)
            assert operator(harness, "stop", "re", now=True) == 0
            assert operator(harness, "rm", "re") == 0
            new = start_event("re", workers=2, epochs=1, rounds_per_epoch=1, seed=7)
            assert harness.invoke(new)["status"] == "started"
        return done

    monkeypatch.setattr(training, "train_steps", operator_replaces_the_run_meanwhile)
    harness.invoke(old_worker)
    assert acted and harness.run("re").config.seed == 7
    record = harness.status.get_round("re", 0)
    assert record is None or 0 not in record.done, "the old run's worker registered in the new run"
    assert not harness.layout.update_path("re", 0, 0).exists(), "the old run's update is in the new run"


# --- DEFECT F: a replayed resume undoes a later `stop --now` -------------------------------------------------------


def test_a_replayed_resume_does_not_undo_a_later_stop_now(harness: Harness) -> None:
    """Broken: README "Operating runs": `stop --now` marks the run STOPPED (a resume -- the operator's -- redoes
    the round); replays re-send only events that still matter.

    The operator resumes a FAILED run; its fan-out is throttled, so the resume fails and its failure record is
    queued. The operator then runs `stop --now` (STOPPED). The failure record arrives (records come minutes to
    hours later) and re-sends the resume, which makes the run RUNNING again under a new generation and fans out
    its round: the operator's later stop is silently undone. A replayed resume must be conditional on the run
    being as the original resume left it (its generation), not on "not SUCCEEDED"."""
    fail_at_round_0_after_fan_out(harness, "un")
    resume = {"start": True, "run": "un", "resume": True}
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(resume)
    record = failure_record(resume, message="TooManyRequestsException")  # stamped when the resume failed
    assert operator(harness, "stop", "un", now=True) == 0
    assert harness.run("un").state == "STOPPED"
    harness.invoke(record)
    harness.drain()
    run = harness.run("un")
    assert run.state == "STOPPED", f"the stop was undone: {run.state}, generation {run.generation}"


def test_a_replayed_stop_does_not_stop_a_run_resumed_after_it(harness: Harness) -> None:
    """Broken (defect F's mirror): a stop whose first delivery failed is replayed from its failure record after
    the operator stopped and resumed the run; the stale stop is applied to the resumed run (STOP_REQUESTED), so
    the later resume is undone after one round."""
    harness.invoke(start_event("us", workers=2, epochs=2, rounds_per_epoch=1))
    harness.invoker.queue.clear()
    stop = {"stop": True, "run": "us"}
    # the stop's first delivery failed (a crashed host) before it wrote anything; meanwhile the operator
    record = failure_record(stop)  # stamped when the stop failed
    assert operator(harness, "stop", "us", now=True) == 0  # stops the run at once ...
    harness.invoke({"start": True, "run": "us", "resume": True})  # ... and later resumes it
    harness.invoke(record)  # the old stop's record arrives
    harness.drain()
    run = harness.run("us")
    assert run.state == "SUCCEEDED", f"the resume was undone: {run.state} at round {run.round_index}"
