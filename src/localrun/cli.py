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
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from localrun import dynamodb_local, environment, faults, function, lambda_api, pool, progress, template
from localrun.errors import LocalRuntimeError
from trainer import coordination, logs

log = logging.getLogger(__name__)

REPO_ROOT = dynamodb_local.REPO_ROOT
DEFAULT_STATE_DIR = Path(".local")
DEFAULT_TABLE = "lambdatrain-status"
DEFAULT_DATASET = "cifar10"
POLL_S = 1.0
STALL_POLLS = 5  # polls with nothing queued or running while the run is not finished: it can never finish
DRAIN_S = 30.0  # how long a finished run's last invocations may take before the runtime stops

# `--demo`: a narrow VGG-19 on a subset of CIFAR-10, meant to finish within 10 minutes on 2 CPU cores and visibly
# learn (tune it against `make demo`). Explicit options and --config override these.
DEMO_PRESET: dict[str, Any] = {
    "workers": 4,
    "model": "vgg19_bn",
    "width": 0.25,
    "epochs": 5,
    "rounds_per_epoch": 4,
    "batch_size": 64,
    "lr": 0.02,
    "test_samples": 2_000,
}
# One handler process per core: TensorFlow already uses every core of its process, so more only contend.
DEFAULT_CONCURRENCY = max(2, min(os.cpu_count() or 2, 8))

# Options that are TrainConfig keys of the start event (option dest -> event key).
CONFIG_OPTIONS = {
    "workers": "workers",
    "epochs": "epochs",
    "model": "model",
    "width": "width",
    "rounds_per_epoch": "rounds_per_epoch",
    "batch_size": "batch_size",
    "lr": "lr",
    "train_samples": "train_samples",
    "test_samples": "test_samples",
    "seed": "seed",
}


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
        "--demo", action="store_true", help="preset: " + ", ".join(f"{k}={v}" for k, v in DEMO_PRESET.items())
    )
    run.add_argument("--run", metavar="ID", help="id of the new run (default: local-<date>-<time>)")
    run.add_argument(
        "--resume", metavar="RUN", help="continue a stopped or failed run from its last completed round"
    )

    training = local.add_argument_group(
        "training configuration (the start event; unset keys take the trainer's defaults)"
    )
    training.add_argument("--workers", type=int, metavar="N", help="parallel workers")
    training.add_argument("--epochs", type=int, metavar="N")
    training.add_argument("--model", help="vgg19_bn or vgg19")
    training.add_argument("--width", type=float, metavar="X", help="channel multiplier of vgg19_bn")
    training.add_argument("--rounds-per-epoch", type=int, metavar="N", help="combines per epoch")
    training.add_argument("--batch-size", type=int, metavar="N", help="per worker and step")
    training.add_argument("--lr", type=float, metavar="X", help="local learning rate")
    training.add_argument(
        "--train-samples", type=int, metavar="N", help="use the first N training images (0 = all)"
    )
    training.add_argument(
        "--test-samples", type=int, metavar="N", help="evaluate on the first N test images (0 = all)"
    )
    training.add_argument("--seed", type=int, metavar="N")
    training.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other start-event key, value as JSON where it parses (repeatable): --config outer_momentum=0.9",
    )

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

    runtime = local.add_argument_group("local runtime")
    runtime.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="worker processes at most (default: %(default)s)",
    )
    runtime.add_argument(
        "--timeout-s", type=float, metavar="S", help="function timeout (default: template.yaml's Timeout)"
    )
    runtime.add_argument(
        "--memory-mb",
        type=int,
        metavar="MB",
        help="reported to the handler, not enforced (default: template.yaml's MemorySize)",
    )
    runtime.add_argument(
        "--retries",
        type=int,
        choices=(0, 1, 2),
        help="async retries before the failure record (default: template.yaml's MaximumRetryAttempts)",
    )
    runtime.add_argument(
        "--failure-destination",
        choices=function.FAILURE_DESTINATIONS,
        help="how failure records reach the handler: as is, or in an SQS event (default: template.yaml's OnFailure)",
    )
    runtime.add_argument(
        "--port", type=int, default=0, help="port of the local Lambda API (default: a free one)"
    )
    runtime.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra handler environment variable (repeatable)",
    )
    runtime.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, e.g. kill:workerno=1,round=0 (repeatable; see localrun.faults)",
    )
    runtime.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="handler LOG_LEVEL"
    )
    runtime.add_argument("--function-name", default=pool.DEFAULT_FUNCTION_NAME, help="(default: %(default)s)")
    runtime.add_argument(
        "--handler", default=pool.DEFAULT_HANDLER, help="module.function in --code-dir (default: %(default)s)"
    )
    runtime.add_argument(
        "--code-dir",
        type=Path,
        default=REPO_ROOT / "src" / "handler",
        help="the function's CodeUri (default: src/handler)",
    )
    runtime.add_argument(
        "--template",
        type=Path,
        default=template.DEFAULT_TEMPLATE,
        help="the SAM template: the table's key schema and the function's settings (default: template.yaml)",
    )
    runtime.add_argument("--table", default=DEFAULT_TABLE, help="status table name (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
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
    start_event = build_start_event(args, run_id)
    settings = function_settings(args)  # also checks the runtime options, before anything starts
    if not args.resume:
        prepare_data(paths.efs_root, start_event.get("dataset", DEFAULT_DATASET), args.source)

    log_path = paths.log_dir / f"{run_id}.log"
    with _log_to(log_path), contextlib.ExitStack() as stack:  # stops, in reverse: function, API, database
        database = stack.enter_context(
            dynamodb_local.DynamoDBLocal(
                db_path=paths.dynamodb_dir, log_path=paths.log_dir / "dynamodb-local.log"
            )
        )
        dynamodb_local.create_table(database.client(), args.table, args.template)
        status = coordination.StatusTable(database.resource().Table(args.table))
        previous_run = _check_run_id(status, run_id, resume=bool(args.resume))
        api = stack.enter_context(lambda_api.LambdaApiServer([], port=args.port))
        trainer = stack.enter_context(
            _local_function(args, settings, paths.efs_root, api.endpoint_url, database.endpoint_url, log_path)
        )
        api.add_function(trainer)
        log.info(
            "local_run_started",
            extra={
                "run_id": run_id,
                "start_event": start_event,
                "concurrency": args.concurrency,
                "timeout_s": settings.timeout_s,
                "maximum_retry_attempts": settings.maximum_retry_attempts,
                "failure_destination": settings.failure_destination,
                "lambda_endpoint_url": api.endpoint_url,
                "dynamodb_endpoint_url": database.endpoint_url,
                "efs_root": str(paths.efs_root),
            },
        )

        print(
            f"run {run_id}: logs in {_display(log_path)}, Lambda API at {api.endpoint_url}", file=sys.stderr
        )
        monitor = Monitor(run_id, status, trainer, api.endpoint_url, log_path)
        started = time.monotonic()
        _invoke_event(api.endpoint_url, trainer.name, start_event)
        outcome = monitor.watch(previous_run)
        if outcome.drain:  # let the invocation that ended the run finish its clean-up
            trainer.wait_idle(DRAIN_S)
        summary = progress.summarize(monitor.read(), time.monotonic() - started)

    print(progress.format_summary(summary))
    if outcome.message:
        print(f"error: {outcome.message}", file=sys.stderr)
    if summary.state != coordination.SUCCEEDED:
        print(f"resume with: lambdatrain local --resume {run_id}", file=sys.stderr)
        return 1
    return 0


def build_start_event(args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """The start event: the demo preset, then --config pairs, then the named options; validated by the trainer."""
    if args.resume:
        if args.run and args.run != args.resume:
            raise LocalRuntimeError(
                f"--run {args.run} and --resume {args.resume} name different runs; give one"
            )
        overridden = [name for name in CONFIG_OPTIONS if getattr(args, name) is not None] + args.config
        if overridden or args.demo:
            raise LocalRuntimeError(
                "--resume continues a run with its own configuration; drop the training options"
            )
        event: dict[str, Any] = {"start": True, "run": run_id, "resume": True}
    else:
        config: dict[str, Any] = dict(DEMO_PRESET) if args.demo else {}
        config.update(parse_pairs(args.config, "--config", as_json=True))
        config.update(
            {
                key: getattr(args, name)
                for name, key in CONFIG_OPTIONS.items()
                if getattr(args, name) is not None
            }
        )
        reserved = sorted({"start", "run", "resume"} & set(config))
        if reserved:
            raise LocalRuntimeError(f"--config cannot set {reserved}; use --run or --resume")
        config.setdefault("workers", DEMO_PRESET["workers"])
        event = {"start": True, "run": run_id, **config}
    from trainer import errors, protocol  # the trainer's own validation, before anything starts

    try:
        protocol.parse_start(event)
    except errors.InvalidEventError as exc:
        raise LocalRuntimeError(f"invalid training configuration: {exc}") from exc
    return event


@dataclass(frozen=True)
class RuntimeSettings:
    """How the local function runs: the template's function settings, overridden by options."""

    timeout_s: float
    memory_mb: int
    maximum_retry_attempts: int
    failure_destination: str
    faults: faults.FaultPlan
    extra_environment: dict[str, str]


def function_settings(args: argparse.Namespace) -> RuntimeSettings:
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
    extra_environment = parse_pairs(args.env, "--env", as_json=False)
    declared = template.function_settings(template.load_template(args.template))

    def pick(option: Any, from_template: Any, default: Any) -> Any:
        return next((value for value in (option, from_template) if value is not None), default)

    return RuntimeSettings(
        timeout_s=pick(args.timeout_s, declared.timeout_s, pool.DEFAULT_TIMEOUT_S),
        memory_mb=pick(args.memory_mb, declared.memory_mb, pool.DEFAULT_MEMORY_MB),
        maximum_retry_attempts=pick(args.retries, declared.maximum_retry_attempts, 0),
        failure_destination=pick(
            args.failure_destination, declared.failure_destination, function.LAMBDA_DESTINATION
        ),
        faults=fault_plan,
        extra_environment=extra_environment,
    )


def _local_function(
    args: argparse.Namespace,
    settings: RuntimeSettings,
    efs_root: Path,
    lambda_endpoint_url: str,
    dynamodb_endpoint_url: str,
    log_path: Path,
) -> function.LocalFunction:
    """The trainer as SAM would run it, pointed at the local Invoke API, DynamoDB Local and the EFS folder."""
    config = pool.FunctionConfig(
        name=args.function_name,
        handler=args.handler,
        code_dir=args.code_dir,
        timeout_s=settings.timeout_s,
        memory_mb=settings.memory_mb,
        environment=environment.handler_environment(
            function_name=args.function_name,
            efs_root=efs_root,
            status_table=args.table,
            lambda_endpoint_url=lambda_endpoint_url,
            dynamodb_endpoint_url=dynamodb_endpoint_url,
            memory_mb=settings.memory_mb,
            log_level=args.log_level,
            extra=settings.extra_environment,
        ),
        unset_environment=environment.UNSET_FOR_HANDLER,
    )
    return function.LocalFunction(
        config,
        concurrency=args.concurrency,
        async_config=function.AsyncConfig(
            maximum_retry_attempts=settings.maximum_retry_attempts,
            failure_destination=settings.failure_destination,
        ),
        faults=settings.faults,
        log_path=log_path,
    )


def parse_pairs(pairs: Sequence[str], option: str, as_json: bool) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; with ``as_json`` values are JSON where they parse (``0.9``, ``true``)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise LocalRuntimeError(f"{option} expects KEY=VALUE, got {pair!r}")
        if as_json:
            try:
                parsed[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                parsed[key.strip()] = value
        else:
            parsed[key.strip()] = value
    return parsed


def prepare_data(efs_root: Path, dataset: str, source: Path | None) -> None:
    """Convert CIFAR-10 into ``<efs_root>/datasets/<dataset>`` unless its manifest is already there."""
    out_dir = efs_root / "datasets" / dataset
    if (out_dir / "manifest.json").is_file():
        return
    if dataset != DEFAULT_DATASET:
        raise LocalRuntimeError(f"dataset {dataset!r} is not prepared: {out_dir}/manifest.json is missing")
    try:
        from prep import cifar
        from prep.errors import PrepError
    except ImportError as exc:
        raise LocalRuntimeError(
            f"data preparation is unavailable ({exc}); prepare {out_dir} with `make preprocess`"
        ) from exc
    print(
        f"preparing CIFAR-10 in {_display(out_dir)} from {source or 'the official download'}", file=sys.stderr
    )
    try:
        cifar.prepare(source, out_dir)
    except PrepError as exc:
        raise LocalRuntimeError(str(exc)) from exc


# --- watching the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    message: str | None = None  # why the watch ended before the run did (stalled, aborted)
    drain: bool = False  # the run ended: wait for its last invocations before shutting down


class Monitor:
    """Follows a run in the status table, relays invocation failures, and handles Ctrl-C."""

    def __init__(
        self,
        run_id: str,
        status: coordination.StatusTable,
        local_function: function.LocalFunction,
        endpoint_url: str,
        log_path: Path,
    ) -> None:
        self.run_id = run_id
        self.status = status
        self.function = local_function
        self.endpoint_url = endpoint_url
        self.log_path = log_path
        self.bar = progress.ProgressBar(run_id)
        self.last_error: str | None = None
        self.snapshot = progress.Snapshot(run_id, None)  # the last one read successfully
        self.watching = True
        local_function.add_listener(self._on_invocation)

    def read(self) -> progress.Snapshot:
        """Read the run from the status table; on a read error keep (and return) the last snapshot."""
        try:
            self.snapshot = progress.read_snapshot(self.status, self.run_id)
        except (BotoCoreError, ClientError) as exc:
            self.bar.write(f"warning: cannot read the status table: {exc}")
        return self.snapshot

    def watch(self, previous_run: coordination.RunStatus | None = None) -> Outcome:
        """Poll until the run ends, stalls or is aborted. ``previous_run``: the item before a resume, whose
        old terminal state must not be mistaken for the resumed run's end."""
        interrupts = _Interrupts()
        idle_polls = 0
        stop_sent = False
        with interrupts.installed():
            try:
                while True:
                    snapshot = self.read()
                    self.bar.update(snapshot)
                    if snapshot.terminal and snapshot.run != previous_run:
                        return Outcome(drain=True)
                    if interrupts.count >= 2:
                        return Outcome("stopped at once; the current round is lost")
                    if interrupts.count == 1 and not stop_sent:
                        stop_sent = True
                        self.bar.write("stopping after the current round (Ctrl-C again to stop now)")
                        # As an operator would: flag the run item now (the stop event's own write), rather
                        # than queue a stop event behind the invocations that are keeping every slot busy.
                        self.status.request_stop(self.run_id)
                    idle_polls = idle_polls + 1 if self.function.in_flight == 0 else 0
                    if idle_polls >= STALL_POLLS:
                        state = snapshot.state or "not created"
                        cause = f"; last error: {self.last_error}" if self.last_error else ""
                        return Outcome(
                            f"run {self.run_id} is {state} but no invocation is queued or running{cause} "
                            f"(see {_display(self.log_path)})"
                        )
                    interrupts.wait(POLL_S)
            finally:
                self.watching = False  # failures after this are the shutdown's own doing
                self.bar.close()

    def _on_invocation(self, completed: function.CompletedInvocation) -> None:
        if completed.result.ok or not self.watching:
            return
        error = completed.result.error()
        self.last_error = f"{error.get('errorType')}: {error.get('errorMessage')}"
        what = "failure record" if completed.failure_record else describe_event(completed.event)
        self.bar.write(f"warning: invocation failed ({what}): {self.last_error}")


def describe_event(event: Any) -> str:
    """A few identifying keys of an event, for one line of output."""
    if not isinstance(event, Mapping):
        return "event"
    keys = ("start", "resume", "stop", "combine", "workerno", "round", "attempt")
    return " ".join(f"{key}={event[key]}" for key in keys if key in event) or "event"


class _Interrupts:
    """SIGINT and SIGTERM as counted flags instead of exceptions, so the watch loop decides what to do."""

    def __init__(self) -> None:
        self.count = 0
        self._wake = threading.Event()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        self._wake.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1 if signum == signal.SIGINT else 2  # SIGTERM: stop at once
        self._wake.set()


# --- helpers ---------------------------------------------------------------------------------------------


def _check_run_id(
    status: coordination.StatusTable, run_id: str, resume: bool
) -> coordination.RunStatus | None:
    """Refuse a start that the trainer would refuse, before any process starts; return the existing run."""
    run = status.get_run(run_id)
    if resume and run is None:
        raise LocalRuntimeError(f"run {run_id!r} does not exist in this state directory; nothing to resume")
    if resume and run.state == coordination.SUCCEEDED:
        raise LocalRuntimeError(f"run {run_id!r} already SUCCEEDED; nothing to resume")
    if not resume and run is not None:
        raise LocalRuntimeError(
            f"run {run_id!r} already exists ({run.state}); continue it with --resume {run_id} or pick another --run"
        )
    return run


def _invoke_event(endpoint_url: str, function_name: str, event: Mapping[str, Any]) -> None:
    """Send an ``Event`` invocation through boto3's Lambda client, as an operator's script would."""
    client = boto3.client("lambda", **environment.client_settings(endpoint_url))
    try:
        client.invoke(FunctionName=function_name, InvocationType="Event", Payload=json.dumps(event).encode())
    except (BotoCoreError, ClientError) as exc:
        raise LocalRuntimeError(f"sending {describe_event(event)} to {function_name} failed: {exc}") from exc


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


def _display(path: Path) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
