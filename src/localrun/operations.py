"""The operator commands, one code path for a deployed stack (``--stack``) and a local state directory
(``--state-dir``, default ``.local``): ``runs``, ``status``, ``watch``, ``stop``, ``rm``, ``start``, ``resume``,
``curves``, ``cost``, ``model``; and ``predict``, which needs only a model file (and, for ``--cifar-test``, the
prepared dataset). The work is in :mod:`localrun.curves`, :mod:`localrun.cost` and :mod:`localrun.predict`; this
module wires the arguments to them.

Every read and write of the status table goes through :mod:`trainer.coordination`; where a command acts is a
:mod:`localrun.targets` object. Bad input (an unknown run or stack, a state directory without a table, a run in
the wrong state) is one ``error: ...`` line and exit status 1, and nothing is changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

from localrun import cost, curves, outputs, predict, progress, runtime, start_event, targets
from localrun.errors import LocalRuntimeError, OperatorError
from trainer import coordination, efs_layout, errors, protocol

POLL_S = 2.0  # how often `watch` reads the status table
HALT_REASON = "stopped at once by the operator (lambdatrain stop --now); the current round is lost"
# `rm` where the run's EFS folder cannot be deleted (a stack) leaves this item under the run's partition key: the
# trainer refuses to start a run whose folder exists, so the id cannot be used again, and `start` says so before
# uploading anything. The trainer never reads it: its run item is ``sk = "RUN"``, its rounds ``sk = "ROUND#..."``,
# and without ``kind`` or ``active`` the item is in neither index (`runs` does not list it).
TOMBSTONE_SORT_KEY = "REMOVED"
COMMANDS = ("runs", "status", "watch", "stop", "rm", "start", "resume", "curves", "cost", "model", "predict")


# --- arguments ------------------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Add the operator commands to ``lambdatrain``'s subparsers."""
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_argument_group("where the runs are (a deployed stack, or a local state directory)")
    group.add_argument("--stack", metavar="NAME", help="a deployed stack: resources from its Outputs")
    group.add_argument("--region", metavar="R", help="the stack's region (default: the AWS configuration's)")
    group.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="local runs: the state directory (default: .local)"
    )
    group.add_argument(
        "--efs-root", type=Path, metavar="DIR", help="local runs: the EFS stand-in (default: <state-dir>/efs)"
    )
    group.add_argument(
        "--table", default=runtime.DEFAULT_TABLE, help="local runs: the status table (default: %(default)s)"
    )

    commands.add_parser("runs", parents=[where], help="list runs, newest first")
    status = commands.add_parser("status", parents=[where], help="a run's state, configuration and rounds")
    status.add_argument("run", metavar="RUN")
    watch = commands.add_parser(
        "watch", parents=[where], help="follow a run with a progress bar; exit 0 if it SUCCEEDED, else 1"
    )
    watch.add_argument("run", metavar="RUN")
    stop = commands.add_parser("stop", parents=[where], help="stop a run after its current round")
    stop.add_argument("run", metavar="RUN")
    stop.add_argument(
        "--now",
        action="store_true",
        help="mark it STOPPED now (the round is lost); on a stack also set the trainer's reserved concurrency "
        "to 0, which halts every run of the stack",
    )
    remove = commands.add_parser(
        "rm",
        parents=[where],
        help="delete a run that has ended: items and (locally) EFS files; on a stack its id stays taken",
    )
    remove.add_argument("run", metavar="RUN")
    start = commands.add_parser(
        "start",
        parents=[where],
        help="start a run from an event file or options (locally: lambdatrain local)",
    )
    start.add_argument("event", nargs="?", type=Path, metavar="EVENT.json", help="a start event (JSON)")
    start.add_argument("--run", metavar="ID", help="id of the new run (default: run-<date>-<time>)")
    start.add_argument("--demo", action="store_true", help="the demo preset (see lambdatrain local --help)")
    start.add_argument(
        "--invoke",
        action="store_true",
        help="a stack: invoke the trainer instead of uploading a start object",
    )
    start_event.add_training_options(start)
    resume = commands.add_parser("resume", parents=[where], help="continue a stopped or failed run")
    resume.add_argument("run", metavar="RUN")
    curve = commands.add_parser(
        "curves", parents=[where], help="plot training loss and test accuracy against round and wall time"
    )
    curve.add_argument("run", metavar="RUN")
    curve.add_argument(
        "-o", "--output", type=Path, default=Path("curves.png"), help="the PNG (default: %(default)s)"
    )
    curve.add_argument("--csv", type=Path, metavar="FILE", help="also write the numbers as CSV")
    price = commands.add_parser(
        "cost", parents=[where], help="price a run from what it measured (GB-seconds, requests, EFS bytes)"
    )
    price.add_argument("run", metavar="RUN")
    price.add_argument(
        "--prices", type=Path, metavar="FILE", help=f"a prices file (default: {cost.DEFAULT_PRICES.name})"
    )
    model = commands.add_parser(
        "model",
        parents=[where],
        help="copy a SUCCEEDED run's final.keras here (from EFS locally, S3 on a stack)",
    )
    model.add_argument("run", metavar="RUN")
    model.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("final.keras"),
        help="where to write it (default: %(default)s)",
    )
    guess = commands.add_parser(
        "predict", help="top-1 class and probability per image with a final.keras; --grid draws them"
    )
    guess.add_argument("model", type=Path, metavar="MODEL", help="a final.keras (lambdatrain model RUN)")
    guess.add_argument("images", type=Path, nargs="*", metavar="IMAGE", help="PNG or JPEG files of any size")
    guess.add_argument("--grid", type=Path, metavar="PNG", help="draw the images with their labels into PNG")
    guess.add_argument(
        "--cifar-test", type=int, metavar="K", help="also predict K random images of the prepared test set"
    )
    guess.add_argument("--seed", type=int, help="of the random test images (default: a new draw each time)")
    dataset = guess.add_argument_group("the prepared dataset (--cifar-test; class names)")
    dataset.add_argument("--dataset", type=Path, metavar="DIR", help="a prepared dataset folder")
    dataset.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="else <efs-root>/datasets/cifar10 of this local state directory",
    )
    dataset.add_argument("--efs-root", type=Path, metavar="DIR", help="(default: <state-dir>/efs)")


def run_command(args: argparse.Namespace) -> int:
    """Run one operator command; errors become one ``error:`` line and status 1."""
    try:
        if args.command == "predict":
            return predict_images(args)
        if args.command in ("start", "resume") and not args.stack:
            return _delegate_local(args)
        with open_target(args) as target:
            return COMMAND_FUNCTIONS[args.command](target, args)
    except (LocalRuntimeError, errors.TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BotoCoreError, ClientError) as exc:
        print(f"error: {args.command} failed: {exc}", file=sys.stderr)
        return 1


def open_target(args: argparse.Namespace) -> targets.Target:
    if args.stack:
        if args.state_dir or args.efs_root:
            raise OperatorError("--stack and --state-dir/--efs-root name different places; give one")
        return targets.StackTarget(args.stack, args.region)
    if args.region:
        raise OperatorError("--region needs --stack")
    return targets.LocalTarget(args.state_dir or Path(".local"), args.efs_root, args.table)


def require_run(target: targets.Target, run_id: str) -> coordination.RunStatus:
    run = target.status.get_run(run_id)
    if run is None:
        tombstone = get_tombstone(target.status, run_id)
        if tombstone is not None:
            raise OperatorError(
                f"{describe_removed(target, run_id, tombstone)}; `lambdatrain runs` lists the runs"
            )
        raise OperatorError(f"no run {run_id!r} in {target.name}; `lambdatrain runs` lists them")
    return run


def tombstone_key(run_id: str) -> dict[str, str]:
    return {"pk": coordination.run_key(run_id)["pk"], "sk": TOMBSTONE_SORT_KEY}


def get_tombstone(status: coordination.StatusTable, run_id: str) -> dict[str, Any] | None:
    """The item `rm` left for a run whose EFS folder it could not delete, or None."""
    item = status.table.get_item(Key=tombstone_key(run_id), ConsistentRead=True).get("Item")
    return dict(item) if item else None


def describe_removed(target: targets.Target, run_id: str, tombstone: dict[str, Any]) -> str:
    return (
        f"run {run_id!r} was removed from {target.name} at {format_time(tombstone.get('removed_at'))} "
        f"(lambdatrain rm), but its EFS folder {tombstone.get('efs_folder', f'runs/{run_id}/')} remains, so the "
        "trainer refuses a new run with this id"
    )


def refuse_if_halted(target: targets.StackTarget, command: str) -> None:
    """`stop --now` left the kill switch on: an event sent now is throttled for hours, then lost to the failure
    queue (whose consumer is the same halted function). Refuse, with the command that lifts it."""
    if target.kill_switch_on():
        raise OperatorError(
            f"the trainer {target.function_name} is halted (reserved concurrency 0, the kill switch of "
            f"`lambdatrain stop --now`), so Lambda would run nothing and the {command} would be lost; nothing sent. "
            f"Lift it first with: {target.undo_kill_switch_command()}  (every run of stack {target.stack_name} "
            "can then be invoked again), then run this command again"
        )


# --- runs -----------------------------------------------------------------------------------------------


def list_runs(target: targets.Target, args: argparse.Namespace) -> int:
    if isinstance(target, targets.LocalTarget):
        target.index_runs_on_efs()
    listing = target.status.list_runs()
    rows = [("RUN", "STATE", "WORKERS", "ROUND", "EPOCHS", "TEST ACC", "STARTED", "WALL")]
    for run in listing.runs:
        accuracy = run.summary.test_accuracy
        rows.append(
            (
                run.run_id,
                run.state,
                str(run.config.workers),
                f"{run.round_index}/{run.total_rounds}",
                f"{run.epochs_done}/{run.config.epochs}",
                f"{float(accuracy):.1%}" if accuracy is not None else "-",
                format_time(run.created_at),
                format_wall_time(run),
            )
        )
    print(format_table(rows))
    for run_id, reason in listing.unreadable.items():
        print(f"warning: run {run_id}: {reason}", file=sys.stderr)
    if not listing.runs:
        print(f"no runs in {target.name}", file=sys.stderr)
    return 0


# --- status ---------------------------------------------------------------------------------------------


def show_status(target: targets.Target, args: argparse.Namespace) -> int:
    run = require_run(target, args.run)
    rounds = target.status.list_rounds(args.run)
    print(f"run {run.run_id}: {run.state}")
    if run.reason:
        print(f"  reason      {run.reason}")
    print(
        f"  progress    round {run.round_index}/{run.total_rounds}, epoch {run.epochs_done}/{run.config.epochs}, "
        f"generation {run.generation}"
    )
    print(
        f"  started     {format_time(run.created_at)}, updated {format_time(run.updated_at)}, wall {format_wall_time(run)}"
    )
    configuration = " ".join(f"{key}={value}" for key, value in run.config.to_dict().items())
    print(f"  config      {configuration}")
    print(f"  data        {run.num_train} training examples, dataset sha256 {run.dataset_sha256 or '-'}")
    print(f"  model       {describe_model(target, run)}")
    print(f"  budget      {describe_budget(run)}")
    completed = [(record, record.metrics) for record in rounds if record.completed and record.metrics]
    if not completed:
        print("  rounds      none completed yet")
        return 0
    phases: list[str] = []
    byte_phases: list[str] = []  # phases whose bytes the round items record (worker, combine, reduce, commit)
    for _, metrics in completed:
        phases.extend(phase for phase in metrics.duration_s if phase not in phases)
        byte_phases.extend(
            phase
            for phase in metrics.phase_bytes_read
            if not phase.endswith("_max") and phase not in byte_phases
        )
    order = {phase: position for position, phase in enumerate(BYTE_PHASES)}
    byte_phases.sort(key=lambda phase: (order.get(phase, len(order)), phase))  # DynamoDB keeps no map order
    header = (
        "ROUND",
        "EPOCH",
        "TRAIN LOSS",
        "TEST LOSS",
        "TEST ACC",
        *(f"{p} s" for p in phases),
        "READ MB",
        "WRITTEN MB",
        *(f"{phase.upper()} MB R/W" for phase in byte_phases),
    )
    rows = [header]
    for record, metrics in completed:
        rows.append(
            (
                str(record.round_index),
                str(metrics.epochs_done),
                f"{float(metrics.train_loss):.4f}",
                f"{float(metrics.test_loss):.4f}" if metrics.test_loss is not None else "-",
                f"{float(metrics.test_accuracy):.1%}" if metrics.test_accuracy is not None else "-",
                *(f"{float(metrics.duration_s.get(p, 0)):.1f}" for p in phases),
                f"{int(metrics.bytes_read) / 1e6:.1f}",
                f"{int(metrics.bytes_written) / 1e6:.1f}",
                *(format_phase_bytes(metrics, phase) for phase in byte_phases),
            )
        )
    print()
    print(format_table(rows))
    return 0


def describe_budget(run: coordination.RunStatus) -> str:
    limits = [
        f"max_wall_s {run.config.max_wall_s:g}" if run.config.max_wall_s else "",
        f"max_gb_s {run.config.max_gb_s:g}" if run.config.max_gb_s else "",
    ]
    spent = f"{run.gb_s:,.1f} GB-s measured by the committed rounds"
    return f"{spent} ({', '.join(limit for limit in limits if limit) or 'no limit'})"


BYTE_PHASES = ("worker", "combine", "reduce", "commit")  # the order of a round's phases


def format_phase_bytes(metrics: coordination.RoundMetrics, phase: str) -> str:
    """A phase's megabytes read/written over all its invocations, and by its largest one where it has many:
    ``5120.0/80.2 max 512.0/8.0``."""
    read, written = metrics.phase_bytes_read, metrics.phase_bytes_written
    if phase not in read:
        return "-"
    cell = f"{read[phase] / 1e6:.1f}/{written.get(phase, 0) / 1e6:.1f}"
    if f"{phase}_max" in read:
        cell += f" max {read[f'{phase}_max'] / 1e6:.1f}/{written.get(f'{phase}_max', 0) / 1e6:.1f}"
    return cell


def describe_model(target: targets.Target, run: coordination.RunStatus) -> str:
    if run.state != coordination.SUCCEEDED or not run.summary.final_model:
        return f"none yet (final.keras is written when the run SUCCEEDS); weights of round {run.round_index} on EFS"
    where = [run.summary.final_model + (" (on the stack's EFS)" if target.efs_root is None else "")]
    if run.summary.final_model_s3:
        where.append(run.summary.final_model_s3)
    return ", ".join(where)


# --- watch ----------------------------------------------------------------------------------------------


def watch_run(target: targets.Target, args: argparse.Namespace) -> int:
    require_run(target, args.run)
    bar = progress.ProgressBar(args.run)
    try:
        while True:
            snapshot = progress.read_snapshot(target.status, args.run)
            if snapshot.run is None:
                raise OperatorError(f"run {args.run!r} was deleted while watching")
            bar.update(snapshot)
            if snapshot.terminal:
                break
            if not target.runs_executed:
                raise OperatorError(
                    f"run {args.run} is {snapshot.state} but no `lambdatrain local` serves {target.name}, so "
                    f"nothing executes it; continue it with: lambdatrain resume {args.run} {target.option_args()}"
                )
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        bar.close()
        print(f"error: stopped watching; run {args.run} goes on", file=sys.stderr)
        return 1
    finally:
        bar.close()
    print(progress.format_summary(progress.summarize(snapshot, wall_time_s(snapshot.run))))
    return 0 if snapshot.state == coordination.SUCCEEDED else 1


# --- stop -----------------------------------------------------------------------------------------------


def stop_run(target: targets.Target, args: argparse.Namespace) -> int:
    run = require_run(target, args.run)
    if run.terminal:
        raise OperatorError(f"run {args.run} is already {run.state}; nothing to stop")
    if args.now:
        if not target.status.halt_run(args.run, HALT_REASON):
            raise OperatorError(f"run {args.run} ended while stopping it; nothing to stop")
        print(
            f"run {args.run}: STOPPED now; its current round {run.round_index} is lost and will be redone on resume"
        )
        if isinstance(target, targets.StackTarget):
            target.stop_all_invocations()
            print(
                f"warning: {target.function_name} now has reserved concurrency 0: Lambda runs no invocation of it, "
                f"which halts EVERY run of stack {target.stack_name} and the failure-queue consumer",
                file=sys.stderr,
            )
            # The undo comes first: `resume` (and `start`) refuse while the kill switch is on.
            print(
                f"undo with: {target.undo_kill_switch_command()}  (first, before any resume or start; the next "
                "deploy resets it too)"
            )
        print(f"resume with: lambdatrain resume {args.run} {target.option_args()}")
        return 0
    if run.state == coordination.STOP_REQUESTED:
        print(f"run {args.run}: a stop is already requested; it stops after round {run.round_index}")
        return 0
    target.request_stop(args.run)
    print(f"run {args.run}: stop requested; it stops after round {run.round_index}")
    print(f"watch with: lambdatrain watch {args.run} {target.option_args()}")
    return 0


# --- rm -------------------------------------------------------------------------------------------------


def remove_run(target: targets.Target, args: argparse.Namespace) -> int:
    if target.efs_root is None and target.status.get_run(args.run) is None:
        tombstone = get_tombstone(target.status, args.run)
        if tombstone is not None:  # removed before; a second rm finishes what an interrupted one left
            deleted = delete_run_items(target.status, args.run)
            print(f"run {args.run}: already removed; deleted {deleted} items left from it")
            print_burnt_id(target, args.run)
            return 0
    run = require_run(target, args.run)
    if run.active:
        raise OperatorError(
            f"run {args.run} is {run.state}; stop it first: lambdatrain stop {args.run} {target.option_args()}"
        )
    if target.efs_root is not None:
        deleted = delete_run_items(target.status, args.run, remove_run_item=True)
        print(f"run {args.run}: deleted {deleted} items from the status table")
        run_dir = efs_layout.EfsLayout(target.efs_root).run_dir(args.run)
        if run_dir.exists():
            shutil.rmtree(run_dir)
            print(f"run {args.run}: deleted {run_dir}")
        return 0
    # The EFS folder stays (not reachable from here), and the trainer refuses to start a run in an existing
    # folder: the run item becomes a tombstone, so that `start` refuses the id instead of uploading a start
    # the trainer drops.
    file_system_id = getattr(target, "file_system_id", None)
    replace_with_tombstone(target.status, run, file_system_id)
    deleted = 1 + delete_run_items(target.status, args.run)
    print(f"run {args.run}: deleted {deleted} items from the status table")
    remains = [
        f"its EFS files under runs/{args.run}/ on file system {file_system_id or '(see the stack)'} "
        "(EFS is not reachable from this machine; the trainer's clean-up already removed all but config.json, "
        "final.keras and what a resume needs)"
    ]
    if run.summary.final_model_s3:
        remains.append(f"its exported model {run.summary.final_model_s3}")
    for line in remains:
        print(f"kept: {line}")
    print_burnt_id(target, args.run)
    return 0


def print_burnt_id(target: targets.Target, run_id: str) -> None:
    file_system_id = getattr(target, "file_system_id", None) or "(the stack's FileSystemId output)"
    region = getattr(target, "region", None)
    key = json.dumps({"pk": {"S": tombstone_key(run_id)["pk"]}, "sk": {"S": TOMBSTONE_SORT_KEY}})
    print(
        f"run {run_id}: the id cannot be used for a new run on {target.name}: its EFS folder runs/{run_id}/ remains "
        "and the trainer refuses to start a run in an existing folder (a new run must not inherit the old "
        "final.keras); `lambdatrain start` refuses it. Use another --run."
    )
    print(
        f"to free the id anyway: delete runs/{run_id}/ from a Lambda function or an EC2 instance that mounts file "
        f"system {file_system_id} (e.g. rm -rf /mnt/efs/runs/{run_id} where it is mounted at /mnt/efs), then the "
        f"tombstone: aws dynamodb delete-item --table-name {target.status.table.name} --key '{key}'"
        + (f" --region {region}" if region else "")
    )


def replace_with_tombstone(
    status: coordination.StatusTable, run: coordination.RunStatus, file_system_id: str | None
) -> None:
    """In one transaction: delete the run item if the run has ended (else nothing, an error), write the tombstone."""
    tombstone = {
        **tombstone_key(run.run_id),
        "removed_at": coordination.now_iso(),
        "removed_state": run.state,
        "created_at_before": run.created_at or "",
        "efs_folder": f"runs/{run.run_id}/",
        "note": "lambdatrain rm: the run's items are deleted, its EFS folder remains; the id cannot start a new run",
    }
    if file_system_id:
        tombstone["file_system_id"] = file_system_id
    condition = coordination.ended_run_condition()
    try:
        status.table.meta.client.transact_write_items(
            TransactItems=[
                {
                    "Delete": {
                        "TableName": status.table.name,
                        "Key": coordination.run_key(run.run_id),
                        **condition,
                    }
                },
                {"Put": {"TableName": status.table.name, "Item": tombstone}},
            ]
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "TransactionCanceledException":
            raise OperatorError(f"run {run.run_id} is gone or became active; nothing deleted") from exc
        raise


def delete_run_items(status: coordination.StatusTable, run_id: str, remove_run_item: bool = False) -> int:
    """With ``remove_run_item``: delete the run item if the run has ended (else nothing, an error). Then delete
    the rest of the run's items (its rounds), never its tombstone. Returns how many were deleted."""
    table = status.table
    deleted = 0
    if remove_run_item:
        try:
            table.delete_item(Key=coordination.run_key(run_id), **coordination.ended_run_condition())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise OperatorError(f"run {run_id} is gone or became active; nothing deleted") from exc
            raise
        deleted = 1
    query = coordination.run_items_query(run_id)
    with table.batch_writer() as batch:
        while True:
            page = table.query(**query)
            for key in page.get("Items", []):
                if key["sk"] in (TOMBSTONE_SORT_KEY, coordination.RUN_SORT_KEY):
                    continue
                batch.delete_item(Key=key)
                deleted += 1
            if "LastEvaluatedKey" not in page:
                return deleted
            query["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# --- start and resume -----------------------------------------------------------------------------------


def start_run(target: targets.Target, args: argparse.Namespace) -> int:
    if not isinstance(target, targets.StackTarget):
        raise OperatorError(
            "start on a state directory runs through lambdatrain local"
        )  # see _delegate_local
    event = build_event(args)
    run_id = event["run"]
    if target.status.get_run(run_id) is not None:
        raise OperatorError(f"run {run_id!r} already exists in {target.name}; pick another --run")
    tombstone = get_tombstone(target.status, run_id)
    if tombstone is not None:
        raise OperatorError(f"{describe_removed(target, run_id, tombstone)}; pick another --run")
    refuse_if_halted(target, "start")
    if args.invoke:
        target.send_event(event)
        print(f"run {run_id}: start event sent to {target.function_name}")
    else:
        print(f"run {run_id}: start object uploaded to {target.upload_start(event, run_id)}")
    print(f"watch with: lambdatrain watch {run_id} {target.option_args()}")
    return 0


def resume_run(target: targets.Target, args: argparse.Namespace) -> int:
    if not isinstance(target, targets.StackTarget):
        raise OperatorError(
            "resume on a state directory runs through lambdatrain local"
        )  # see _delegate_local
    run = require_run(target, args.run)
    if run.state == coordination.SUCCEEDED or run.active:
        raise OperatorError(f"run {args.run} is {run.state}; only a STOPPED or FAILED run can be resumed")
    refuse_if_halted(target, "resume")
    target.send_event({"start": True, "run": args.run, "resume": True})
    print(f"run {args.run}: resume event sent to {target.function_name}")
    print(f"watch with: lambdatrain watch {args.run} {target.option_args()}")
    return 0


def build_event(args: argparse.Namespace) -> dict[str, Any]:
    """The start event from EVENT.json, or from the training options (as ``lambdatrain local`` builds it)."""
    if args.event is None:
        run_id = args.run or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        args.resume = None
        return start_event.build_start_event(args, run_id)
    options = [field.name for field in start_event.TRAINING_FIELDS if getattr(args, field.name) is not None]
    if options or args.config or args.demo:
        raise OperatorError(f"give {args.event} or training options, not both")
    try:
        event = json.loads(args.event.read_text())
    except (OSError, ValueError) as exc:
        raise OperatorError(f"cannot read the start event {args.event}: {exc}") from exc
    if not isinstance(event, dict):
        raise OperatorError(f"{args.event} must hold a JSON object, got {type(event).__name__}")
    if event.get("resume"):
        raise OperatorError(f"{args.event} is a resume event; use lambdatrain resume RUN")
    if args.run and event.get("run", args.run) != args.run:
        raise OperatorError(f"--run {args.run} and the event's run {event['run']!r} differ; give one")
    event["run"] = args.run or event.get("run") or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    try:
        protocol.parse_start(event)
    except errors.InvalidEventError as exc:
        raise OperatorError(f"invalid start event {args.event}: {exc}") from exc
    return event


def _delegate_local(args: argparse.Namespace) -> int:
    """``start`` / ``resume`` on a state directory: ``lambdatrain local``, which runs the run to its end."""
    from localrun import cli  # cli imports this module

    if args.region:
        raise OperatorError("--region needs --stack")
    state_dir = args.state_dir or Path(".local")
    argv = ["local", "--state-dir", str(state_dir), "--table", args.table]
    if args.efs_root:
        argv += ["--efs-root", str(args.efs_root)]
    if args.command == "resume":
        if not (state_dir / "dynamodb").is_dir():
            raise OperatorError(
                f"{state_dir} holds no status table ({state_dir / 'dynamodb'} does not exist)"
            )
        return cli.main([*argv, "--resume", args.run])
    if args.invoke:
        raise OperatorError("--invoke needs --stack (locally the start is always an Event invocation)")
    event = build_event(args)
    training = {key: value for key, value in event.items() if key not in ("start", "run")}
    argv += [
        "--run",
        event["run"],
        *(f"--config={key}={json.dumps(value)}" for key, value in training.items()),
    ]
    return cli.main(argv)


# --- curves, cost, model ---------------------------------------------------------------------------------


def plot_curves(target: targets.Target, args: argparse.Namespace) -> int:
    run = require_run(target, args.run)
    points = curves.curve_points(run, target.status.list_rounds(args.run))
    if args.csv is not None:
        curves.write_csv(points, args.csv)
        print(f"run {args.run}: {len(points)} rounds written to {args.csv}")
    title = f"{args.run}: {run.state}, {run.config.workers} workers, {run.config.model} x{run.config.width:g}"
    curves.plot(points, args.output, title)
    print(f"run {args.run}: curves of {len(points)} rounds in {args.output}")
    return 0


def price_run(target: targets.Target, args: argparse.Namespace) -> int:
    prices = cost.load_prices(args.prices)  # a bad prices file fails before anything is read
    run = require_run(target, args.run)
    usage = cost.measure(args.run, target.log_lines(run), target.status.list_rounds(args.run))
    if usage.invocations == 0:
        raise OperatorError(
            f"no invocation of run {args.run} in the records of {target.name}; nothing to price"
        )
    print(cost.format_report(run, usage, prices, target.stack_parameters(), target.measurement_note()))
    return 0


def fetch_model(target: targets.Target, args: argparse.Namespace) -> int:
    run = require_run(target, args.run)
    if run.state != coordination.SUCCEEDED:
        raise OperatorError(
            f"run {args.run} is {run.state}; final.keras exists once a run SUCCEEDED "
            f"(its round {run.round_index} weights are on EFS)"
        )
    with outputs.atomic_output(args.output) as temporary:
        source = target.fetch_model(run, temporary)
    print(f"run {args.run}: {source} -> {args.output}")
    return 0


# --- predict --------------------------------------------------------------------------------------------


def predict_images(args: argparse.Namespace) -> int:
    if not args.images and args.cifar_test is None:
        raise OperatorError("give IMAGE files, --cifar-test K, or both")
    dataset_dir = _dataset_dir(args)
    model = predict.load_model(args.model)
    size = predict.input_size(model)
    images = [
        predict.load_image(path, size) for path in args.images
    ]  # every file is checked before predicting
    names: list[str] = [str(path) for path in args.images]
    truths: list[str | None] = [None] * len(images)
    label_names = predict.label_names_of(dataset_dir)
    if args.cifar_test is not None:
        if dataset_dir is None:
            raise OperatorError(
                "--cifar-test needs the prepared dataset: --dataset DIR, or --state-dir/--efs-root"
            )
        test_x, test_y, indices, label_names = predict.sample_test_set(
            dataset_dir, args.cifar_test, args.seed
        )
        images += [predict.load_array(image, size) for image in test_x]
        names += [f"test[{index}]" for index in indices]
        truths += [label_names[int(label)] for label in test_y]
    predictions = predict.predict(model, np.stack(images), label_names)
    width = max(len(name) for name in names)
    for name, prediction, truth in zip(names, predictions, truths, strict=True):
        verdict = (
            "" if truth is None else f"  (true: {truth}{'' if truth == prediction.label else ', wrong'})"
        )
        print(f"{name:<{width}}  {prediction.label:<10} {prediction.probability:6.1%}{verdict}")
    if args.cifar_test is not None:
        right = sum(p.label == t for p, t in zip(predictions, truths, strict=True) if t is not None)
        print(f"right: {right}/{args.cifar_test}")
    if args.grid is not None:
        predict.draw_grid(np.stack(images), predictions, truths, args.grid, f"{args.model.name}: predictions")
        print(f"grid: {args.grid}")
    return 0


def _dataset_dir(args: argparse.Namespace) -> Path | None:
    """The prepared dataset: --dataset, else <efs-root>/datasets/cifar10 of the state directory; None if neither
    is given and the default state directory has none."""
    if args.dataset is not None:
        if args.state_dir or args.efs_root:
            raise OperatorError("--dataset and --state-dir/--efs-root name different datasets; give one")
        return args.dataset
    efs_root = args.efs_root or (args.state_dir or Path(".local")) / "efs"
    path = efs_layout.EfsLayout(efs_root).dataset_dir("cifar10")
    if args.state_dir or args.efs_root or path.is_dir():
        return path
    return None


# --- formatting -----------------------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def format_time(stamp: str | None) -> str:
    if not stamp:
        return "-"
    return dt.datetime.fromisoformat(stamp).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def wall_time_s(run: coordination.RunStatus | None) -> float:
    """From creation to the last update of a run that ended, or to now."""
    if run is None or not run.created_at:
        return 0.0
    end = (
        dt.datetime.fromisoformat(run.updated_at)
        if run.terminal and run.updated_at
        else dt.datetime.now(dt.UTC)
    )
    return max(0.0, (end - dt.datetime.fromisoformat(run.created_at)).total_seconds())


def format_wall_time(run: coordination.RunStatus) -> str:
    return progress.format_duration(wall_time_s(run)) if run.created_at else "-"


COMMAND_FUNCTIONS: dict[str, Callable[[targets.Target, argparse.Namespace], int]] = {
    "runs": list_runs,
    "status": show_status,
    "watch": watch_run,
    "stop": stop_run,
    "rm": remove_run,
    "start": start_run,
    "resume": resume_run,
    "curves": plot_curves,
    "cost": price_run,
    "model": fetch_model,
}
