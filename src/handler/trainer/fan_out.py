"""Signal a round: send one worker event per worker, then record that the round was fanned out; and signal its
reduction: one combine event, or one reduce event per reducer of a sharded run.

Called by the start, resume and combine flows, and by whoever finds a committed round whose fan-out was cut
short. Sending twice is safe: workers, combines and reducers of a round are idempotent."""

from __future__ import annotations

import logging

from trainer import logs
from trainer.coordination import RunStatus
from trainer.protocol import CombineEvent, ReduceEvent, WorkerEvent
from trainer.services import Services

log = logging.getLogger(__name__)


def fan_out(run: RunStatus, round_index: int, services: Services) -> None:
    epochs_done = run.schedule.epoch_of(round_index)
    events = [
        WorkerEvent(
            run.run_id,
            round_index,
            worker,
            run.config.workers,
            epochs_done,
            generation=run.generation,
            instance=run.instance,
        ).to_wire()
        for worker in range(run.config.workers)
    ]
    services.invoker.invoke_async(events)
    services.status.mark_fanned_out(run.run_id, round_index)
    logs.event(log, "workers_invoked", round=round_index, workers=len(events))


def reduce_round(run: RunStatus, round_index: int, epochs_done: int, services: Services) -> None:
    """Invoke what averages a complete round: the combine, or each of a sharded run's reducers."""
    if run.reducers == 1:
        events = [
            CombineEvent(
                run.run_id,
                round_index,
                run.config.workers,
                epochs_done,
                generation=run.generation,
                instance=run.instance,
            ).to_wire()
        ]
    else:
        events = [
            ReduceEvent(
                run.run_id,
                round_index,
                reducer,
                run.reducers,
                run.config.workers,
                epochs_done,
                generation=run.generation,
                instance=run.instance,
            ).to_wire()
            for reducer in range(run.reducers)
        ]
    services.invoker.invoke_async(events)
    logs.event(log, "combine_invoked", round=round_index, reducers=run.reducers)


def resend(run: RunStatus, services: Services) -> None:
    """Send what an active run needs next (a resume, or the watchdog's re-send): the follow-up of its last
    commit if that was cut short (the next round's fan-out, or finishing the run), else its current round."""
    if run.round_index > 0 and run.awaits_follow_up(run.round_index - 1):
        follow_up = CombineEvent(
            run.run_id,
            run.round_index - 1,
            run.config.workers,
            run.epochs_done,
            generation=run.generation,
            instance=run.instance,
        )
        services.invoker.invoke_async([follow_up.to_wire()])
        logs.event(log, "follow_up_invoked", round=run.round_index - 1)
    else:
        fan_out(run, run.round_index, services)
