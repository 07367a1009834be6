"""The combine flow: average a round's updates, apply the outer update, evaluate, write the next round's
weights under this combine's own token, commit the round with one transaction, then follow up: fan out the next
round, or export the model and finish the run.

Nothing another invocation may be reading is ever replaced: each combine writes the next round's files under its
own token and the commit records the winner's, so a duplicate combine (a retry, or a copy on another host whose
floating-point results differ in the last bits) that loses the commit only deletes its own files. Metrics are
written by the commit itself; the model is exported and uploaded only after a winning commit."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from trainer import aggregation, budget, config, embedded_metrics, housekeeping, logs, models, training
from trainer.coordination import (
    RUNNING,
    STOP_REQUESTED,
    STOPPED,
    SUCCEEDED,
    RoundMetrics,
    RunStatus,
    RunSummary,
)
from trainer.efs_layout import (
    TMP_PREFIX,
    file_size,
    load_arrays,
    load_meta,
    new_token,
    publish_file,
    save_arrays,
)
from trainer.errors import CoordinationConflictError, LayoutError, TrainingError
from trainer.fan_out import fan_out
from trainer.protocol import CombineEvent
from trainer.services import Services, load_global_weights, model_for, require_run, run_dataset

log = logging.getLogger(__name__)


def run_combine(event: CombineEvent, services: Services) -> dict[str, Any]:
    """What happens when a round is complete: check, load, aggregate, evaluate, write, commit, follow up."""
    logs.bind_more(run_id=event.run_id, round=event.round_index)
    run = require_run(event.run_id, services)
    if not run.owns(event):
        logs.event(log, "stale_combine_ignored", reason="sent for a removed run of the same id")
        return {"status": "ignored", "reason": "sent for another run of the same id"}
    if not run.is_current(event.round_index):
        if run.awaits_follow_up(event.round_index):  # the combine that committed died before its follow-up
            state = follow_up(run, services)
            return {"status": "finished" if state == SUCCEEDED else "fanned_out", "round": run.round_index}
        logs.event(log, "stale_combine_ignored", run_round=run.round_index, state=run.state)
        return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}
    if run.reducers > 1:  # a sharded round: its reducers average it, the last of them commits
        logs.event(log, "combine_not_used", reducers=run.reducers)
        return {
            "status": "ignored",
            "reason": f"round {run.round_index} is reduced by {run.reducers} reducers",
        }
    services.status.heartbeat(run.run_id)
    not_ready = check_all_registered(run, services)
    if not_ready is not None:
        return not_ready

    began = time.perf_counter()
    phases: dict[str, float] = {}
    inputs = _load_round(run, services, phases)
    new_weights, new_momentum, averaged = _aggregate(run, inputs, phases)
    result = RoundResult(
        inputs.model,
        new_weights,
        new_momentum,
        averaged.samples,
        averaged.mean_loss,
        inputs.worker_meta,
        inputs.update_sizes,
    )
    outcome = commit_next_round(
        run, result, phases, {"combine": inputs.bytes_read}, {}, services, "combine", began
    )
    if outcome["status"] == "committed":
        outcome["status"] = "combined"
    return outcome


@dataclass
class RoundResult:
    """What averaging a round produced (by one combine, or assembled from the reducers' slices)."""

    model: keras.Model  # holds the new weights
    new_weights: list[np.ndarray]
    new_momentum: list[np.ndarray] | None
    samples: int
    mean_loss: float
    worker_meta: list[dict[str, Any]]
    update_sizes: list[int]  # each worker's update file: what it wrote besides its saved states
    reducers_s: float = 0.0  # handler seconds of the round's other reducing invocations (sharded rounds)


def commit_next_round(
    run: RunStatus,
    result: RoundResult,
    phases: dict[str, float],
    bytes_read: dict[str, int],
    bytes_written: dict[str, int],
    services: Services,
    phase: str,
    began: float,
) -> dict[str, Any]:
    """Evaluate if due, write the next round's weights under a new token, commit the round once, follow up.
    ``phase``: who does it (``combine``, or ``commit``: the reducer that commits a sharded round);
    ``bytes_read`` / ``bytes_written``: per phase so far, with ``<phase>_max`` for phases of many invocations
    (this call adds the workers' and its own writes); ``began``: when this invocation's reducing work began."""
    round_index = run.round_index
    results: dict[str, Any] = {"train_loss": result.mean_loss}
    if run.schedule.evaluates_after(round_index):
        results["test_loss"], results["test_accuracy"] = _evaluate(run, result.model, services, phases)
    token = new_token()
    written = _write_next_round(run, token, result.new_weights, result.new_momentum, services, phases)
    metas = result.worker_meta
    phases["worker_compute"] = max(float(meta["compute_s"]) for meta in metas)
    phases["worker_load"] = max(float(meta["load_s"]) for meta in metas)
    worker_reads = [int(meta.get("bytes_read", 0)) for meta in metas]
    worker_writes = [
        int(meta.get("bytes_written", 0)) + size
        for meta, size in zip(metas, result.update_sizes, strict=True)
    ]
    reads = {"worker": sum(worker_reads), "worker_max": max(worker_reads), **bytes_read}
    writes = {"worker": sum(worker_writes), "worker_max": max(worker_writes), **bytes_written, phase: written}

    def reducing(per_phase: dict[str, int]) -> int:  # what the combine (or the reducers and commit) moved
        return sum(
            value for key, value in per_phase.items() if not key.startswith("worker") and "_max" not in key
        )

    epochs_done = run.schedule.epochs_done_after(round_index)
    metrics = RoundMetrics(
        epochs_done=epochs_done,
        samples=result.samples,
        train_loss=results["train_loss"],
        duration_s={name: round(seconds, 4) for name, seconds in phases.items()},
        bytes_read=reducing(reads),
        bytes_written=reducing(writes),
        test_loss=results.get("test_loss"),
        test_accuracy=results.get("test_accuracy"),
        worker_bytes_read=reads["worker"],
        worker_bytes_written=writes["worker"],
        invocation_s=round(
            sum(float(meta.get("handler_s", 0.0)) for meta in metas)
            + result.reducers_s
            + (time.perf_counter() - began),
            3,
        ),
        memory_mb=services.environment.memory_mb,
        phase_bytes_read=reads,
        phase_bytes_written=writes,
    )
    summary = RunSummary(test_accuracy=results.get("test_accuracy"), test_loss=results.get("test_loss"))
    committed = _commit_round(run, epochs_done, token, summary, metrics, services)
    if committed is None:
        housekeeping.discard_token(run, token, services.layout)
        return {"status": "ignored", "reason": f"round committed by another {phase}"}
    logs.event(
        log,
        "round_combined",
        state=committed.state,
        epochsdone=epochs_done,
        gb_s=round(metrics.gb_s, 3),
        # results and phases, with the _aws block that makes them CloudWatch metrics
        **{
            **results,
            **phases,
            **embedded_metrics.block(services.environment.function_name, {**results, **phases}),
        },
    )
    state = follow_up(committed, services, result.model)
    return {"status": "committed", "round": round_index, "state": state, **results}


@dataclass
class _RoundInputs:
    model: keras.Model
    global_weights: list[np.ndarray]
    average: aggregation.RunningAverage  # every worker's update, added as it was read
    worker_meta: list[dict[str, Any]]
    momentum: list[np.ndarray] | None
    bytes_read: int
    update_sizes: list[int]  # the update files' sizes: what the workers wrote


def check_all_registered(run: RunStatus, services: Services) -> dict[str, Any] | None:
    """None when every worker registered and every update file is there; else why the combine waits."""
    record = services.status.get_round(run.run_id, run.round_index)
    registered = record.done if record else frozenset()
    if len(registered) < run.config.workers:
        logs.event(log, "combine_not_ready", registered=len(registered), workers=run.config.workers)
        return {
            "status": "ignored",
            "reason": f"{len(registered)} of {run.config.workers} workers registered",
        }
    missing = [
        path.name
        for worker in range(run.config.workers)
        if not (path := services.layout.update_path(run.run_id, run.round_index, worker)).exists()
    ]
    if missing:
        raise LayoutError(f"round {run.round_index}: every worker registered but {missing} are missing")
    return None


def _load_round(run: RunStatus, services: Services, phases: dict[str, float]) -> _RoundInputs:
    """The model with this round's global weights, the running average of every worker's update (each added as
    it is read, so memory does not grow with the worker count), and the outer momentum."""
    began = time.perf_counter()
    layout = services.layout
    model = model_for(run.config, layout.root)
    weights_path = layout.weights_path(run.run_id, run.round_index, run.weights_token)
    global_weights = load_global_weights(weights_path, model)
    update_paths = [
        layout.update_path(run.run_id, run.round_index, worker) for worker in range(run.config.workers)
    ]
    worker_meta = [update_meta(path) for path in update_paths]  # the sample counts weight the average
    try:
        average = aggregation.RunningAverage(
            [weight.shape for weight in global_weights], sum(int(meta["samples"]) for meta in worker_meta)
        )
        for path in update_paths:
            arrays, meta = load_arrays(path)
            average.add(aggregation.WorkerUpdate(arrays, int(meta["samples"]), float(meta["mean_loss"])))
            del arrays
    except (ValueError, KeyError) as exc:
        raise LayoutError(f"round {run.round_index}: {exc}") from exc
    update_sizes = [file_size(path) for path in update_paths]
    bytes_read = file_size(weights_path) + sum(update_sizes)
    momentum = None
    if run.config.outer_momentum > 0 and run.round_index > 0:
        momentum_path = layout.outer_state_path(run.run_id, run.round_index, run.weights_token)
        momentum, _ = load_arrays(momentum_path)  # must exist
        bytes_read += file_size(momentum_path)
    phases["load"] = time.perf_counter() - began
    return _RoundInputs(model, global_weights, average, worker_meta, momentum, bytes_read, update_sizes)


UPDATE_META_FIELDS = {"samples": int, "mean_loss": float, "compute_s": float, "load_s": float}
# Written since the round metrics count GB-seconds and the workers' bytes; update files of an older trainer lack them.
OPTIONAL_UPDATE_META_FIELDS = {"handler_s": float, "bytes_read": int, "bytes_written": int}


def update_meta(path: Path) -> dict[str, Any]:
    """An update's metadata, checked: a damaged file fails the run at once instead of being retried."""
    meta = load_meta(path)
    optional = {name: kind for name, kind in OPTIONAL_UPDATE_META_FIELDS.items() if name in meta}
    for name, kind in {**UPDATE_META_FIELDS, **optional}.items():
        value = meta.get(name)
        valid = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
            and (kind is float or float(value).is_integer())
        )
        if not valid:
            raise LayoutError(
                f"{path}: update metadata {name!r} is {value!r}; expected a non-negative {kind.__name__}"
            )
    return meta


def _aggregate(
    run: RunStatus, inputs: _RoundInputs, phases: dict[str, float]
) -> tuple[list[np.ndarray], list[np.ndarray] | None, aggregation.Averaged]:
    """Average the updates, apply the outer update; the model holds the new weights afterwards."""
    began = time.perf_counter()
    try:
        averaged = inputs.average.result()
    except ValueError as exc:
        raise LayoutError(f"round {run.round_index}: {exc}") from exc
    new_weights, new_momentum = aggregation.apply_outer_update(
        inputs.global_weights,
        averaged.arrays,
        models.trainable_mask(inputs.model),
        run.config.outer_lr,
        run.config.outer_momentum,
        inputs.momentum,
    )
    inputs.model.set_weights(new_weights)
    phases["aggregate"] = time.perf_counter() - began
    return new_weights, new_momentum, averaged


def _evaluate(
    run: RunStatus, model: keras.Model, services: Services, phases: dict[str, float]
) -> tuple[float, float]:
    began = time.perf_counter()
    dataset = run_dataset(run, services.layout)
    test_loss, test_accuracy = training.evaluate(model, dataset.test_x, dataset.test_y)
    phases["eval"] = time.perf_counter() - began
    return test_loss, test_accuracy


def _write_next_round(
    run: RunStatus,
    token: str,
    new_weights: list[np.ndarray],
    new_momentum: list[np.ndarray] | None,
    services: Services,
    phases: dict[str, float],
) -> int:
    """The next round's weights and outer momentum under this combine's token; returns the bytes written."""
    began = time.perf_counter()
    layout, next_round = services.layout, run.round_index + 1
    bytes_written = save_arrays(
        layout.weights_path(run.run_id, next_round, token), new_weights, {"round": next_round}
    )
    if new_momentum is not None:
        bytes_written += save_arrays(layout.outer_state_path(run.run_id, next_round, token), new_momentum)
    phases["write"] = time.perf_counter() - began
    return bytes_written


def _commit_round(
    run: RunStatus,
    epochs_done: int,
    token: str,
    summary: RunSummary,
    metrics: RoundMetrics,
    services: Services,
) -> RunStatus | None:
    """Commit the round once; a stop requested meanwhile, or a budget this round used up, is honoured (the run
    stops after this round, unless it is the last). The run as committed, or None if another combine (or a
    resume) won."""
    for _ in range(3):
        last = run.schedule.is_last(run.round_index)
        over_budget = None if last else budget.exceeded(run, metrics, committed_at=time.time())
        new_state = STOPPED if (run.state == STOP_REQUESTED or over_budget) and not last else run.state
        try:
            services.status.commit_round(
                run, epochs_done, new_state, token, summary, metrics, reason=over_budget
            )
        except CoordinationConflictError:
            fresh = services.status.get_run(run.run_id)
            if fresh is None or not fresh.is_current(run.round_index) or fresh.generation != run.generation:
                logs.event(log, "duplicate_combine_ignored")
                return None
            run = fresh  # only the state changed (a stop was requested): commit again
            continue
        if over_budget:
            logs.event(log, "budget_exhausted", reason=over_budget)
        return dataclasses.replace(
            run,
            round_index=run.round_index + 1,
            epochs_done=epochs_done,
            state=new_state,
            reason=over_budget or run.reason,
            gb_s=run.gb_s + metrics.gb_s,
            weights_token=token,
            summary=dataclasses.replace(
                run.summary,
                **{key: value for key, value in dataclasses.asdict(summary).items() if value is not None},
            ),
        )
    raise CoordinationConflictError(
        f"run {run.run_id!r} kept changing while committing round {run.round_index}"
    )


def follow_up(run: RunStatus, services: Services, model: keras.Model | None = None) -> str:
    """After a commit (``run`` as committed): fan out the next round, or finish the run; then clean up.
    Returns the run's state."""
    if run.all_rounds_committed and run.active:
        state = _finish(run, services, model)
    elif run.active:
        fan_out(run, run.round_index, services)
        state = RUNNING
    else:  # stopped after this round
        logs.event(log, "run_finished", state=run.state, rounds=run.round_index, epochsdone=run.epochs_done)
        state = run.state
    housekeeping.clean_up(dataclasses.replace(run, state=state), services.layout)
    return state


def _finish(run: RunStatus, services: Services, model: keras.Model | None) -> str:
    """Export ``final.keras`` from the committed weights (and upload it), mark the run SUCCEEDED, then delete
    what it no longer needs. Returns the run's state."""
    path = services.layout.final_model_path(run.run_id)
    if not path.exists():
        if model is None:  # a follow-up after a crash: the committed weights are on EFS
            model = model_for(run.config, services.layout.root)
            weights_path = services.layout.weights_path(run.run_id, run.round_index, run.weights_token)
            model.set_weights(load_global_weights(weights_path, model))
        _export_model(model, path)
    summary = RunSummary(final_model=str(path))
    if run.export_bucket:  # before SUCCEEDED: a succeeded run's model is in S3 too
        summary = dataclasses.replace(summary, final_model_s3=_upload_model(path, run, services))
    if services.status.finish_run(run, summary):
        logs.event(
            log,
            "run_finished",
            state=SUCCEEDED,
            rounds=run.round_index,
            epochsdone=run.epochs_done,
            **{**run.summary.to_item(), **summary.to_item()},
        )
        state = SUCCEEDED
    else:  # another copy finished it, or it was stopped or failed meanwhile: report what it is
        fresh = services.status.get_run(run.run_id)
        state = fresh.state if fresh is not None else run.state
    if state == SUCCEEDED:  # a crash before this leaves it to the sweep of the crash's own failure record
        housekeeping.clean_up(dataclasses.replace(run, state=SUCCEEDED), services.layout)
    return state


def _export_model(model: keras.Model, path: Path) -> None:
    """Save ``final.keras`` under a temporary name, fsync it and publish it once."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}.keras")
    try:
        model.save(tmp)
        publish_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _upload_model(path: Path, run: RunStatus, services: Services) -> str:
    """Copy ``final.keras`` to ``s3://<export bucket>/models/<run>/final.keras`` (managed multipart upload)."""
    key = f"{config.MODEL_PREFIX}{run.run_id}/final.keras"
    try:
        services.s3_client().upload_file(str(path), run.export_bucket, key)
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise TrainingError(f"uploading {path} to s3://{run.export_bucket}/{key} failed: {exc}") from exc
    logs.event(log, "model_exported", uri=f"s3://{run.export_bucket}/{key}", size_bytes=file_size(path))
    return f"s3://{run.export_bucket}/{key}"
