"""The worker flow: train this worker's share of a round from the round's global weights, write the update
atomically, register in DynamoDB; the registration that completes the round and wins the claim invokes the combine.

A duplicate worker event finds its update written and only registers again; a worker short of time saves its
state and continues in a chained invocation of itself."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from trainer import logs, models, training
from trainer.coordination import (
    RunStatus,
)
from trainer.efs_layout import load_arrays, save_arrays
from trainer.errors import CoordinationConflictError, InvalidEventError, TrainingError
from trainer.protocol import (
    CombineEvent,
    WorkerEvent,
)
from trainer.schedule import Schedule
from trainer.services import Services, dataset_for, load_global_weights, model_for, require_run

log = logging.getLogger(__name__)


def run_worker(event: WorkerEvent, services: Services, context: Any) -> dict[str, Any]:
    logs.bind_more(run_id=event.run_id, worker_index=event.worker_index, round=event.round_index)
    run = require_run(event.run_id, services)
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
    global_weights = load_global_weights(layout.weights_path(run.run_id, event.round_index), model)
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
