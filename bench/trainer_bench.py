"""Benchmarks of the trainer inside its handler (issue: training protocol, performance).

Measures, in one process so that ratios share the machine's noise:

- ``throughput``: examples/s of a worker invocation's training loop (reading, augmenting and training each
  batch through the real handler) against a bare ``model.train_on_batch`` loop on ready float32 batches, same model
  and batch, alternating A/B/A/B.
- ``overhead``: per-round costs outside training (worker: weights + shard load, update write, DynamoDB
  registration; combine: reading updates, averaging, writing weights), cold (first invocation, model built) and
  warm, as a fraction of a default-configuration round's compute (its steps x the measured step time).
- ``memory``: peak RSS of a process that runs worker invocations (run it alone: ``memory`` in a fresh process).

Usage::

    .venv/bin/python bench/trainer_bench.py throughput --width 1.0 --batch-size 128 --steps 6
    .venv/bin/python bench/trainer_bench.py overhead --width 1.0 --batch-size 128 --steps 4
    .venv/bin/python bench/trainer_bench.py memory --width 1.0 --batch-size 128 --steps 3

Data: ``--efs-root`` with a prepared ``datasets/cifar10`` (``make preprocess``), or the tests' synthetic dataset
(:mod:`prep.synthetic`) at CIFAR-10's size, 50,000 + 10,000 images (the default; throughput does not depend on
pixel values).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src" / "handler"), str(REPO / "src")]
os.environ.setdefault("LOG_LEVEL", "WARNING")  # the handler's JSON logs would drown the result

from trainer import config as trainer_config  # noqa: E402

trainer_config.set_tensorflow_defaults()  # before TensorFlow is imported, as the handler does

import numpy as np  # noqa: E402

from localrun import environment, runtime, settings  # noqa: E402
from prep import synthetic  # noqa: E402


class Context:
    aws_request_id = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


class Bench:
    """The real handler, in this process, configured as Lambda would configure it: a status table in DynamoDB
    Local, an EFS folder, and its own invocations sent through the local Invoke API to a no-op function
    (``bench/sink.py``), so that they cost what an asynchronous ``Invoke`` costs but run nothing."""

    def __init__(self, efs_root: Path, local: runtime.LocalRuntime) -> None:
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
                extra={"SAFETY_MARGIN_S": "30"},
            )
        )
        import app
        from trainer.coordination import StatusTable
        from trainer.efs_layout import EfsLayout

        self.app = app
        self.local = local
        self.efs_root = efs_root
        self.layout = EfsLayout(efs_root)
        self.status = StatusTable(local.table)

    def start(self, **config: Any) -> str:
        run_id = f"b{uuid.uuid4().hex[:8]}"
        self.app.lambda_handler({"start": True, "run": run_id, **config}, Context())
        self.local.function.wait_idle(60.0)  # its worker events reach the sink before anything is measured
        return run_id

    def worker(self, run_id: str, worker: int, workers: int) -> tuple[float, dict[str, Any]]:
        """Wall seconds of one worker invocation, and its update's metadata."""
        from trainer.efs_layout import load_arrays

        event = {"workerno": worker, "workers": workers, "epochsdone": 0, "run": run_id, "round": 0}
        began = time.perf_counter()
        self.app.lambda_handler(event, Context())
        wall = time.perf_counter() - began
        _, meta = load_arrays(self.layout.update_path(run_id, 0, worker))
        return wall, meta

    def combine(self, run_id: str, workers: int) -> tuple[float, Any]:
        """Wall seconds of the round's combine, and what it measured (a ``RoundMetrics``)."""
        event = {"combine": True, "workers": workers, "epochsdone": 0, "run": run_id, "round": 0}
        began = time.perf_counter()
        self.app.lambda_handler(event, Context())
        wall = time.perf_counter() - began
        self.local.function.wait_idle(60.0)
        return wall, self.status.list_rounds(run_id)[0].metrics

    def warm_model(self, config: dict[str, Any]) -> Any:
        """The model a warm container holds for ``config`` (built now if it holds none)."""
        from trainer import services
        from trainer.config import TrainConfig

        return services.model_for(TrainConfig.from_mapping(config), self.efs_root)

    def evict_model(self) -> None:
        """Make the next worker a cold one: a new container starts without the model."""
        from trainer import services

        services.clear_warm_caches()


def bare_loop(model: Any, batch_size: int, steps: int) -> float:
    """examples/s of ``train_on_batch`` on ready float32 batches (the first, tracing step excluded)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)  # the dtype the handler feeds: no retracing
    model.train_on_batch(x, y)
    began = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - began)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": "vgg19_bn", "width": args.width, "batch_size": args.batch_size, "augment": True}


def run_throughput(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    config = {**model_config(args), "workers": 2, "epochs": 1, "local_steps": args.steps + 1}
    run_id = bench.start(**config)
    bench.worker(run_id, 0, 2)  # warm the handler's model (tracing) before measuring
    model = bench.warm_model(config)
    handler, bare = [], []
    for _ in range(args.repeats):
        run_id = bench.start(**config)
        _, meta = bench.worker(run_id, 0, 2)
        handler.append(meta["samples"] / meta["compute_s"])
        bare.append(bare_loop(model, args.batch_size, args.steps + 1))
    return {
        "handler_examples_per_s": [round(value, 1) for value in handler],
        "bare_examples_per_s": [round(value, 1) for value in bare],
        "ratio_median": round(statistics.median(h / b for h, b in zip(handler, bare, strict=True)), 3),
    }


def run_overhead(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    from trainer.config import TrainConfig
    from trainer.schedule import Schedule

    workers = args.workers
    config = {**model_config(args), "workers": workers, "epochs": 1, "local_steps": args.steps}
    results = {}
    for label in ("cold", "warm"):
        run_id = bench.start(**config)  # the first start builds the model: the worker after it is warm
        if label == "cold":
            bench.evict_model()  # a new container: the worker must build the model
        walls, metas = zip(*(bench.worker(run_id, worker, workers) for worker in range(workers)), strict=True)
        combine_wall, round_metrics = bench.combine(run_id, workers)
        step_s = statistics.median(meta["compute_s"] / meta["steps"] for meta in metas)
        overheads = [wall - meta["compute_s"] for wall, meta in zip(walls, metas, strict=True)]
        # cold: the first worker after the cache was cleared builds the model; warm: the median worker
        worker_overhead = overheads[0] if label == "cold" else statistics.median(overheads)
        combine_overhead = combine_wall - round_metrics.duration_s.get("eval", 0.0)
        default = Schedule(TrainConfig(workers=workers, batch_size=args.batch_size), num_train=50_000)
        round_compute_s = default.steps(len(default.worker_indices(0, 0))) * step_s
        results[label] = {
            "step_s": round(step_s, 3),
            "worker_overhead_s": round(worker_overhead, 3),
            "worker_load_s": round(statistics.median(meta["load_s"] for meta in metas), 3),
            "combine_overhead_s": round(combine_overhead, 3),
            "update_bytes": int(round_metrics.bytes_read / (workers + 1)),
            "default_round_compute_s": round(round_compute_s, 1),
            "overhead_fraction": round((worker_overhead + combine_overhead) / round_compute_s, 4),
        }
    return results


def run_memory(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    config = {**model_config(args), "workers": 2, "epochs": 1, "local_steps": args.steps}
    for _ in range(2):
        run_id = bench.start(**config)
        bench.worker(run_id, 0, 2)
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=("throughput", "overhead", "memory"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="training steps per measured invocation")
    parser.add_argument("--repeats", type=int, default=2, help="A/B repetitions (throughput)")
    parser.add_argument(
        "--workers", type=int, default=4, help="workers of the default configuration (overhead)"
    )
    parser.add_argument(
        "--efs-root", type=Path, help="an EFS root with datasets/cifar10 (default: synthetic)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lambdatrain-bench-") as scratch:
        efs_root = args.efs_root or Path(scratch)
        if args.efs_root is None:
            synthetic.write_synthetic_dataset(efs_root / "datasets" / "cifar10", 50_000, 10_000)
        sink = settings.FunctionSettings(handler="sink.lambda_handler", code_dir=REPO / "bench")
        with runtime.LocalRuntime(sink, efs_root=efs_root, template_path=REPO / "template.yaml") as local:
            bench = Bench(efs_root, local)
            measure = {"throughput": run_throughput, "overhead": run_overhead, "memory": run_memory}[
                args.measure
            ]
            began = time.perf_counter()
            result = measure(bench, args)
    print(
        json.dumps(
            {
                "measure": args.measure,
                **vars(args),
                "efs_root": str(args.efs_root),
                **result,
                "seconds": round(time.perf_counter() - began, 1),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
