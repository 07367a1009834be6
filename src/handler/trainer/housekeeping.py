"""The one clean-up rule for a run's files on EFS: keep what the run can still read, delete everything else.

What a run keeps, by its state after a commit (``R`` = its round, ``T`` = its weights token):

- active, STOPPED or FAILED: the weights and outer momentum of round ``R`` named ``T`` (a stopped or failed run
  resumes from them), round ``R``'s updates and saved worker states (a resume reuses them), and the weights and
  momentum of round ``R - 1`` (a duplicate combine of that round may still be reading them; one that finds a
  file gone fails harmlessly, as a stale event). Everything older goes, and so do files of round ``R`` that
  another (losing) combine named. Files of later rounds are never touched: the run may have moved on since the
  status this clean-up was given was read (a slow invocation cleaning up after an old commit);
- SUCCEEDED: ``config.json`` and ``final.keras`` only.

Temporary files a killed writer left (``.tmp-*``) go once they are older than ``STALE_TEMPORARY_S``: a live
writer finishes within one invocation. Clean-up is best effort: leftovers cost disk space, never correctness.
"""

from __future__ import annotations

import logging
import shutil
import time

from trainer import logs
from trainer.coordination import SUCCEEDED, RunStatus
from trainer.efs_layout import EfsLayout

log = logging.getLogger(__name__)

STALE_TEMPORARY_S = 2 * 900.0  # twice Lambda's longest timeout


def clean_up(run: RunStatus, layout: EfsLayout) -> int:
    """Delete what ``run`` (its status after a commit or its end) no longer needs; returns entries removed."""
    removed = 0
    try:
        for kind, round_index, token, path in list(layout.round_files(run.run_id)):
            if not _keeps(run, kind, round_index, token):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
        cutoff = time.time() - STALE_TEMPORARY_S
        for path in list(layout.temporary_files(run.run_id)):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
    except OSError as exc:
        logs.event(log, "clean_up_failed", level=logging.WARNING, error=str(exc))
    return removed


def _keeps(run: RunStatus, kind: str, round_index: int, token: str | None) -> bool:
    if run.state == SUCCEEDED:
        return False
    if round_index > run.round_index:
        return True
    if round_index == run.round_index:
        return token is None or token == run.weights_token
    return round_index == run.round_index - 1 and token is not None


def discard_token(run: RunStatus, token: str, layout: EfsLayout) -> None:
    """A combine that lost the commit deletes the next-round files it wrote under its own token."""
    next_round = run.round_index + 1
    for path in (
        layout.weights_path(run.run_id, next_round, token),
        layout.outer_state_path(run.run_id, next_round, token),
    ):
        path.unlink(missing_ok=True)
