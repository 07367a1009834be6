"""DynamoDB coordination against DynamoDB Local: each transition happens once, whatever the concurrency."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from trainer.config import TrainConfig
from trainer.coordination import STOP_REQUESTED, STOPPED, StatusTable
from trainer.errors import CoordinationConflictError


@pytest.fixture
def status(table: Any) -> StatusTable:
    return StatusTable(table)


def race(count: int, action) -> list[Any]:
    """Run ``action(i)`` in ``count`` threads released at the same instant."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        results[index] = action(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_second_create_with_the_same_id_conflicts(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=2), total_rounds=4)
    with pytest.raises(CoordinationConflictError, match="already exists"):
        status.create_run("r", TrainConfig(workers=3), total_rounds=4)
    assert status.get_run("r").config.workers == 2


def test_concurrent_registrations_are_all_counted_and_one_claim_wins(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=8), total_rounds=1)
    race(8, lambda worker: status.register_worker("r", 0, worker))
    assert status.register_worker("r", 0, 3) == set(range(8))  # registering again is idempotent
    claims = race(8, lambda worker: status.claim_combine("r", 0, 1, worker, 1))
    assert claims.count(True) == 1


def test_only_the_claimant_retrying_may_claim_again(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=2), total_rounds=1)
    status.register_worker("r", 0, 0)
    assert status.claim_combine("r", 0, 1, worker_index=1, attempt=1)
    assert not status.claim_combine("r", 0, 1, worker_index=0, attempt=2)
    assert status.claim_combine("r", 0, 1, worker_index=1, attempt=2)
    assert status.claim_combine("r", 0, 2, worker_index=0, attempt=1)  # a resumed run's new generation


def test_round_advances_once_under_concurrent_commits(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=2, epochs=2), total_rounds=4)
    run = status.get_run("r")

    def commit(_: int) -> bool:
        try:
            status.advance_run(run, 1, 0, "RUNNING", {"test_accuracy": 0.5})
        except CoordinationConflictError:
            return False
        return True

    assert race(6, commit).count(True) == 1
    assert status.get_run("r").round_index == 1
    assert status.get_run_item("r")["test_accuracy"] == 0.5


def test_registration_after_the_combine_is_refused(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=1), total_rounds=2)
    status.register_worker("r", 0, 0)
    status.record_round("r", 0, {"completed_at": "now", "train_loss": 1.25})
    with pytest.raises(CoordinationConflictError, match="already combined"):
        status.register_worker("r", 0, 0)
    assert status.list_rounds("r")[0]["train_loss"] == 1.25


def test_stop_flag_and_failure_apply_only_to_active_runs(status: StatusTable) -> None:
    status.create_run("r", TrainConfig(workers=1), total_rounds=2)
    assert status.request_stop("r")
    assert not status.request_stop("r")  # already flagged
    run = status.get_run("r")
    assert run.state == STOP_REQUESTED
    status.advance_run(run, 1, 0, STOPPED, {})
    assert not status.fail_run("r", "late failure")
    assert status.get_run("r").state == STOPPED
    resumed = status.resume_run("r")
    assert resumed.state == "RUNNING" and resumed.generation == 2
