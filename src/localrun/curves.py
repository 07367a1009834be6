"""Learning curves of a run from its round items (:class:`trainer.coordination.RoundMetrics`): training loss and
test accuracy against the round and against wall time, as a PNG (matplotlib) and a CSV of the same numbers."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localrun.errors import OperatorError
from localrun.outputs import atomic_output
from trainer import coordination

CSV_FIELDS = ("round", "epoch", "wall_s", "train_loss", "test_loss", "test_accuracy")


@dataclass(frozen=True)
class CurvePoint:
    round_index: int  # 1-based: the point after this many rounds
    epoch: int
    wall_s: float  # from the run's creation to the round's commit
    train_loss: float
    test_loss: float | None
    test_accuracy: float | None


def curve_points(run: coordination.RunStatus, rounds: Sequence[coordination.RoundRecord]) -> list[CurvePoint]:
    """One point per committed round, in order; an error if none is committed yet."""
    created = dt.datetime.fromisoformat(run.created_at) if run.created_at else None
    points = []
    for record in rounds:
        metrics = record.metrics
        if not record.completed or metrics is None:
            continue
        completed = dt.datetime.fromisoformat(record.completed_at) if record.completed_at else None
        wall_s = (completed - created).total_seconds() if created and completed else float("nan")
        points.append(
            CurvePoint(
                record.round_index + 1,
                int(metrics.epochs_done),
                wall_s,
                float(metrics.train_loss),
                None if metrics.test_loss is None else float(metrics.test_loss),
                None if metrics.test_accuracy is None else float(metrics.test_accuracy),
            )
        )
    if not points:
        raise OperatorError(f"run {run.run_id} has no committed round yet; nothing to plot")
    return points


def write_csv(points: Sequence[CurvePoint], path: Path) -> None:
    with atomic_output(path) as temporary, temporary.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        for point in points:
            writer.writerow(
                [
                    point.round_index,
                    point.epoch,
                    f"{point.wall_s:.0f}",
                    f"{point.train_loss:.6g}",
                    "" if point.test_loss is None else f"{point.test_loss:.6g}",
                    "" if point.test_accuracy is None else f"{point.test_accuracy:.6g}",
                ]
            )


def plot(points: Sequence[CurvePoint], path: Path, title: str) -> None:
    """Two panels, against rounds and against wall time: training loss (left axis), test accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot

    figure, panels = pyplot.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    evaluated = [point for point in points if point.test_accuracy is not None]
    axes = (
        ("round", [p.round_index for p in points], [p.round_index for p in evaluated]),
        ("wall time (minutes)", [p.wall_s / 60 for p in points], [p.wall_s / 60 for p in evaluated]),
    )
    for panel, (label, x_loss, x_accuracy) in zip(panels, axes, strict=True):
        panel.plot(x_loss, [p.train_loss for p in points], "o-", color="tab:blue", label="train loss")
        panel.set_xlabel(label)
        panel.set_ylabel("training loss", color="tab:blue")
        accuracy = panel.twinx()
        accuracy.plot(
            x_accuracy,
            [100 * p.test_accuracy for p in evaluated],
            "s-",
            color="tab:orange",
            label="test accuracy",
        )
        accuracy.set_ylabel("test accuracy (%)", color="tab:orange")
        accuracy.set_ylim(0, 100)
        panel.grid(alpha=0.3)
    figure.suptitle(title)
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        pyplot.close(figure)
