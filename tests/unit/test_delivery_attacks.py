"""Hostile review: scenarios against the README's "Correct under at-least-once delivery" guarantees.

Every test drives the public entry points (``app.handle`` through the harness, ``watchdog.check_runs``,
``StatusTable`` methods). Tests marked DEFECT fail on the reviewed code; tests marked HELD pass and stay as
regression tests.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer import combine as combine_flow
from trainer import watchdog
from trainer import worker as worker_flow
from trainer.errors import InvalidEventError, InvocationError, LayoutError
from trainer_harness import (
    BUCKET,
    Crash,
    Harness,
    Throttled,
    deliver_until,
    failure_record,
    run_files,
    s3_event,
    start_event,
)

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)  # past any watchdog bound


# --- DEFECT 1: a late clean-up deletes the next round's committed weights ------------------------------------


def test_a_slow_follow_up_clean_up_never_deletes_a_later_rounds_committed_weights(
    harness: Harness, monkeypatch
) -> None:
    """Broken: "Committed files never change" / the clean-up never deletes what a live invocation needs.

    The combine of round 0 commits and fans out round 1, then is paused before its clean-up (a frozen sandbox,
    a slow EFS listing). Meanwhile round 1 trains and commits (weights of round 2 under a new token). The paused
    combine's clean-up then runs with its stale view (round 1) and deletes round 2's committed weights; every
    round-2 worker then fails with LayoutError, which fails the run at once."""
    harness.invoke(start_event("cu"))  # 3 workers, 4 rounds
    combine0 = deliver_until(harness, lambda event: event.get("combine") and event["round"] == 0)
    real_mark = harness.status.mark_fanned_out
    paused: list[int] = []

    def mark_then_round_1_runs_meanwhile(run_id: str, round_index: int) -> None:
        real_mark(run_id, round_index)
        if round_index == 1 and not paused:
            paused.append(1)
            while True:  # round 1's workers and its combine run to completion
                event = harness.invoker.queue.popleft()
                harness.invoke(event)
                if event.get("combine"):
                    break

    monkeypatch.setattr(harness.status, "mark_fanned_out", mark_then_round_1_runs_meanwhile)
    harness.invoke(combine0)
    monkeypatch.setattr(harness.status, "mark_fanned_out", real_mark)
    run = harness.run("cu")
    assert run.round_index == 2
    assert harness.layout.weights_path("cu", 2, run.weights_token).exists(), run_files(harness, "cu")
    harness.drain()
    assert harness.run("cu").state == "SUCCEEDED"


# --- DEFECT 2: a crash between registration and the combine's invoke is never retried -----------------------


@pytest.mark.parametrize("where", ["before-claim", "after-claim"])
def test_the_last_worker_killed_around_its_claim_is_retried_by_its_failure_record(
    harness: Harness, monkeypatch, where: str
) -> None:
    """Broken: "Failures retry what can succeed" (the claim even allows the same worker a later attempt).

    The last worker registers, then dies before (or right after) claiming the combine, or its Invoke of the
    combine is throttled. Its failure record is judged stale ("already registered") and dropped: the round is
    complete, nothing is queued, and the run sits RUNNING until the watchdog (2 x timeout + 60 s, 31 min)."""
    harness.invoke(start_event("cl", workers=2, epochs=1, rounds_per_epoch=1))
    first, last = harness.invoker.queue.popleft(), harness.invoker.queue.popleft()
    harness.invoke(first)
    if where == "before-claim":
        real_claim = harness.status.claim_combine

        def killed(*args: Any, **kwargs: Any) -> bool:
            raise Crash("killed before claim_combine")

        monkeypatch.setattr(harness.status, "claim_combine", killed)
        with pytest.raises(Crash):
            harness.invoke(last)
        monkeypatch.setattr(harness.status, "claim_combine", real_claim)
    else:
        with Throttled(harness), pytest.raises(InvocationError):
            harness.invoke(last)  # registered and claimed; the combine's Invoke was refused
    result = harness.invoke(failure_record(last, "Crash" if where == "before-claim" else "InvocationError"))
    harness.drain()
    assert harness.run("cl").state == "SUCCEEDED", (result, harness.run("cl").state)


# --- DEFECT 3: a failure record of a duplicate combine fails a run that is finishing -------------------------


@pytest.mark.parametrize("stage", ["last-round-finishing", "mid-run-fanning-out"])
def test_a_failure_record_of_a_crashed_combine_copy_does_not_fail_a_healthy_run(
    harness: Harness, monkeypatch, stage: str
) -> None:
    """Broken: "Records that no longer matter are ignored: ... for a round already committed".

    Two copies of a combine: one crashed (its last attempt), the other committed the round and is doing the
    follow-up (exporting/uploading final.keras, or fanning out). ``awaits_follow_up`` makes the crashed copy's
    record look live, so the handler marks the run FAILED. For the last round the winner's ``finish_run`` then
    loses silently and it reports "finished" after deleting everything but final.keras, while the run is FAILED."""
    rounds = 1 if stage == "last-round-finishing" else 2
    harness.invoke(start_event("fin", workers=2, epochs=1, rounds_per_epoch=rounds, max_attempts=1))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    outcome: dict[str, Any] = {}
    name = "finish_run" if stage == "last-round-finishing" else "mark_fanned_out"
    real = getattr(harness.status, name)

    def record_arrives_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not outcome:  # the other copy (same event, its only attempt) was killed; its record arrives now
            outcome["record"] = harness.invoke(failure_record(combine, "Crash", message="killed"))
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.status, name, record_arrives_meanwhile)
    result = harness.invoke(combine)
    monkeypatch.setattr(harness.status, name, real)
    harness.drain()
    run = harness.run("fin")
    assert run.state == "SUCCEEDED", (result, outcome, run.state, run.reason)


# --- DEFECT 4: leftovers a SUCCEEDED run keeps forever -------------------------------------------------------


def test_a_late_worker_copy_leaves_no_update_behind_a_succeeded_run(harness: Harness, monkeypatch) -> None:
    """Broken: "Nothing is left behind" (a SUCCEEDED run keeps only config.json and final.keras) and "a late
    worker re-checks its round before writing its update".

    Two copies of the only worker. Copy B passes its re-check; before it writes, copy A writes, registers, and
    the combine commits, exports and cleans up. B then recreates updates/round-000000/ and writes its update
    into a run that already SUCCEEDED; its registration is refused and nothing ever deletes the file."""
    harness.invoke(start_event("late", workers=1, epochs=1, rounds_per_epoch=1))
    worker = harness.invoker.queue.popleft()
    real_save = worker_flow.save_arrays
    inner: list[Any] = []

    def other_copy_finishes_the_run_first(path: Path, *args: Any, **kwargs: Any) -> int:
        if not inner:
            inner.append(None)
            inner.append(harness.invoke(worker))  # copy A: writes, registers, claims
            harness.drain()  # the combine: commit, final.keras, clean-up, SUCCEEDED
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", other_copy_finishes_the_run_first)
    late = harness.invoke(worker)
    assert harness.run("late").state == "SUCCEEDED"
    assert run_files(harness, "late") == ["config.json", "final.keras"], late


def test_a_losing_combine_killed_after_writing_leaves_nothing_behind_a_succeeded_run(
    harness: Harness, monkeypatch
) -> None:
    """Broken: "Nothing is left behind" / "a losing copy deletes only its own files" when it is killed between
    writing them and losing the commit (the README's seeded test claims crashes after every save_arrays).

    Copy B of the last round's combine is killed right after writing weights/round-000001-<its token>.npz; copy A
    has already committed and finished. B's failure record is stale (the run ended), no commit follows, so no
    clean-up ever removes B's file."""
    harness.invoke(start_event("dup", workers=2, epochs=1, rounds_per_epoch=1))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    real_save = combine_flow.save_arrays
    seen: list[Any] = []

    def other_copy_finishes_then_this_one_is_killed(path: Path, *args: Any, **kwargs: Any) -> int:
        if seen:
            return real_save(path, *args, **kwargs)
        seen.append(None)
        seen.append(harness.invoke(combine))  # copy A commits, exports and finishes the run
        real_save(path, *args, **kwargs)
        raise Crash("killed after save_arrays")

    monkeypatch.setattr(combine_flow, "save_arrays", other_copy_finishes_then_this_one_is_killed)
    with pytest.raises(Crash):
        harness.invoke(combine)
    monkeypatch.setattr(combine_flow, "save_arrays", real_save)
    assert harness.invoke(failure_record(combine, "Crash"))["status"] == "ignored"
    assert harness.run("dup").state == "SUCCEEDED"
    assert run_files(harness, "dup") == ["config.json", "final.keras"]


# --- DEFECT 5: a resumed run has no watchdog re-sends left -----------------------------------------------------


def test_a_run_resumed_after_the_watchdog_failed_it_gets_its_resends_again(harness: Harness) -> None:
    """Broken: "After max_attempts re-sends without a commit it marks the run FAILED": after a resume the
    counter is not reset (resume_run does not touch watchdog_resends), so the first silence after the resume
    fails the run with zero re-sends, with a reason claiming re-sends that never happened."""
    harness.invoke(start_event("wd", max_attempts=1))
    harness.invoker.queue.clear()
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"wd": "resent"}
    harness.invoker.queue.clear()
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"wd": "failed"}
    harness.invoke({"start": True, "run": "wd", "resume": True})
    harness.invoker.queue.clear()  # the resumed round's events are lost once
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"wd": "resent"}


# --- DEFECT 6: an S3 start whose body names its run is never failed -------------------------------------------


def test_an_s3_start_that_never_got_its_workers_out_fails_the_run_it_created(
    harness: Harness, bucket: Any
) -> None:
    """Broken: "a start that never got its workers out marks its run FAILED" for S3 starts whose object body
    carries "run": the start creates that run, but the exhausted replay looks up the key-derived id instead
    (and would fail an unrelated run of that name), so the created run stays RUNNING with nothing sent."""
    body = {**start_event("inner"), "workers": 2}
    bucket.put_object(Bucket=BUCKET, Key="start/outer.json", Body=json.dumps(body).encode())
    event = s3_event("start/outer.json")
    with Throttled(harness), pytest.raises(InvocationError):
        harness.invoke(event)  # created run "inner", then could not fan out
    assert harness.run("inner").state == "RUNNING"
    result = harness.invoke(failure_record({**event, "attempt": 3}, message="TooManyRequestsException"))
    # The run the object named is found (not the key's "outer") and handed to the watchdog at once: re-sent.
    assert result["status"] == "resent" and harness.run("inner").generation == 2
    assert harness.status.get_run("outer") is None


# --- DEFECT 7: damaged update metadata is retried as if an outage ---------------------------------------------


def test_an_update_file_without_its_metadata_fails_the_run_at_once(harness: Harness) -> None:
    """Broken: "damaged state fails the run at once with the reason" / "never misread". An update archive that
    is a valid .npz but lacks its metadata (or whose metadata lacks 'samples') makes the combine raise a bare
    KeyError: retryable, so the run is not failed, the combine is re-dispatched max_attempts times and the
    final reason is "last error: 'samples'"."""
    harness.invoke(start_event("meta", workers=2, epochs=1, rounds_per_epoch=1))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    path = harness.layout.update_path("meta", 0, 0)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files if key != "__meta__"}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(LayoutError):
        harness.invoke(combine)
    assert harness.run("meta").state == "FAILED"


# --- HELD ------------------------------------------------------------------------------------------------------


def test_held_a_truncated_update_file_fails_the_run_at_once_with_the_reason(harness: Harness) -> None:
    """HELD: a truncated update .npz is a LayoutError: the run is FAILED at once, its record is not retried."""
    harness.invoke(start_event("trunc", workers=2, epochs=1, rounds_per_epoch=1))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    path = harness.layout.update_path("trunc", 0, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LayoutError, match="unreadable"):
        harness.invoke(combine)
    run = harness.run("trunc")
    assert run.state == "FAILED" and "LayoutError" in run.reason
    sent = len(harness.invoker.sent)
    assert harness.invoke(failure_record(combine, "LayoutError"))["status"] == "ignored"
    assert len(harness.invoker.sent) == sent


def test_held_a_stop_requested_inside_the_commit_stops_after_the_round_and_resumes(
    harness: Harness, monkeypatch
) -> None:
    """HELD: a stop that lands between the combine's read and its commit is honoured (STOPPED after the round),
    and a resume finishes the run with the weights of an undisturbed run's round count."""
    harness.invoke(start_event("st"))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    real_commit = harness.status.commit_round
    stopped: list[Any] = []

    def stop_then_commit(*args: Any, **kwargs: Any) -> None:
        if not stopped:
            stopped.append(harness.invoke({"stop": True, "run": "st"}))
        real_commit(*args, **kwargs)

    monkeypatch.setattr(harness.status, "commit_round", stop_then_commit)
    assert harness.invoke(combine)["state"] == "STOPPED"
    monkeypatch.setattr(harness.status, "commit_round", real_commit)
    assert not harness.invoker.queue and harness.run("st").round_index == 1
    harness.invoke({"start": True, "run": "st", "resume": True})
    harness.drain()
    run = harness.run("st")
    assert run.state == "SUCCEEDED" and run.round_index == 4
    assert run_files(harness, "st") == ["config.json", "final.keras"]


@pytest.mark.parametrize(
    "payload",
    [
        {"workerno": 0, "workers": 3, "epochsdone": 0, "run": "../x", "round": 0},
        {"combine": True, "workers": 3, "epochsdone": 0, "run": "t1", "round": -1},
        {"workerno": 0, "workers": 3, "epochsdone": 0, "run": "t1", "round": 0, "attempt": True},
    ],
    ids=["hostile-run", "negative-round", "boolean-attempt"],
)
def test_held_a_crafted_failure_record_is_refused_and_changes_nothing(harness: Harness, payload) -> None:
    """HELD: a failure record whose payload is a malformed worker/combine event is an InvalidEventError."""
    harness.invoke(start_event())
    before, sent = harness.run("t1"), len(harness.invoker.sent)
    with pytest.raises(InvalidEventError):
        harness.invoke(failure_record(payload))
    assert harness.run("t1") == before and len(harness.invoker.sent) == sent


def test_held_a_stale_generation_combine_after_a_resume_commits_at_most_once(
    harness: Harness, monkeypatch
) -> None:
    """HELD: a generation-1 combine delivered after a resume (generation 2) and the generation-2 combine: the
    round is committed once, metrics are on the round item, and the run finishes with only config and model."""
    harness.invoke(start_event("g", workers=2, epochs=1, rounds_per_epoch=2))
    old_combine = deliver_until(harness, lambda event: event.get("combine"))
    harness.invoke({"start": True, "run": "g", "resume": True})
    assert harness.run("g").generation == 2
    results = [harness.invoke(old_combine)]
    harness.drain(duplicate=True)
    run = harness.run("g")
    assert run.state == "SUCCEEDED" and run.round_index == 2
    records = harness.status.list_rounds("g")
    assert all(record.completed and record.metrics is not None for record in records), results
    assert run_files(harness, "g") == ["config.json", "final.keras"]


# --- DEFECT 4b: a chained continuation saves state for a round already committed -----------------------------


def test_a_worker_copy_short_of_time_after_the_commit_leaves_no_partial_state_behind(
    harness: Harness, monkeypatch
) -> None:
    """Broken: "Nothing is left behind" / "stale events do nothing". ``_continue_later`` saves the partial state
    and chains a continuation without re-checking the round (``train_share`` re-checks only before writing an
    update). Copy B of the only worker runs short of time just after copy A's round was committed and the run
    SUCCEEDED: partial/round-000000/worker-0000.npz stays forever and a useless continuation is invoked."""
    from trainer_harness import FakeContext

    harness.invoke(start_event("cont", workers=1, epochs=1, rounds_per_epoch=1))
    worker = harness.invoker.queue.popleft()
    real_save = worker_flow.save_arrays
    inner: list[Any] = []

    def other_copy_finishes_the_run_first(path: Path, *args: Any, **kwargs: Any) -> int:
        if not inner:
            inner.append(None)
            inner.append(harness.invoke(worker))  # copy A trains in one go, registers, claims
            harness.drain()  # the combine commits and the run SUCCEEDS
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(worker_flow, "save_arrays", other_copy_finishes_the_run_first)
    clock = iter([900_000, 900_000] + [0] * 100)
    result = harness.invoke(worker, FakeContext(remaining_ms=lambda: next(clock)))
    monkeypatch.setattr(worker_flow, "save_arrays", real_save)
    assert harness.run("cont").state == "SUCCEEDED"
    assert run_files(harness, "cont") == ["config.json", "final.keras"], (result, list(harness.invoker.queue))
    assert result["status"] != "continued" and not harness.invoker.queue, result


# --- DEFECT 8 (cloud path): the start's concurrency check ignores the function's reserved concurrency --------


class AccountWithReservation:
    """The Lambda API of an account of 1000 executions where the trainer reserved ``reserved`` of them."""

    def __init__(self, reserved: int) -> None:
        self.reserved = reserved

    def get_account_settings(self) -> dict[str, Any]:
        return {
            "AccountLimit": {
                "ConcurrentExecutions": 1000,
                "UnreservedConcurrentExecutions": 1000 - self.reserved,
            }
        }

    def get_function_concurrency(self, **kwargs: Any) -> dict[str, Any]:
        return {"ReservedConcurrentExecutions": self.reserved}


def test_a_start_larger_than_the_trainers_reserved_concurrency_is_refused(harness: Harness) -> None:
    """Broken: "a start checks the account's concurrency before writing anything" when the stack is deployed with
    ReservedConcurrency (template parameter): ``runs.start_run`` calls ``quotas.check_concurrency`` without
    ``reserved`` and nothing tells the function its reservation (no env var, no GetFunctionConcurrency call or
    grant), so the check compares against the account's *unreserved* pool, which excludes the trainer's own
    reservation. Here ReservedConcurrency=3 and workers=3 (needs 4): the run is created and throttled."""
    harness.services.lambda_api = AccountWithReservation(reserved=3)
    with pytest.raises(InvalidEventError, match="reserved concurrency"):
        harness.invoke(start_event("res", workers=3))
    assert harness.status.get_run("res") is None


# --- HELD ------------------------------------------------------------------------------------------------------


def test_held_the_watchdog_leaves_a_round_alone_when_a_worker_heartbeats_during_its_check(
    harness: Harness, monkeypatch
) -> None:
    """HELD: the watchdog read the run as silent, but a worker starts (heartbeats) before the re-send's
    conditional write: the re-send loses ("moved on"), no new generation, the run finishes."""
    import time

    harness.invoke(start_event("wa", workers=1, epochs=1, rounds_per_epoch=1))
    worker = harness.invoker.queue.popleft()
    real = harness.status.resend_round

    def worker_starts_meanwhile(run: Any) -> Any:
        time.sleep(1.1)  # heartbeats have one-second resolution
        harness.invoke(worker)
        return real(run)

    monkeypatch.setattr(harness.status, "resend_round", worker_starts_meanwhile)
    assert watchdog.check_runs(harness.services, now=LATER)["actions"] == {"wa": "moved on"}
    monkeypatch.setattr(harness.status, "resend_round", real)
    assert harness.run("wa").generation == 1
    harness.drain()
    assert harness.run("wa").state == "SUCCEEDED"


def test_held_final_keras_holds_exactly_the_committed_weights_under_duplicates(
    harness: Harness, monkeypatch
) -> None:
    """HELD: with every event delivered twice, final.keras holds bit for bit the weights file the last commit
    named (captured just before the SUCCEEDED clean-up deletes it)."""
    from trainer import housekeeping, models
    from trainer.efs_layout import load_arrays

    real_clean = housekeeping.clean_up
    captured: dict[str, Any] = {}

    def capture_then_clean(run: Any, layout: Any) -> int:
        if run.state == "SUCCEEDED" and "weights" not in captured:
            path = layout.weights_path(run.run_id, run.round_index, run.weights_token)
            captured["weights"], _ = load_arrays(path)
            captured["token"] = run.weights_token
        return real_clean(run, layout)

    monkeypatch.setattr(housekeeping, "clean_up", capture_then_clean)
    harness.invoke(start_event("fk", workers=2, epochs=1, rounds_per_epoch=2))
    harness.drain(duplicate=True)
    run = harness.run("fk")
    assert run.state == "SUCCEEDED" and captured["token"] == run.weights_token
    assert harness.status.get_round("fk", 1).committed_token == run.weights_token
    for got, want in zip(harness.final_weights("fk"), captured["weights"], strict=True):
        np.testing.assert_array_equal(got, want)
    del models


# --- DEFECT 3b: a worker copy's exhausted failure record fails a run whose other copy is registering ---------


def test_an_exhausted_worker_record_does_not_fail_a_run_whose_other_copy_wrote_the_update(
    harness: Harness, monkeypatch
) -> None:
    """Broken: "a failure record that no longer matters is ignored" (the existing test covers only the order
    register-then-record). Two copies of a worker (max_attempts=1): copy A was killed, copy B has written the
    update and is registering. A's record arrives between B's write and B's registration: the worker is not yet
    in ``done``, so the run is marked FAILED although its update is on EFS and B completes the round a moment
    later (the combine is then ignored and the run stays FAILED)."""
    harness.invoke(start_event("wf", workers=2, epochs=1, rounds_per_epoch=1, max_attempts=1))
    first, second = harness.invoker.queue.popleft(), harness.invoker.queue.popleft()
    harness.invoke(first)
    real_register = harness.status.register_worker
    outcome: dict[str, Any] = {}

    def record_arrives_meanwhile(run_id: str, round_index: int, worker_index: int) -> set[int]:
        if worker_index == 1 and not outcome:
            outcome["record"] = harness.invoke(failure_record(second, "Crash", message="killed"))
        return real_register(run_id, round_index, worker_index)

    monkeypatch.setattr(harness.status, "register_worker", record_arrives_meanwhile)
    harness.invoke(second)
    monkeypatch.setattr(harness.status, "register_worker", real_register)
    harness.drain()
    run = harness.run("wf")
    assert run.state == "SUCCEEDED", (outcome, run.reason)


# --- DEFECT 9: crafted run items are misread instead of refused ------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("state", "PAUSED"), ("round", -1), ("round", 99), ("weights_token", "../../../etc/passwd")],
    ids=["unknown-state", "negative-round", "round-past-plan", "hostile-token"],
)
def test_a_crafted_run_item_is_refused_on_read(
    harness: Harness, table: Any, attribute: str, value: Any
) -> None:
    """Broken: "an item written by another version is refused with the reason, never misread, and its
    configuration is validated on every read": only ``config`` and ``schema`` are validated. A state outside the
    five, a round outside 0..total_rounds, or a token that is not a name are read as a valid run (an unknown
    state is neither active nor terminal: the run is skipped by workers and by the watchdog although it stays
    in the ActiveRuns index; a hostile token surfaces later as an InvalidEventError blaming the *event*)."""
    harness.invoke(start_event())
    item = table.get_item(Key={"pk": "RUN#t1", "sk": "RUN"})["Item"]
    item[attribute] = value
    table.put_item(Item=item)
    with pytest.raises(LayoutError):
        harness.status.get_run("t1")


# --- DEFECT 10 (cloud path): the dead-letter alarm cannot publish to its topic ----------------------------------


def test_the_dead_letter_alarms_topic_is_one_cloudwatch_can_publish_to() -> None:
    """Broken: "Failure records that fail three times land in a dead-letter queue with a CloudWatch alarm (SNS,
    optional e-mail)". AlarmTopic is encrypted with the AWS managed key ``alias/aws/sns``, whose key policy does
    not let cloudwatch.amazonaws.com call kms:GenerateDataKey/Decrypt and cannot be edited: the alarm goes to
    ALARM but its action fails ("CloudWatch Alarms does not have authorization to access the SNS topic encryption
    key", AWS re:Post knowledge-center/cloudwatch-configure-alarm-sns), so no e-mail is ever sent. The template
    gate asserts nothing about the alarm path, so it passes."""
    from localrun import template as cfn_template

    resources = cfn_template.load_template(Path(__file__).resolve().parents[2] / "template.yaml")["Resources"]
    alarm = resources["DeadLetterAlarm"]["Properties"]
    topic_id = alarm["AlarmActions"][0]["Ref"]
    key = resources[topic_id]["Properties"].get("KmsMasterKeyId")
    assert key != "alias/aws/sns", "CloudWatch alarms cannot publish to a topic encrypted with aws/sns"


# --- DEFECT 3c: an exhausted start record fails a run whose workers did get out ---------------------------------


def test_an_exhausted_start_whose_workers_were_sent_does_not_fail_the_run(
    harness: Harness, monkeypatch
) -> None:
    """Broken: "a start that never got its workers out marks its run FAILED" — this one did. Its last attempt
    invoked every worker and was killed before ``mark_fanned_out``; the exhausted record sees ``fanned_out`` -1
    and fails the run while its round-0 workers are running (their combine is then ignored)."""
    event = {**start_event("sent", workers=2, epochs=1, rounds_per_epoch=1), "attempt": 3}
    real_mark = harness.status.mark_fanned_out

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Crash("killed before mark_fanned_out")

    monkeypatch.setattr(harness.status, "mark_fanned_out", killed)
    with pytest.raises(Crash):
        harness.invoke(event)
    monkeypatch.setattr(harness.status, "mark_fanned_out", real_mark)
    assert len(harness.invoker.queue) == 2  # both workers were sent
    record = harness.invoke(failure_record(event, "Crash", message="killed"))
    harness.drain()
    run = harness.run("sent")
    assert run.state == "SUCCEEDED", (record, run.reason)


def test_held_two_copies_of_a_start_interleaved_at_create_run_make_one_run(
    harness: Harness, monkeypatch
) -> None:
    """HELD: copy B of a start runs to the end inside copy A's create_run (before A writes the round-0 weights):
    one run item, one set of round-0 weights, duplicate worker events only, and the run finishes."""
    event = start_event("twin", workers=2, epochs=1, rounds_per_epoch=1)
    real_create = harness.status.create_run
    inner: list[Any] = []

    def other_copy_runs_meanwhile(run: Any) -> None:
        real_create(run)
        if not inner:
            inner.append(harness.invoke(event))

    monkeypatch.setattr(harness.status, "create_run", other_copy_runs_meanwhile)
    outer = harness.invoke(event)
    monkeypatch.setattr(harness.status, "create_run", real_create)
    assert {inner[0]["status"], outer["status"]} <= {"started", "duplicate"}
    assert sorted(p.name for p in (harness.layout.run_dir("twin") / "weights").iterdir()) == [
        "round-000000-init.npz"
    ]
    harness.drain()
    assert harness.run("twin").state == "SUCCEEDED"
    assert run_files(harness, "twin") == ["config.json", "final.keras"]
