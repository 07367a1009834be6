"""The worker flow: train this worker's share of a round from the round's global weights, write the update
atomically, register in DynamoDB; the registration that completes the round and wins the claim invokes the combine.

A duplicate worker event finds its update written and only registers again; a worker short of time saves its
state and continues in a chained invocation of itself."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from trainer import data, housekeeping, logs, models, sharding, training
from trainer.coordination import RunStatus
from trainer.efs_layout import file_size, load_arrays, save_arrays
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError, TrainingError
from trainer.fan_out import reduce_round
from trainer.protocol import WorkerEvent
from trainer.services import Services, load_global_weights, model_for, require_run, run_dataset

log = logging.getLogger(__name__)


def run_worker(event: WorkerEvent, services: Services, context: Any) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id, worker_index=event.worker_index, round=event.round_index)
    run = require_run(event.run_id, services)
    if event.num_workers != run.config.workers:
        raise InvalidEventError(f"workers {event.num_workers} does not match the run's {run.config.workers}")
    if not run.owns(event) or not run.is_current(event.round_index):
        return _stale(run)
    services.status.heartbeat(run.run_id)
    if services.layout.update_path(event.run_id, event.round_index, event.worker_index).exists():
        logs.event(log, "update_already_written")
    else:
        outcome = train_share(event, run, services, context)
        if outcome is not None:
            return outcome
    return _register(event, run, services)


def _stale(run: RunStatus) -> dict[str, Any]:
    logs.event(log, "stale_worker_event_ignored", run_round=run.round_index, state=run.state)
    return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}


def train_share(
    event: WorkerEvent, run: RunStatus, services: Services, context: Any
) -> dict[str, Any] | None:
    """Train this worker's share of the round: None once its update is written, else the continuation's result.

    1. load the round's global weights (or the saved state of an interrupted share) into the model;
    2. train the share's mini-batches until done or the deadline is near;
    3. done: write the update; short of time: save the state and invoke a continuation of this event.
    """
    began = time.perf_counter()
    dataset = run_dataset(run, services.layout)
    logs.bind_more(epoch=run.schedule.epoch_of(event.round_index))
    model = model_for(run.config, services.layout.root)
    weights_path = services.layout.weights_path(run.run_id, event.round_index, run.weights_token)
    global_weights = load_global_weights(weights_path, model)
    state = _restore_local_state(event, run, model, global_weights, services)
    state.bytes_read += file_size(weights_path)
    indices = run.schedule.worker_indices(event.round_index, event.worker_index)
    total_steps = run.schedule.steps(len(indices))
    load_s = time.perf_counter() - began

    first_step, first_samples = state.next_step, state.samples
    done = training.train_steps(
        model,
        dataset,
        indices,
        total_steps,
        run.config,
        state,
        augment_seed=(run.config.seed, event.round_index, event.worker_index),
        seconds_left=lambda: context.get_remaining_time_in_millis() / 1000.0,
        margin_s=services.environment.safety_margin_s,
        learning_rate=lambda step: run.schedule.learning_rate(event.round_index, step, total_steps),
    )
    steps_now = state.next_step - first_step
    state.bytes_read += (state.samples - first_samples) * _example_bytes(dataset)
    over = housekeeping.round_over(
        event, services.status
    )  # a late copy must leave nothing that nobody will read
    if over is not None:
        return _ignored(over)
    if not done:
        return _continue_later(event, run, model, state, steps_now, load_s, began, services)
    written = _write_update(event, run, model, global_weights, state, steps_now, load_s, began, services)
    over = housekeeping.round_over(event, services.status)
    if over is not None and written:  # the round ended (and was cleaned up) while this one wrote
        for path in written:  # its kept optimizer state too: nobody of this run will read it
            housekeeping.take_back(path, services.layout.run_dir(event.run_id))
        return _ignored(over)
    return None


def _example_bytes(dataset: data.Dataset) -> int:
    """EFS bytes one training example costs to read (its pixels and its label)."""
    return int(dataset.train_x[:1].nbytes + dataset.train_y[:1].nbytes)


def _ignored(reason: str) -> dict[str, Any]:
    logs.event(log, "stale_worker_event_ignored", reason=reason)
    return {"status": "ignored", "reason": reason}


def _restore_local_state(
    event: WorkerEvent,
    run: RunStatus,
    model: keras.Model,
    global_weights: list[np.ndarray],
    services: Services,
) -> training.LocalState:
    """The model at the round's start (global weights; zero momentum, or with ``local_optimizer`` "keep" the
    momentum this worker ended its previous round with), or where a saved state left it. Every saved state is a
    valid point to go on from (a chained continuation or a retry after a crash), because each step's batch and
    augmentation depend only on the step index."""
    model.set_weights(global_weights)
    training.reset_optimizer(model, run.schedule.learning_rate(event.round_index))
    kept_bytes = 0
    if run.config.local_optimizer == "keep" and event.round_index > 0:
        kept_bytes = _restore_kept_optimizer(event, run, model, services)
    partial_path = services.layout.partial_path(run.run_id, event.round_index, event.worker_index)
    if not partial_path.exists():
        return training.LocalState(bytes_read=kept_bytes)
    arrays, meta = load_arrays(partial_path)
    state = training.LocalState.from_meta(meta)
    state.bytes_read += kept_bytes
    saved_bytes = file_size(partial_path)  # written by the previous invocation, read by this one
    state.bytes_written += saved_bytes
    state.bytes_read += saved_bytes
    count = len(model.weights)
    model.set_weights(arrays[:count])
    _restore_optimizer(model, arrays[count:], partial_path)
    state.invocations += 1
    logs.event(log, "continued_from_saved_state", step=state.next_step, resume_step=event.resume_step)
    return state


def _restore_kept_optimizer(
    event: WorkerEvent, run: RunStatus, model: keras.Model, services: Services
) -> int:
    """Load the optimizer state this worker's previous round left for it; returns the bytes read. Missing (a run
    resumed from a state written before it kept momentum): start from zero, as a reset would."""
    path = services.layout.local_state_path(run.run_id, event.round_index, event.worker_index)
    if not path.exists():
        logs.event(log, "kept_optimizer_state_missing", level=logging.WARNING, path=str(path))
        return 0
    arrays, meta = load_arrays(path)
    if meta.get("instance", run.instance) != run.instance:  # a removed run's late worker left it: not ours
        logs.event(log, "kept_optimizer_state_foreign", level=logging.WARNING, path=str(path))
        return file_size(path)
    _restore_optimizer(model, arrays, path)
    return file_size(path)


def _restore_optimizer(model: keras.Model, arrays: list[np.ndarray], path: Path) -> None:
    """A saved optimizer state that does not fit the model is a damaged file (not retried), naming it."""
    try:
        training.restore_optimizer_state(model, arrays)
    except ValueError as exc:
        raise LayoutError(f"{path}: does not fit the model's optimizer ({exc})") from exc


def _continue_later(
    event: WorkerEvent,
    run: RunStatus,
    model: keras.Model,
    state: training.LocalState,
    steps_now: int,
    load_s: float,
    share_began: float,
    services: Services,
) -> dict[str, Any]:
    """Save the model and optimizer state, then invoke this event again from the next step."""
    if steps_now == 0:
        raise TrainingError("not even one training step fits before the deadline; raise the timeout")
    began = time.perf_counter()
    partial_path = services.layout.partial_path(run.run_id, event.round_index, event.worker_index)
    saved = dataclasses.replace(state, handler_s=state.handler_s + (began - share_began))
    size = save_arrays(partial_path, model.get_weights() + training.optimizer_state(model), saved.to_meta())
    over = housekeeping.round_over(event, services.status)
    if over is not None:  # the round ended while this copy saved: nobody will continue from it
        housekeeping.take_back(partial_path, services.layout.run_dir(event.run_id))
        return _ignored(over)
    continuation = dataclasses.replace(event, resume_step=state.next_step)
    services.invoker.invoke_async([continuation.to_wire()])
    logs.event(
        log,
        "round_continued",
        next_step=state.next_step,
        size_bytes=size,
        load_s=round(load_s, 3),
        write_s=round(time.perf_counter() - began, 3),
    )
    return {"status": "continued", "next_step": state.next_step}


def _write_update(
    event: WorkerEvent,
    run: RunStatus,
    model: keras.Model,
    global_weights: list[np.ndarray],
    state: training.LocalState,
    steps_now: int,
    load_s: float,
    share_began: float,
    services: Services,
) -> list[Path]:
    """Write the update: deltas of trainable weights (in ``update_dtype``), values of BatchNorm statistics; for
    a sharded run as one member per slice (``trainer/sharding.py``), so a reducer reads its slice in one piece.
    Returns the paths this call published: the update and the kept optimizer state written before it (none
    when another copy had already published them)."""
    began = time.perf_counter()
    dtype = np.dtype(run.config.update_dtype)
    trainable = models.trainable_mask(model)
    update = [
        (local - start).astype(dtype) if is_trainable else local
        for local, start, is_trainable in zip(model.get_weights(), global_weights, trainable, strict=True)
    ]
    layout = services.layout
    written: list[Path] = []
    kept_bytes = 0
    keeps_optimizer = run.config.local_optimizer == "keep" and not run.schedule.is_last(event.round_index)
    if keeps_optimizer:  # before the update: a written update implies its worker's next optimizer state
        kept = layout.local_state_path(run.run_id, event.round_index + 1, event.worker_index)
        kept_meta = {"round": event.round_index + 1, "worker": event.worker_index, "instance": run.instance}
        if save_arrays(kept, training.optimizer_state(model), kept_meta, once=True):
            written.append(kept)
        kept_bytes = file_size(
            kept
        )  # written now or by an earlier attempt: the round's EFS traffic either way
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
        # For the round's metrics: handler seconds up to this write (earlier invocations of the share included),
        # EFS bytes read, and bytes of saved states written (the combine measures the update file itself).
        "handler_s": state.handler_s + (time.perf_counter() - share_began),
        "bytes_read": state.bytes_read,
        "bytes_written": state.bytes_written + kept_bytes,
    }
    update, sharded_layout = sharding.encode_update(update, trainable, run.reducers)
    meta.update(sharded_layout)
    path = layout.update_path(run.run_id, event.round_index, event.worker_index)
    size = save_arrays(path, update, meta, once=True)  # a copy that finished first has already won
    layout.partial_path(run.run_id, event.round_index, event.worker_index).unlink(missing_ok=True)
    if not size:
        logs.event(log, "update_already_written")
        return written
    written.append(path)
    throughput = (steps_now * run.config.batch_size) / max(state.compute_s, 1e-9) if steps_now else 0.0
    logs.event(
        log,
        "update_written",
        steps=state.next_step,
        samples=state.samples,
        mean_loss=round(meta["mean_loss"], 5),
        examples_per_s=round(throughput, 1),
        load_s=round(load_s, 3),
        compute_s=round(state.compute_s, 3),
        write_s=round(time.perf_counter() - began, 3),
        size_bytes=size,
    )
    return written


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
    # The event's generation's claim (see reduce._register): a late copy of an older generation must not take the
    # current generation's claim, since its failure record is ignored as stale.
    generation = min(event.generation, run.generation)
    if not services.status.claim_combine(
        event.run_id, event.round_index, generation, event.worker_index, event.attempt
    ):
        return {"status": "trained", "done": len(done), "combine": "claimed elsewhere"}
    reduce_round(run, event.round_index, event.epochs_done, services)
    return {"status": "trained", "done": len(done), "combine": "invoked"}
