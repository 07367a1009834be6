"""``lambdatrain curves``, ``cost``, ``model`` and ``predict`` against both targets through one code path (the
``place`` fixtures of ``test_operations``: a local state directory served by DynamoDB Local, and a "deployed
stack" of moto's S3, CloudWatch Logs and Lambda with its status table in DynamoDB Local), and their bad input:
one ``error:`` line, exit status 1, nothing written."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
import uuid
from pathlib import Path

import boto3
import pytest
from test_operations import (  # noqa: F401  (fixtures)
    BUCKET,
    FUNCTION,
    REGION,
    Place,
    commit,
    deployed_stack,
    items,
    local_table,
    new_run,
    place,
    served_state_dir,
    succeeded_run,
)

from localrun import cli, cost, outputs, reports
from localrun.errors import OperatorError
from trainer import coordination
from trainer_harness import write_synthetic_dataset

pytestmark = pytest.mark.java  # DynamoDB Local

MEMORY_MB = 10240


def run_id(name: str) -> str:
    """Run ids are unique per test: the local place's state directory (and its logs/) is shared."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- curves -----------------------------------------------------------------------------------------------


def test_curves_plot_and_tabulate_every_committed_round(
    place: Place, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_id("curved")
    succeeded_run(place.status, run, "2026-11-27T09:00:00+00:00")
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()

    assert place.main("curves", run, "-o", str(tmp_path / "c.png"), "--csv", str(tmp_path / "c.csv")) == 0

    assert png(tmp_path / "c.png")
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert [row["round"] for row in rows] == ["1", "2", "3", "4"]
    assert [row["train_loss"] for row in rows] == ["2", "1.9", "1.8", "1.7"]
    assert [row["test_accuracy"] for row in rows] == ["", "0.31", "", "0.42"]
    assert all(float(row["wall_s"]) > 0 for row in rows)  # commit time since the run's creation
    assert f"run {run}: curves of 4 rounds in {tmp_path / 'c.png'}" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.csv", "c.png"]  # no temporary left


# --- cost -------------------------------------------------------------------------------------------------


def log_records(run: str, other: str) -> list[str]:
    """The log of a run with a duplicated delivery (same request id, two REPORT lines), a crashed invocation
    (its REPORT line but no result) and another run's invocation in the same log."""
    line = json.dumps
    return [
        line({"level": "INFO", "message": "run_created", "request_id": "req-start", "run_id": run}),
        reports.format_report("req-start", 2.0, MEMORY_MB),
        line({"level": "INFO", "message": "update_written", "request_id": "req-w0", "run_id": run}),
        reports.format_report("req-w0", 10.0, MEMORY_MB),
        line({"level": "INFO", "message": "update_already_written", "request_id": "req-w0", "run_id": run}),
        reports.format_report("req-w0", 1.0, MEMORY_MB),  # the duplicate delivery is billed too
        line({"level": "INFO", "message": "model_built", "request_id": "req-crash", "run_id": run}),
        "REPORT RequestId: req-crash\tDuration: 900000.00 ms\tBilled Duration: 900000 ms\tMemory Size: 10240 MB\t"
        "Max Memory Used: 3000 MB\tStatus: timeout\n",  # as Lambda writes it for a timed-out invocation
        line({"level": "INFO", "message": "update_written", "request_id": "req-other", "run_id": other}),
        reports.format_report("req-other", 50.0, MEMORY_MB),
        "START RequestId: req-w0 Version: $LATEST\n",
        "not json {\n",
    ]


def write_log(place: Place, run: str, lines: list[str]) -> None:
    """Where each target keeps the function's log: the run's log file locally, CloudWatch Logs on a stack."""
    if place.kind == "local":
        state_dir = Path(place.options[place.options.index("--state-dir") + 1])
        path = state_dir / "logs" / f"{run}.log"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(text if text.endswith("\n") else text + "\n" for text in lines))
        return
    client = boto3.client("logs", region_name=REGION)
    group = f"/aws/lambda/{FUNCTION}"
    client.create_log_group(logGroupName=group)
    client.create_log_stream(logGroupName=group, logStreamName="2026/11/28/[$LATEST]abc")
    now_ms = int(time.time() * 1000)
    client.put_log_events(
        logGroupName=group,
        logStreamName="2026/11/28/[$LATEST]abc",
        logEvents=[
            {"timestamp": now_ms + index, "message": text.rstrip("\n")} for index, text in enumerate(lines)
        ],
    )


def test_cost_sums_every_invocation_of_the_run_and_prices_it(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    run, other = run_id("priced"), run_id("other")
    succeeded_run(place.status, run, "2026-11-27T09:00:00+00:00")
    write_log(place, run, log_records(run, other))

    assert place.main("cost", run) == 0

    out = capsys.readouterr().out
    gb_s = (2 + 10 + 1 + 900) * MEMORY_MB / 1024  # start, worker, its duplicate, the timed-out one
    assert f"run {run}: SUCCEEDED, 4 rounds committed, 4 invocations" in out
    assert f"Lambda compute    {gb_s:,.1f} GB-s (913.0 s billed at 10240 MB)" in out
    assert f"${gb_s * 0.0000166667:,.4f}" in out
    read_gb, written_gb = 4 * 2_000_000 / 1024**3, 4 * 1_000_000 / 1024**3  # the rounds' metrics
    assert f"EFS reads         {read_gb:,.3f} GB" in out and f"EFS writes        {written_gb:,.3f} GB" in out
    assert "NAT gateway" in out and "$0.0450/hour" in out
    assert ("note: local run: seconds measured on this machine" in out) == (place.kind == "local")


def test_cost_of_a_run_without_records_is_one_error_line(
    place: Place, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_id("unlogged")
    succeeded_run(place.status, run, "2026-11-27T09:00:00+00:00")
    if place.kind == "stack":
        write_log(place, run, log_records(run_id("someone-else"), run_id("x")))

    assert place.main("cost", run) == 1

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("does not exist: no invocation records" in err[0]) or ("no invocation of run" in err[0])


def test_measure_is_the_same_arithmetic_for_either_log() -> None:
    rounds = [
        coordination.RoundRecord(
            "r",
            0,
            completed_at="2026-11-28T10:00:00+00:00",
            metrics=coordination.RoundMetrics(
                1, 10, 1.0, {}, 100, 50, worker_bytes_read=1000, worker_bytes_written=7
            ),
        ),
        coordination.RoundRecord("r", 1),  # not committed: not counted
    ]

    usage = cost.measure("r", log_records("r", "s"), rounds)

    assert usage.invocations == 4 and usage.billed_s == pytest.approx(913.0)
    assert (usage.efs_read_bytes, usage.efs_written_bytes, usage.rounds) == (1100, 57, 1)
    assert usage.memory_mb == (MEMORY_MB,)


def test_a_stack_without_a_nat_gateway_costs_its_lambda_endpoint_per_hour() -> None:
    prices = cost.load_prices()

    lines = cost.hourly_costs({"EnableNatGateway": "false"}, prices)

    assert [(line.item, line.dollars) for line in lines] == [
        ("Lambda interface endpoint", pytest.approx(0.02))
    ]


def test_the_shipped_prices_file_is_dated_and_cites_its_pages() -> None:
    document = json.loads(cost.DEFAULT_PRICES.read_text())
    prices = cost.load_prices()

    assert prices.taken_on == document["taken_on"] and prices.region == "us-east-1"
    assert all(url.startswith("https://aws.amazon.com/") for url in document["sources"].values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read prices file"),
        ("[]", "expected a JSON object, got list"),
        ('{"lambda_gb_second_x86": 1}', "taken_on is None; expected the date"),
        ('{"taken_on": "yesterday"}', "taken_on is 'yesterday'"),
        (
            '{"taken_on": "2026-11-28", "lambda_gb_second_x86": -1}',
            "lambda_gb_second_x86 is -1; expected a non-negative",
        ),
        ('{"taken_on": "2026-11-28", "lambda_gb_second_x86": "0.1"}', "lambda_gb_second_x86 is '0.1'"),
        (None, "cannot read prices file"),
    ],
    ids=["not-json", "not-an-object", "no-date", "bad-date", "negative", "string", "missing-file"],
)
def test_a_bad_prices_file_is_one_error_line_before_anything_is_read(
    place: Place, tmp_path: Path, content: str | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prices = tmp_path / "prices.json"
    if content is not None:
        prices.write_text(content)

    assert place.main("cost", "no-such-run", "--prices", str(prices)) == 1

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# --- model ------------------------------------------------------------------------------------------------


def finished_with_model(place: Place, run: str, tmp_path: Path) -> bytes:
    """A SUCCEEDED run whose final.keras is where its target keeps it: the EFS folder, or the bucket."""
    content = f"model of {run}".encode()
    new_run(place.status, run, "2026-11-27T09:00:00+00:00")
    for accuracy in (None, 0.3, None):
        commit(place.status, run, accuracy)
    record = place.status.get_run(run)
    assert record is not None
    status = place.status
    registered = coordination.RoundMetrics(2, 100, 1.0, {}, 0, 0, test_accuracy=0.4)
    status.register_worker(run, record.round_index, 0)
    status.commit_round(record, 2, coordination.RUNNING, "t3", coordination.RunSummary(), registered)
    record = status.get_run(run)
    assert record is not None
    summary = coordination.RunSummary(final_model=f"/mnt/efs/runs/{run}/final.keras")
    if place.kind == "local":
        path = place.efs_root / "runs" / run / "final.keras"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    else:
        place.s3_client.put_object(Bucket=BUCKET, Key=f"models/{run}/final.keras", Body=content)
        summary = dataclasses.replace(summary, final_model_s3=f"s3://{BUCKET}/models/{run}/final.keras")
    assert status.finish_run(record, summary)
    return content


def test_model_copies_final_keras_out_of_efs_or_s3(
    place: Place, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_id("modelled")
    content = finished_with_model(place, run, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    assert place.main("model", run, "-o", str(out_dir / "final.keras")) == 0

    assert (out_dir / "final.keras").read_bytes() == content
    assert [path.name for path in out_dir.iterdir()] == ["final.keras"]
    source = f"s3://{BUCKET}/models/{run}/final.keras" if place.kind == "stack" else "final.keras"
    assert source in capsys.readouterr().out


def test_model_of_a_stack_run_that_was_not_exported_says_where_it_is(
    place: Place, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_id("old")
    succeeded_run(place.status, run, "2026-11-27T09:00:00+00:00")  # final_model on EFS only, nothing in S3

    assert place.main("model", run, "-o", str(tmp_path / "m.keras")) == 1

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    expected = "has no final.keras in S3" if place.kind == "stack" else "final.keras does not exist"
    assert expected in err[0]
    assert list(tmp_path.iterdir()) == [] or [p.name for p in tmp_path.iterdir()] == ["efs"]


# --- bad input for a run ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["curves", "nope"], "error: no run 'nope' in "),
        (["cost", "nope"], "error: no run 'nope' in "),
        (["model", "nope"], "error: no run 'nope' in "),
        (["curves", "live"], "error: run live has no committed round yet; nothing to plot"),
        (["model", "live"], "error: run live is RUNNING; final.keras exists once a run SUCCEEDED"),
        (["curves", "done", "-o", "{tmp}/missing/c.png"], "/missing does not exist"),
        (["curves", "done", "-o", "{tmp}"], "it is a folder"),
        (["model", "done", "-o", "{tmp}/missing/m.keras"], "/missing does not exist"),
    ],
    ids=["curves-unknown", "cost-unknown", "model-unknown", "curves-no-rounds", "model-not-done",
         "curves-missing-folder", "curves-onto-a-folder", "model-missing-folder"],
)  # fmt: skip
def test_bad_input_for_a_run_is_one_error_line_and_writes_nothing(
    place: Place, tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    succeeded_run(place.status, "done", "2026-11-27T09:00:00+00:00")
    new_run(place.status, "live", "2026-11-27T10:00:00+00:00")
    before = items(place.status)
    files_before = sorted(tmp_path.rglob("*"))

    assert place.main(*[arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert items(place.status) == before
    assert sorted(tmp_path.rglob("*")) == files_before


def test_an_output_that_fails_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "curves.png"
    target.write_bytes(b"previous")

    with pytest.raises(RuntimeError), outputs.atomic_output(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed while writing")

    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


# --- predict ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer import models

    path = tmp_path_factory.mktemp("model") / "final.keras"
    models.build_vgg19_bn(10, 32, width=1 / 64).save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("efs") / "datasets" / "cifar10"
    write_synthetic_dataset(directory, num_train=40, num_test=50)
    return directory


def image_files(tmp_path: Path) -> list[Path]:
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(big)
    small = tmp_path / "gray.png"
    Image.new("L", (17, 9), 128).save(small)  # any size, any mode
    return [big, small]


def test_predict_gives_the_top_class_and_probability_of_each_image(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = image_files(tmp_path)

    assert cli.main(["predict", str(tiny_model), *map(str, images), "--grid", str(tmp_path / "g.png")]) == 0

    lines = capsys.readouterr().out.splitlines()
    for path, line in zip(images, lines, strict=False):
        name, label, probability = line.split()[:3]
        assert name == str(path)
        assert label in (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        )
        assert 0 < float(probability.rstrip("%")) <= 100
    assert png(tmp_path / "g.png")


def test_predict_on_random_test_images_reports_how_many_are_right(
    tiny_model: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", str(tiny_model), "--cifar-test", "12", "--seed", "3", "--dataset", str(dataset)]

    assert cli.main([*argv, "--grid", str(tmp_path / "grid.png")]) == 0
    first = capsys.readouterr().out.splitlines()
    assert cli.main(argv) == 0  # the same seed draws the same images
    again = capsys.readouterr().out.splitlines()

    rows = [line for line in first if line.startswith("test[")]
    assert len(rows) == 12 and all("(true: class" in row for row in rows)  # the dataset's own class names
    right = sum(", wrong)" not in row for row in rows)
    assert f"right: {right}/12" in first
    assert first[:13] == again[:13]
    assert png(tmp_path / "grid.png")


def test_predict_finds_the_test_set_through_the_efs_root(
    tiny_model: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    efs_root = dataset.parents[1]

    assert cli.main(["predict", str(tiny_model), "--cifar-test", "3", "--efs-root", str(efs_root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("right: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/not-a-model.keras", "{img}"], "not-a-model.keras is not a Keras model"),
        (["{tmp}/absent.keras", "{img}"], "absent.keras: no such model file"),
        (["{model}", "{tmp}/not-an-image.png"], "not-an-image.png is not an image Pillow can read"),
        (["{model}", "{img}", "{tmp}/absent.png"], "absent.png: no such image file"),
        (["{model}"], "give IMAGE files, --cifar-test K, or both"),
        (["{model}", "--cifar-test", "5", "--dataset", "{tmp}/none"], "no prepared dataset in"),
        (["{model}", "--cifar-test", "0", "--dataset", "{data}"], "--cifar-test must be between 1 and the 50"),
        (["{model}", "--cifar-test", "51", "--dataset", "{data}"], "--cifar-test must be between 1 and the 50"),
        (["{model}", "--cifar-test", "2", "--dataset", "{data}", "--efs-root", "{tmp}"], "give one"),
        (["{model}", "{img}", "--grid", "{tmp}/missing/g.png"], "/missing does not exist"),
    ],
    ids=["not-a-model", "no-model", "not-an-image", "no-image", "nothing-to-predict", "no-dataset",
         "zero-images", "more-than-the-test-set", "two-datasets", "grid-missing-folder"],
)  # fmt: skip
def test_bad_input_for_predict_is_one_error_line_and_writes_nothing(
    tiny_model: Path,
    dataset: Path,
    tmp_path: Path,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "not-a-model.keras").write_bytes(b"PK\x03\x04 truncated zip")
    (tmp_path / "not-an-image.png").write_text("hello")
    image = image_files(tmp_path)[0]
    files_before = sorted(tmp_path.rglob("*"))
    values = {"{tmp}": str(tmp_path), "{img}": str(image), "{model}": str(tiny_model), "{data}": str(dataset)}

    def fill(arg: str) -> str:
        for key, value in values.items():
            arg = arg.replace(key, value)
        return arg

    assert cli.main(["predict", *map(fill, argv)]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(tmp_path.rglob("*")) == files_before


def test_the_report_line_round_trips_and_reads_lambdas_own() -> None:
    line = reports.format_report("abc-1", 1.2345, 3008)
    lambdas = (
        "REPORT RequestId: 3604209a-e9a3-11e6-939a-754dd98c7be3\tDuration: 12.34 ms\tBilled Duration: 13 ms\t"
        "Memory Size: 128 MB\tMax Memory Used: 18 MB\tInit Duration: 120.45 ms\t"
    )

    assert reports.parse_report(line) == reports.Report("abc-1", 1235.0, 3008)
    assert reports.parse_report(lambdas) == reports.Report("3604209a-e9a3-11e6-939a-754dd98c7be3", 13.0, 128)
    assert reports.parse_report("REPORT RequestId: x\tDuration: 1 ms\t") is None  # no billing fields
    assert reports.parse_report('{"message": "REPORT RequestId: x"}') is None
    json_format = {  # the same report in Lambda's JSON log format (LoggingConfig.LogFormat: JSON)
        "time": "2026-11-28T12:00:00.000Z",
        "type": "platform.report",
        "record": {
            "requestId": "abc-2",
            "metrics": {
                "durationMs": 12.34,
                "billedDurationMs": 13,
                "memorySizeMB": 128,
                "maxMemoryUsedMB": 18,
            },
            "status": "success",
        },
    }
    assert reports.parse_report(json.dumps(json_format)) == reports.Report("abc-2", 13.0, 128)
    assert reports.parse_report(json.dumps({**json_format, "record": {"requestId": "x"}})) is None


def test_operator_error_is_the_error_of_every_new_command() -> None:
    with pytest.raises(OperatorError):
        cost.load_prices(Path("/nonexistent/prices.json"))
