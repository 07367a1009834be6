"""A run's budget (``max_wall_s``, ``max_gb_s``), the round metrics it counts, the combine's embedded metrics and
the export of every cloud run's model, through the real handler (``trainer_harness``)."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest

from trainer import budget, coordination, embedded_metrics, training
from trainer.config import TrainConfig
from trainer.errors import InvalidEventError
from trainer_harness import BUCKET, Harness, deliver_until, start_event

MEMORY_MB = 10240


def with_memory(harness: Harness, memory_mb: int = MEMORY_MB, model_bucket: str | None = None) -> Harness:
    """The harness as Lambda runs it: AWS_LAMBDA_FUNCTION_MEMORY_SIZE (and the stack's MODEL_BUCKET) set."""
    harness.services.environment = dataclasses.replace(
        harness.services.environment, memory_mb=memory_mb, model_bucket=model_bucket
    )
    return harness


# --- the configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_wall_s", -1, "max_wall_s must be between 0 and"),
        ("max_gb_s", -0.5, "max_gb_s must be between 0 and"),
        ("max_gb_s", "100", "max_gb_s must be float, got str"),
        ("max_wall_s", True, "max_wall_s must be float, got boolean"),
        ("max_wall_s", 1e9, "max_wall_s must be between 0 and 3.16224e\\+07, got 1000000000.0"),
    ],
    ids=["negative-wall", "negative-gb-s", "gb-s-string", "wall-boolean", "wall-over-a-year"],
)
def test_an_invalid_budget_is_refused_with_the_field(key: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidEventError, match=message):
        TrainConfig.from_mapping({key: value})


def test_a_budget_of_zero_means_no_limit() -> None:
    run = coordination.RunStatus.new("r", TrainConfig(workers=2, epochs=2, rounds_per_epoch=1), 100)
    run = dataclasses.replace(run, created_at="2000-01-01T00:00:00+00:00", gb_s=1e9)
    metrics = coordination.RoundMetrics(0, 10, 1.0, {}, 0, 0, invocation_s=1e6, memory_mb=MEMORY_MB)

    assert budget.exceeded(run, metrics, committed_at=2e9) is None


def test_the_wall_budget_counts_from_the_runs_creation_to_the_commit() -> None:
    config = TrainConfig(workers=2, epochs=2, rounds_per_epoch=1, max_wall_s=600)
    run = dataclasses.replace(
        coordination.RunStatus.new("r", config, 100), created_at="2026-11-28T10:00:00+00:00"
    )
    metrics = coordination.RoundMetrics(0, 10, 1.0, {}, 0, 0)
    created = 1_795_860_000.0  # 2026-11-28T10:00:00Z

    assert budget.exceeded(run, metrics, committed_at=created + 599) is None
    reason = budget.exceeded(run, metrics, committed_at=created + 600)
    assert reason == "budget: max_wall_s 600 s reached (600 s since the start) after round 1 of 2"


def test_the_gb_s_budget_adds_the_rounds_measure_to_what_the_run_used() -> None:
    config = TrainConfig(workers=2, epochs=4, rounds_per_epoch=1, max_gb_s=100)
    run = dataclasses.replace(coordination.RunStatus.new("r", config, 100), gb_s=90.0, round_index=1)
    under = coordination.RoundMetrics(1, 10, 1.0, {}, 0, 0, invocation_s=0.9, memory_mb=MEMORY_MB)  # 9 GB-s
    over = dataclasses.replace(under, invocation_s=1.0)  # 10 GB-s

    assert budget.exceeded(run, under, committed_at=0.0) is None
    assert budget.exceeded(run, over, committed_at=0.0) == (
        "budget: max_gb_s 100 GB-s reached (100.0 GB-s measured) after round 2 of 4"
    )


# --- through the handler ------------------------------------------------------------------------------


def test_rounds_record_the_workers_bytes_and_gb_seconds_and_the_run_adds_them_up(harness: Harness) -> None:
    with_memory(harness)
    harness.invoke(start_event("measured", epochs=1))
    harness.drain()

    run = harness.run("measured")
    rounds = harness.status.list_rounds("measured")
    assert run.state == coordination.SUCCEEDED
    assert all(record.metrics.memory_mb == MEMORY_MB for record in rounds)
    assert all(record.metrics.invocation_s > 0 for record in rounds)
    # every worker read at least the global weights, and wrote an update at least as large as its arrays
    assert all(record.metrics.worker_bytes_read > 3 * record.metrics.bytes_written / 2 for record in rounds)
    assert all(record.metrics.worker_bytes_written >= record.metrics.bytes_written for record in rounds)
    assert run.gb_s == pytest.approx(sum(record.metrics.gb_s for record in rounds), rel=1e-6)


def test_a_run_past_its_gb_s_budget_stops_itself_after_the_round_with_the_reason(harness: Harness) -> None:
    with_memory(harness)
    harness.invoke(start_event("capped", max_gb_s=0.001))  # any measured round passes it
    harness.drain()

    run = harness.run("capped")
    assert run.state == coordination.STOPPED
    assert run.round_index == 1  # the first round was committed, nothing after it
    assert run.reason is not None and run.reason.startswith("budget: max_gb_s 0.001 GB-s reached (")
    assert run.reason.endswith("after round 1 of 4")
    assert not harness.invoker.queue  # no worker of round 1 was sent


def test_a_duplicate_or_late_combine_after_a_budget_stop_changes_nothing(harness: Harness) -> None:
    with_memory(harness)
    harness.invoke(start_event("twice", max_gb_s=0.001))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    harness.invoke(combine)
    stopped = harness.run("twice")
    assert stopped.state == coordination.STOPPED

    late_worker = next(event for event in harness.invoker.sent if "workerno" in event)
    assert harness.invoke(combine)["status"] == "ignored"  # the duplicate loses: the round is committed
    assert harness.invoke(late_worker)["status"] == "ignored"  # a late worker of round 0 does nothing
    harness.drain()

    again = harness.run("twice")
    assert (again.state, again.round_index, again.reason, again.gb_s) == (
        stopped.state,
        stopped.round_index,
        stopped.reason,
        stopped.gb_s,
    )
    assert len([record for record in harness.status.list_rounds("twice") if record.completed]) == 1


def test_a_stop_requested_and_a_budget_in_the_same_round_stop_once_with_the_budgets_reason(
    harness: Harness,
) -> None:
    with_memory(harness)
    harness.invoke(start_event("both", max_gb_s=0.001))
    combine = deliver_until(harness, lambda event: event.get("combine"))
    harness.invoke({"stop": True, "run": "both"})
    harness.invoke(combine)
    harness.drain()

    run = harness.run("both")
    assert run.state == coordination.STOPPED and run.round_index == 1
    assert run.reason is not None and run.reason.startswith("budget: max_gb_s")


def test_a_resumed_budget_stopped_run_clears_the_reason_and_stops_again_at_the_next_round(
    harness: Harness,
) -> None:
    with_memory(harness)
    harness.invoke(start_event("again", max_gb_s=0.001))
    harness.drain()
    harness.invoke({"start": True, "run": "again", "resume": True})
    resumed = harness.run("again")
    assert resumed.state == coordination.RUNNING and resumed.reason is None
    harness.drain()

    run = harness.run("again")
    assert run.state == coordination.STOPPED and run.round_index == 2
    assert run.reason is not None and "after round 2 of 4" in run.reason


def test_the_last_round_finishes_the_run_even_past_its_budget(harness: Harness) -> None:
    with_memory(harness)
    harness.invoke(start_event("last", epochs=1, rounds_per_epoch=1, max_gb_s=0.001))
    harness.drain()

    run = harness.run("last")
    assert run.state == coordination.SUCCEEDED and run.reason is None


# --- embedded metrics, export -------------------------------------------------------------------------


def test_each_committed_round_logs_an_embedded_metric_block_per_function_not_per_run(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with_memory(harness)
    with caplog.at_level(logging.INFO, logger="trainer.combine"):
        harness.invoke(start_event("emf", epochs=1))
        harness.drain()

    lines = [record for record in caplog.records if record.getMessage() == "round_combined"]
    assert len(lines) == 2
    for record in lines:
        block = record._aws
        directive = block["CloudWatchMetrics"][0]
        assert directive["Namespace"] == "lambdatrain"
        assert directive["Dimensions"] == [["FunctionName"]]  # never the run id: one series per stack
        assert record.FunctionName == harness.services.environment.function_name
        names = [metric["Name"] for metric in directive["Metrics"]]
        assert {"train_loss", "load", "aggregate", "write", "worker_compute", "worker_load"} <= set(names)
        assert all(
            isinstance(getattr(record, name), float) for name in names
        )  # every declared metric has a value
        assert isinstance(block["Timestamp"], int)
    assert "test_accuracy" in [m["Name"] for m in lines[-1]._aws["CloudWatchMetrics"][0]["Metrics"]]
    assert "test_accuracy" not in [m["Name"] for m in lines[0]._aws["CloudWatchMetrics"][0]["Metrics"]]


def test_the_embedded_block_leaves_out_missing_and_non_finite_values() -> None:
    block = embedded_metrics.block(
        "fn", {"train_loss": 1.5, "test_accuracy": None, "eval": float("nan")}, 1.0
    )

    assert block["_aws"]["Timestamp"] == 1000
    assert block["_aws"]["CloudWatchMetrics"][0]["Metrics"] == [{"Name": "train_loss", "Unit": "None"}]
    assert (block["FunctionName"], block["train_loss"]) == ("fn", 1.5)
    assert "eval" not in block and "test_accuracy" not in block
    assert embedded_metrics.block("fn", {}) == {}
    import numpy as np

    assert embedded_metrics.block("fn", {"eval": np.float32(2.5), "load": True})["eval"] == 2.5
    assert "load" not in embedded_metrics.block("fn", {"eval": np.float32(2.5), "load": True})
    json.dumps(block)  # a log line must hold it


def test_a_run_started_directly_exports_its_model_to_the_stacks_bucket(harness: Harness, bucket: Any) -> None:
    with_memory(harness, model_bucket=BUCKET)
    harness.invoke(start_event("direct", epochs=1))
    harness.drain()

    run = harness.run("direct")
    assert run.summary.final_model_s3 == f"s3://{BUCKET}/models/direct/final.keras"
    exported = bucket.get_object(Bucket=BUCKET, Key="models/direct/final.keras")["Body"].read()
    assert exported == harness.layout.final_model_path("direct").read_bytes()


def test_a_local_run_without_a_model_bucket_exports_nothing(harness: Harness) -> None:
    harness.invoke(start_event("local", epochs=1))
    harness.drain()

    run = harness.run("local")
    assert (
        run.state == coordination.SUCCEEDED
        and run.summary.final_model_s3 is None
        and run.export_bucket is None
    )


def test_a_saved_state_from_before_the_new_meta_keys_still_resumes() -> None:
    old = {"next_step": 3, "loss_sum": 1.5, "samples": 96, "compute_s": 2.0, "invocations": 1}

    state = training.LocalState.from_meta(old)

    assert (state.next_step, state.handler_s, state.bytes_read, state.bytes_written) == (3, 0.0, 0, 0)
    assert training.LocalState.from_meta(state.to_meta()) == state


def test_a_gb_s_budget_where_the_memory_is_unknown_is_refused_at_start(harness: Harness) -> None:
    with pytest.raises(InvalidEventError, match="max_gb_s 5 needs the function's memory"):
        harness.invoke(start_event("blind", max_gb_s=5))

    assert harness.status.get_run("blind") is None and not harness.invoker.queue
