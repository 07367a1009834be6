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
from pathlib import Path
from typing import Any

import keras
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from trainer import aggregation, logs, models, training
from trainer.coordination import (
    RUNNING,
    STOP_REQUESTED,
    STOPPED,
    SUCCEEDED,
    RunStatus,
)
from trainer.efs_layout import TMP_PREFIX, EfsLayout, file_size, load_arrays, save_arrays
from trainer.errors import CoordinationConflictError, LayoutError, TrainingError
from trainer.protocol import (
    CombineEvent,
)
from trainer.runs import fan_out
from trainer.schedule import Schedule
from trainer.services import Services, dataset_for, load_global_weights, model_for, require_run

log = logging.getLogger(__name__)

MODEL_PREFIX = "models/"  # where runs started from S3 export final.keras, in the start object's bucket


def run_combine(event: CombineEvent, services: Services) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id, round=event.round_index)
    run = require_run(event.run_id, services)
    if not run.active or run.round_index != event.round_index:
        if run.active and run.round_index == event.round_index + 1 and run.fanned_out < run.round_index:
            # This round was committed, but the combine that did it died before fanning out: finish its work.
            fan_out(run, run.round_index, services)
            _clean_up(run.run_id, event.round_index, services.layout)
            return {"status": "fanned_out", "round": run.round_index}
        logs.event(log, "stale_combine_ignored", run_round=run.round_index, state=run.state)
        return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}
    cfg, layout = run.config, services.layout
    registered = (services.status.get_round(run.run_id, event.round_index) or {}).get("done", [])
    if len(registered) < cfg.workers:
        logs.event(log, "combine_not_ready", registered=len(registered), workers=cfg.workers)
        return {"status": "ignored", "reason": f"{len(registered)} of {cfg.workers} workers registered"}
    update_paths = [
        layout.update_path(run.run_id, event.round_index, worker) for worker in range(cfg.workers)
    ]
    missing = [path.name for path in update_paths if not path.exists()]
    if missing:
        raise LayoutError(f"round {event.round_index}: every worker registered but {missing} are missing")

    phases: dict[str, float] = {}
    began = time.perf_counter()
    dataset = dataset_for(cfg, layout)
    schedule = Schedule(cfg, len(dataset.train_x))
    model = model_for(cfg, layout.root)
    weights_path = layout.weights_path(run.run_id, event.round_index)
    global_weights = load_global_weights(weights_path, model)
    updates, worker_meta = [], []
    bytes_read = file_size(weights_path)
    for path in update_paths:
        arrays, meta = load_arrays(path)
        bytes_read += file_size(path)
        updates.append(aggregation.WorkerUpdate(arrays, int(meta["samples"]), float(meta["mean_loss"])))
        worker_meta.append(meta)
    momentum = None
    if cfg.outer_momentum > 0 and event.round_index > 0:
        momentum, _ = load_arrays(layout.outer_state_path(run.run_id, event.round_index))  # must exist
    phases["load"] = time.perf_counter() - began

    began = time.perf_counter()
    shapes = [weight.shape for weight in global_weights]
    try:
        averaged = aggregation.average_updates(updates, shapes)
    except ValueError as exc:
        raise LayoutError(f"round {event.round_index}: {exc}") from exc
    new_weights, new_momentum = aggregation.apply_outer_update(
        global_weights,
        averaged.arrays,
        models.trainable_mask(model),
        cfg.outer_lr,
        cfg.outer_momentum,
        momentum,
    )
    model.set_weights(new_weights)
    phases["aggregate"] = time.perf_counter() - began

    metrics: dict[str, Any] = {"train_loss": averaged.mean_loss}
    if schedule.evaluates_after(event.round_index):
        began = time.perf_counter()
        metrics["test_loss"], metrics["test_accuracy"] = training.evaluate(
            model, dataset.test_x, dataset.test_y
        )
        phases["eval"] = time.perf_counter() - began

    # Everything below is deterministic, so a duplicate combine running at the same time writes the same bytes;
    # its inputs (this round's weights, updates and momentum) stay until this round's commit is two rounds old.
    began = time.perf_counter()
    next_round = event.round_index + 1
    bytes_written = save_arrays(
        layout.weights_path(run.run_id, next_round), new_weights, {"round": next_round}
    )
    if new_momentum is not None:
        bytes_written += save_arrays(layout.outer_state_path(run.run_id, next_round), new_momentum)
    last = schedule.is_last(event.round_index)
    if last:
        bytes_written += _export_model(model, layout.final_model_path(run.run_id))
        if run.export_bucket:  # before the commit: SUCCEEDED means the model is in S3 too
            metrics["final_model_s3"] = _upload_model(layout.final_model_path(run.run_id), run, services)
    phases["write"] = time.perf_counter() - began
    phases["worker_compute"] = max(float(meta["compute_s"]) for meta in worker_meta)
    phases["worker_load"] = max(float(meta["load_s"]) for meta in worker_meta)

    epochs_done = schedule.epochs_done_after(event.round_index)
    services.status.record_round(
        run.run_id,
        event.round_index,
        {
            **metrics,
            "round": event.round_index,
            "epochsdone": epochs_done,
            "samples": averaged.samples,
            "duration_s": {name: round(seconds, 4) for name, seconds in phases.items()},
            "bytes_read": bytes_read,
            "bytes_written": bytes_written,
        },
    )
    summary = {key: value for key, value in metrics.items() if key.startswith(("test_", "final_"))}
    if last:
        summary["final_model"] = str(layout.final_model_path(run.run_id))
    new_state = _commit_round(run, next_round, epochs_done, last, summary, services)
    if new_state is None:
        return {"status": "ignored", "reason": "round committed by another combine"}
    services.status.mark_round_completed(run.run_id, event.round_index)
    logs.event(log, "round_combined", state=new_state, epochsdone=epochs_done, **metrics, **phases)
    if new_state == RUNNING:
        fan_out(dataclasses.replace(run, round_index=next_round), next_round, services)
    else:
        logs.event(log, "run_finished", state=new_state, rounds=next_round, epochsdone=epochs_done, **summary)
    _clean_up(run.run_id, event.round_index, layout)
    return {"status": "combined", "round": event.round_index, "state": new_state, **metrics}


def _commit_round(
    run: RunStatus, next_round: int, epochs_done: int, last: bool, summary: dict[str, Any], services: Services
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
