"""The operator commands (``lambdatrain runs``, ``status``, ``watch``, ``stop``, ``rm``, ``start``, ``resume``)
against both targets through the same code path:

- ``local``: a state directory whose ``dynamodb/`` is served by a DynamoDB Local on disk (as a running
  ``lambdatrain local`` serves it); the commands find it through its ``server.json``.
- ``stack``: a "deployed stack" whose CloudFormation, S3 and Lambda control plane are moto's (a minimal stack with
  the Outputs the commands read), and whose status table lives in the same DynamoDB Local.

Runs are fakes made with :class:`trainer.coordination.StatusTable` methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from localrun import cli, dynamodb_local, operations, targets
from localrun.errors import OperatorError
from trainer import coordination
from trainer.config import TrainConfig
from trainer.errors import LayoutError
from trainer_harness import Harness

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "template.yaml"
STACK = "lambdatrain-test"
REGION = "eu-west-1"
FUNCTION = "lambdatrain-test-trainer"
BUCKET = "lambdatrain-test-bucket"
ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}],
}  # fmt: skip


@pytest.fixture(scope="module")
def served_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state directory served by DynamoDB Local on disk for the module, as ``lambdatrain local`` serves it."""
    state_dir = tmp_path_factory.mktemp("state")
    with dynamodb_local.DynamoDBLocal(db_path=state_dir / "dynamodb"):
        yield state_dir


@dataclasses.dataclass
class Place:
    """Where a test's runs live, and the options that name it."""

    kind: str
    options: list[str]
    status: coordination.StatusTable
    efs_root: Path
    invocations: list[dict[str, Any]]  # Lambda Invoke calls (stack only)
    lambda_client: Any = None
    s3_client: Any = None

    def main(self, command: str, *argv: str) -> int:
        return cli.main([command, *argv, *self.options])


@pytest.fixture
def local_table(served_state_dir: Path) -> Iterator[tuple[str, Any]]:
    server = dynamodb_local.running_server(served_state_dir / "dynamodb")
    assert server is not None
    client = boto3.client("dynamodb", **targets.environment.client_settings(server.endpoint_url))
    name = f"ops-{uuid.uuid4().hex[:12]}"
    dynamodb_local.create_table(client, name, TEMPLATE)
    resource = boto3.resource("dynamodb", **targets.environment.client_settings(server.endpoint_url))
    yield name, resource.Table(name)
    client.delete_table(TableName=name)


@pytest.fixture(params=["local", "stack"])
def place(
    request: pytest.FixtureRequest,
    served_state_dir: Path,
    local_table: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Place]:
    name, table = local_table
    efs_root = tmp_path / "efs"
    efs_root.mkdir()
    if request.param == "local":
        options = ["--state-dir", str(served_state_dir), "--efs-root", str(efs_root), "--table", name]
        yield Place("local", options, coordination.StatusTable(table), efs_root, [])
        return
    endpoint_url = table.meta.client.meta.endpoint_url
    with deployed_stack(monkeypatch, tmp_path, name, endpoint_url) as (invocations, lambda_client, s3_client):
        yield Place(
            "stack",
            ["--stack", STACK, "--region", REGION],
            coordination.StatusTable(table),
            efs_root,
            invocations,
            lambda_client,
            s3_client,
        )


@pytest.fixture
def local_place(place: Place) -> Place:
    if place.kind != "local":
        pytest.skip("a local state directory only")
    return place


@pytest.fixture
def stack_place(place: Place) -> Place:
    if place.kind != "stack":
        pytest.skip("a deployed stack only")
    return place


class deployed_stack:  # a context manager, named like mock_aws
    """moto's S3, IAM and Lambda; CloudFormation's DescribeStacks answers with the commands' Outputs for STACK
    (moto's CloudFormation needs openapi-spec-validator, which the lock does not hold) and ValidationError for
    any other stack; DynamoDB stays on the DynamoDB Local named by AWS_ENDPOINT_URL_DYNAMODB (moto passes
    requests to it through)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, table_name: str, dynamodb_endpoint_url: str
    ) -> None:
        self.monkeypatch, self.tmp_path, self.table_name = monkeypatch, tmp_path, table_name
        self.dynamodb_endpoint_url = dynamodb_endpoint_url
        self.mock = mock_aws(config={"lambda": {"use_docker": False}})

    def __enter__(self) -> tuple[list[dict[str, Any]], Any, Any]:
        monkeypatch = self.monkeypatch
        missing = self.tmp_path / "no-aws-config"
        for name, value in {
            "AWS_CONFIG_FILE": str(missing),
            "AWS_SHARED_CREDENTIALS_FILE": str(missing),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        monkeypatch.delenv("AWS_REGION", raising=False)
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", self.dynamodb_endpoint_url)
        self.mock.start()
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        outputs = {
            "BucketName": BUCKET,
            "StatusTableName": self.table_name,
            "TrainerFunctionName": FUNCTION,
            "FileSystemId": "fs-0123456789abcdef0",
        }
        role = boto3.client("iam", region_name=REGION).create_role(
            RoleName="trainer", AssumeRolePolicyDocument=json.dumps(ROLE_POLICY)
        )
        code = io.BytesIO()
        with zipfile.ZipFile(code, "w") as archive:
            archive.writestr("app.py", "def lambda_handler(event, context):\n    return event\n")
        lambda_client = boto3.client("lambda", region_name=REGION)
        lambda_client.create_function(
            FunctionName=FUNCTION,
            Runtime="python3.12",
            Role=role["Role"]["Arn"],
            Handler="app.lambda_handler",
            Code={"ZipFile": code.getvalue()},
        )
        invocations: list[dict[str, Any]] = []
        stack_requests: list[dict[str, Any]] = []
        session_class = boto3.Session

        def describe_stacks(params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if params.get("StackName") != STACK:
                error = {
                    "Code": "ValidationError",
                    "Message": f"Stack with id {params.get('StackName')} does not exist",
                }
                return FakeHttpResponse(400), {"Error": error}
            stack = {
                "StackName": STACK,
                "CreationTime": "2026-11-27T08:00:00Z",
                "StackStatus": "CREATE_COMPLETE",
                "Outputs": [{"OutputKey": key, "OutputValue": value} for key, value in outputs.items()],
            }
            return FakeHttpResponse(200), {"Stacks": [stack]}

        def session_recording_invocations(*args: Any, **kwargs: Any) -> Any:
            session = session_class(*args, **kwargs)
            session.events.register(
                "provide-client-params.lambda.Invoke", lambda params, **_: invocations.append(dict(params))
            )
            session.events.register(
                "provide-client-params.cloudformation.DescribeStacks",
                lambda params, **_: stack_requests.append(dict(params)),
            )
            session.events.register(
                "before-call.cloudformation.DescribeStacks", lambda **_: describe_stacks(stack_requests[-1])
            )
            return session

        monkeypatch.setattr(targets.boto3, "Session", session_recording_invocations)
        return invocations, lambda_client, boto3.client("s3", region_name=REGION)

    def __exit__(self, *exc_info: object) -> None:
        self.mock.stop()


@dataclasses.dataclass
class FakeHttpResponse:
    status_code: int
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def new_run(
    status: coordination.StatusTable, run_id: str, created_at: str, **config: Any
) -> coordination.RunStatus:
    run = coordination.RunStatus.new(
        run_id, TrainConfig(epochs=2, rounds_per_epoch=2, workers=2, **config), 100
    )
    run = dataclasses.replace(run, created_at=created_at, updated_at=created_at)
    status.create_run(run)
    return run


def commit(status: coordination.StatusTable, run_id: str, accuracy: float | None = None) -> None:
    """Commit the run's current round with metrics, as a combine does; finish the run after its last round."""
    run = status.get_run(run_id)
    assert run is not None
    status.register_worker(run_id, run.round_index, 0)
    metrics = coordination.RoundMetrics(
        epochs_done=(run.round_index + 1) // 2,
        samples=100,
        train_loss=2.0 - run.round_index / 10,
        duration_s={"load": 1.0, "compute": 2.5, "aggregate": 0.5},
        bytes_read=2_000_000,
        bytes_written=1_000_000,
        test_loss=1.5 if accuracy is not None else None,
        test_accuracy=accuracy,
    )
    summary = coordination.RunSummary(test_accuracy=accuracy, test_loss=1.5 if accuracy is not None else None)
    status.commit_round(
        run, metrics.epochs_done, coordination.RUNNING, f"t{run.round_index}", summary, metrics
    )
    run = status.get_run(run_id)
    assert run is not None
    if run.all_rounds_committed:
        final = dataclasses.replace(summary, final_model=f"/mnt/efs/runs/{run_id}/final.keras")
        assert status.finish_run(run, final)


def succeeded_run(status: coordination.StatusTable, run_id: str, created_at: str) -> None:
    new_run(status, run_id, created_at)
    for accuracy in (None, 0.31, None, 0.42):
        commit(status, run_id, accuracy)


def items(status: coordination.StatusTable) -> list[dict[str, Any]]:
    return sorted(status.table.scan()["Items"], key=lambda item: (item["pk"], item["sk"]))


# --- runs, status -----------------------------------------------------------------------------------------


def test_runs_lists_every_run_newest_first(place: Place, capsys: pytest.CaptureFixture[str]) -> None:
    succeeded_run(place.status, "first", "2026-11-27T09:00:00+00:00")
    new_run(place.status, "second", "2026-11-27T10:00:00+00:00")
    commit(place.status, "second", 0.25)

    assert place.main("runs") == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "RUN",
        "STATE",
        "WORKERS",
        "ROUND",
        "EPOCHS",
        "TEST",
        "ACC",
        "STARTED",
        "WALL",
    ]
    assert lines[1].split()[:6] == ["second", "RUNNING", "2", "1/4", "0/2", "25.0%"]
    assert lines[2].split()[:6] == ["first", "SUCCEEDED", "2", "4/4", "2/2", "42.0%"]
    assert "2026-11-27 09:00 UTC" in lines[2]


def test_runs_of_an_empty_table_says_so(place: Place, capsys: pytest.CaptureFixture[str]) -> None:
    assert place.main("runs") == 0
    assert "no runs in" in capsys.readouterr().err


def test_status_shows_state_configuration_rounds_and_model(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    succeeded_run(place.status, "done", "2026-11-27T09:00:00+00:00")

    assert place.main("status", "done") == 0

    out = capsys.readouterr().out
    assert out.startswith("run done: SUCCEEDED\n")
    assert "round 4/4, epoch 2/2" in out
    assert "workers=2" in out and "epochs=2" in out
    assert "/mnt/efs/runs/done/final.keras" in out
    header = next(line for line in out.splitlines() if line.startswith("ROUND"))
    assert header.split() == ["ROUND", "EPOCH", "TRAIN", "LOSS", "TEST", "LOSS", "TEST", "ACC", "load", "s",
                              "compute", "s", "aggregate", "s", "READ", "MB", "WRITTEN", "MB"]  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("3 "))
    assert row.split() == ["3", "2", "1.7000", "1.5000", "42.0%", "1.0", "2.5", "0.5", "2.0", "1.0"]


def test_status_shows_the_bytes_each_phase_read_and_wrote(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    new_run(place.status, "sharded", "2026-11-27T09:00:00+00:00")
    run = place.status.get_run("sharded")
    assert run is not None
    place.status.register_worker("sharded", 0, 0)
    metrics = coordination.RoundMetrics(
        epochs_done=0,
        samples=100,
        train_loss=2.0,
        duration_s={"reduce": 1.0},
        bytes_read=6_000_000,
        bytes_written=2_000_000,
        phase_bytes_read={
            "worker": 8_000_000,
            "worker_max": 4_000_000,
            "reduce": 5_000_000,
            "reduce_max": 2_500_000,
            "commit": 1_000_000,
        },
        phase_bytes_written={
            "worker": 8_000_000,
            "worker_max": 4_000_000,
            "reduce": 1_000_000,
            "reduce_max": 500_000,
            "commit": 1_000_000,
        },
    )
    place.status.commit_round(run, 0, coordination.RUNNING, "t0", coordination.RunSummary(), metrics)

    assert place.main("status", "sharded") == 0

    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("ROUND"))
    assert re.split(r"\s{2,}", header)[-3:] == ["WORKER MB R/W", "REDUCE MB R/W", "COMMIT MB R/W"], header
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert "8.0/8.0 max 4.0/4.0" in row and "5.0/1.0 max 2.5/0.5" in row and row.endswith("1.0/1.0")
    assert place.status.list_rounds("sharded")[0].metrics == metrics  # what the item holds, read back


def test_status_of_a_failed_run_gives_the_reason(place: Place, capsys: pytest.CaptureFixture[str]) -> None:
    new_run(place.status, "bad", "2026-11-27T09:00:00+00:00")
    place.status.fail_run("bad", "loss diverged at round 0")

    assert place.main("status", "bad") == 0

    out = capsys.readouterr().out
    assert "run bad: FAILED" in out and "reason      loss diverged at round 0" in out
    assert "none completed yet" in out and "none yet" in out


# --- watch ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("finish", "code"), [("succeed", 0), ("fail", 1)], ids=["succeeded-0", "failed-1"])
def test_watch_follows_the_run_and_exits_with_its_outcome(
    place: Place, finish: str, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(operations, "POLL_S", 0.05)
    new_run(place.status, "live", "2026-11-27T09:00:00+00:00")

    def train() -> None:
        time.sleep(0.3)
        if finish == "fail":
            place.status.fail_run("live", "worker 1 failed 3 times")
            return
        for accuracy in (None, 0.31, None, 0.42):
            commit(place.status, "live", accuracy)

    trainer = threading.Thread(target=train)
    trainer.start()
    assert place.main("watch", "live") == code
    trainer.join()

    captured = capsys.readouterr()
    if finish == "succeed":
        assert "run live: SUCCEEDED" in captured.out and "test accuracy   42.0%" in captured.out
        assert "live: round 4/4" in captured.err
    else:
        assert "run live: FAILED" in captured.out and "worker 1 failed 3 times" in captured.out


def test_watch_of_a_local_run_that_nothing_executes_says_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    with dynamodb_local.DynamoDBLocal(db_path=state_dir / "dynamodb") as database:
        dynamodb_local.create_table(database.client(), "lambdatrain-status", TEMPLATE)
        new_run(
            coordination.StatusTable(database.resource().Table("lambdatrain-status")),
            "orphan",
            "2026-11-27T09:00:00+00:00",
        )
    # Nothing serves the folder now: the command starts DynamoDB Local on it, and stops it again.

    assert cli.main(["watch", "orphan", "--state-dir", str(state_dir)]) == 1

    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"error: run orphan is RUNNING but no `lambdatrain local` serves state directory {state_dir}, so nothing "
        f"executes it; continue it with: lambdatrain resume orphan --state-dir {state_dir}"
    )
    assert dynamodb_local.running_server(state_dir / "dynamodb") is None


# --- stop -------------------------------------------------------------------------------------------------


def test_stop_asks_the_run_to_stop_after_its_round(place: Place, capsys: pytest.CaptureFixture[str]) -> None:
    new_run(place.status, "live", "2026-11-27T09:00:00+00:00")

    assert place.main("stop", "live") == 0

    assert "stop requested; it stops after round 0" in capsys.readouterr().out
    run = place.status.get_run("live")
    if place.kind == "local":  # the status table's request_stop, as the monitor does on Ctrl-C
        assert run is not None and run.state == coordination.STOP_REQUESTED
        return
    # a stack: the stop event, as an Event invocation of the trainer (which writes STOP_REQUESTED)
    assert [(call["FunctionName"], call["InvocationType"], json.loads(call["Payload"])) for call in place.invocations] == [
        (FUNCTION, "Event", {"stop": True, "run": "live"})
    ]  # fmt: skip
    assert run is not None and run.state == coordination.RUNNING


def test_stop_now_marks_the_run_stopped_and_on_a_stack_applies_the_kill_switch(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    new_run(place.status, "live", "2026-11-27T09:00:00+00:00")

    assert place.main("stop", "live", "--now") == 0

    run = place.status.get_run("live")
    assert run is not None and (run.state, run.reason) == (coordination.STOPPED, operations.HALT_REASON)
    captured = capsys.readouterr()
    assert "resume with: lambdatrain resume live" in captured.out
    if place.kind == "local":
        assert "reserved concurrency" not in captured.err
        return
    concurrency = place.lambda_client.get_function_concurrency(FunctionName=FUNCTION)
    assert concurrency["ReservedConcurrentExecutions"] == 0
    assert f"halts EVERY run of stack {STACK} and the failure-queue consumer" in captured.err
    out = captured.out.splitlines()
    undo = next(i for i, line in enumerate(out) if line.startswith("undo with: "))
    resume = next(i for i, line in enumerate(out) if line.startswith("resume with: "))
    assert undo < resume  # the kill switch must be lifted before the resume can do anything
    assert out[undo].startswith(UNDO)


UNDO = f"undo with: aws lambda delete-function-concurrency --function-name {FUNCTION} --region {REGION}"
HALTED = (
    f"the trainer {FUNCTION} is halted (reserved concurrency 0, the kill switch of `lambdatrain stop --now`)"
)


@pytest.mark.parametrize(
    "argv",
    [["resume", "halted"], ["start", "--workers", "2", "--run", "new"], ["start", "--workers", "2", "--run", "new", "--invoke"]],
    ids=["resume", "start-upload", "start-invoke"],
)  # fmt: skip
def test_resume_and_start_on_a_halted_stack_are_refused_with_the_undo_command(
    stack_place: Place, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`stop --now` leaves reserved concurrency 0: an event sent now would be throttled for hours, then land in a
    failure queue whose consumer is halted too. Refused with the command that lifts the kill switch."""
    new_run(stack_place.status, "halted", "2026-11-27T09:00:00+00:00")
    assert stack_place.main("stop", "halted", "--now") == 0
    capsys.readouterr()
    before = items(stack_place.status)

    assert stack_place.main(*argv) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {HALTED}"), err
    assert (
        f"Lift it first with: aws lambda delete-function-concurrency --function-name {FUNCTION} --region {REGION}"
        in err[0]
    )
    assert stack_place.invocations == []
    assert stack_place.s3_client.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    assert items(stack_place.status) == before

    # once the kill switch is lifted (the printed command), the same command goes through
    stack_place.lambda_client.delete_function_concurrency(FunctionName=FUNCTION)
    assert stack_place.main(*argv) == 0
    assert (
        stack_place.invocations or stack_place.s3_client.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 1
    )


def test_resume_after_stop_now_on_a_stack_does_not_send_into_the_kill_switch(
    stack_place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second hostile review's scenario C, as it was written (branch review2)."""
    new_run(stack_place.status, "halted", "2026-11-27T09:00:00+00:00")
    assert stack_place.main("stop", "halted", "--now") == 0
    assert "resume with: lambdatrain resume halted" in capsys.readouterr().out
    code = stack_place.main("resume", "halted")
    captured = capsys.readouterr()
    concurrency = stack_place.lambda_client.get_function_concurrency(FunctionName=FUNCTION)
    kill_switch_on = concurrency.get("ReservedConcurrentExecutions") == 0
    assert not (code == 0 and kill_switch_on and "concurrency" not in captured.err + captured.out), (
        code,
        captured.out,
        captured.err,
    )
    assert code == 1 and stack_place.invocations == []


# --- rm ---------------------------------------------------------------------------------------------------


def test_rm_deletes_an_ended_runs_items_and_local_efs_files(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    succeeded_run(place.status, "done", "2026-11-27T09:00:00+00:00")
    new_run(place.status, "other", "2026-11-27T10:00:00+00:00")
    run_dir = place.efs_root / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "final.keras").write_bytes(b"model")

    assert place.main("rm", "done") == 0

    out = capsys.readouterr().out
    assert "run done: deleted 5 items from the status table" in out
    if place.kind == "local":  # the folder is gone too: the id can be used again
        assert [item["pk"] for item in items(place.status)] == ["RUN#other"]
        assert not run_dir.exists()
        return
    # the stack's EFS is not reachable from here: named, not touched; the id is burnt, and a tombstone says so
    assert run_dir.exists()
    assert [(item["pk"], item["sk"]) for item in items(place.status)] == [
        ("RUN#done", "REMOVED"),
        ("RUN#other", "RUN"),
    ]
    assert "kept: its EFS files under runs/done/ on file system fs-0123456789abcdef0" in out
    assert (
        f"run done: the id cannot be used for a new run on stack {STACK} ({REGION}): its EFS folder runs/done/ remains"
        in out
    )
    assert (
        "delete runs/done/ from a Lambda function or an EC2 instance that mounts file system fs-0123456789abcdef0"
        in out
    )
    assert (
        f"""aws dynamodb delete-item --table-name {place.status.table.name} """
        f"""--key '{{"pk": {{"S": "RUN#done"}}, "sk": {{"S": "REMOVED"}}}}' --region {REGION}"""
    ) in out


def test_a_run_id_removed_on_a_stack_is_refused_by_start_and_hidden_from_runs(
    stack_place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `rm --stack` the run's EFS folder remains, and the trainer refuses to start a run in an existing
    folder (it must: final.keras is written once, a new run would keep the old model). `start --run ID` refuses
    the id before uploading anything; `runs` does not list it; `status` and a second `rm` say what happened."""
    succeeded_run(stack_place.status, "done", "2026-11-27T09:00:00+00:00")
    assert stack_place.main("rm", "done") == 0
    capsys.readouterr()
    before = items(stack_place.status)

    for argv in (
        ["start", "--workers", "2", "--run", "done"],
        ["start", "--workers", "2", "--run", "done", "--invoke"],
    ):
        assert stack_place.main(*argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"error: run 'done' was removed from stack {STACK} ({REGION}) at "
        ), err
        assert (
            "(lambdatrain rm), but its EFS folder runs/done/ remains, so the trainer refuses a new run with this id; pick another --run"
            in err[0]
        )
    assert stack_place.invocations == []
    assert stack_place.s3_client.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0

    assert stack_place.main("runs") == 0
    captured = capsys.readouterr()
    assert "done" not in captured.out and "no runs in" in captured.err
    assert stack_place.main("status", "done") == 1
    assert "error: run 'done' was removed from stack" in capsys.readouterr().err
    assert stack_place.main("rm", "done") == 0  # nothing left to delete; says again why the id is burnt
    assert "run done: already removed; deleted 0 items" in capsys.readouterr().out
    assert items(stack_place.status) == before
    assert stack_place.main("start", "--workers", "2", "--run", "fresh") == 0  # another id goes through


# --- start, resume ----------------------------------------------------------------------------------------


def test_start_on_a_stack_uploads_the_start_object(
    stack_place: Place, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event_path = tmp_path / "start.json"
    event_path.write_text(json.dumps({"start": True, "workers": 3, "epochs": 2}))

    assert stack_place.main("start", str(event_path), "--run", "exp1") == 0

    body = stack_place.s3_client.get_object(Bucket=BUCKET, Key="start/exp1.json")["Body"].read()
    assert json.loads(body) == {"start": True, "workers": 3, "epochs": 2, "run": "exp1"}
    out = capsys.readouterr().out
    assert f"run exp1: start object uploaded to s3://{BUCKET}/start/exp1.json" in out
    assert f"watch with: lambdatrain watch exp1 --stack {STACK} --region {REGION}" in out


def test_start_on_a_stack_with_invoke_sends_the_event_built_from_options(
    stack_place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack_place.main("start", "--workers", "2", "--epochs", "1", "--run", "exp2", "--invoke") == 0

    assert [json.loads(call["Payload"]) for call in stack_place.invocations] == [
        {"start": True, "run": "exp2", "workers": 2, "epochs": 1}
    ]
    assert "run exp2: start event sent" in capsys.readouterr().out


def test_resume_on_a_stack_sends_the_resume_event(stack_place: Place) -> None:
    new_run(stack_place.status, "paused", "2026-11-27T09:00:00+00:00")
    stack_place.status.halt_run("paused", "operator")

    assert stack_place.main("resume", "paused") == 0

    assert [json.loads(call["Payload"]) for call in stack_place.invocations] == [
        {"start": True, "run": "paused", "resume": True}
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["start", "--workers", "2", "--run", "exp3"], ["--run", "exp3", "--config=workers=2"]),
        (["resume", "paused"], ["--resume", "paused"]),
    ],
    ids=["start", "resume"],
)
def test_start_and_resume_of_local_runs_are_lambdatrain_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: list[str]
) -> None:
    (tmp_path / "dynamodb").mkdir()
    delegated: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: delegated.append(list(argv)) or 0)

    assert operations.run_command(cli.main_parser().parse_args([*argv, "--state-dir", str(tmp_path)])) == 0

    assert delegated == [["local", "--state-dir", str(tmp_path), "--table", "lambdatrain-status", *expected]]


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "nope"], "error: no run 'nope' in "),
        (["watch", "nope"], "error: no run 'nope' in "),
        (["stop", "nope"], "error: no run 'nope' in "),
        (["rm", "nope"], "error: no run 'nope' in "),
        (["stop", "done"], "error: run done is already SUCCEEDED; nothing to stop"),
        (["rm", "live"], "error: run live is RUNNING; stop it first: lambdatrain stop live "),
        (["resume", "done"], "run done is SUCCEEDED; only a STOPPED or FAILED run can be resumed"),
    ],
    ids=[
        "status-unknown",
        "watch-unknown",
        "stop-unknown",
        "rm-unknown",
        "stop-ended",
        "rm-active",
        "resume-done",
    ],
)
def test_bad_input_is_one_error_line_and_changes_nothing(
    place: Place, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "resume" and place.kind == "local":
        pytest.skip("a local resume is lambdatrain local's, tested with it")
    succeeded_run(place.status, "done", "2026-11-27T09:00:00+00:00")
    new_run(place.status, "live", "2026-11-27T10:00:00+00:00")
    before = items(place.status)

    assert place.main(*argv) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert items(place.status) == before
    assert place.invocations == []


def test_a_stack_that_does_not_exist_is_one_error_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_table: tuple[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint_url = local_table[1].meta.client.meta.endpoint_url
    with deployed_stack(monkeypatch, tmp_path, local_table[0], endpoint_url):
        assert cli.main(["runs", "--stack", "missing", "--region", REGION]) == 1
    assert capsys.readouterr().err == (
        f"error: stack missing does not exist in {REGION}; deploy it (make deploy) or pass --region\n"
    )


def test_a_state_dir_without_a_table_is_one_error_line(
    tmp_path: Path, served_state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["runs", "--state-dir", str(tmp_path / "empty")]) == 1
    assert cli.main(["runs", "--state-dir", str(served_state_dir), "--table", "absent"]) == 1

    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"error: {tmp_path / 'empty'} holds no status table ({tmp_path / 'empty' / 'dynamodb'} does not exist); "
        "start a run with `lambdatrain local`, or pass --state-dir"
    )
    assert err[1].startswith(f"error: {served_state_dir} has no table 'absent'")
    assert not (tmp_path / "empty").exists()


def test_runs_of_a_local_table_from_before_the_index_are_listed(
    local_place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    new_run(local_place.status, "older", "2026-11-27T09:00:00+00:00")
    local_place.status.table.update_item(Key=coordination.run_key("older"), UpdateExpression="REMOVE kind")
    (local_place.efs_root / "runs" / "older").mkdir(parents=True)

    assert local_place.main("runs") == 0

    assert "older" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["runs", "--state-dir", "elsewhere"],
            "error: --stack and --state-dir/--efs-root name different places",
        ),
        (
            ["start", "--run", "live", "--workers", "2"],
            "error: run 'live' already exists in stack lambdatrain-test",
        ),
        (
            ["start", "--workers", "0"],
            "error: invalid training configuration: workers must be between 1 and 256",
        ),
        (["start", "EVENT", "--workers", "2"], "error: give EVENT or training options, not both"),
        (
            ["start", "EVENT", "--run", "other"],
            "error: --run other and the event's run 'exp9' differ; give one",
        ),
    ],
    ids=["stack-and-state-dir", "start-existing", "start-invalid", "start-file-and-options", "start-two-ids"],
)
def test_bad_input_for_a_stack_is_one_error_line_and_sends_nothing(
    stack_place: Place, tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    event_path = tmp_path / "start.json"
    event_path.write_text(json.dumps({"start": True, "workers": 2, "run": "exp9"}))
    new_run(stack_place.status, "live", "2026-11-27T10:00:00+00:00")
    before = items(stack_place.status)

    assert stack_place.main(*[str(event_path) if arg == "EVENT" else arg for arg in argv]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("EVENT", str(event_path)) in err[0], err
    assert items(stack_place.status) == before
    assert stack_place.invocations == []
    assert stack_place.s3_client.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_a_stack_without_a_region_is_one_error_line(
    stack_place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["runs", "--stack", STACK]) == 1
    assert capsys.readouterr().err == "error: no AWS region configured; pass --region (or set AWS_REGION)\n"


# --- the trainer's side of a removed run (its real handler, in the harness of the trainer's tests) -------------


class HarnessTarget(targets.Target):
    """The operator commands' view of the harness's table, with no reachable EFS (``efs_root`` None): what a
    stack gives `rm`."""

    def __init__(self, harness: Harness) -> None:
        self.name = "harness"
        self.status = harness.status
        self.efs_root = None

    def option_args(self) -> str:
        return "--stack harness"


def test_the_trainer_refuses_to_start_a_run_id_removed_on_a_stack(harness: Harness) -> None:
    """The second hostile review's scenario D (branch review2), adapted: it expected the id to be reusable after
    `rm --stack`. It is not, on purpose: the folder stays, and the trainer must not start a new run in it
    (final.keras is written once: a new run would keep the old model). What is checked instead: the trainer's
    start of that id fails with a clear reason and writes nothing (it never reads the tombstone `rm` leaves), the
    tombstone survives, and the operator's view refuses the id."""
    event = {"start": True, "run": "again", "workers": 2, "epochs": 1, "rounds_per_epoch": 1}
    harness.invoke(event)
    harness.drain()
    assert harness.run("again").state == "SUCCEEDED"
    target = HarnessTarget(harness)

    assert operations.remove_run(target, argparse.Namespace(command="rm", run="again")) == 0

    assert harness.status.get_run("again") is None
    assert harness.layout.run_dir("again").exists()
    assert operations.get_tombstone(harness.status, "again") is not None
    with pytest.raises(LayoutError, match="already exists but the status table has no run 'again'"):
        harness.invoke(event)
    assert harness.status.get_run("again") is None and not harness.invoker.queue
    assert operations.get_tombstone(harness.status, "again") is not None
    assert "again" not in [run.run_id for run in harness.status.list_runs().runs]
    with pytest.raises(OperatorError, match=r"was removed from harness .* so the trainer refuses a new run"):
        operations.require_run(target, "again")
