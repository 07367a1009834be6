"""The sharded reduce: K reducers each average one slice of every update of a round, the last one commits it.

When a run uses more than one reducer (``sharding.reducer_count``), the worker that completes a round and wins
the combine claim sends K reduce events instead of one combine event. Reducer ``k``:

1. checks the event (the run, its round, the counts), as the combine does;
2. reads slice ``k`` of every update (one contiguous ``.npz`` member per update), the matching elements of the
   round's global weights and outer momentum, averages and applies the outer update on that slice only;
3. publishes the slice of the next weights (and momentum) once, under ``reduce/round-R/slice-k.npz``: the first
   finished copy wins, so a duplicate never replaces a slice another invocation may read; a copy that finds its
   round over afterwards takes back what it wrote;
4. registers in the round item (``reduced``, an idempotent ``ADD``); the registration that completes the set and
   wins the commit claim (the same rule as the combine claim) assembles the slices into the next round's weights
   under its own token, evaluates, commits the round with the combine's one transaction and follows up.

A reducer whose slice is written only registers again; its retries and the watchdog's re-sends follow the
combine's rules. Bytes one reducer reads are ``N x model / K`` (flat in ``N`` when ``K`` grows with ``N``); the
committing one reads the K slices, one model's worth, whatever ``N`` is."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer import aggregation, combine, housekeeping, logs, models, sharding
from trainer.coordination import SUCCEEDED, RunStatus
from trainer.efs_layout import file_size, load_arrays, load_members, save_arrays
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError
from trainer.protocol import ReduceEvent
from trainer.services import Services, model_for, require_run

log = logging.getLogger(__name__)

SLICE_META_FIELDS = ("samples", "mean_loss", "bytes_read", "reduce_s")


def run_reducer(event: ReduceEvent, services: Services) -> dict[str, Any]:
    """Reduce slice ``event.reducer_index`` of the round, register, and commit if this is the last one."""
    logs.bind_more(run_id=event.run_id, round=event.round_index, reducer=event.reducer_index)
    run = require_run(event.run_id, services)
    if not run.owns(event):
        logs.event(log, "stale_reducer_ignored", reason="sent for a removed run of the same id")
        return {"status": "ignored", "reason": "sent for another run of the same id"}
    if not run.is_current(event.round_index):
        if run.awaits_follow_up(event.round_index):  # the reducer that committed died before its follow-up
            state = combine.follow_up(run, services)
            return {"status": "finished" if state == SUCCEEDED else "fanned_out", "round": run.round_index}
        logs.event(log, "stale_reducer_ignored", run_round=run.round_index, state=run.state)
        return {"status": "ignored", "reason": f"run is {run.state} at round {run.round_index}"}
    not_ready = combine.check_all_registered(run, services)  # reads only
    if not_ready is not None:
        return not_ready
    if event.num_workers != run.config.workers or event.num_reducers != run.reducers:
        raise InvalidEventError(
            f"workers {event.num_workers} and reducers {event.num_reducers} do not match the run's "
            f"{run.config.workers} workers and {run.reducers} reducers"
        )
    services.status.heartbeat(run.run_id)
    if services.layout.slice_path(run.run_id, run.round_index, event.reducer_index).exists():
        logs.event(log, "slice_already_written")
    else:
        over = _reduce_slice(event, run, services)
        if over is not None:
            logs.event(log, "stale_reducer_ignored", reason=over)
            return {"status": "ignored", "reason": over}
    return _register(event, run, services)


# --- one slice --------------------------------------------------------------------------------------------


def _reduce_slice(event: ReduceEvent, run: RunStatus, services: Services) -> str | None:
    """Average slice k of the round and publish it; None once it is there, or why the round is over (then
    nothing this copy wrote is left)."""
    began = time.perf_counter()
    layout, k = services.layout, event.reducer_index
    update_paths = [layout.update_path(run.run_id, run.round_index, w) for w in range(run.config.workers)]
    metas = [combine.update_meta(path) for path in update_paths]
    plan = _plan_of(metas, update_paths, run)
    lengths = plan.lengths(k)
    delta_dtype = np.dtype(run.config.update_dtype)
    bytes_read = 0
    try:
        average = aggregation.RunningAverage(
            [(lengths[0],), (lengths[1],)], sum(int(meta["samples"]) for meta in metas)
        )
        for path, meta in zip(update_paths, metas, strict=True):
            (member,), size = load_members(path, [k])
            bytes_read += size
            trainable, statistics = sharding.unpack(member, lengths, delta_dtype)
            average.add(
                aggregation.WorkerUpdate(
                    [trainable, statistics], int(meta["samples"]), float(meta["mean_loss"])
                )
            )
            del member, trainable, statistics
        averaged = average.result()
    except ValueError as exc:
        raise LayoutError(f"round {run.round_index}, slice {k}: {exc}") from exc
    weights, size = _global_slice(run, plan, k, services)
    bytes_read += size
    momentum, size = _momentum_slice(run, plan, k, services)
    bytes_read += size
    new_weights, new_momentum = aggregation.apply_outer_update(
        weights, averaged.arrays, [True, False], run.config.outer_lr, run.config.outer_momentum, momentum
    )
    path = layout.slice_path(run.run_id, run.round_index, k)
    meta = {
        "round": run.round_index,
        "reducer": k,
        "samples": averaged.samples,
        "mean_loss": averaged.mean_loss,
        "bytes_read": bytes_read,
        "reduce_s": time.perf_counter() - began,
    }
    written = save_arrays(path, new_weights + (new_momentum or []), meta, once=True)
    over = housekeeping.round_over(event, services.status)
    if over is not None and written:  # the round ended (and was cleaned up) while this copy wrote
        housekeeping.take_back(path, layout.run_dir(run.run_id))
        return over
    logs.event(
        log,
        "slice_written" if written else "slice_already_written",
        bytes_read=bytes_read,
        size_bytes=written,
        duration_s=round(meta["reduce_s"], 3),
    )
    return over


def _plan_of(metas: list[dict[str, Any]], paths: list[Path], run: RunStatus) -> sharding.SlicePlan:
    """The slice plan every update of the round was written with; an update written otherwise is damage."""
    layout = metas[0].get("layout")
    for meta, path in zip(metas, paths, strict=True):
        if meta.get("slices") != run.reducers or meta.get("layout") != layout:
            raise LayoutError(
                f"{path}: written for {meta.get('slices')!r} slices with another layout; the run reduces "
                f"{run.reducers} slices of worker 0's layout"
            )
    try:
        return sharding.SlicePlan.of(layout["shapes"], layout["trainable"], run.reducers)
    except (TypeError, KeyError, ValueError) as exc:
        raise LayoutError(f"{paths[0]}: update metadata 'layout' is not a slice layout ({exc})") from exc


def _global_slice(
    run: RunStatus, plan: sharding.SlicePlan, k: int, services: Services
) -> tuple[list[np.ndarray], int]:
    """The round's global weights on slice k (trainable part, statistics part), read member by member."""
    path = services.layout.weights_path(run.run_id, run.round_index, run.weights_token)
    indices = plan.weight_indices(k)
    arrays, size = load_members(path, indices)
    full: list[np.ndarray | None] = [None] * len(plan.shapes)
    for index, array in zip(indices, arrays, strict=True):
        if tuple(array.shape) != plan.shapes[index]:
            raise LayoutError(
                f"{path}: weight {index} has shape {array.shape}, the updates {plan.shapes[index]}"
            )
        full[index] = array
    return [plan.cut(full, k, trainable=True), plan.cut(full, k, trainable=False)], size


def _momentum_slice(
    run: RunStatus, plan: sharding.SlicePlan, k: int, services: Services
) -> tuple[list[np.ndarray] | None, int]:
    """The outer momentum on slice k's trainable part (None before the first round or without momentum)."""
    if run.config.outer_momentum <= 0 or run.round_index == 0:
        return None, 0
    path = services.layout.outer_state_path(run.run_id, run.round_index, run.weights_token)
    positions = plan.trainable_positions()
    wanted = [index for index in plan.weight_indices(k) if index in positions]
    arrays, size = load_members(path, [positions[index] for index in wanted])
    full: list[np.ndarray | None] = [None] * len(plan.shapes)
    for index, array in zip(wanted, arrays, strict=True):
        full[index] = array
    return [plan.cut(full, k, trainable=True)], size


# --- registration and the commit -------------------------------------------------------------------------


def _register(event: ReduceEvent, run: RunStatus, services: Services) -> dict[str, Any]:
    try:
        reduced = services.status.register_reducer(run.run_id, run.round_index, event.reducer_index)
    except CoordinationConflictError:
        logs.event(log, "round_already_committed")
        return {"status": "ignored", "reason": "round already committed"}
    logs.event(log, "reducer_registered", done=len(reduced), reducers=run.reducers)
    if len(reduced) < run.reducers:
        return {"status": "reduced", "done": len(reduced)}
    # The claim is the event's generation's, not the run's: a late copy of an older generation (delivered after a
    # resume or a watchdog re-send) may take only its own generation's claim, which the current one outranks; its
    # failure record is ignored as stale, so a claim it took in the current generation would block the round.
    generation = min(event.generation, run.generation)
    if not services.status.claim_commit(
        run.run_id, run.round_index, generation, event.reducer_index, event.attempt
    ):
        return {"status": "reduced", "done": len(reduced), "commit": "claimed elsewhere"}
    return _commit(run, services)


def _commit(run: RunStatus, services: Services) -> dict[str, Any]:
    """Assemble the K slices into the next round's weights (and momentum), then commit as the combine does."""
    began = time.perf_counter()
    layout, phases = services.layout, {}
    model = model_for(run.config, layout.root)
    shapes = [tuple(variable.shape) for variable in model.weights]
    plan = sharding.SlicePlan.of(shapes, models.trainable_mask(model), run.reducers)
    new_weights = [np.zeros(shape, dtype=np.float32) for shape in shapes]
    new_momentum = (
        [
            np.zeros(shape, dtype=np.float32)
            for shape, keep in zip(shapes, plan.trainable, strict=True)
            if keep
        ]
        if run.config.outer_momentum > 0
        else None
    )
    momentum_targets = plan.expand(new_momentum) if new_momentum is not None else None
    slice_metas, slice_sizes = [], []
    for k in range(run.reducers):
        path = layout.slice_path(run.run_id, run.round_index, k)
        arrays, meta = load_arrays(path)
        expected = 3 if new_momentum is not None else 2
        if len(arrays) != expected or any(
            not isinstance(meta.get(name), int | float) for name in SLICE_META_FIELDS
        ):
            raise LayoutError(
                f"{path}: a slice holds {expected} arrays and {SLICE_META_FIELDS}; this one does not"
            )
        try:
            plan.paste(new_weights, arrays[0], k, trainable=True)
            plan.paste(new_weights, arrays[1], k, trainable=False)
            if momentum_targets is not None:
                plan.paste(momentum_targets, arrays[2], k, trainable=True)  # type: ignore[arg-type]
        except ValueError as exc:
            raise LayoutError(f"{path}: {exc}") from exc
        slice_metas.append(meta)
        slice_sizes.append(file_size(path))
        del arrays
    if len({(meta["samples"], meta["mean_loss"]) for meta in slice_metas}) != 1:
        raise LayoutError(
            f"round {run.round_index}: the slices disagree on the samples and loss they averaged"
        )
    model.set_weights(new_weights)
    update_paths = [layout.update_path(run.run_id, run.round_index, w) for w in range(run.config.workers)]
    worker_meta = [combine.update_meta(path) for path in update_paths]
    phases["load"] = time.perf_counter() - began
    phases["reduce"] = max(float(meta["reduce_s"]) for meta in slice_metas)
    reducer_reads = [int(meta["bytes_read"]) for meta in slice_metas]
    reads = {"reduce": sum(reducer_reads), "reduce_max": max(reducer_reads), "commit": sum(slice_sizes)}
    writes = {"reduce": sum(slice_sizes), "reduce_max": max(slice_sizes)}
    result = combine.RoundResult(
        model,
        new_weights,
        new_momentum,
        int(slice_metas[0]["samples"]),
        float(slice_metas[0]["mean_loss"]),
        worker_meta,
        [file_size(path) for path in update_paths],
        reducers_s=sum(float(meta["reduce_s"]) for meta in slice_metas),
    )
    return combine.commit_next_round(run, result, phases, reads, writes, services, "commit", began)
