"""The flow behind each event kind: start, worker, combine, stop, failure record.

Each flow reads the run item, does its work, persists atomically to EFS, commits with one conditional DynamoDB
write, then signals the next invocation. Every flow is idempotent, because Lambda delivers asynchronous events at
least once: a duplicate or late event finds its work done (or its round no longer current) and does nothing.
"""

from __future__ import annotations

import contextlib
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

from trainer import aggregation, config, data, logs, models, training
from trainer.coordination import (
    FAILED,
    RUNNING,
    STOP_REQUESTED,
    STOPPED,
    SUCCEEDED,
    RunStatus,
    StatusTable,
)
from trainer.efs_layout import TMP_PREFIX, EfsLayout, file_size, load_arrays, save_arrays, write_json
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError, TrainingError
from trainer.invocation import Invoker, LambdaInvoker
from trainer.protocol import (
    CombineEvent,
    FailureRecord,
    S3StartEvent,
    StartEvent,
    StopEvent,
    WorkerEvent,
    parse_start_object,
)
from trainer.schedule import Schedule

log = logging.getLogger(__name__)

MAX_START_OBJECT_BYTES = 64 * 1024
MODEL_PREFIX = "models/"  # where runs started from S3 export final.keras, in the start object's bucket


@dataclass
class Services:
    """Everything a flow touches outside memory; tests build their own."""

    layout: EfsLayout
    status: StatusTable
    invoker: Invoker
    environment: config.Environment
    s3: Any = None

    @classmethod
    def from_environment(cls, environment: config.Environment) -> Services:
        return cls(
            layout=EfsLayout(environment.efs_root),
            status=StatusTable.from_name(environment.status_table),
            invoker=LambdaInvoker(environment.function_name),
            environment=environment,
        )

    def s3_client(self) -> Any:
        if self.s3 is None:
            import boto3

            self.s3 = boto3.client("s3")
        return self.s3


# --- warm-container caches ------------------------------------------------------------------------------

_models: dict[tuple[Any, ...], keras.Model] = {}


def _model_key(cfg: config.TrainConfig) -> tuple[Any, ...]:
    return (cfg.model, cfg.width, cfg.image_size, cfg.weights, cfg.momentum, cfg.weight_decay)


def _build(cfg: config.TrainConfig, efs_root: Path) -> keras.Model:
    began = time.perf_counter()
    model = models.build_model(cfg, efs_root)
    logs.event(
        log,
        "model_built",
        model=cfg.model,
        width=cfg.width,
        parameters=models.count_parameters(model),
        duration_s=round(time.perf_counter() - began, 3),
    )
    return model


def model_for(cfg: config.TrainConfig, efs_root: Path) -> keras.Model:
    """The compiled model for a configuration, built once per container and reused while warm."""
    key = _model_key(cfg)
    cold = key not in _models
    if cold:
        _models.clear()  # one model per container: memory is for vCPUs, not for a zoo
        _models[key] = _build(cfg, efs_root)
    logs.bind_more(container="cold" if cold else "warm")
    return _models[key]


def initial_weights(cfg: config.TrainConfig, efs_root: Path) -> list[np.ndarray]:
    """Round-0 weights from the seed. A warm container's cached (already traced) model is left as it is."""
    model = _build(cfg, efs_root)
    if _model_key(cfg) not in _models:  # keep a warm container's traced model; never hold two
        _models.clear()
        _models[_model_key(cfg)] = model
    return model.get_weights()


def dataset_for(cfg: config.TrainConfig, layout: EfsLayout) -> data.Dataset:
    return data.open_dataset(layout.dataset_dir(cfg.dataset)).limited(cfg.train_samples, cfg.test_samples)


# --- start ----------------------------------------------------------------------------------------------


def start_from_s3(event: S3StartEvent, services: Services) -> dict[str, Any]:
    """Read the start object and start it; the run id defaults to the object's name, so a redelivery is a no-op."""
    try:
        response = services.s3_client().get_object(Bucket=event.bucket, Key=event.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "AccessDenied"):
            raise InvalidEventError(
                f"cannot read start object s3://{event.bucket}/{event.key}: {exc}"
            ) from exc
        raise TrainingError(f"reading start object s3://{event.bucket}/{event.key} failed: {exc}") from exc
    if int(response.get("ContentLength", 0)) > MAX_START_OBJECT_BYTES:
        raise InvalidEventError(f"start object {event.key!r} is larger than {MAX_START_OBJECT_BYTES} bytes")
    start = parse_start_object(response["Body"].read(MAX_START_OBJECT_BYTES + 1), event.key)
    return start_run(start, services, default_run_id=event.run_id, export_bucket=event.bucket)


def start_run(
    event: StartEvent, services: Services, default_run_id: str, export_bucket: str | None = None
) -> dict[str, Any]:
    if event.resume:
        return _resume_run(event, services)
    cfg = event.config
    run_id = event.run_id or default_run_id
    logs.bind_more(run_id=run_id)
    dataset = dataset_for(cfg, services.layout)  # a missing dataset fails here, before anything is written
    schedule = Schedule(cfg, len(dataset.train_x))
    if schedule.shard_size < 1:
        raise InvalidEventError(f"workers {cfg.workers} exceeds the {len(dataset.train_x)} training examples")
    if schedule.rounds_per_epoch > schedule.shard_size:
        raise InvalidEventError(
            f"rounds_per_epoch {schedule.rounds_per_epoch} exceeds the {schedule.shard_size} examples per worker "
            "shard; some workers would have nothing to train on"
        )
    run = services.status.get_run(run_id)
    if run is None and services.layout.run_dir(run_id).exists():
        raise LayoutError(
            f"{services.layout.run_dir(run_id)} already exists but the status table has no run {run_id!r}; "
            "delete the folder or choose another run id"
        )
    if run is None:
        weights = initial_weights(cfg, services.layout.root)  # validates a weights file too
        with contextlib.suppress(CoordinationConflictError):  # a concurrent duplicate won: checked below
            services.status.create_run(run_id, cfg, schedule.total_rounds, export_bucket)
            _write_initial_state(run_id, cfg, weights, services.layout)
            logs.event(log, "run_created", total_rounds=schedule.total_rounds, config=cfg.to_dict())
        run = _require_run(run_id, services)
    if run.config != cfg:
        raise CoordinationConflictError(
            f"run {run_id!r} already exists with another configuration; pick a new 'run' or send \"resume\": true"
        )
    if not run.active or run.round_index > 0 or run.fanned_out >= 0:
        logs.event(log, "duplicate_start_ignored", state=run.state, round=run.round_index)
        return {"status": "duplicate", "run": run_id, "state": run.state}
    if not services.layout.weights_path(run_id, 0).exists():  # a crashed first delivery: finish its work
        _write_initial_state(run_id, cfg, initial_weights(cfg, services.layout.root), services.layout)
    _fan_out(run, 0, services)
    return {"status": "started", "run": run_id, "workers": cfg.workers, "total_rounds": run.total_rounds}


def _write_initial_state(
    run_id: str, cfg: config.TrainConfig, weights: list[np.ndarray], layout: EfsLayout
) -> None:
    write_json(layout.config_path(run_id), cfg.to_dict())
    size = save_arrays(layout.weights_path(run_id, 0), weights, {"round": 0})
    logs.event(log, "initial_weights_written", size_bytes=size)


def _resume_run(event: StartEvent, services: Services) -> dict[str, Any]:
    if event.run_id is None:
        raise InvalidEventError("a resume event needs 'run', the id of the run to continue")
    logs.bind_more(run_id=event.run_id)
    if services.status.get_run(event.run_id) is None:
        raise InvalidEventError(f"run {event.run_id!r} does not exist; nothing to resume")
    if not services.layout.config_path(event.run_id).exists():
        raise LayoutError(
            f"{services.layout.config_path(event.run_id)}: missing; the run's EFS files are gone"
        )
    run = services.status.resume_run(event.run_id)
    logs.event(log, "run_resumed", round=run.round_index, generation=run.generation)
    _fan_out(run, run.round_index, services)
    return {"status": "resumed", "run": run.run_id, "round": run.round_index}


def _fan_out(run: RunStatus, round_index: int, services: Services) -> None:
    schedule = Schedule(run.config, len(dataset_for(run.config, services.layout).train_x))
    epochs_done = schedule.epoch_of(round_index)
    events = [
        WorkerEvent(run.run_id, round_index, worker, run.config.workers, epochs_done).to_wire()
        for worker in range(run.config.workers)
    ]
    services.invoker.invoke_async(events)
    services.status.mark_fanned_out(run.run_id, round_index)
    logs.event(log, "workers_invoked", round=round_index, workers=len(events))


# --- worker ---------------------------------------------------------------------------------------------


def run_worker(event: WorkerEvent, services: Services, context: Any) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id, worker_index=event.worker_index, round=event.round_index)
    run = _require_run(event.run_id, services)
    if event.num_workers != run.config.workers:
        raise InvalidEventError(f"workers {event.num_workers} does not match the run's {run.config.workers}")
    if not run.active or run.round_index != event.round_index:
        logs.event(log, "stale_worker_event_ignored", run_round=run.round_index, state=run.state)
        return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}
    update_path = services.layout.update_path(event.run_id, event.round_index, event.worker_index)
    if update_path.exists():
        logs.event(log, "update_already_written")
    else:
        outcome = _train_share(event, run, services, context)
        if outcome is not None:
            return outcome
    return _register(event, run, services)


def _train_share(
    event: WorkerEvent, run: RunStatus, services: Services, context: Any
) -> dict[str, Any] | None:
    """Train this worker's share of the round; None when the update is written, else the continuation."""
    cfg, layout = run.config, services.layout
    began = time.perf_counter()
    dataset = dataset_for(cfg, layout)
    schedule = Schedule(cfg, len(dataset.train_x))
    logs.bind_more(epoch=schedule.epoch_of(event.round_index))
    model = model_for(cfg, layout.root)
    global_weights = _load_weights(layout.weights_path(run.run_id, event.round_index), model)
    model.set_weights(global_weights)
    training.reset_optimizer(model, schedule.learning_rate(event.round_index))
    state = training.LocalState()
    partial_path = layout.partial_path(run.run_id, event.round_index, event.worker_index)
    if partial_path.exists():
        # A chained continuation, or a retry after a crash: every saved state is a valid point to go on from,
        # because each step's batch and augmentation depend only on the step index.
        arrays, meta = load_arrays(partial_path)
        state = training.LocalState.from_meta(meta)
        count = len(model.weights)
        model.set_weights(arrays[:count])
        training.restore_optimizer_state(model, arrays[count:])
        state.invocations += 1
        logs.event(log, "continued_from_saved_state", step=state.next_step, resume_step=event.resume_step)
    indices = schedule.worker_indices(event.round_index, event.worker_index)
    load_s = time.perf_counter() - began
    first_step = state.next_step
    done = training.train_steps(
        model,
        dataset,
        indices,
        cfg,
        state,
        augment_seed=(cfg.seed, event.round_index, event.worker_index),
        seconds_left=lambda: context.get_remaining_time_in_millis() / 1000.0,
        margin_s=services.environment.safety_margin_s,
    )
    steps_now = state.next_step - first_step
    throughput = (steps_now * cfg.batch_size) / max(state.compute_s, 1e-9) if steps_now else 0.0
    if not done:
        if steps_now == 0:
            raise TrainingError("not even one training step fits before the deadline; raise the timeout")
        write_began = time.perf_counter()
        size = save_arrays(
            partial_path, model.get_weights() + training.optimizer_state(model), state.to_meta()
        )
        continuation = dataclasses.replace(event, resume_step=state.next_step)
        services.invoker.invoke_async([continuation.to_wire()])
        logs.event(
            log,
            "round_continued",
            next_step=state.next_step,
            size_bytes=size,
            load_s=round(load_s, 3),
            write_s=round(time.perf_counter() - write_began, 3),
        )
        return {"status": "continued", "next_step": state.next_step}
    write_began = time.perf_counter()
    trainable = models.trainable_mask(model)
    dtype = np.dtype(cfg.update_dtype)
    update = [
        (local - start).astype(dtype) if is_trainable else local
        for local, start, is_trainable in zip(model.get_weights(), global_weights, trainable, strict=True)
    ]
    meta = {
        "worker": event.worker_index,
        "round": event.round_index,
        "samples": state.samples,
        "mean_loss": state.loss_sum / max(1, state.samples),
        "steps": state.next_step,
        "compute_s": state.compute_s,
        "load_s": load_s,
        "attempt": event.attempt,
        "invocations": state.invocations,
    }
    size = save_arrays(layout.update_path(run.run_id, event.round_index, event.worker_index), update, meta)
    partial_path.unlink(missing_ok=True)
    logs.event(
        log,
        "update_written",
        steps=state.next_step,
        samples=state.samples,
        mean_loss=round(meta["mean_loss"], 5),
        examples_per_s=round(throughput, 1),
        load_s=round(load_s, 3),
        compute_s=round(state.compute_s, 3),
        write_s=round(time.perf_counter() - write_began, 3),
        size_bytes=size,
    )
    return None


def _register(event: WorkerEvent, run: RunStatus, services: Services) -> dict[str, Any]:
    """Add this worker to the round's done set; the registration that completes it and wins the claim combines."""
    try:
        done = services.status.register_worker(event.run_id, event.round_index, event.worker_index)
    except CoordinationConflictError:
        logs.event(log, "round_already_combined")
        return {"status": "ignored", "reason": "round already combined"}
    logs.event(log, "worker_registered", done=len(done), workers=run.config.workers)
    if len(done) < run.config.workers:
        return {"status": "trained", "done": len(done)}
    if not services.status.claim_combine(
        event.run_id, event.round_index, run.generation, event.worker_index, event.attempt
    ):
        return {"status": "trained", "done": len(done), "combine": "claimed elsewhere"}
    combine = CombineEvent(event.run_id, event.round_index, run.config.workers, event.epochs_done)
    services.invoker.invoke_async([combine.to_wire()])
    logs.event(log, "combine_invoked")
    return {"status": "trained", "done": len(done), "combine": "invoked"}


# --- combine --------------------------------------------------------------------------------------------


def run_combine(event: CombineEvent, services: Services) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id, round=event.round_index)
    run = _require_run(event.run_id, services)
    if not run.active or run.round_index != event.round_index:
        if run.active and run.round_index == event.round_index + 1 and run.fanned_out < run.round_index:
            # This round was committed, but the combine that did it died before fanning out: finish its work.
            _fan_out(run, run.round_index, services)
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
    global_weights = _load_weights(weights_path, model)
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
        _fan_out(dataclasses.replace(run, round_index=next_round), next_round, services)
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


# --- stop and failure -----------------------------------------------------------------------------------


def stop_run(event: StopEvent, services: Services) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id)
    run = _require_run(event.run_id, services)
    requested = services.status.request_stop(event.run_id)
    logs.event(log, "stop_requested" if requested else "stop_ignored", state=run.state)
    return {"status": "stop_requested" if requested else "ignored", "run": event.run_id}


# Errors that a retry cannot fix: the event itself is wrong, or another invocation already won.
NOT_RETRIED = ("InvalidEventError", "CoordinationConflictError")
START_MAX_ATTEMPTS = 3


def handle_failure(record: FailureRecord, services: Services) -> dict[str, Any]:
    """Re-dispatch a failed event with the next attempt number, or fail the run once attempts are used up."""
    if record.error_type in NOT_RETRIED:
        logs.event(log, "failed_event_not_retried", level=logging.ERROR, error=record.error_message)
        return {"status": "ignored", "reason": f"{record.error_type} is not retried"}
    failed = record.failed
    if failed is None:
        return _retry_start(record, services)
    logs.bind_more(run_id=failed.run_id, round=failed.round_index)
    run = services.status.get_run(failed.run_id)
    current = run is not None and run.active and run.round_index == failed.round_index
    unfinished_fan_out = (
        run is not None
        and run.active
        and isinstance(failed, CombineEvent)
        and run.round_index == failed.round_index + 1
        and run.fanned_out < run.round_index
    )
    if run is None or not (current or unfinished_fan_out):
        logs.event(log, "stale_failure_ignored", error=record.error_message)
        return {"status": "ignored"}
    kind = "combine" if isinstance(failed, CombineEvent) else f"worker {failed.worker_index}"
    if failed.attempt < run.config.max_attempts:
        retry = dataclasses.replace(failed, attempt=failed.attempt + 1)
        services.invoker.invoke_async([retry.to_wire()])
        logs.event(
            log, "failed_event_redispatched", kind=kind, attempt=retry.attempt, error=record.error_message
        )
        return {"status": "redispatched", "attempt": retry.attempt}
    reason = f"{kind} of round {failed.round_index} failed {failed.attempt} times; last error: {record.error_message}"
    services.status.fail_run(failed.run_id, reason)
    logs.event(log, "run_failed", level=logging.ERROR, reason=reason, failed_request_id=record.request_id)
    return {"status": FAILED.lower(), "reason": reason}


def _retry_start(record: FailureRecord, services: Services) -> dict[str, Any]:
    """A start (direct or S3) that failed part-way is safe to send again: starting is idempotent."""
    if record.start_payload is None or record.attempt >= START_MAX_ATTEMPTS:
        logs.event(
            log, "start_failed", level=logging.ERROR, error=record.error_message, attempt=record.attempt
        )
        return {"status": "ignored", "reason": "the start failed and is not retried"}
    retry = {**record.start_payload, "attempt": record.attempt + 1}
    services.invoker.invoke_async([retry])
    logs.event(log, "failed_start_redispatched", attempt=record.attempt + 1, error=record.error_message)
    return {"status": "redispatched", "attempt": record.attempt + 1}


# --- helpers --------------------------------------------------------------------------------------------


def _require_run(run_id: str, services: Services) -> RunStatus:
    run = services.status.get_run(run_id)
    if run is None:
        raise InvalidEventError(f"run {run_id!r} does not exist (start it first)")
    return run


def _load_weights(path: Path, model: keras.Model) -> list[np.ndarray]:
    arrays, _ = load_arrays(path)
    expected = [tuple(variable.shape) for variable in model.weights]
    if [tuple(array.shape) for array in arrays] != expected:
        raise LayoutError(f"{path}: {len(arrays)} arrays do not match the model's {len(expected)} weights")
    return arrays
