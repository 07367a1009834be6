"""The watchdog flow: find active runs that stopped making progress and re-send their current round.

Every invocation that works on a run writes a heartbeat on the run item (chained continuations included), so
an active run whose heartbeat is older than ``Environment.stalled_after_s`` (longer than any live invocation
can be silent) has lost its events: a failure record that failed itself, an Invoke throttled past the SDK's
retries, a combine killed after its claim. The watchdog re-sends the round as a resume does (a new generation,
so the round's combine can be claimed again; updates already written are kept, so healthy work is not lost), at
most ``max_attempts`` times without a commit in between, then marks the run FAILED with the reason.

It runs on a schedule in the cloud (the template's ``WatchdogSchedule``) and from ``lambdatrain local``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from trainer import logs
from trainer.coordination import RunStatus
from trainer.errors import LayoutError
from trainer.fan_out import resend
from trainer.services import Services

log = logging.getLogger(__name__)


def check_runs(
    services: Services,
    now: dt.datetime | None = None,
    run_id: str | None = None,
    stalled_after_s: float | None = None,
) -> dict[str, Any]:
    """Look at every active run (or only ``run_id``) once; returns what was done to which run."""
    now = now or dt.datetime.now(dt.UTC)
    bound_s = services.environment.stalled_after_s if stalled_after_s is None else stalled_after_s
    actions: dict[str, str] = {}
    for candidate in [run_id] if run_id else services.status.list_active_run_ids():
        try:
            run = services.status.get_run(candidate)
        except LayoutError as exc:  # an item this version cannot read: say so, never guess
            logs.event(
                log, "watchdog_unreadable_run", level=logging.WARNING, run_id=candidate, error=str(exc)
            )
            continue
        if run is None or not run.active:
            continue
        progress = run.last_progress_at
        silent_s = (now - progress).total_seconds() if progress else float("inf")
        if silent_s >= bound_s:
            actions[run.run_id] = revive(run, services, silent_s=silent_s)
    logs.event(log, "watchdog_checked", stalled=len(actions), **({"actions": actions} if actions else {}))
    return {"status": "checked", "actions": actions}


def revive(
    run: RunStatus, services: Services, silent_s: float | None = None, cause: str | None = None
) -> str:
    """Re-send what ``run`` needs next under a new generation, or fail it once its re-sends are used up.
    ``cause``: why it is being revived (default: its silence). Returns "resent", "failed" or "moved on"."""
    why = cause or f"no progress for {silent_s:.0f} s at round {run.round_index}"
    if run.watchdog_resends >= run.config.max_attempts:
        reason = (
            f"{why}; {run.watchdog_resends} watchdog re-sends did not get it going (see the dead-letter queue "
            "and the function's logs)"
        )
        if services.status.fail_run(
            run.run_id, reason, round_index=run.round_index, generation=run.generation, instance=run.instance
        ):
            logs.event(log, "run_failed", level=logging.ERROR, run_id=run.run_id, reason=reason)
            return "failed"
        return "moved on"
    revived = services.status.resend_round(run)
    if revived is None:
        return "moved on"
    resend(revived, services)
    logs.event(
        log,
        "round_resent",
        run_id=run.run_id,
        round=revived.round_index,
        generation=revived.generation,
        cause=why,
        resends=revived.watchdog_resends,
    )
    return "resent"
