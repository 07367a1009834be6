"""A run's budget (``max_wall_s``, ``max_gb_s`` in its configuration): whether a round about to be committed
used it up, and why. The combine stops the run at that commit (STOPPED, with the reason), so a budget takes
effect at a round boundary, once, through the commit's own conditional transaction: a duplicate or late combine
loses the commit and changes nothing.

What counts: wall time from the run's creation to the commit (a stopped run's idle time included), and the
GB-seconds the committed rounds measured (handler seconds of the workers' and the combine's invocations times
the function's memory; see :class:`trainer.coordination.RoundMetrics`). Invocations whose work was not used
(crashed or duplicated ones), the start and the registrations are not in it; ``lambdatrain cost`` counts every
invocation from the function's REPORT lines.
"""

from __future__ import annotations

import datetime as dt

from trainer.coordination import RoundMetrics, RunStatus


def exceeded(run: RunStatus, metrics: RoundMetrics, committed_at: float) -> str | None:
    """Why committing ``run``'s current round with ``metrics`` at ``committed_at`` (epoch seconds) uses up its
    budget, or None."""
    config = run.config
    if config.max_wall_s > 0 and run.created_at:
        elapsed_s = committed_at - dt.datetime.fromisoformat(run.created_at).timestamp()
        if elapsed_s >= config.max_wall_s:
            return (
                f"budget: max_wall_s {config.max_wall_s:g} s reached ({elapsed_s:.0f} s since the start) after "
                f"round {run.round_index + 1} of {run.total_rounds}"
            )
    if config.max_gb_s > 0:
        used = run.gb_s + metrics.gb_s
        if used >= config.max_gb_s:
            return (
                f"budget: max_gb_s {config.max_gb_s:g} GB-s reached ({used:.1f} GB-s measured) after round "
                f"{run.round_index + 1} of {run.total_rounds}"
            )
    return None
