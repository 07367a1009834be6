"""A run's progress, read from the status table the way an operator would read it, as a bar and a summary.

Only DynamoDB is read (through ``trainer.coordination``'s read helpers), never the runtime's internals, so
what the bar shows is what ``aws dynamodb query`` would show for a run in the cloud.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm

from trainer import coordination


@dataclass(frozen=True)
class Snapshot:
    """The run item and its round items at one moment."""

    run_id: str
    run: coordination.RunStatus | None
    rounds: list[coordination.RoundRecord] = field(default_factory=list)

    @property
    def state(self) -> str | None:
        return self.run.state if self.run else None

    @property
    def terminal(self) -> bool:
        return self.run is not None and self.run.terminal

    @property
    def completed_rounds(self) -> list[coordination.RoundRecord]:
        """Rounds whose combine finished (a round item exists as soon as one worker registers)."""
        return [record for record in self.rounds if record.completed]

    @property
    def total_rounds(self) -> int:
        return self.run.total_rounds if self.run else 0

    @property
    def total_epochs(self) -> int:
        return self.run.config.epochs if self.run else 0

    @property
    def epochs_done(self) -> int:
        """Epochs complete among the completed rounds read (not the run item's, which is read separately and
        may already count a round committed after the round items were read)."""
        if not self.run:
            return 0
        return min(self.run.config.epochs, len(self.completed_rounds) // self.run.schedule.rounds_per_epoch)

    def latest(self, metric: str) -> float | None:
        """The newest value of a :class:`~trainer.coordination.RoundMetrics` field among completed rounds (test
        metrics exist only on evaluated rounds)."""
        for record in reversed(self.completed_rounds):
            value = getattr(record.metrics, metric, None)
            if value is not None:
                return float(value)
        return None


def read_snapshot(status: coordination.StatusTable, run_id: str) -> Snapshot:
    run = status.get_run(run_id)
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
    phase_seconds: collections.Counter[str] = collections.Counter()  # in the order the trainer wrote them
    for record in snapshot.completed_rounds:
        for phase, seconds in (record.metrics.duration_s if record.metrics else {}).items():
            phase_seconds[phase] += float(seconds)
    run_summary = snapshot.run.summary if snapshot.run else coordination.RunSummary()
    accuracy, loss = run_summary.test_accuracy, run_summary.test_loss
    return Summary(
        run_id=snapshot.run_id,
        state=snapshot.state,
        reason=snapshot.run.reason if snapshot.run else None,
        rounds_done=len(snapshot.completed_rounds),
        total_rounds=snapshot.total_rounds,
        epochs_done=snapshot.epochs_done,
        test_accuracy=float(accuracy) if accuracy is not None else snapshot.latest("test_accuracy"),
        test_loss=float(loss) if loss is not None else snapshot.latest("test_loss"),
        wall_time_s=wall_time_s,
        phase_seconds=dict(phase_seconds),
        final_model=run_summary.final_model if snapshot.state == coordination.SUCCEEDED else None,
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
