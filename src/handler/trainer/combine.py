"""The combine flow: average a round's updates, apply the outer update, evaluate, write the next round's
weights, commit the round with one conditional write, then fan out the next round or finish the run.

Everything written before the commit is deterministic, so a duplicate combine running at the same time writes the
same bytes, and only one of them commits."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from trainer import aggregation, logs, models, training
from trainer.coordination import (
    RUNNING,
    STOP_REQUESTED,
    STOPPED,
    SUCCEEDED,
    RoundMetrics,
    RunStatus,
    RunSummary,
)
from trainer.efs_layout import TMP_PREFIX, EfsLayout, file_size, load_arrays, save_arrays
from trainer.errors import CoordinationConflictError, LayoutError, TrainingError
from trainer.fan_out import fan_out
from trainer.protocol import CombineEvent
from trainer.services import Services, dataset_for, load_global_weights, model_for, require_run

log = logging.getLogger(__name__)

MODEL_PREFIX = "models/"  # where runs started from S3 export final.keras, in the start object's bucket


def run_combine(event: CombineEvent, services: Services) -> dict[str, Any]:
    """What happens when a round is complete: check, load, aggregate, evaluate, write, commit, signal."""
    logs.bind_more(run_id=event.run_id, round=event.round_index)
    run = require_run(event.run_id, services)
    if not run.is_current(event.round_index):
        if run.awaits_fan_out_after(event.round_index):  # the combine that committed died before fanning out
            fan_out(run, run.round_index, services)
            _clean_up(run.run_id, event.round_index, services.layout)
            return {"status": "fanned_out", "round": run.round_index}
        logs.event(log, "stale_combine_ignored", run_round=run.round_index, state=run.state)
        return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}
    not_ready = _check_all_registered(run, services)
    if not_ready is not None:
        return not_ready

    round_index, phases = run.round_index, {}
    inputs = _load_round(run, services, phases)
    new_weights, new_momentum, averaged = _aggregate(run, inputs, phases)
    results: dict[str, Any] = {"train_loss": averaged.mean_loss}
    if run.schedule.evaluates_after(round_index):
        results["test_loss"], results["test_accuracy"] = _evaluate(run, inputs.model, services, phases)
    last = run.schedule.is_last(round_index)
    bytes_written = _write_next_round(
        run, inputs.model, new_weights, new_momentum, last, services, results, phases
    )
    phases["worker_compute"] = max(float(meta["compute_s"]) for meta in inputs.worker_meta)
    phases["worker_load"] = max(float(meta["load_s"]) for meta in inputs.worker_meta)

    epochs_done = run.schedule.epochs_done_after(round_index)
    services.status.record_round(
        run.run_id,
        round_index,
        RoundMetrics(
            epochs_done=epochs_done,
            samples=averaged.samples,
            train_loss=results["train_loss"],
            duration_s={name: round(seconds, 4) for name, seconds in phases.items()},
            bytes_read=inputs.bytes_read,
            bytes_written=bytes_written,
            test_loss=results.get("test_loss"),
            test_accuracy=results.get("test_accuracy"),
            final_model_s3=results.get("final_model_s3"),
        ),
    )
    summary = RunSummary(
        test_accuracy=results.get("test_accuracy"),
        test_loss=results.get("test_loss"),
        final_model=str(services.layout.final_model_path(run.run_id)) if last else None,
        final_model_s3=results.get("final_model_s3"),
    )
    new_state = _commit_round(run, round_index + 1, epochs_done, last, summary, services)
    if new_state is None:
        return {"status": "ignored", "reason": "round committed by another combine"}
    services.status.mark_round_completed(run.run_id, round_index)
    logs.event(log, "round_combined", state=new_state, epochsdone=epochs_done, **results, **phases)
    if new_state == RUNNING:
        fan_out(dataclasses.replace(run, round_index=round_index + 1), round_index + 1, services)
    else:
        logs.event(
            log,
            "run_finished",
            state=new_state,
            rounds=round_index + 1,
            epochsdone=epochs_done,
            **summary.to_item(),
        )
    _clean_up(run.run_id, round_index, services.layout)
    return {"status": "combined", "round": round_index, "state": new_state, **results}


@dataclass
class _RoundInputs:
    model: keras.Model
    global_weights: list[np.ndarray]
    updates: list[aggregation.WorkerUpdate]
    worker_meta: list[dict[str, Any]]
    momentum: list[np.ndarray] | None
    bytes_read: int


def _check_all_registered(run: RunStatus, services: Services) -> dict[str, Any] | None:
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
    """The model with this round's global weights, every worker's update, and the outer momentum."""
    began = time.perf_counter()
    layout = services.layout
    model = model_for(run.config, layout.root)
    weights_path = layout.weights_path(run.run_id, run.round_index)
    global_weights = load_global_weights(weights_path, model)
    updates, worker_meta = [], []
    bytes_read = file_size(weights_path)
    for worker in range(run.config.workers):
        path = layout.update_path(run.run_id, run.round_index, worker)
        arrays, meta = load_arrays(path)
        bytes_read += file_size(path)
        updates.append(aggregation.WorkerUpdate(arrays, int(meta["samples"]), float(meta["mean_loss"])))
        worker_meta.append(meta)
    momentum = None
    if run.config.outer_momentum > 0 and run.round_index > 0:
        momentum, _ = load_arrays(layout.outer_state_path(run.run_id, run.round_index))  # must exist
    phases["load"] = time.perf_counter() - began
    return _RoundInputs(model, global_weights, updates, worker_meta, momentum, bytes_read)


def _aggregate(
    run: RunStatus, inputs: _RoundInputs, phases: dict[str, float]
) -> tuple[list[np.ndarray], list[np.ndarray] | None, aggregation.Averaged]:
    """Average the updates, apply the outer update; the model holds the new weights afterwards."""
    began = time.perf_counter()
    shapes = [weight.shape for weight in inputs.global_weights]
    try:
        averaged = aggregation.average_updates(inputs.updates, shapes)
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
    dataset = dataset_for(run.config, services.layout)
    test_loss, test_accuracy = training.evaluate(model, dataset.test_x, dataset.test_y)
    phases["eval"] = time.perf_counter() - began
    return test_loss, test_accuracy


def _write_next_round(
    run: RunStatus,
    model: keras.Model,
    new_weights: list[np.ndarray],
    new_momentum: list[np.ndarray] | None,
    last: bool,
    services: Services,
    results: dict[str, Any],
    phases: dict[str, float],
) -> int:
    """The next round's weights and momentum, and after the last round ``final.keras`` (and its S3 copy).

    Everything written here is deterministic, so a duplicate combine running at the same time writes the same
    bytes; its inputs (this round's weights, updates and momentum) stay until this round's commit is two rounds
    old. Returns the bytes written."""
    began = time.perf_counter()
    layout, next_round = services.layout, run.round_index + 1
    bytes_written = save_arrays(
        layout.weights_path(run.run_id, next_round), new_weights, {"round": next_round}
    )
    if new_momentum is not None:
        bytes_written += save_arrays(layout.outer_state_path(run.run_id, next_round), new_momentum)
    if last:
        bytes_written += _export_model(model, layout.final_model_path(run.run_id))
        if run.export_bucket:  # before the commit: SUCCEEDED means the model is in S3 too
            results["final_model_s3"] = _upload_model(layout.final_model_path(run.run_id), run, services)
    phases["write"] = time.perf_counter() - began
    return bytes_written


def _commit_round(
    run: RunStatus, next_round: int, epochs_done: int, last: bool, summary: RunSummary, services: Services
) -> str | None:
    """Advance the run item once; a stop requested meanwhile is honoured. None if another combine won."""
    for _ in range(3):
        new_state = SUCCEEDED if last else STOPPED if run.state == STOP_REQUESTED else RUNNING
        try:
            services.status.advance_run(run, next_round, epochs_done, new_state, summary)
            return new_state
        except CoordinationConflictError:
            fresh = services.status.get_run(run.run_id)
            if (
                fresh is None
                or not fresh.active
                or fresh.round_index != run.round_index
                or fresh.generation != run.generation
            ):
                logs.event(log, "duplicate_combine_ignored")
                return None
            run = fresh  # only the state changed (a stop was requested): commit again
    raise CoordinationConflictError(
        f"run {run.run_id!r} kept changing while committing round {run.round_index}"
    )


def _export_model(model: keras.Model, path: Path) -> int:
    """Save ``final.keras`` under a temporary name and rename it into place."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}.keras")
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_size(path)


def _upload_model(path: Path, run: RunStatus, services: Services) -> str:
    """Copy ``final.keras`` to ``s3://<export bucket>/models/<run>/final.keras`` (managed multipart upload)."""
    key = f"{MODEL_PREFIX}{run.run_id}/final.keras"
    try:
        services.s3_client().upload_file(str(path), run.export_bucket, key)
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise TrainingError(f"uploading {path} to s3://{run.export_bucket}/{key} failed: {exc}") from exc
    logs.event(log, "model_exported", uri=f"s3://{run.export_bucket}/{key}", size_bytes=file_size(path))
    return f"s3://{run.export_bucket}/{key}"


def _clean_up(run_id: str, round_index: int, layout: EfsLayout) -> None:
    """Best effort, after a commit: delete the round's updates and saved states, and inputs two rounds old."""
    try:
        shutil.rmtree(layout.updates_dir(run_id, round_index), ignore_errors=True)
        shutil.rmtree(layout.partial_path(run_id, round_index, 0).parent, ignore_errors=True)
        for stale in (
            layout.weights_path(run_id, round_index - 1),
            layout.outer_state_path(run_id, round_index - 1),
        ):
            stale.unlink(missing_ok=True)
    except OSError as exc:  # leftovers cost disk space, not correctness
        logs.event(log, "clean_up_failed", level=logging.WARNING, error=str(exc))
