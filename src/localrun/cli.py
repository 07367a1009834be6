"""``lambdatrain local``: train on this machine with the real handler and local stand-ins for Lambda, DynamoDB and EFS.

What it does, in order:

1. prepares CIFAR-10 under ``<efs-root>/datasets/cifar10`` if its ``manifest.json`` is missing (``--source``
   archive, else the official download);
2. starts DynamoDB Local (on disk under ``<state-dir>/dynamodb``, so a run can be resumed) and creates the
   status table from ``template.yaml`` if it is missing;
3. starts the local Invoke API and the worker pool, and sends the start event as an ``Event`` invocation;
4. shows a progress bar read from the status table until the run is SUCCEEDED, FAILED or STOPPED, then a
   summary. Exit code 0 when the run SUCCEEDED, 1 otherwise.

Ctrl-C asks the run to stop after its current round (STOP_REQUESTED on the run item, what the stop event
writes); a second Ctrl-C stops at once. Either way
every worker process and DynamoDB Local are shut down, and the command to resume is printed. Handler output
goes to ``<state-dir>/logs/<run>.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from localrun import (
    dynamodb_local,
    faults,
    monitor,
    operations,
    progress,
    runtime,
    settings,
    start_event,
    template,
)
from localrun.errors import LocalRuntimeError
from trainer import config, coordination, efs_layout, logs

log = logging.getLogger(__name__)

REPO_ROOT = dynamodb_local.REPO_ROOT
DEFAULT_STATE_DIR = Path(".local")
DRAIN_S = 30.0  # how long a finished run's last invocations may take before the runtime stops


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambdatrain", description="Serverless data-parallel training of VGG-19 (local runtime)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local = commands.add_parser(
        "local",
        help="train on this machine: the real handler, a local Lambda API, DynamoDB Local and a folder as EFS",
        description=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    run = local.add_argument_group("run")
    run.add_argument(
        "--demo",
        action="store_true",
        help="preset: " + ", ".join(f"{k}={v}" for k, v in start_event.DEMO_PRESET.items()),
    )
    run.add_argument("--run", metavar="ID", help="id of the new run (default: local-<date>-<time>)")
    run.add_argument(
        "--resume", metavar="RUN", help="continue a stopped or failed run from its last completed round"
    )

    start_event.add_training_options(local)

    paths = local.add_argument_group("data and state")
    paths.add_argument(
        "--source", type=Path, metavar="PATH", help="CIFAR-10 archive or folder (default: download)"
    )
    paths.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="local state: dynamodb/, logs/ (default: .local)",
    )
    paths.add_argument(
        "--efs-root", type=Path, metavar="DIR", help="the EFS stand-in (default: <state-dir>/efs)"
    )

    runtime_options = local.add_argument_group("local runtime")
    runtime_options.add_argument(
        "--concurrency",
        type=int,
        default=settings.DEFAULT_CONCURRENCY,
        metavar="N",
        help="worker processes at most (default: %(default)s)",
    )
    runtime_options.add_argument(
        "--timeout-s", type=float, metavar="S", help="function timeout (default: template.yaml's Timeout)"
    )
    runtime_options.add_argument(
        "--memory-mb",
        type=int,
        metavar="MB",
        help="reported to the handler, not enforced (default: template.yaml's MemorySize)",
    )
    runtime_options.add_argument(
        "--retries",
        type=int,
        choices=(0, 1, 2),
        help="async retries before the failure record (default: template.yaml's MaximumRetryAttempts)",
    )
    runtime_options.add_argument(
        "--failure-destination",
        choices=settings.FAILURE_DESTINATIONS,
        help="how failure records reach the handler: as is, or in an SQS event (default: template.yaml's OnFailure)",
    )
    runtime_options.add_argument(
        "--port", type=int, default=0, help="port of the local Lambda API (default: a free one)"
    )
    runtime_options.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra handler environment variable (repeatable)",
    )
    runtime_options.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, e.g. kill:workerno=1,round=0 (repeatable; see localrun.faults)",
    )
    runtime_options.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="handler LOG_LEVEL"
    )
    runtime_options.add_argument(
        "--function-name", default=settings.DEFAULT_FUNCTION_NAME, help="(default: %(default)s)"
    )
    runtime_options.add_argument(
        "--handler",
        default=settings.DEFAULT_HANDLER,
        help="module.function in --code-dir (default: %(default)s)",
    )
    runtime_options.add_argument(
        "--code-dir",
        type=Path,
        default=REPO_ROOT / "src" / "handler",
        help="the function's CodeUri (default: src/handler)",
    )
    runtime_options.add_argument(
        "--template",
        type=Path,
        default=template.DEFAULT_TEMPLATE,
        help="the SAM template: the table's key schema and the function's settings (default: template.yaml)",
    )
    runtime_options.add_argument(
        "--table", default=runtime.DEFAULT_TABLE, help="status table name (default: %(default)s)"
    )
    operations.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    if args.command != "local":
        return operations.run_command(args)
    try:
        return run_local(args)
    except LocalRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted before the run started; nothing to resume", file=sys.stderr)
        return 1


def entrypoint() -> None:
    sys.exit(main())


# --- the command ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    efs_root: Path
    dynamodb_dir: Path
    log_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Paths:
        state_dir = args.state_dir.resolve()
        efs_root = (args.efs_root or state_dir / "efs").resolve()
        return cls(state_dir, efs_root, state_dir / "dynamodb", state_dir / "logs")


def run_local(args: argparse.Namespace) -> int:
    paths = Paths.from_args(args)
    run_id = args.resume or args.run or dt.datetime.now().strftime("local-%Y%m%d-%H%M%S")
    event = start_event.build_start_event(args, run_id)
    # Checks the runtime options too, before anything starts.
    function_settings, fault_plan = resolve_function(args)
    if not args.resume:
        prepare_data(paths.efs_root, event.get("dataset", config.TrainConfig.dataset), args.source)

    log_path = paths.log_dir / f"{run_id}.log"
    local_runtime = runtime.LocalRuntime(
        function_settings,
        efs_root=paths.efs_root,
        table_name=args.table,
        template_path=args.template,
        db_path=paths.dynamodb_dir,
        dynamodb_log_path=paths.log_dir / "dynamodb-local.log",
        port=args.port,
        log_level=args.log_level,
        fault_plan=fault_plan,
        log_path=log_path,
        check_table=lambda table: monitor.check_run_id(
            coordination.StatusTable(table), run_id, resume=bool(args.resume)
        ),
    )
    with _log_to(log_path), local_runtime as local:  # stops, in reverse: function, API, database
        log.info(
            "local_run_started",
            extra={
                "run_id": run_id,
                "start_event": event,
                "concurrency": function_settings.concurrency,
                "timeout_s": function_settings.timeout_s,
                "maximum_retry_attempts": function_settings.maximum_retry_attempts,
                "failure_destination": function_settings.failure_destination,
                "lambda_endpoint_url": local.lambda_endpoint_url,
                "dynamodb_endpoint_url": local.dynamodb_endpoint_url,
                "efs_root": str(paths.efs_root),
            },
        )

        print(
            f"run {run_id}: logs in {monitor.display_path(log_path)}, Lambda API at {local.lambda_endpoint_url}",
            file=sys.stderr,
        )
        watcher = monitor.Monitor(
            run_id,
            coordination.StatusTable(local.table),
            local.function,
            log_path,
            send_event=local.invoke_event,
        )
        started = time.monotonic()
        local.invoke_event(event)
        outcome = watcher.watch(previous_run=local.checked)
        if outcome.drain:  # let the invocation that ended the run finish its clean-up
            local.function.wait_idle(DRAIN_S)
        summary = progress.summarize(watcher.read(), time.monotonic() - started)

    print(progress.format_summary(summary))
    if outcome.message:
        print(f"error: {outcome.message}", file=sys.stderr)
    if summary.state != coordination.SUCCEEDED:
        print(f"resume with: lambdatrain local --resume {run_id}", file=sys.stderr)
        return 1
    print(next_commands(run_id, paths))
    return 0


def next_commands(run_id: str, paths: Paths) -> str:
    """What to run next on a run that SUCCEEDED: its status, its learning curves, predictions of its model."""
    program = (
        "lambdatrain"
        if shutil.which("lambdatrain")
        else monitor.display_path(Path(sys.prefix) / "bin" / "lambdatrain")
    )
    where = ""
    if paths.state_dir != Path(".local").resolve():
        where += f" --state-dir {monitor.display_path(paths.state_dir)}"
    if paths.efs_root != paths.state_dir / "efs":
        where += f" --efs-root {monitor.display_path(paths.efs_root)}"
    model = monitor.display_path(efs_layout.EfsLayout(paths.efs_root).final_model_path(run_id))
    return "\n".join(
        [
            "next:",
            f"  {program} status {run_id}{where}",
            f"  {program} curves {run_id} -o curves.png{where}",
            f"  {program} predict {model} --cifar-test 30 --grid predictions.png{where}",
        ]
    )


def resolve_function(args: argparse.Namespace) -> tuple[settings.FunctionSettings, faults.FaultPlan]:
    """template.yaml's TrainerFunction, overridden by options, else built-in defaults; bad options are errors."""
    if args.concurrency < 1:
        raise LocalRuntimeError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.timeout_s is not None and args.timeout_s <= 0:
        raise LocalRuntimeError(f"--timeout-s must be positive, got {args.timeout_s:g}")
    try:
        fault_plan = faults.FaultPlan(
            [
                *faults.parse_faults(os.environ.get(faults.ENV_FAULTS, "")),
                *map(faults.parse_fault, args.fault),
            ]
        )
    except ValueError as exc:
        raise LocalRuntimeError(str(exc)) from exc
    extra_environment = start_event.parse_pairs(args.env, "--env", as_json=False)
    declared = template.function_settings(template.load_template(args.template))
    function_settings = settings.FunctionSettings(
        name=args.function_name,
        handler=args.handler,
        code_dir=args.code_dir,
        concurrency=args.concurrency,
        environment=extra_environment,
    )
    options = {
        "timeout_s": args.timeout_s,
        "memory_mb": args.memory_mb,
        "maximum_retry_attempts": args.retries,
        "failure_destination": args.failure_destination,
    }
    return function_settings.overridden(declared).overridden(options), fault_plan


def prepare_data(efs_root: Path, dataset: str, source: Path | None) -> None:
    """Convert CIFAR-10 into ``<efs_root>/datasets/<dataset>`` unless its manifest is already there."""
    out_dir = efs_layout.EfsLayout(efs_root).dataset_dir(dataset)
    if (out_dir / efs_layout.MANIFEST_FILE).is_file():
        return
    if dataset != config.TrainConfig.dataset:  # the one dataset prep builds
        raise LocalRuntimeError(
            f"dataset {dataset!r} is not prepared: {out_dir}/{efs_layout.MANIFEST_FILE} is missing"
        )
    try:
        from prep import cifar
        from prep.errors import PrepError
    except ImportError as exc:
        raise LocalRuntimeError(
            f"data preparation is unavailable ({exc}); prepare {out_dir} with `make preprocess`"
        ) from exc
    print(
        f"preparing CIFAR-10 in {monitor.display_path(out_dir)} from {source or 'the official download'}",
        file=sys.stderr,
    )
    try:
        cifar.prepare(source, out_dir)
    except PrepError as exc:
        raise LocalRuntimeError(str(exc)) from exc


@contextlib.contextmanager
def _log_to(log_path: Path) -> Iterator[None]:
    """The runtime's own log lines (JSON, like the handler's) go to the run's log file, not the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("localrun")
    previous = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
        handler.close()
