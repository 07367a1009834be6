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
from pathlib import Path
from typing import Any

from trainer import logs
from trainer.coordination import SUCCEEDED, RunStatus, StatusTable
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


def round_over(event: Any, status: StatusTable) -> str | None:
    """Why a worker's or reducer's ``event`` round is over (the run was removed, the id now names another run,
    the round was committed, the run finished), or None. A run that failed or was stopped at this round still
    wants the round's files: a resume reuses them."""
    fresh = status.get_run(event.run_id)
    if fresh is None:
        return f"run {event.run_id!r} was removed"
    if not fresh.owns(event):
        return f"run {event.run_id!r} was removed and started again"
    if fresh.round_index != event.round_index or fresh.state == SUCCEEDED:
        return f"run is {fresh.state} at round {fresh.round_index}"
    return None


def take_back(path: Path, run_dir: Path) -> None:
    """Delete a file a late copy wrote after its round ended, and the folders that only it had created."""
    path.unlink(missing_ok=True)
    for folder in path.parents:
        if folder == run_dir.parent:
            break
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break
