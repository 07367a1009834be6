"""Scale benchmark (issue 11): the round's averaging against the worker count, and the paper's Fig. 5 redrawn.

``measure``: for each worker count N, a run whose round 0 is complete (N full-width update files on disk, every
worker registered) is averaged through the real handler, each invocation in a fresh process
(``python bench/scale_bench.py invoke EVENT``): once by one combine (``reducers`` 1) and once by the sharded
reduce (``reducers`` = the automatic count, at least 2), whose reducers run one after another, the last one
committing. Each invocation reports its wall time (the handler call, not the interpreter's start), its peak RSS
(``VmHWM``) and, from the round item, the bytes every phase read. Update deltas are synthetic (float32 noise);
``--distinct`` different files are written per run and hard-linked to reach N (the combine reads each link in
full, but the page cache serves repeated reads: this host's reads are memory-speed, EFS's are modelled below).

``model``: time per epoch against workers 1-64 from measured components and AWS's published limits (the
assumptions are printed, stored beside the plot and listed in ``bench/RESULTS.md``), first for the paper's
configuration (it must put the knee near 17 workers with 33 about as slow as 8), then for this project with one
combine and with the sharded reduce. Writes a PNG.

Usage::

    PYTHONPATH=src/handler:src .venv/bin/python bench/scale_bench.py measure --workers 4 16 32 64 256 \\
        --out bench/scale_results.json
    PYTHONPATH=src/handler:src .venv/bin/python bench/scale_bench.py model --results bench/scale_results.json \\
        --png bench/fig5_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src" / "handler"), str(REPO / "src")]
os.environ.setdefault("LOG_LEVEL", "WARNING")

from trainer import config as trainer_config  # noqa: E402

trainer_config.set_tensorflow_defaults()

MIB = 2**20


class Context:
    aws_request_id = "scale-bench"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


# --- one invocation in a fresh process ---------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries that across ``exec`` from the
    forking parent, whose own peak (the benchmark's model and files) it would report."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def run_invoke(event_json: str) -> int:
    """The child: import the handler (as a cold container does), then time one invocation."""
    import app

    imported_rss = peak_rss_mib()
    began = time.perf_counter()
    result = app.lambda_handler(json.loads(event_json), Context())
    wall = time.perf_counter() - began
    peak = peak_rss_mib()
    print(
        json.dumps({"wall_s": wall, "peak_rss_mib": peak, "import_rss_mib": imported_rss, "result": result})
    )
    return 0


def invoke_fresh(event: dict[str, Any]) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, __file__, "invoke", json.dumps(event)], capture_output=True, text=True, check=False
    )
    if child.returncode != 0:
        raise RuntimeError(f"invocation {event} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# --- measure -------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> int:
    import numpy as np

    from localrun import environment, runtime, settings
    from trainer import models, sharding
    from trainer.config import TrainConfig
    from trainer.coordination import INITIAL_TOKEN, RunStatus, StatusTable
    from trainer.efs_layout import EfsLayout, save_arrays

    results: dict[str, Any] = {"workers": args.workers, "distinct": args.distinct, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lambdatrain-scale-", dir=args.scratch) as scratch:
        efs_root = Path(scratch)
        sink = settings.FunctionSettings(handler="sink.lambda_handler", code_dir=REPO / "bench")
        with runtime.LocalRuntime(sink, efs_root=efs_root, template_path=REPO / "template.yaml") as local:
            for name in environment.UNSET_FOR_HANDLER:
                os.environ.pop(name, None)
            os.environ.update(
                environment.handler_environment(
                    function_name=local.settings.name,
                    efs_root=efs_root,
                    status_table=local.table_name,
                    lambda_endpoint_url=local.lambda_endpoint_url,
                    dynamodb_endpoint_url=local.dynamodb_endpoint_url,
                    memory_mb=local.settings.memory_mb,
                    log_level=os.environ["LOG_LEVEL"],
                    extra={},
                )
            )
            status, layout = StatusTable(local.table), EfsLayout(efs_root)
            model = models.build_model(TrainConfig(width=args.width), efs_root)
            weights = model.get_weights()
            trainable = models.trainable_mask(model)
            parameters = sum(int(weight.size) for weight in weights)
            del model
            results["parameters"] = parameters
            rng = np.random.default_rng(0)
            for workers in args.workers:
                for mode in ("single", "sharded"):
                    auto = sharding.reducer_count(0, workers, parameters, 4)
                    reducers = 1 if mode == "single" else max(2, auto)
                    cfg = TrainConfig(
                        workers=workers, width=args.width, epochs=1, rounds_per_epoch=2, reducers=reducers
                    )
                    run = RunStatus.new(f"s{workers}-{mode}", cfg, 50_000, parameters=parameters)
                    status.create_run(run)
                    save_arrays(layout.weights_path(run.run_id, 0, INITIAL_TOKEN), weights, {"round": 0})
                    write_updates(layout, run, weights, trainable, args.distinct, rng)
                    for worker in range(workers):
                        status.register_worker(run.run_id, 0, worker)
                    status.claim_combine(run.run_id, 0, run.generation, workers - 1, 1)
                    measured = average_round(run, status)
                    measured.update(mode=mode, workers=workers, reducers=reducers, auto_reducers=auto)
                    print(json.dumps(measured), flush=True)
                    results["runs"].append(measured)
                    local.function.wait_idle(120.0)
                    subprocess.run(["rm", "-rf", str(layout.run_dir(run.run_id))], check=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def write_updates(layout: Any, run: Any, weights: list, trainable: list, distinct: int, rng: Any) -> None:
    """``distinct`` synthetic updates in the format the run's workers write, hard-linked up to its N."""
    import numpy as np

    from trainer import sharding
    from trainer.efs_layout import save_arrays

    samples = run.num_train // run.config.workers
    for worker in range(min(distinct, run.config.workers)):
        update = [
            (rng.standard_normal(weight.shape, dtype=np.float32) * 1e-3) if keep else weight
            for weight, keep in zip(weights, trainable, strict=True)
        ]
        arrays, layout_meta = sharding.encode_update(update, trainable, run.reducers)
        meta = {
            "worker": worker,
            "round": 0,
            "samples": samples,
            "mean_loss": 2.0,
            "steps": 1,
            "compute_s": 1.0,
            "load_s": 0.1,
            "bytes_read": int(sum(weight.nbytes for weight in weights)),
            "bytes_written": int(sum(array.nbytes for array in update)),
            **layout_meta,
        }
        save_arrays(layout.update_path(run.run_id, 0, worker), arrays, meta)
    for worker in range(distinct, run.config.workers):
        os.link(
            layout.update_path(run.run_id, 0, worker % distinct), layout.update_path(run.run_id, 0, worker)
        )


def average_round(run: Any, status: Any) -> dict[str, Any]:
    """Average round 0 through the handler, each invocation in a fresh process."""
    from trainer.protocol import CombineEvent, ReduceEvent

    if run.reducers == 1:
        events = [CombineEvent(run.run_id, 0, run.config.workers, 0, instance=run.instance).to_wire()]
    else:
        events = [
            ReduceEvent(
                run.run_id, 0, k, run.reducers, run.config.workers, 0, instance=run.instance
            ).to_wire()
            for k in range(run.reducers)
        ]
    invocations = [invoke_fresh(event) for event in events]
    record = status.get_round(run.run_id, 0)
    if record is None or not record.completed or record.metrics is None:
        raise RuntimeError(f"round 0 of {run.run_id} was not committed: {invocations[-1]}")
    return {
        "invocations": [
            {key: invocation[key] for key in ("wall_s", "peak_rss_mib", "import_rss_mib")}
            for invocation in invocations
        ],
        "status": [invocation["result"].get("status") for invocation in invocations],
        "phase_bytes_read": record.metrics.phase_bytes_read,
        "phase_bytes_written": record.metrics.phase_bytes_written,
        "duration_s": record.metrics.duration_s,
    }


# --- model ---------------------------------------------------------------------------------------------------

# Every number the model uses, with where it comes from (printed beside the plot).
HOST_IMAGES_PER_S = 80.0  # full-width vgg19_bn, batch 128, this 2-core host (bench/RESULTS.md, throughput)
HOST_VCPUS = 2
WORKER_OVERHEAD_S = 0.67  # per worker and round outside training, warm (bench/RESULTS.md, overhead)
LAMBDA_MB_PER_VCPU = 1769  # AWS Lambda docs, "Configuring function memory": 1,769 MB = one vCPU
EXAMPLES = 50_000  # CIFAR-10's training set
MODEL_MIB = 80_204_365 / MIB  # one full-width update (bench/RESULTS.md)
INVOKE_S = 0.1  # an asynchronous Invoke until the next phase starts (assumed; a few ms locally)

# EFS, from "Amazon EFS performance specifications" (docs.aws.amazon.com/efs/latest/ug/performance.html) and the
# knowledge-center article "efs-choosing-correct-throughput-mode": Bursting: every file system bursts to 100 MiB/s
# (small file systems get no more), per client 500 MiB/s. Elastic: per file system 20-60 GiB/s read and 1-5 GiB/s
# write (the lower bounds used), per client 1,500 MiB/s.
EFS = {
    "bursting": {"read_mibs": 100.0, "write_mibs": 100.0, "client_mibs": 500.0, "shared": True},
    "elastic": {"read_mibs": 20 * 1024.0, "write_mibs": 1024.0, "client_mibs": 1500.0, "shared": False},
}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``a + b x``."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def components(results: dict[str, Any]) -> dict[str, float]:
    """Per-update costs of averaging on this host, fitted over the measured N (page-cache reads: CPU-bound)."""
    single = [
        (run["workers"], run["invocations"][0]["wall_s"])
        for run in results["runs"]
        if run["mode"] == "single"
    ]
    reducer_points, commit_points = [], []
    for run in results["runs"]:
        if run["mode"] != "sharded":
            continue
        walls = [invocation["wall_s"] for invocation in run["invocations"]]
        per_reducer_updates = run["workers"] / run["reducers"]
        reducer_points.extend((per_reducer_updates, wall) for wall in walls[:-1])
        # The last reducer reduced its slice, then committed: its wall minus a typical reducer's.
        commit_points.append((run["workers"], walls[-1] - sorted(walls[:-1])[len(walls[:-1]) // 2]))
    combine_a, combine_b = fit_line(single)
    reducer_a, reducer_b = fit_line(reducer_points)
    commit = sorted(wall for _, wall in commit_points)[len(commit_points) // 2]
    return {
        "combine_fixed_s": combine_a,
        "combine_per_update_s": combine_b,
        "reducer_fixed_s": reducer_a,
        "reducer_per_full_update_s": reducer_b,
        "commit_s": commit,
    }


def epoch_time(workers: int, scenario: dict[str, Any], cost: dict[str, float], rounds: int = 1) -> float:
    """Modelled seconds per epoch for ``workers`` workers: the epoch's compute, plus ``rounds`` rounds' costs
    (the paper: one round per epoch). ``scenario["update"]``: an update's size in models (0.5 for float16);
    ``scenario["kept_state"]``: each worker also reads and writes its optimizer state (``local_optimizer`` keep,
    one float32 model's worth)."""
    efs = EFS[scenario["efs"]]
    rounds = scenario.get("rounds", rounds)
    update_mib = MODEL_MIB * scenario.get("update", 1.0)
    kept_mib = MODEL_MIB if scenario.get("kept_state") else 0.0
    vcpus = scenario["memory_mb"] / LAMBDA_MB_PER_VCPU
    compute = EXAMPLES / workers / (HOST_IMAGES_PER_S * vcpus / HOST_VCPUS)
    # Workers read the weights and write their updates at once: the file system's limits are shared.
    read_mib, write_mib = MODEL_MIB + kept_mib, update_mib + kept_mib
    worker_read = workers * read_mib / efs["read_mibs"] if efs["shared"] else read_mib / efs["client_mibs"]
    worker_read = max(worker_read, read_mib / efs["client_mibs"])
    worker_write = max(workers * write_mib / efs["write_mibs"], write_mib / efs["client_mibs"])
    workers_s = WORKER_OVERHEAD_S + worker_read + worker_write
    client = min(efs["client_mibs"], efs["read_mibs"])
    reducers = scenario.get("reducers", lambda n: 1)(workers)
    if reducers == 1:
        average = cost["combine_fixed_s"] + workers * (cost["combine_per_update_s"] + update_mib / client)
        average += MODEL_MIB / min(efs["client_mibs"], efs["write_mibs"])  # the next weights
        return compute + rounds * (workers_s + INVOKE_S + average)
    share_mib = workers * update_mib / reducers  # what one reducer reads
    parallel_read = max(share_mib / client, workers * update_mib / efs["read_mibs"])
    reducer = cost["reducer_fixed_s"] + workers / reducers * cost["reducer_per_full_update_s"] + parallel_read
    commit = cost["commit_s"] + 2 * MODEL_MIB / client  # read the slices, write the next weights
    return compute + rounds * (workers_s + 2 * INVOKE_S + reducer + commit)


def model(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from trainer import sharding

    results = json.loads(args.results.read_text())
    cost = components(results)
    parameters = int(results["parameters"])

    def auto(workers: int) -> int:  # what the trainer picks: one combine up to 6 workers at full width
        return sharding.reducer_count(0, workers, parameters, 4)

    scenarios = {
        "paper: one combine, 3,008 MB Lambda, EFS bursting": {"memory_mb": 3008, "efs": "bursting"},
        "this project today: one streaming combine, 10,240 MB, EFS elastic": {
            "memory_mb": 10240,
            "efs": "elastic",
        },
        "sharded reduce (reducers auto), 10,240 MB, EFS elastic": {
            "memory_mb": 10240,
            "efs": "elastic",
            "reducers": auto,
        },
    }
    # The accuracy study's defaults (issue 10): 4 rounds per epoch and each worker's kept optimizer state on EFS
    # (plotted dashed); with float16 updates and the other variants in scale_model.json and bench/RESULTS.md.
    defaults = {"memory_mb": 10240, "efs": "elastic", "reducers": auto, "rounds": 4, "kept_state": True}
    trained_defaults = {
        "defaults: sharded, 4 rounds/epoch, kept optimizer state": defaults,
        "defaults + float16 updates": {**defaults, "update": 0.5},
        "defaults without the kept state (local_optimizer reset)": {**defaults, "kept_state": False},
        "defaults at 2 rounds per epoch": {**defaults, "rounds": 2},
    }
    counts = list(range(1, 65))
    curves = {name: [epoch_time(n, scenario, cost) for n in counts] for name, scenario in scenarios.items()}
    paper = curves[next(iter(scenarios))]
    knee = counts[paper.index(min(paper))]
    report = {
        "components": cost,
        "paper_knee_workers": knee,
        "paper_t33_over_t8": paper[32] / paper[7],
        "knees": {name: counts[curve.index(min(curve))] for name, curve in curves.items()},
        "seconds_per_epoch": {
            name: {n: round(curve[n - 1], 1) for n in (1, 8, 17, 32, 33, 64)}
            for name, curve in curves.items()
        },
    }
    # The trainer's default since the accuracy study: 4 rounds per epoch (every per-round cost counts 4 times).
    report["knees_at_4_rounds_per_epoch"] = {
        name: min(counts, key=lambda n, s=scenario: epoch_time(n, s, cost, rounds=4))
        for name, scenario in scenarios.items()
    }
    report["seconds_per_epoch_at_4_rounds_per_epoch"] = {
        name: {n: round(epoch_time(n, scenario, cost, rounds=4), 1) for n in (1, 8, 17, 32, 64)}
        for name, scenario in scenarios.items()
    }
    report["defaults_of_the_accuracy_study"] = {
        name: {
            "knee_workers": min(counts, key=lambda n, s=scenario: epoch_time(n, s, cost)),
            "seconds_per_epoch": {n: round(epoch_time(n, scenario, cost), 1) for n in (1, 4, 8, 16, 32, 64)},
        }
        for name, scenario in trained_defaults.items()
    }
    print(json.dumps(report, indent=2))
    if not (14 <= knee <= 20 and 0.8 <= report["paper_t33_over_t8"] <= 1.25):
        print("error: the model does not reproduce the paper's curve; not plotting it", file=sys.stderr)
        return 1

    figure, axes = pyplot.subplots(figsize=(12, 6))
    for name, curve in curves.items():
        axes.plot(counts, [value / 60 for value in curve], label=name)
    # The accuracy defaults pay for their accuracy with rounds: drawn dashed, so the trade-off is on the plot.
    name = next(iter(trained_defaults))
    axes.plot(
        counts,
        [epoch_time(n, trained_defaults[name], cost) / 60 for n in counts],
        linestyle="--",
        label=f"the accuracy {name}",
    )
    axes.axvline(17, color="grey", linestyle=":", label="paper's reported knee (17 workers)")
    axes.set_xlabel("workers")
    axes.set_ylabel("minutes per epoch (modelled)")
    axes.set_yscale("log")
    axes.set_xlim(1, 64)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    assumptions = "\n".join(
        [
            "Assumptions (bench/RESULTS.md):",
            f"- compute: {HOST_IMAGES_PER_S:.0f} img/s on this {HOST_VCPUS}-core host,",
            f"  x vCPUs/{HOST_VCPUS}; vCPUs = MB/{LAMBDA_MB_PER_VCPU}",
            "  (Lambda docs: 1,769 MB = 1 vCPU)",
            f"- {EXAMPLES:,} images, 1 round per epoch (dashed: 4)",
            f"- worker overhead {WORKER_OVERHEAD_S} s, Invoke {INVOKE_S} s",
            f"- update = model = {MODEL_MIB:.1f} MiB (width 1)",
            "- EFS bursting: 100 MiB/s per file system,",
            "  500 MiB/s per client (AWS EFS docs)",
            "- EFS elastic: 20 GiB/s read, 1 GiB/s write",
            "  per file system, 1,500 MiB/s per client",
            f"- combine: {cost['combine_fixed_s']:.2f} s + {cost['combine_per_update_s']:.3f} s/update",
            f"- reducer: {cost['reducer_fixed_s']:.2f} s + {cost['reducer_per_full_update_s']:.3f} s/update",
            f"- commit: {cost['commit_s']:.2f} s (measured here)",
            "- reads at EFS speed on top (host reads",
            "  came from the page cache)",
        ]
    )
    figure.text(0.70, 0.5, assumptions, fontsize=7.5, va="center", family="monospace")
    figure.subplots_adjust(right=0.68)
    axes.set_title("Time per epoch vs workers: the paper's Fig. 5 redrawn from measured components")
    figure.savefig(args.png, dpi=120)
    args.results.with_name("scale_model.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    invoke = commands.add_parser("invoke", help="(internal) one invocation in this fresh process")
    invoke.add_argument("event")
    run = commands.add_parser("measure", help="combine and reducers at several worker counts")
    run.add_argument("--workers", type=int, nargs="+", default=[4, 16, 32, 64, 256])
    run.add_argument(
        "--distinct", type=int, default=4, help="different update files per run (others are links)"
    )
    run.add_argument("--width", type=float, default=1.0)
    run.add_argument(
        "--scratch", type=Path, default=None, help="where the EFS stand-in goes (default: $TMPDIR)"
    )
    run.add_argument("--out", type=Path, default=REPO / "bench" / "scale_results.json")
    plot = commands.add_parser("model", help="the modelled time per epoch, and its plot")
    plot.add_argument("--results", type=Path, default=REPO / "bench" / "scale_results.json")
    plot.add_argument("--png", type=Path, default=REPO / "bench" / "fig5_scale.png")
    args = parser.parse_args(argv)
    if args.command == "invoke":
        return run_invoke(args.event)
    if args.command == "measure":
        return measure(args)
    return model(args)


if __name__ == "__main__":
    raise SystemExit(main())
