"""The ``cifar10-prep`` command through ``prep.cli.main([...])``, including the cloud path with moto S3
and stubbed CloudFormation and Lambda clients."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws

from prep import cli, upload

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
BUCKET = "lambdatrain-datasets"
STACK = "lambdatrain"
FUNCTION = "lambdatrain-StagingFunction-AbC123"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the working directory, with the fixture as an archive and as an extracted folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIXTURE, tmp_path / "cifar10-tiny.tar.gz")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "notes.txt").write_text("precious")
    return tmp_path


CASES = [
    # id, argv, exit status, pattern in stdout (0) or stderr (non-zero)
    ("archive", ["--source", "cifar10-tiny.tar.gz", "--out", "out"], 0, r"^prepared 200 train \+ 100 test images from cifar10-tiny.tar.gz in out \("),
    ("folder", ["--source", "extracted/cifar-10-batches-py", "--out", "out"], 0, r"^prepared 200 train \+ 100 test images from cifar-10-batches-py"),
    ("parent-folder", ["--source", "extracted", "--out", "out", "--force"], 0, r"^prepared 200 train"),
    ("missing-source", ["--source", "nope.tar.gz", "--out", "out"], 1, r"^error: nope.tar.gz: no such file or folder\n$"),
    ("not-a-tar", ["--source", "not-a-dataset/notes.txt", "--out", "out"], 1, r"^error: not-a-dataset/notes.txt: not a tar archive"),
    ("foreign-out-folder", ["--source", "cifar10-tiny.tar.gz", "--out", "not-a-dataset"], 1, r"^error: not-a-dataset: folder is not empty and holds no manifest.json"),
    ("stack-without-s3", ["--source", "cifar10-tiny.tar.gz", "--stack", STACK], 1, r"^error: --stack: only used with --s3-uri\n$"),
    ("region-without-s3", ["--source", "cifar10-tiny.tar.gz", "--region", "us-east-1"], 1, r"^error: --region: only used with --s3-uri"),
    ("s3-without-stack", ["--source", "cifar10-tiny.tar.gz", "--s3-uri", f"s3://{BUCKET}/p"], 1, r"^error: --s3-uri needs --stack"),
    ("bad-s3-uri", ["--source", "cifar10-tiny.tar.gz", "--s3-uri", "https://bucket/p", "--stack", STACK], 1, r"^error: --s3-uri must look like s3://bucket/prefix"),
    ("s3-prefix-dotdot", ["--source", "cifar10-tiny.tar.gz", "--s3-uri", f"s3://{BUCKET}/a/../b", "--stack", STACK], 1, r"^error: --s3-uri .*no '\.\.'"),
    ("bad-dataset-name", ["--source", "cifar10-tiny.tar.gz", "--s3-uri", f"s3://{BUCKET}/datasets/p", "--stack", STACK, "--dataset", "a/b"], 1, r"^error: --dataset must match"),
    ("s3-prefix-outside-datasets", ["--source", "cifar10-tiny.tar.gz", "--s3-uri", f"s3://{BUCKET}/p", "--stack", STACK], 1, r"^error: --s3-uri .*must start with 'datasets/'"),
    ("unknown-option", ["--frobnicate"], 2, r"unrecognized arguments: --frobnicate"),
    ("help", ["--help"], 0, r"usage: cifar10-prep"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "status", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_main(workdir, capsys, argv, status, pattern):
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    assert re.search(pattern, captured.out if status == 0 else captured.err, re.MULTILINE)
    if status == 0 and "--help" not in argv:
        assert captured.err == ""  # no progress bars or logs when stderr is not a terminal
    if status != 0:
        assert not (workdir / "out").exists()  # validation happens before anything is written


def test_second_run_is_up_to_date_and_force_rebuilds(workdir, capsys):
    argv = ["--source", "cifar10-tiny.tar.gz", "--out", "out"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--force"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["prepared", "up", "prepared"]
    assert lines[1] == "up to date: out was made from the same source (--force rebuilds)"


def test_console_script_runs_as_a_module(workdir):
    completed = subprocess.run(
        [sys.executable, "-m", "prep", "--source", "nope.tar.gz"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 1
    assert completed.stderr == "error: nope.tar.gz: no such file or folder\n"


# --- Cloud path ---------------------------------------------------------------------------------------


def _stack_outputs(outputs: dict[str, str]) -> dict[str, Any]:
    return {
        "Stacks": [
            {
                "StackName": STACK,
                "CreationTime": "2026-01-01T00:00:00Z",
                "StackStatus": "CREATE_COMPLETE",
                "Outputs": [{"OutputKey": key, "OutputValue": value} for key, value in outputs.items()],
            }
        ]
    }


def _invoke_response(payload: dict[str, Any], function_error: str | None = None) -> dict[str, Any]:
    raw = json.dumps(payload).encode()
    response: dict[str, Any] = {"StatusCode": 200, "Payload": StreamingBody(io.BytesIO(raw), len(raw))}
    if function_error:
        response["FunctionError"] = function_error
    return response


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto S3 with a bucket; CloudFormation and Lambda clients whose responses each test stubs."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        cloudformation = boto3.client("cloudformation", region_name="us-east-1")
        lambda_ = boto3.client("lambda", region_name="us-east-1")
        stubs = {"cloudformation": Stubber(cloudformation), "lambda": Stubber(lambda_)}
        regions: list[str | None] = []

        def for_region(region: str | None) -> upload.AwsClients:
            regions.append(region)
            return upload.AwsClients(s3=s3, cloudformation=cloudformation, lambda_=lambda_)

        monkeypatch.setattr(upload.AwsClients, "for_region", staticmethod(for_region))
        with stubs["cloudformation"], stubs["lambda"]:
            yield {"s3": s3, "regions": regions, **stubs}


CLOUD_ARGV = ["--source", "cifar10-tiny.tar.gz", "--out", "out", "--s3-uri", f"s3://{BUCKET}/datasets/cifar10/",
              "--stack", STACK, "--region", "eu-west-1"]  # fmt: skip
STAGE_EVENT = {"stage": {"bucket": BUCKET, "prefix": "datasets/cifar10", "dataset": "cifar10"}}
STAGE_SUMMARY = {"dataset": "cifar10", "directory": "/mnt/efs/datasets/cifar10", "seconds": 1.5,
                 "files": ["train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy", "manifest.json"], "bytes": 925000}  # fmt: skip


def _expect_stack(aws: dict[str, Any], outputs: dict[str, str] | None = None) -> None:
    aws["cloudformation"].add_response(
        "describe_stacks", _stack_outputs(outputs or {"StagingFunctionName": FUNCTION}), {"StackName": STACK}
    )


def _expect_invoke(aws: dict[str, Any], payload: dict[str, Any], function_error: str | None = None) -> None:
    aws["lambda"].add_response(
        "invoke",
        _invoke_response(payload, function_error),
        {
            "FunctionName": FUNCTION,
            "InvocationType": "RequestResponse",
            "Payload": json.dumps(STAGE_EVENT).encode(),
        },
    )


def test_cloud_path_uploads_then_invokes_the_staging_function(workdir, aws, capsys):
    _expect_stack(aws)
    _expect_invoke(aws, STAGE_SUMMARY)

    assert cli.main(CLOUD_ARGV) == 0

    out = capsys.readouterr().out
    assert "uploaded 5 file(s)" in out and f"s3://{BUCKET}/datasets/cifar10/" in out
    assert "staged 5 file(s), 0.9 MB, into /mnt/efs/datasets/cifar10 in 1.5 s" in out
    assert aws["regions"] == ["eu-west-1"]
    aws["cloudformation"].assert_no_pending_responses()
    aws["lambda"].assert_no_pending_responses()
    objects = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="datasets/cifar10/")["Contents"]
    assert sorted(obj["Key"].rsplit("/", 1)[1] for obj in objects) == sorted(STAGE_SUMMARY["files"])
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    head = aws["s3"].head_object(Bucket=BUCKET, Key="datasets/cifar10/train_x.npy")
    assert head["Metadata"] == {"sha256": manifest["arrays"]["train_x"]["sha256"]}


def test_cloud_rerun_skips_unchanged_arrays(workdir, aws, capsys):
    for _ in range(2):
        _expect_stack(aws)
        _expect_invoke(aws, STAGE_SUMMARY)
    assert cli.main(CLOUD_ARGV) == 0
    assert cli.main(CLOUD_ARGV) == 0
    second = capsys.readouterr().out.split("up to date")[1]
    assert "uploaded 1 file(s)" in second and "(4 unchanged)" in second


def test_staging_function_error_is_an_error_exit(workdir, aws, capsys):
    _expect_stack(aws)
    error = {"errorType": "StagingError", "errorMessage": "s3://b/p/train_x.npy: not found"}
    _expect_invoke(aws, error, function_error="Unhandled")

    assert cli.main(CLOUD_ARGV) == 1

    assert capsys.readouterr().err == (
        f"error: staging function {FUNCTION} failed (Unhandled): StagingError: s3://b/p/train_x.npy: not found\n"
    )


def test_stack_without_the_staging_output_fails_before_uploading(workdir, aws, capsys):
    _expect_stack(aws, {"TrainFunctionName": "x"})

    assert cli.main(CLOUD_ARGV) == 1

    assert "has no output StagingFunctionName (outputs: ['TrainFunctionName'])" in capsys.readouterr().err
    assert aws["s3"].list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0


def test_missing_stack_is_an_error_exit(workdir, aws, capsys):
    aws["cloudformation"].add_client_error(
        "describe_stacks",
        service_error_code="ValidationError",
        service_message=f"Stack with id {STACK} does not exist",
    )
    assert cli.main(CLOUD_ARGV) == 1
    assert (
        f"error: stack '{STACK}': ValidationError: Stack with id {STACK} does not exist"
        in capsys.readouterr().err
    )
