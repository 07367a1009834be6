"""Convergence harness: N simulated workers trained by the trainer's own handler in one process.

Every event goes through ``app.handle`` — the start, each worker's share of each round, each combine — with the
same flows, files and DynamoDB items as a deployed run; only the transport differs: the handler's asynchronous
invocations land in a queue that this process drains in order, and the status table lives in an in-memory
DynamoDB Local. One warm model serves every simulated worker (as one warm container would), so a run of
N = 16 costs about what N = 1 costs: the same images are trained, in 16 shares.

Per-epoch test accuracy comes from the round items the combine commits (``RoundMetrics``), so the curve is the
one ``lambdatrain status`` shows for a real run.

Usage::

    # one configuration, N = 1, 4, 16, three seeds; results appended to bench/convergence/results.jsonl
    .venv/bin/python bench/convergence.py run --efs-root /work/bench-efs --label defaults \\
        --workers 1 4 16 --seeds 0 1 2 --set width=0.125 epochs=10
    # the table (mean and spread over seeds) and the accuracy-vs-epoch plot of what has been recorded
    .venv/bin/python bench/convergence.py report --png bench/convergence/accuracy.png

``--efs-root`` needs a prepared dataset in ``datasets/cifar10`` (``make preprocess DATA_DIR=<root>/datasets/cifar10``).
With ``KERAS_BACKEND=torch`` (and the ``keras`` wheel) the same harness runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src" / "handler"), str(REPO / "src")]
os.environ.setdefault("LOG_LEVEL", "WARNING")  # the handler's JSON logs would drown the progress lines

from trainer import config as trainer_config  # noqa: E402

trainer_config.set_tensorflow_defaults()  # before TensorFlow is imported, as the handler does

DEFAULT_RESULTS = REPO / "bench" / "convergence" / "results.jsonl"


class Context:
    """Lambda's context as the handler reads it; no deadline, so no share is ever continued."""

    def __init__(self) -> None:
        self.aws_request_id = str(uuid.uuid4())

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


class QueueInvoker:
    """The handler's asynchronous invocations, kept in order for :func:`train` to deliver."""

    def __init__(self) -> None:
        self.queue: collections.deque[dict[str, Any]] = collections.deque()

    def invoke_async(self, payloads: Sequence[dict[str, Any]]) -> None:
        self.queue.extend(payloads)


@contextmanager
def status_tables() -> Iterator[Any]:
    """A function that makes a fresh status table (the template's schema) in one in-memory DynamoDB Local."""
    from localrun import dynamodb_local, environment

    for name in environment.UNSET_FOR_HANDLER:
        os.environ.pop(name, None)
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": environment.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": environment.SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": environment.REGION,
        }
    )
    with dynamodb_local.DynamoDBLocal() as database:
        os.environ["AWS_ENDPOINT_URL_DYNAMODB"] = database.endpoint_url

        def new_table() -> Any:
            name = f"convergence-{uuid.uuid4().hex[:8]}"
            dynamodb_local.create_table(database.client(), name)
            return database.resource().Table(name)

        yield new_table


@dataclasses.dataclass
class Result:
    label: str
    workers: int
    seed: int
    config: dict[str, Any]  # the run's full TrainConfig, as the start handler stored it
    curve: list[dict[str, Any]]  # per evaluated round: round, epochs (fractional), test_accuracy, ...
    final_accuracy: float
    rounds: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    img_per_s: float  # training images per second of wall time (the whole run, evaluation included)
    commit: str
    host: str
    started: str


def train(event: dict[str, Any], efs_root: Path, table: Any, label: str, progress: bool = True) -> Result:
    """Run one start event to its end through ``app.handle``; the run's curve from its round items."""
    import app
    from trainer.coordination import SUCCEEDED, StatusTable
    from trainer.efs_layout import EfsLayout
    from trainer.services import Services

    environment = trainer_config.load(
        {"STATUS_TABLE": table.name, "EFS_ROOT": str(efs_root), "SAFETY_MARGIN_S": "0"}
    )
    invoker = QueueInvoker()
    status = StatusTable(table)
    services = Services(layout=EfsLayout(efs_root), status=status, invoker=invoker, environment=environment)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    began = time.perf_counter()
    wall_at: dict[int, float] = {}
    result = app.handle(event, Context(), services)
    run_id = result["run"]
    while invoker.queue:
        payload = invoker.queue.popleft()
        outcome = app.handle(payload, Context(), services)
        if outcome.get("status") == "combined":
            wall_at[outcome["round"]] = time.perf_counter() - began
            if progress and "test_accuracy" in outcome:
                print(
                    f"  [{label} N={event.get('workers')} seed={event.get('seed', 0)}] round "
                    f"{outcome['round']}: test accuracy {outcome['test_accuracy']:.4f} "
                    f"({wall_at[outcome['round']]:.0f} s)",
                    flush=True,
                )
    wall_s = time.perf_counter() - began
    run = status.get_run(run_id)
    if run is None or run.state != SUCCEEDED:
        raise SystemExit(f"run {run_id} ended {run.state if run else 'without an item'}: {run}")
    rounds = status.list_rounds(run_id)
    per_epoch = run.schedule.rounds_per_epoch
    curve = [
        {
            "round": record.round_index,
            "epochs": (record.round_index + 1) / per_epoch,
            "test_accuracy": record.metrics.test_accuracy,
            "test_loss": record.metrics.test_loss,
            "train_loss": record.metrics.train_loss,
            "wall_s": round(wall_at.get(record.round_index, float("nan")), 2),
        }
        for record in rounds
        if record.metrics is not None and record.metrics.test_accuracy is not None
    ]
    images = run.num_train * run.config.epochs
    return Result(
        label=label,
        workers=run.config.workers,
        seed=run.config.seed,
        config=run.config.to_dict(),
        curve=curve,
        final_accuracy=curve[-1]["test_accuracy"],
        rounds=len(rounds),
        bytes_read=sum(record.metrics.bytes_read for record in rounds if record.metrics),
        bytes_written=sum(record.metrics.bytes_written for record in rounds if record.metrics),
        wall_s=round(wall_s, 1),
        img_per_s=round(images / wall_s, 1),
        commit=CODE_COMMIT,
        host=os.uname().nodename,
        started=started,
    )


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CODE_COMMIT = _commit()  # at import, when the trainer's modules are read: the code a run trains with


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON (``lr=0.05``, ``augment=false``, ``preset="paper"``) or strings."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def append_result(path: Path, result: Result) -> None:
    """Append one JSON line (one ``write`` of a whole line: a killed run leaves no partial record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dataclasses.asdict(result)) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def command_run(args: argparse.Namespace) -> int:
    settings = parse_settings(args.set)
    efs_root = Path(args.efs_root).resolve()
    if not (efs_root / "datasets" / settings.get("dataset", "cifar10")).is_dir():
        raise SystemExit(
            f"{efs_root}/datasets/{settings.get('dataset', 'cifar10')} does not exist; see --help"
        )
    with status_tables() as new_table:
        for workers in args.workers:
            for seed in args.seeds:
                event = {"start": True, "run": f"conv-{uuid.uuid4().hex[:8]}", **settings}
                event.update(workers=workers, seed=seed)
                result = train(event, efs_root, new_table(), args.label)
                append_result(Path(args.results), result)
                print(
                    f"{args.label} N={workers} seed={seed}: {result.final_accuracy:.4f} after {result.rounds} "
                    f"rounds, {result.wall_s:.0f} s ({result.img_per_s:.0f} img/s)",
                    flush=True,
                )
    return 0


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `convergence.py run` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


FULL_WIDTH_MODEL_BYTES = 80_204_365  # vgg19_bn at width 1 as an .npz (bench/RESULTS.md, "Scale")


def efs_bytes_per_round(config: dict[str, Any], model_bytes: int = FULL_WIDTH_MODEL_BYTES) -> float:
    """EFS bytes one round moves for this configuration at full width: each worker reads the weights (and its
    kept optimizer state) and writes its update (and its next kept state); the averaging reads every update and
    the weights (and the outer momentum) and writes the next weights (and momentum)."""
    workers = config["workers"]
    update = model_bytes * (0.5 if config.get("update_dtype") == "float16" else 1.0)
    kept = model_bytes if config.get("local_optimizer", "reset") == "keep" else 0.0
    outer = model_bytes if config.get("outer_momentum", 0.0) > 0 else 0.0
    worker_bytes = workers * (model_bytes + update + 2 * kept)
    averaging_bytes = workers * update + 2 * model_bytes + 2 * outer
    return worker_bytes + averaging_bytes


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (label, workers): mean and spread (min-max) of the final accuracy over seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for result in results:
        groups[(result["label"], result["workers"])].append(result)
    rows = []
    for (label, workers), group in groups.items():
        finals = [result["final_accuracy"] for result in group]
        rows.append(
            {
                "label": label,
                "workers": workers,
                "seeds": sorted(result["seed"] for result in group),
                "epochs": group[0]["config"]["epochs"],
                "mean": statistics.fmean(finals),
                "spread": max(finals) - min(finals),
                "low": min(finals),
                "high": max(finals),
                "rounds": group[0]["rounds"],
                "efs_gb_full_width": group[0]["rounds"] * efs_bytes_per_round(group[0]["config"]) / 1e9,
                "wall_s": statistics.fmean(result["wall_s"] for result in group),
            }
        )
    return rows


def command_report(args: argparse.Namespace) -> int:
    results = load_results(Path(args.results))
    if args.labels:
        results = [result for result in results if result["label"] in args.labels]
    rows = summarize(results)
    print(
        "| configuration | N | seeds | epochs | final test accuracy: mean (min-max) | rounds "
        "| EFS GB per run at width 1 | harness wall s |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|")
    for row in rows:
        seeds = ",".join(str(seed) for seed in row["seeds"])
        accuracy = f"{100 * row['mean']:.1f} %"
        if len(row["seeds"]) > 1:
            accuracy += f" ({100 * row['low']:.1f}-{100 * row['high']:.1f})"
        print(
            f"| {row['label']} | {row['workers']} | {seeds} | {row['epochs']} | {accuracy} | {row['rounds']} "
            f"| {row['efs_gb_full_width']:.0f} | {row['wall_s']:.0f} |"
        )
    if args.png:
        plot(results, Path(args.png))
        print(f"wrote {args.png}")
    return 0


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy against epoch, one line per (label, N): the mean over seeds, the band min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple[str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for result in results:
        groups[(result["label"], result["workers"])].append(result)
    figure, axis = plt.subplots(figsize=(8, 5))
    for (label, workers), group in sorted(groups.items()):
        epochs = [point["epochs"] for point in group[0]["curve"]]
        curves = np.array([[point["test_accuracy"] for point in result["curve"]] for result in group]) * 100
        (line,) = axis.plot(epochs, curves.mean(axis=0), marker="o", ms=3, label=f"{label}, N={workers}")
        if len(group) > 1:
            axis.fill_between(
                epochs, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2
            )
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("CIFAR-10, vgg19_bn: N simulated workers through the trainer's handler")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON-lines results file")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train configurations and append their results")
    run.add_argument("--efs-root", required=True, help="holds datasets/<dataset> (make preprocess)")
    run.add_argument("--label", required=True, help="name of this configuration in the results")
    run.add_argument("--workers", type=int, nargs="+", default=[1])
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="start-event keys")
    report = commands.add_parser("report", help="print the table and draw the plot of recorded results")
    report.add_argument("--labels", nargs="*", help="only these configurations")
    report.add_argument("--png", help="accuracy-vs-epoch plot")
    args = parser.parse_args(argv)
    return command_run(args) if args.command == "run" else command_report(args)


if __name__ == "__main__":
    sys.exit(main())
