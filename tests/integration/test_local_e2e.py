"""``lambdatrain local`` end to end: the real handler, the local Invoke API, DynamoDB Local and a folder as EFS.

A tiny run on the test fixture (a narrow ``vgg19_bn``, 2 workers, 1 epoch of 2 rounds) takes about 20 s here.
"""

from __future__ import annotations

import multiprocessing
import zipfile
from pathlib import Path

import pytest

from localrun import cli, dynamodb_local, runtime
from trainer import coordination

pytestmark = pytest.mark.java  # DynamoDB Local

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
TINY_RUN = [
    "--model", "vgg19_bn", "--width", "0.0625", "--workers", "2", "--epochs", "1", "--rounds-per-epoch", "2",
    "--train-samples", "256", "--test-samples", "128", "--batch-size", "32", "--concurrency", "2",
]  # fmt: skip


@pytest.mark.slow
def test_local_run_trains_on_the_fixture_and_leaves_nothing_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"

    code = cli.main(
        ["local", "--state-dir", str(state_dir), "--source", str(FIXTURE), "--run", "tiny", *TINY_RUN]
    )

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run tiny: SUCCEEDED" in out and "(2/2 rounds, 1 epochs)" in out
    final_model = state_dir / "efs" / "runs" / "tiny" / "final.keras"
    assert f"final model     {final_model}" in out
    assert zipfile.is_zipfile(final_model)  # the .keras format is a zip archive
    assert (state_dir / "efs" / "datasets" / "cifar10" / "manifest.json").is_file()
    assert multiprocessing.active_children() == []

    with dynamodb_local.DynamoDBLocal(
        db_path=state_dir / "dynamodb"
    ) as database:  # what the run left on disk
        status = coordination.StatusTable(database.resource().Table(runtime.DEFAULT_TABLE))
        run = status.get_run("tiny")
        rounds = status.list_rounds("tiny")
    assert run is not None and run.state == coordination.SUCCEEDED
    assert [record.round_index for record in rounds] == [0, 1]
    assert all(record.completed and record.metrics.duration_s for record in rounds)
    assert rounds[-1].metrics.test_accuracy is not None  # evaluated at the end of the epoch


@pytest.mark.slow
def test_local_run_recovers_from_a_killed_worker_through_its_failure_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    kill_worker = ["--fault", "kill=0.2:workerno=1,round=0"]  # SIGKILL worker 1 while it trains round 0

    code = cli.main(
        [
            "local",
            "--state-dir",
            str(state_dir),
            "--source",
            str(FIXTURE),
            "--run",
            "hurt",
            *TINY_RUN,
            *kill_worker,
        ]
    )

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "warning: invocation failed (workerno=1 round=0 attempt=1): Runtime.ExitError" in err
    assert "run hurt: SUCCEEDED" in out
    log_text = (state_dir / "logs" / "hurt.log").read_text()
    assert '"message": "failed_event_redispatched"' in log_text  # the trainer got the SQS-wrapped record


@pytest.mark.slow
def test_local_run_whose_combine_event_is_lost_is_revived_by_the_watchdog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = tmp_path / "state"
    lose_combine = ["--fault", "drop:combine=true,round=0"]  # accepted, never delivered

    code = cli.main(
        [
            "local",
            "--state-dir",
            str(state_dir),
            "--source",
            str(FIXTURE),
            "--run",
            "lost",
            *TINY_RUN,
            *lose_combine,
        ]
    )

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "nothing is queued or running for active run lost: sending the watchdog event" in err
    assert "run lost: SUCCEEDED" in out
    log_text = (state_dir / "logs" / "lost.log").read_text()
    assert '"message": "round_resent"' in log_text and '"generation": 2' in log_text
