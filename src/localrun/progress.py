"""A run's progress, read from the status table the way an operator would read it, as a bar and a summary.

Only DynamoDB is read (through ``trainer.coordination``'s read helpers), never the runtime's internals, so
what the bar shows is what ``aws dynamodb query`` would show for a run in the cloud.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from trainer import coordination


@dataclass(frozen=True)
class Snapshot:
    """The run item and its round items at one moment (numbers already plain ``int``/``float``)."""

    run_id: str
    run: dict[str, Any] | None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str | None:
        return self.run.get("state") if self.run else None

    @property
    def terminal(self) -> bool:
        return self.state in coordination.TERMINAL_STATES

    @property
    def completed_rounds(self) -> list[dict[str, Any]]:
        """Rounds whose combine finished (a round item exists as soon as one worker registers)."""
        return [item for item in self.rounds if item.get("completed_at")]

    @property
    def total_rounds(self) -> int:
        return int(self.run.get("total_rounds", 0)) if self.run else 0

    @property
    def total_epochs(self) -> int:
        if not self.run:
            return 0
        rounds_per_epoch = max(1, int(self.run.get("rounds_per_epoch", 1)))
        return max(1, self.total_rounds // rounds_per_epoch)

    @property
    def epochs_done(self) -> int:
        return int(self.run.get("epochsdone", 0)) if self.run else 0

    def latest(self, key: str) -> float | None:
        """The newest value of ``key`` among completed rounds (test metrics exist only on evaluated rounds)."""
        for item in reversed(self.completed_rounds):
            if item.get(key) is not None:
                return float(item[key])
        return None


def read_snapshot(status: coordination.StatusTable, run_id: str) -> Snapshot:
    run = status.get_run_item(run_id)
    return Snapshot(run_id, run, status.list_rounds(run_id) if run else [])


class ProgressBar:
    """A tqdm bar over rounds on a terminal; elsewhere (CI logs, pipes) one line whenever the figures change.

    Shown: rounds done, the epoch, the last training loss and the last test accuracy, and the state if it is
    not RUNNING.
    """

    def __init__(self, run_id: str, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.run_id = run_id
        self.stream = stream or sys.stderr
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self._bar: tqdm | None = None
        self._last_line = ""

    def update(self, snapshot: Snapshot) -> None:
        if snapshot.run is None:
            return
        figures = self._figures(snapshot)
        done = len(snapshot.completed_rounds)
        if not self.interactive:
            line = f"{self.run_id}: round {done}/{snapshot.total_rounds} " + " ".join(
                f"{key}={value}" for key, value in figures.items()
            )
            if line != self._last_line:
                self.write(line)
                self._last_line = line
            return
        if self._bar is None:
            self._bar = tqdm(
                total=snapshot.total_rounds,
                desc=self.run_id,
                unit="round",
                file=self.stream,
                dynamic_ncols=True,
            )
        self._bar.n = done
        self._bar.set_postfix(figures, refresh=False)
        self._bar.refresh()

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly when there is none)."""
        if self._bar is not None:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def _figures(snapshot: Snapshot) -> dict[str, str]:
        figures = {"epoch": f"{snapshot.epochs_done}/{snapshot.total_epochs}"}
        loss = snapshot.latest("train_loss")
        accuracy = snapshot.latest("test_accuracy")
        if loss is not None:
            figures["loss"] = f"{loss:.3f}"
        if accuracy is not None:
            figures["test_acc"] = f"{accuracy:.1%}"
        if snapshot.state != coordination.RUNNING:
            figures["state"] = str(snapshot.state)
        return figures


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass(frozen=True)
class Summary:
    run_id: str
    state: str | None
    reason: str | None
    rounds_done: int
    total_rounds: int
    epochs_done: int
    test_accuracy: float | None
    test_loss: float | None
    wall_time_s: float
    phase_seconds: dict[str, float]
    final_model: str | None


def summarize(snapshot: Snapshot, wall_time_s: float) -> Summary:
    """Final figures: accuracy from the run item (else the last evaluated round) and seconds per phase."""
    run = snapshot.run or {}
    phase_seconds: collections.Counter[str] = (
        collections.Counter()
    )  # phases in the order the trainer wrote them
    for item in snapshot.completed_rounds:
        for phase, seconds in (item.get("duration_s") or {}).items():
            phase_seconds[phase] += float(seconds)
    accuracy = run.get("test_accuracy")
    loss = run.get("test_loss")
    return Summary(
        run_id=snapshot.run_id,
        state=snapshot.state,
        reason=run.get("reason"),
        rounds_done=len(snapshot.completed_rounds),
        total_rounds=snapshot.total_rounds,
        epochs_done=snapshot.epochs_done,
        test_accuracy=float(accuracy) if accuracy is not None else snapshot.latest("test_accuracy"),
        test_loss=float(loss) if loss is not None else snapshot.latest("test_loss"),
        wall_time_s=wall_time_s,
        phase_seconds=dict(phase_seconds),
        final_model=run.get("final_model") if snapshot.state == coordination.SUCCEEDED else None,
    )


def format_summary(summary: Summary) -> str:
    lines = [
        f"run {summary.run_id}: {summary.state or 'NOT STARTED'} in {format_duration(summary.wall_time_s)} "
        f"({summary.rounds_done}/{summary.total_rounds} rounds, {summary.epochs_done} epochs)"
    ]
    if summary.reason:
        lines.append(f"  reason          {summary.reason}")
    if summary.test_accuracy is not None:
        loss = f" (test loss {summary.test_loss:.3f})" if summary.test_loss is not None else ""
        lines.append(f"  test accuracy   {summary.test_accuracy:.1%}{loss}")
    if summary.phase_seconds:
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in summary.phase_seconds.items())
        lines.append(f"  time per phase  {phases}")
    if summary.final_model:
        lines.append(f"  final model     {summary.final_model}")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
