"""A run's lifecycle: start (direct or from an S3 object), resume and stop.

Starting is idempotent: a redelivered start with the same id and configuration finishes a crashed first delivery
or does nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import numpy as np

from trainer import config, logs, quotas
from trainer.coordination import INITIAL_TOKEN, MAX_ROUNDS, RunStatus
from trainer.efs_layout import EfsLayout, save_arrays, write_json
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError
from trainer.fan_out import fan_out, resend
from trainer.protocol import S3StartEvent, StartEvent, StopEvent
from trainer.schedule import Schedule
from trainer.services import Services, dataset_digest, dataset_for, initial_weights, require_run

log = logging.getLogger(__name__)


# --- start ----------------------------------------------------------------------------------------------


def start_from_s3(event: S3StartEvent, services: Services) -> dict[str, Any]:
    """Read the start object and start it; the run id defaults to the object's name, so a redelivery is a no-op."""
    start = services.read_start_object(event)
    return start_run(start, services, default_run_id=event.run_id, export_bucket=event.bucket)


def start_run(
    event: StartEvent, services: Services, default_run_id: str, export_bucket: str | None = None
) -> dict[str, Any]:
    if event.resume:
        return _resume_run(event, services)
    cfg = event.config
    run_id = event.run_id or default_run_id
    logs.bind_more(run_id=run_id)
    if cfg.max_gb_s > 0 and services.environment.memory_mb <= 0:
        raise InvalidEventError(
            f"max_gb_s {cfg.max_gb_s:g} needs the function's memory, but {config.ENV_MEMORY_SIZE} is not set "
            "(Lambda sets it; so does lambdatrain local)"
        )
    dataset = dataset_for(cfg, services.layout)  # a missing dataset fails here, before anything is written
    digest = dataset_digest(cfg, services.layout)
    # Every cloud run exports final.keras to the stack's bucket (MODEL_BUCKET); one started by an S3 object, to
    # the bucket the object came from (the same one in a deployed stack).
    export_bucket = export_bucket or services.environment.model_bucket
    planned = RunStatus.new(run_id, cfg, len(dataset.train_x), export_bucket, dataset_sha256=digest)
    _check_plan(planned.schedule)
    run = services.status.get_run(run_id)
    if run is None and services.layout.run_dir(run_id).exists():
        raise LayoutError(
            f"{services.layout.run_dir(run_id)} already exists but the status table has no run {run_id!r}; "
            "delete the folder or choose another run id"
        )
    if run is None:
        weights = initial_weights(cfg, services.layout.root)  # validates a weights file too
        planned = dataclasses.replace(planned, parameters=sum(int(weight.size) for weight in weights))
        quotas.check_memory(  # refuse a run whose combine cannot fit the function, before writing anything
            planned.parameters, planned.reducers, cfg.outer_momentum > 0, services.environment.memory_mb
        )
        if services.lambda_api is not None:  # refuse a run the account cannot execute
            quotas.check_concurrency(
                services.lambda_api,
                cfg.workers,
                function_name=services.environment.function_name,
                reducers=planned.reducers,
            )
        with contextlib.suppress(CoordinationConflictError):  # a concurrent duplicate won: checked below
            services.status.create_run(planned)
            _write_initial_state(run_id, cfg, weights, services.layout)
            logs.event(log, "run_created", total_rounds=planned.total_rounds, config=cfg.to_dict())
        run = require_run(run_id, services)
    if run.config != cfg:
        raise CoordinationConflictError(
            f"run {run_id!r} already exists with another configuration; pick a new 'run' or send \"resume\": true"
        )
    if not run.active or run.round_index > 0 or run.fanned_out >= 0:
        logs.event(log, "duplicate_start_ignored", state=run.state, round=run.round_index)
        return {"status": "duplicate", "run": run_id, "state": run.state}
    if not services.layout.weights_path(run_id, 0, INITIAL_TOKEN).exists():  # a crashed first delivery
        _write_initial_state(run_id, cfg, initial_weights(cfg, services.layout.root), services.layout)
    fan_out(run, 0, services)
    return {"status": "started", "run": run_id, "workers": cfg.workers, "total_rounds": run.total_rounds}


def _check_plan(schedule: Schedule) -> None:
    """Every worker must have examples to train on in every round, and the rounds must fit the sort keys."""
    if schedule.total_rounds > MAX_ROUNDS:
        raise InvalidEventError(
            f"the plan has {schedule.total_rounds} rounds ({schedule.config.epochs} epochs x "
            f"{schedule.rounds_per_epoch} rounds per epoch); at most {MAX_ROUNDS} are supported"
        )
    if schedule.shard_size < 1:
        raise InvalidEventError(
            f"workers {schedule.config.workers} exceeds the {schedule.num_train} training examples"
        )
    if schedule.rounds_per_epoch > schedule.shard_size:
        raise InvalidEventError(
            f"rounds_per_epoch {schedule.rounds_per_epoch} exceeds the {schedule.shard_size} examples per worker "
            "shard; some workers would have nothing to train on"
        )


def _write_initial_state(
    run_id: str, cfg: config.TrainConfig, weights: list[np.ndarray], layout: EfsLayout
) -> None:
    write_json(layout.config_path(run_id), cfg.to_dict())
    size = save_arrays(layout.weights_path(run_id, 0, INITIAL_TOKEN), weights, {"round": 0}, once=True)
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
    resend(run, services)
    return {"status": "resumed", "run": run.run_id, "round": run.round_index}


# --- stop ------------------------------------------------------------------------------------------------


def stop_run(event: StopEvent, services: Services) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id)
    run = require_run(event.run_id, services)
    requested = services.status.request_stop(event.run_id)
    logs.event(log, "stop_requested" if requested else "stop_ignored", state=run.state)
    return {"status": "stop_requested" if requested else "ignored", "run": event.run_id}
