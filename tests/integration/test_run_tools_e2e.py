"""The commands a user runs after ``lambdatrain local`` on a real tiny run: the three it prints (status, curves,
predict --cifar-test 30) work as printed, ``cost`` counts every invocation the local runtime recorded (a
duplicated delivery included), ``model`` copies the model, and a run with a budget stops itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from localrun import cli, reports

pytestmark = [pytest.mark.java, pytest.mark.slow]

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
TINY_RUN = [
    "--model", "vgg19_bn", "--width", "0.0625", "--workers", "2", "--epochs", "1", "--rounds-per-epoch", "2",
    "--train-samples", "256", "--test-samples", "128", "--batch-size", "32", "--concurrency", "2",
]  # fmt: skip


def test_the_printed_next_commands_cost_and_model_work_on_a_real_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    state = ["--state-dir", str(tmp_path / "state")]
    duplicate = ["--fault", "duplicate:workerno=0,round=0"]  # one worker event delivered twice

    assert cli.main(["local", *state, "--source", str(FIXTURE), "--run", "tiny", *TINY_RUN, *duplicate]) == 0

    out = capsys.readouterr().out
    commands = out.split("next:\n", 1)[1].strip().splitlines()
    assert [shlex.split(command)[1] for command in commands] == ["status", "curves", "predict"]
    assert "--cifar-test 30" in commands[2]
    outputs = []
    for command in commands:
        assert cli.main(shlex.split(command)[1:]) == 0, command
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("run tiny: SUCCEEDED")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"^right: \d+/30$", outputs[2], re.MULTILINE)
    assert (tmp_path / "predictions.png").is_file()

    assert cli.main(["cost", "tiny", *state]) == 0
    priced = capsys.readouterr().out
    log = (tmp_path / "state" / "logs" / "tiny.log").read_text().splitlines()
    report_lines = [line for line in log if reports.parse_report(line)]
    finished = [line for line in log if '"message": "invocation_finished"' in line]
    # start + 2 workers x 2 rounds + 2 combines + the duplicated worker; one REPORT line per invocation
    assert len(report_lines) == len(finished) == 8
    assert "8 invocations" in priced and "Lambda compute" in priced and "note: local run" in priced

    assert cli.main(["model", "tiny", "-o", "copy.keras", *state]) == 0
    capsys.readouterr()
    assert (tmp_path / "copy.keras").read_bytes() == (
        tmp_path / "state" / "efs" / "runs" / "tiny" / "final.keras"
    ).read_bytes()


def test_a_local_run_past_its_budget_stops_itself_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]

    code = cli.main(
        ["local", *state, "--source", str(FIXTURE), "--run", "capped", *TINY_RUN, "--max-gb-s", "0.01"]
    )

    out, err = capsys.readouterr()
    assert code == 1
    assert "run capped: STOPPED" in out and "(1/2 rounds" in out
    assert "resume with: lambdatrain local --resume capped" in err
    assert cli.main(["status", "capped", *state]) == 0
    status = capsys.readouterr().out
    assert "reason      budget: max_gb_s 0.01 GB-s reached (" in status and "after round 1 of 2" in status
