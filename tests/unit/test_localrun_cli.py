"""``lambdatrain local``: argument errors, and whole runs of a fake trainer (the real one is tested elsewhere)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from localrun_handlers import HERE

from localrun import cli, monitor, start_event
from prep import synthetic
from trainer import config


def fake_trainer_args(state_dir: Path, *extra: str) -> list[str]:
    return [
        "local",
        "--handler",
        "localrun_handlers.fake_trainer",
        "--code-dir",
        str(HERE),
        "--state-dir",
        str(state_dir),
        "--concurrency",
        "2",
        *extra,
    ]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory whose EFS already holds a prepared dataset (the fake trainer never reads it)."""
    synthetic.write_synthetic_dataset(tmp_path / "state" / "efs" / "datasets" / "cifar10", 10, 10)
    return tmp_path / "state"


def java_processes_using(path: Path) -> list[int]:
    """Pids of processes whose command line mentions ``path`` (DynamoDB Local started for that state dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def press_ctrl_c(when_exists: Path, times: int) -> threading.Thread:
    """Send SIGINT to this process ``times`` times once ``when_exists`` appears (a marker of the fake trainer)."""

    def press() -> None:
        deadline = time.monotonic() + 120  # a loaded machine can take long to start the workers
        while not when_exists.exists():
            if time.monotonic() > deadline:
                return  # never interrupt pytest itself; the test's assertions fail instead
            time.sleep(0.05)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)

    thread = threading.Thread(target=press)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "outer_momentum"], "--config expects KEY=VALUE, got 'outer_momentum'"),
        (["--config", "run=other"], "--config cannot set ['run']"),
        (["--workers", "0"], "invalid training configuration: workers must be between 1 and 256, got 0"),
        (["--model", "resnet"], "invalid training configuration: model must be one of"),
        (["--config", "colour=blue"], "unknown configuration key(s) ['colour']"),
        (["--resume", "r1", "--epochs", "3"], "--resume continues a run with its own configuration"),
        (["--run", "a", "--resume", "b"], "--run a and --resume b name different runs"),
        (["--run", "../escape"], "run must match [A-Za-z0-9_-]{1,64}, got '../escape'"),
        (["--fault", "explode:x=1"], "action must be one of"),
        (["--env", "NOVALUE"], "--env expects KEY=VALUE"),
        (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
        (["--timeout-s", "0"], "--timeout-s must be positive, got 0"),
    ],
    ids=[
        "config-without-value",
        "config-reserved-key",
        "zero-workers",
        "unknown-model",
        "unknown-config-key",
        "resume-with-options",
        "run-and-resume-differ",
        "hostile-run-id",
        "bad-fault",
        "env-without-value",
        "zero-concurrency",
        "zero-timeout",
    ],
)
def test_bad_arguments_are_one_error_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["local", "--state-dir", str(tmp_path), *argv])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "dynamodb").exists()  # refused before anything started


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([])

    assert exited.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_demo_preset_is_overridden_by_named_options() -> None:
    args = cli.main_parser().parse_args(["local", "--demo", "--epochs", "1", "--config", "lr=0.1"])

    event = start_event.build_start_event(args, "demo-run")

    assert event == {"start": True, "run": "demo-run", **start_event.DEMO_PRESET, "epochs": 1, "lr": 0.1}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--outer-momentum", "0.9"], {"outer_momentum": 0.9}),
        (["--no-augment"], {"augment": False}),
        (["--lr-schedule", "constant", "--local-steps", "3"], {"lr_schedule": "constant", "local_steps": 3}),
        (["--update-dtype", "float16", "--config", "update_dtype=float32"], {"update_dtype": "float16"}),
    ],
    ids=["float-field", "bool-field", "str-and-int-fields", "option-beats-config"],
)
def test_every_training_field_is_an_option_that_sets_its_start_event_key(
    argv: list[str], expected: dict[str, Any]
) -> None:
    args = cli.main_parser().parse_args(["local", "--workers", "2", *argv])

    event = start_event.build_start_event(args, "r1")

    assert event == {"start": True, "run": "r1", "workers": 2, **expected}


def test_options_are_the_training_fields() -> None:
    args = cli.main_parser().parse_args(["local"])

    assert {field.name for field in dataclasses.fields(config.TrainConfig)} <= set(vars(args))


def test_data_is_prepared_only_when_the_manifest_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, Path]] = []
    fake_cifar = types.ModuleType("prep.cifar")
    fake_cifar.prepare = lambda source, out_dir: calls.append((source, out_dir))  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "prep.cifar", fake_cifar)
    import prep

    monkeypatch.setattr(prep, "cifar", fake_cifar, raising=False)
    archive = tmp_path / "cifar-10-python.tar.gz"

    cli.prepare_data(tmp_path / "efs", "cifar10", archive)
    (tmp_path / "efs" / "datasets" / "cifar10").mkdir(parents=True)
    (tmp_path / "efs" / "datasets" / "cifar10" / "manifest.json").write_text("{}")
    cli.prepare_data(tmp_path / "efs", "cifar10", archive)

    assert calls == [(archive, tmp_path / "efs" / "datasets" / "cifar10")]


@pytest.mark.java  # the run's own DynamoDB Local
def test_fake_run_succeeds_with_progress_and_summary(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--run", "fake-1", "--workers", "2", "--epochs", "2", "--rounds-per-epoch", "2"]

    code = cli.main(fake_trainer_args(state_dir, *argv))

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run fake-1: SUCCEEDED" in out
    assert "(4/4 rounds, 2 epochs)" in out
    assert "test accuracy   50.0%" in out
    assert "time per phase  load 2.0 s, compute 8.0 s" in out
    assert f"final model     {state_dir / 'efs' / 'runs' / 'fake-1' / 'final.keras'}" in out
    assert "4/4" in err and "test_acc=50.0%" in err  # the progress bar
    assert '"message": "invocation_finished"' in (state_dir / "logs" / "fake-1.log").read_text()
    assert multiprocessing.active_children() == []
    assert java_processes_using(state_dir) == []


@pytest.mark.java  # the run's own DynamoDB Local
def test_run_id_that_exists_is_refused_with_the_resume_command(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(fake_trainer_args(state_dir, "--run", "twice")) == 0
    capsys.readouterr()

    code = cli.main(fake_trainer_args(state_dir, "--run", "twice"))

    assert code == 1
    assert (
        "error: run 'twice' already exists (SUCCEEDED); continue it with --resume twice"
        in capsys.readouterr().err
    )


@pytest.mark.java  # the run's own DynamoDB Local
def test_run_that_can_no_longer_finish_is_reported(
    state_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor, "POLL_S", 0.2)
    monkeypatch.setattr(monitor, "STALL_POLLS", 3)

    code = cli.main(fake_trainer_args(state_dir, "--run", "lost", "--fault", "kill:start=true"))

    err = capsys.readouterr().err
    assert code == 1
    assert (
        "warning: invocation failed (start=True): Runtime.ExitError: Runtime exited with error: signal: killed"
        in err
    )
    assert (
        "error: run lost is not created but no invocation is queued or running; last error: Runtime.ExitError"
        in err
    )
    assert "resume with: lambdatrain local --resume lost" in err


@pytest.mark.java  # the run's own DynamoDB Local
def test_ctrl_c_stops_after_the_round_and_the_run_resumes(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--run", "paused", "--epochs", "6", "--env", "FAKE_ROUND_S=0.4"]
    interrupter = press_ctrl_c(when_exists=state_dir / "efs" / "paused-round-0.done", times=1)

    stopped_code = cli.main(fake_trainer_args(state_dir, *argv))
    interrupter.join()
    stopped = capsys.readouterr()

    assert stopped_code == 1
    assert "stopping after the current round (Ctrl-C again to stop now)" in stopped.err
    assert "run paused: STOPPED" in stopped.out
    assert "resume with: lambdatrain local --resume paused" in stopped.err
    assert multiprocessing.active_children() == []
    assert java_processes_using(state_dir) == []

    resumed_code = cli.main(fake_trainer_args(state_dir, "--resume", "paused", "--env", "FAKE_ROUND_S=0"))

    assert resumed_code == 0
    assert "run paused: SUCCEEDED" in capsys.readouterr().out


@pytest.mark.java  # the run's own DynamoDB Local
def test_second_ctrl_c_stops_at_once_and_leaves_no_process(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--run", "aborted", "--epochs", "3", "--env", "FAKE_ROUND_S=120"]
    interrupter = press_ctrl_c(when_exists=state_dir / "efs" / "aborted-round-0.started", times=2)

    began = time.monotonic()
    code = cli.main(fake_trainer_args(state_dir, *argv))
    elapsed = time.monotonic() - began
    interrupter.join()

    captured = capsys.readouterr()
    assert code == 1
    assert "error: stopped at once; the current round is lost" in captured.err
    assert "run aborted: STOP_REQUESTED" in captured.out
    assert "resume with: lambdatrain local --resume aborted" in captured.err
    assert elapsed < 100  # the 120 s round was not waited for (the margin is for a loaded machine's start-up)
    assert multiprocessing.active_children() == []
    assert java_processes_using(state_dir) == []


@pytest.mark.java  # the run's own DynamoDB Local
def test_operator_commands_use_the_database_of_a_running_local_run(
    state_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from localrun import dynamodb_local, operations

    monkeypatch.setattr(operations, "POLL_S", 0.1)
    argv = ["--run", "busy", "--epochs", "6", "--env", "FAKE_ROUND_S=0.4"]
    codes: list[int] = []
    local = threading.Thread(target=lambda: codes.append(cli.main(fake_trainer_args(state_dir, *argv))))
    local.start()
    marker = state_dir / "efs" / "busy-round-0.started"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    server = dynamodb_local.running_server(state_dir / "dynamodb")
    options = ["--state-dir", str(state_dir)]

    assert cli.main(["runs", *options]) == 0
    assert cli.main(["status", "busy", *options]) == 0
    assert cli.main(["stop", "busy", *options]) == 0
    assert cli.main(["watch", "busy", *options]) == 1  # it stops after the round: not SUCCEEDED
    local.join(120)
    assert cli.main(["rm", "busy", *options]) == 0

    out = capsys.readouterr().out
    assert server is not None and server.owner_pid == os.getpid()
    assert "busy   RUNNING" in out or "busy  RUNNING" in out
    assert "run busy: stop requested" in out
    assert "run busy: STOPPED" in out
    assert "run busy: deleted" in out
    assert codes == [1]
    assert java_processes_using(state_dir) == []
