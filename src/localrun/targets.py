"""Where the operator commands act: a deployed stack, or a local state directory. One class each, one interface.

- :class:`StackTarget` finds the status table, the trainer function and the bucket in the stack's CloudFormation
  ``Outputs`` (``StatusTableName``, ``TrainerFunctionName``, ``BucketName``) and reaches them with boto3.
- :class:`LocalTarget` uses the DynamoDB Local that serves ``<state-dir>/dynamodb`` now (a running
  ``lambdatrain local``, found through :func:`localrun.dynamodb_local.running_server`), or starts one on those
  files for the length of the command; never a second one on the same files.

Both give a :class:`trainer.coordination.StatusTable`, so every read and write of run state goes through the
trainer's own records.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from localrun import dynamodb_local, environment, template
from localrun.errors import OperatorError
from trainer import config, coordination, efs_layout

STACK_OUTPUTS = ("StatusTableName", "TrainerFunctionName", "BucketName")
START_PREFIX = "start/"  # the bucket's start objects (the trainer's S3 notification filter)
# Invocations of a run start up to a minute before its item exists (the start) and may end long after its last
# update (a late copy, a failure record): the log window of `cost` reaches this far after it.
LOG_MARGIN_S = 2 * config.DEFAULT_FUNCTION_TIMEOUT_S + 60


class Target:
    """What the commands need from where runs live."""

    name: str  # for messages: "stack S (region R)" or "state directory D"
    status: coordination.StatusTable
    efs_root: Path | None = None  # None: the EFS is not reachable from this machine
    runs_executed: bool = True  # False: nothing executes this target's runs now (a local one, unattended)

    def option_args(self) -> str:
        """The options that name this target again, for printed commands."""
        raise NotImplementedError

    def request_stop(self, run_id: str) -> None:
        raise NotImplementedError

    def log_lines(self, run: coordination.RunStatus) -> Iterator[str]:
        """The function's log lines that may concern ``run``: its handler's JSON lines and the REPORT lines."""
        raise NotImplementedError

    def fetch_model(self, run: coordination.RunStatus, destination: Path) -> str:
        """Copy the run's ``final.keras`` to ``destination``; returns where it came from."""
        raise NotImplementedError

    def stack_parameters(self) -> dict[str, str] | None:
        """The deployed stack's parameters (None: no stack; the template's defaults apply)."""
        return None

    def measurement_note(self) -> str | None:
        """What to keep in mind about the measured seconds (None: Lambda measured them)."""
        return None

    def close(self) -> None:
        """Release what the target started."""

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StackTarget(Target):
    def __init__(self, stack_name: str, region: str | None = None, session: Any = None) -> None:
        self.stack_name = stack_name
        try:
            self.session = session or boto3.Session(region_name=region)
            self.region = self.session.region_name
            if self.region is None:
                raise OperatorError("no AWS region configured; pass --region (or set AWS_REGION)")
            self.name = f"stack {stack_name} ({self.region})"
            outputs = self._outputs()
            self.table_name = outputs["StatusTableName"]
            self.function_name = outputs["TrainerFunctionName"]
            self.bucket = outputs["BucketName"]
            self.file_system_id = outputs.get("FileSystemId")
            self.log_group = f"/aws/lambda/{self.function_name}"  # the template's TrainerLogGroup
            self.status = coordination.StatusTable(self.session.resource("dynamodb").Table(self.table_name))
            self.lambda_client = self.session.client("lambda")
            self.s3_client = self.session.client("s3")
        except BotoCoreError as exc:
            raise OperatorError(f"cannot reach stack {stack_name}: {exc}") from exc

    def _outputs(self) -> dict[str, str]:
        client = self.session.client("cloudformation")
        try:
            stacks = client.describe_stacks(StackName=self.stack_name)["Stacks"]
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", str(exc))
            if "does not exist" in message:
                raise OperatorError(
                    f"stack {self.stack_name} does not exist in {self.region}; deploy it (make deploy) or pass "
                    "--region"
                ) from exc
            raise OperatorError(f"cannot describe stack {self.stack_name}: {message}") from exc
        outputs = {output["OutputKey"]: output["OutputValue"] for output in stacks[0].get("Outputs", [])}
        self.parameters = {
            parameter["ParameterKey"]: parameter.get("ParameterValue", "")
            for parameter in stacks[0].get("Parameters", [])
        }
        missing = [key for key in STACK_OUTPUTS if key not in outputs]
        if missing:
            raise OperatorError(
                f"stack {self.stack_name} has no output {', '.join(missing)}; is it a lambdatrain stack, fully "
                "deployed?"
            )
        return outputs

    def option_args(self) -> str:
        return f"--stack {self.stack_name} --region {self.region}"

    def send_event(self, event: dict[str, Any]) -> None:
        """An ``Event`` invocation of the trainer, as ``aws lambda invoke --invocation-type Event`` would."""
        try:
            self.lambda_client.invoke(
                FunctionName=self.function_name, InvocationType="Event", Payload=json.dumps(event).encode()
            )
        except (BotoCoreError, ClientError) as exc:
            raise OperatorError(f"invoking {self.function_name} failed: {exc}") from exc

    def request_stop(self, run_id: str) -> None:
        self.send_event({"stop": True, "run": run_id})

    def upload_start(self, event: dict[str, Any], run_id: str) -> str:
        """Upload a start object (what ``make start`` does); returns its URL."""
        key = f"{START_PREFIX}{run_id}.json"
        try:
            self.s3_client.put_object(
                Bucket=self.bucket, Key=key, Body=json.dumps(event).encode(), ContentType="application/json"
            )
        except (BotoCoreError, ClientError) as exc:
            raise OperatorError(f"uploading s3://{self.bucket}/{key} failed: {exc}") from exc
        return f"s3://{self.bucket}/{key}"

    def log_lines(self, run: coordination.RunStatus) -> Iterator[str]:
        """The trainer's CloudWatch log events from shortly before the run was created to well after its last
        update: the handler's JSON lines and Lambda's REPORT lines (crashed and duplicate invocations too)."""
        start_s, end_s = _log_window(run)
        client = self.session.client("logs")
        kwargs: dict[str, Any] = {
            "logGroupName": self.log_group,
            "startTime": int(start_s * 1000),
            "endTime": int(end_s * 1000),
        }
        try:
            for page in client.get_paginator("filter_log_events").paginate(**kwargs):
                for event in page.get("events", []):
                    yield event.get("message", "")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                raise OperatorError(
                    f"log group {self.log_group} does not exist in {self.region}; the trainer has not logged yet"
                ) from exc
            raise OperatorError(f"reading log group {self.log_group} failed: {exc}") from exc

    def fetch_model(self, run: coordination.RunStatus, destination: Path) -> str:
        uri = run.summary.final_model_s3
        if not uri:
            raise OperatorError(
                f"run {run.run_id} has no final.keras in S3 (it was exported only to the stack's EFS, "
                f"{run.summary.final_model}; runs started before every run exported to the bucket)"
            )
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            self.s3_client.download_file(bucket, key, str(destination))
        except (BotoCoreError, ClientError) as exc:
            raise OperatorError(f"downloading {uri} failed: {exc}") from exc
        return uri

    def stack_parameters(self) -> dict[str, str] | None:
        return dict(self.parameters)

    def undo_kill_switch_command(self) -> str:
        """The command that lifts the kill switch of ``stop --now`` (deletes the trainer's reserved concurrency)."""
        return f"aws lambda delete-function-concurrency --function-name {self.function_name} --region {self.region}"

    def kill_switch_on(self) -> bool:
        """Whether the trainer's reserved concurrency is 0 (``stop --now``): Lambda then runs no invocation of it."""
        try:
            reserved = self.lambda_client.get_function_concurrency(FunctionName=self.function_name)
        except (BotoCoreError, ClientError) as exc:
            raise OperatorError(
                f"reading the reserved concurrency of {self.function_name} failed (nothing sent): {exc}"
            ) from exc
        return reserved.get("ReservedConcurrentExecutions") == 0

    def stop_all_invocations(self) -> None:
        """The kill switch: reserved concurrency 0, so Lambda runs no invocation of the trainer at all."""
        try:
            self.lambda_client.put_function_concurrency(
                FunctionName=self.function_name, ReservedConcurrentExecutions=0
            )
        except (BotoCoreError, ClientError) as exc:
            raise OperatorError(
                f"setting the reserved concurrency of {self.function_name} failed: {exc}"
            ) from exc


class LocalTarget(Target):
    def __init__(
        self,
        state_dir: Path,
        efs_root: Path | None = None,
        table_name: str = "lambdatrain-status",
        template_path: Path = template.DEFAULT_TEMPLATE,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.efs_root = (efs_root or self.state_dir / "efs").resolve()
        self.table_name = table_name
        self.name = f"state directory {state_dir}"
        self.database: dynamodb_local.DynamoDBLocal | None = None
        db_path = self.state_dir / "dynamodb"
        if not db_path.is_dir():
            raise OperatorError(
                f"{state_dir} holds no status table ({db_path} does not exist); start a run with "
                "`lambdatrain local`, or pass --state-dir"
            )
        server = dynamodb_local.running_server(db_path)
        if server is None:
            self.database = dynamodb_local.DynamoDBLocal(
                db_path=db_path, log_path=self.state_dir / "logs" / "dynamodb-local.log"
            ).start()
            endpoint_url = self.database.endpoint_url
        else:
            endpoint_url = server.endpoint_url
        # Runs make progress only while a `lambdatrain local` serves these files (it started the database).
        self.runs_executed = server is not None
        try:
            client = boto3.client("dynamodb", **environment.client_settings(endpoint_url))
            try:
                client.describe_table(TableName=table_name)
            except client.exceptions.ResourceNotFoundException:
                raise OperatorError(
                    f"{state_dir} has no table {table_name!r}; start a run with `lambdatrain local`, or pass --table"
                ) from None
            dynamodb_local.add_missing_indexes(client, table_name, template_path)
            resource = boto3.resource("dynamodb", **environment.client_settings(endpoint_url))
            self.status = coordination.StatusTable(resource.Table(table_name))
        except BaseException:
            self.close()
            raise

    def option_args(self) -> str:
        return f"--state-dir {self.state_dir}"

    def request_stop(self, run_id: str) -> None:
        # What the monitor does on Ctrl-C: flag the run item now, the stop event's own write.
        self.status.request_stop(run_id)

    def log_path(self, run_id: str) -> Path:
        """Where ``lambdatrain local`` logs a run: the handler's lines and the runtime's REPORT lines."""
        return self.state_dir / "logs" / f"{run_id}.log"

    def log_lines(self, run: coordination.RunStatus) -> Iterator[str]:
        path = self.log_path(run.run_id)
        try:
            with path.open(errors="replace") as lines:
                yield from lines
        except FileNotFoundError:
            raise OperatorError(
                f"{path} does not exist: no invocation records of run {run.run_id} (lambdatrain local writes them)"
            ) from None

    def fetch_model(self, run: coordination.RunStatus, destination: Path) -> str:
        source = efs_layout.EfsLayout(self.efs_root).final_model_path(run.run_id)
        try:
            shutil.copyfile(source, destination)
        except FileNotFoundError:
            raise OperatorError(
                f"{source} does not exist (run {run.run_id} SUCCEEDED; was it removed?)"
            ) from None
        return str(source)

    def measurement_note(self) -> str | None:
        return (
            f"local run: seconds measured on this machine ({_cpu_name()}, {os.cpu_count()} cores) stand for "
            "Lambda's at the function's memory; Lambda's vCPUs (one per 1769 MB) are not this machine's cores, so "
            "the GB-seconds in the cloud scale with how much slower or faster they are"
        )

    def index_runs_on_efs(self) -> None:
        """Runs created before the ``Runs`` index have EFS folders: index those the listing misses."""
        runs_dir = self.efs_root / "runs"
        if runs_dir.is_dir():
            for run_dir in runs_dir.iterdir():
                if run_dir.is_dir():
                    self.status.index_run(run_dir.name)

    def close(self) -> None:
        database, self.database = self.database, None
        if database is not None:
            database.stop()


def _log_window(run: coordination.RunStatus) -> tuple[float, float]:
    """Epoch seconds: from shortly before the run was created to well after its last update (or now)."""
    now = dt.datetime.now(dt.UTC).timestamp()
    created = dt.datetime.fromisoformat(run.created_at).timestamp() if run.created_at else now
    ended = dt.datetime.fromisoformat(run.updated_at).timestamp() if run.terminal and run.updated_at else now
    return created - 60.0, min(now, ended + LOG_MARGIN_S)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
