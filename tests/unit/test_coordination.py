"""DynamoDB coordination against DynamoDB Local: each transition happens once, whatever the concurrency."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from trainer.config import TrainConfig
from trainer.coordination import (
    STOP_REQUESTED,
    STOPPED,
    RoundMetrics,
    RoundRecord,
    RunStatus,
    RunSummary,
    StatusTable,
)
from trainer.errors import CoordinationConflictError, LayoutError
from trainer_harness import race


@pytest.fixture
def status(table: Any) -> StatusTable:
    return StatusTable(table)


def create(status: StatusTable, run_id: str, **config: Any) -> RunStatus:
    """Create a run over 100 training examples (4 rounds with the default 2 epochs of 2 rounds)."""
    config = {"epochs": 2, "rounds_per_epoch": 2, **config}
    run = RunStatus.new(run_id, TrainConfig(**config), num_train=100)
    status.create_run(run)
    return run


def test_second_create_with_the_same_id_conflicts(status: StatusTable) -> None:
    create(status, "r", workers=2)
    with pytest.raises(CoordinationConflictError, match="already exists"):
        create(status, "r", workers=3)
    assert status.get_run("r").config.workers == 2


def test_concurrent_registrations_are_all_counted_and_one_claim_wins(status: StatusTable) -> None:
    create(status, "r", workers=8)
    race(8, lambda worker: status.register_worker("r", 0, worker))
    assert status.register_worker("r", 0, 3) == set(range(8))  # registering again is idempotent
    claims = race(8, lambda worker: status.claim_combine("r", 0, 1, worker, 1))
    assert claims.count(True) == 1


def test_only_the_claimant_retrying_may_claim_again(status: StatusTable) -> None:
    create(status, "r", workers=2)
    status.register_worker("r", 0, 0)
    assert status.claim_combine("r", 0, 1, worker_index=1, attempt=1)
    assert not status.claim_combine("r", 0, 1, worker_index=0, attempt=2)
    assert status.claim_combine("r", 0, 1, worker_index=1, attempt=2)
    assert status.claim_combine("r", 0, 2, worker_index=0, attempt=1)  # a resumed run's new generation


METRICS = RoundMetrics(
    epochs_done=0, samples=100, train_loss=1.25, duration_s={"load": 0.5}, bytes_read=10, bytes_written=20
)


def test_round_advances_once_under_concurrent_commits_with_the_winners_token_and_metrics(
    status: StatusTable,
) -> None:
    create(status, "r", workers=2)
    run = status.get_run("r")

    def commit(index: int) -> bool:
        metrics = dataclasses.replace(METRICS, train_loss=float(index))
        try:
            status.commit_round(run, 0, "RUNNING", f"token{index}", RunSummary(test_accuracy=0.5), metrics)
        except CoordinationConflictError:
            return False
        return True

    results = race(6, commit)
    assert results.count(True) == 1
    winner = results.index(True)
    committed = status.get_run("r")
    assert committed.round_index == 1 and committed.weights_token == f"token{winner}"
    assert committed.summary == RunSummary(test_accuracy=0.5)
    (record,) = status.list_rounds("r")
    assert record.completed and record.committed_token == f"token{winner}"
    assert record.metrics == dataclasses.replace(METRICS, train_loss=float(winner))  # only the winner's


def test_registration_after_the_combine_is_refused(status: StatusTable) -> None:
    create(status, "r", workers=1)
    status.register_worker("r", 0, 0)
    status.commit_round(status.get_run("r"), 0, "RUNNING", "t", RunSummary(), METRICS)
    with pytest.raises(CoordinationConflictError, match="already combined"):
        status.register_worker("r", 0, 0)
    (record,) = status.list_rounds("r")
    assert record.metrics == METRICS and record.completed and record.done == {0}


def test_stop_flag_and_failure_apply_only_to_active_runs(status: StatusTable) -> None:
    create(status, "r", workers=1)
    assert status.request_stop("r")
    assert not status.request_stop("r")  # already flagged
    run = status.get_run("r")
    assert run.state == STOP_REQUESTED
    status.commit_round(run, 0, STOPPED, "t", RunSummary(), METRICS)
    assert not status.fail_run("r", "late failure")
    assert status.get_run("r").state == STOPPED
    resumed = status.resume_run("r")
    assert resumed.state == "RUNNING" and resumed.generation == 2


# --- the records, as pure functions -----------------------------------------------------------------------


def run_at(state: str = "RUNNING", round_index: int = 3, fanned_out: int = 3) -> RunStatus:
    run = RunStatus.new("r", TrainConfig(workers=2, epochs=2, rounds_per_epoch=2), num_train=100)
    return dataclasses.replace(run, state=state, round_index=round_index, fanned_out=fanned_out)


@pytest.mark.parametrize(
    ("run", "round_index", "current", "awaits_follow_up"),
    [
        (run_at(), 3, True, False),
        (run_at(), 2, False, False),  # round 2 committed and round 3 fanned out: a stale event
        (
            run_at(fanned_out=2),
            2,
            False,
            True,
        ),  # committed, but the committing combine died before the fan-out
        (run_at(state="STOP_REQUESTED"), 3, True, False),
        (run_at(state="STOPPED", fanned_out=2), 2, False, False),  # ended runs need nothing
        (run_at(state="FAILED"), 3, False, False),
        (run_at(fanned_out=2), 1, False, False),
    ],
    ids=["current", "stale", "fan-out-cut-short", "stop-requested", "stopped", "failed", "older"],
)
def test_round_predicates(run: RunStatus, round_index: int, current: bool, awaits_follow_up: bool) -> None:
    assert run.is_current(round_index) is current
    assert run.awaits_follow_up(round_index) is awaits_follow_up


def test_run_item_round_trips_and_owns_the_plan() -> None:
    run = dataclasses.replace(
        run_at(), summary=RunSummary(test_accuracy=0.25, final_model="/mnt/efs/x"), export_bucket="b"
    )
    item = run.to_item()
    assert item["pk"] == "RUN#r" and item["num_train"] == 100 and item["rounds_per_epoch"] == 2
    assert RunStatus.from_item(item) == dataclasses.replace(
        run, created_at=item["created_at"], updated_at=item["updated_at"]
    )
    assert item["active"] == "1" and item["schema"] == 2 and item["weights_token"] == "init"
    assert "active" not in dataclasses.replace(run, state="STOPPED").to_item()  # leaves the sparse index
    assert run.total_rounds == run.schedule.total_rounds == 4
    assert run.schedule.num_train == 100


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda item: item.pop("num_train"), "has no 'num_train'"),
        (lambda item: item.pop("schema"), "written by another version of the trainer .item schema 1"),
        (lambda item: item.update(config='{"workers": 0}'), "not a valid run: workers must be between"),
        (lambda item: item.update(config='{"weights": "/etc/passwd", "model": "vgg19"}'), "weights must be"),
    ],
    ids=["no-plan", "older-version", "bad-config", "weights-outside-efs"],
)
def test_a_run_item_that_is_not_a_valid_run_is_refused(change: Any, message: str) -> None:
    item = run_at().to_item()
    change(item)
    with pytest.raises(LayoutError, match=message):
        RunStatus.from_item(item)


def test_a_failure_for_an_older_round_or_generation_does_not_fail_the_run(status: StatusTable) -> None:
    create(status, "r", workers=1)
    status.commit_round(status.get_run("r"), 0, "RUNNING", "t", RunSummary(), METRICS)
    assert not status.fail_run("r", "stale worker", round_index=0, generation=1)
    assert not status.fail_run("r", "before a resume", round_index=1, generation=0)
    assert status.get_run("r").state == "RUNNING"
    assert status.fail_run("r", "current", round_index=1, generation=1)
    failed = status.get_run("r")
    assert failed.state == "FAILED" and failed.reason == "current" and "active" not in failed.to_item()


def test_finish_happens_once_after_the_last_commit(status: StatusTable) -> None:
    run = create(status, "r", workers=1, epochs=1, rounds_per_epoch=1)
    assert not status.finish_run(status.get_run("r"), RunSummary(final_model="m"))  # round 0 not committed
    status.commit_round(status.get_run("r"), 1, "RUNNING", "t", RunSummary(test_accuracy=0.5), METRICS)
    committed = status.get_run("r")
    assert committed.all_rounds_committed and committed.awaits_follow_up(0) and run.total_rounds == 1
    assert status.finish_run(committed, RunSummary(final_model="m"))
    assert not status.finish_run(committed, RunSummary(final_model="other"))
    finished = status.get_run("r")
    assert finished.state == "SUCCEEDED"
    assert finished.summary == RunSummary(test_accuracy=0.5, final_model="m")


def test_runs_are_listed_newest_first_from_the_runs_index(status: StatusTable) -> None:
    for index, run_id in enumerate(["old", "middle", "new"]):
        run = RunStatus.new(run_id, TrainConfig(epochs=2, rounds_per_epoch=2), num_train=100)
        status.create_run(dataclasses.replace(run, created_at=f"2026-11-2{index}T10:00:00+00:00"))
    status.register_worker("new", 0, 0)  # round items are not runs

    listing = status.list_runs()

    assert [run.run_id for run in listing.runs] == ["new", "middle", "old"]
    assert listing.unreadable == {}
    indexes = status.table.meta.client.describe_table(TableName=status.table.name)["Table"]
    assert "Runs" in [index["IndexName"] for index in indexes["GlobalSecondaryIndexes"]]


def test_a_run_item_from_before_the_index_is_listed_once_indexed(status: StatusTable) -> None:
    create(status, "before")
    status.table.update_item(Key={"pk": "RUN#before", "sk": "RUN"}, UpdateExpression="REMOVE kind")
    assert status.list_runs().runs == []

    assert status.index_run("before") is True
    assert status.index_run("before") is False  # already indexed
    assert status.index_run("missing") is False
    assert [run.run_id for run in status.list_runs().runs] == ["before"]


def test_halt_stops_an_active_run_at_once_with_the_reason(status: StatusTable) -> None:
    create(status, "r1")

    assert status.halt_run("r1", "stopped at once by the operator") is True
    assert status.halt_run("r1", "again") is False  # no longer active

    run = status.get_run("r1")
    assert (run.state, run.reason, run.active) == (STOPPED, "stopped at once by the operator", False)
    assert "r1" not in status.list_active_run_ids()
    assert status.resume_run("r1").state == "RUNNING"


def test_progress_counts_epochs_from_the_rounds_it_read() -> None:
    """The bar's epoch agrees with its round count even when the run item was read before a commit."""
    from localrun import progress

    run = run_at(round_index=2, fanned_out=2)  # 2 rounds per epoch
    rounds = [
        RoundRecord("r", index, done=frozenset({0, 1}), completed_at="2026-01-01T00:00:00+00:00")
        for index in range(3)
    ]
    stale_run = dataclasses.replace(run, epochs_done=0)
    assert progress.Snapshot("r", stale_run, rounds).epochs_done == 1
    assert progress.Snapshot("r", stale_run, rounds[:1]).epochs_done == 0
