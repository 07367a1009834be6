"""The staging function (prep.stage) against moto S3, with ``tmp_path`` as the EFS mount.

``efs_root`` is the shared fixture from ``tests/conftest.py`` (an empty folder under ``tmp_path``).
"""

from __future__ import annotations

import ast
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from moto import mock_aws

from prep import cifar, stage, upload

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-tiny.tar.gz"
BUCKET = "lambdatrain-datasets"
PREFIX = "datasets/cifar10"
EVENT = {"stage": {"bucket": BUCKET, "prefix": PREFIX, "dataset": "cifar10"}}
FILES = ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy", "manifest.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture prepared once into a local folder: what gets uploaded."""
    out_dir = tmp_path_factory.mktemp("prepared") / "cifar10"
    cifar.prepare(FIXTURE, out_dir)
    return out_dir


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, prepared: Path) -> Iterator[Any]:
    """A moto S3 bucket holding the prepared dataset under PREFIX."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        for name in FILES:
            client.upload_file(str(prepared / name), BUCKET, f"{PREFIX}/{name}")
        yield client


def request() -> stage.StageRequest:
    return stage.parse_stage_event(EVENT)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def leftovers(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith((stage.TMP_PREFIX, stage.OLD_PREFIX))
    )


# --- Success ------------------------------------------------------------------------------------------


def test_handler_copies_the_dataset_into_efs_and_returns_a_summary(s3, efs_root, prepared, monkeypatch):
    monkeypatch.setenv("EFS_ROOT", str(efs_root))

    summary = stage.lambda_handler(EVENT, None)

    target = efs_root / "datasets" / "cifar10"
    assert snapshot(target) == snapshot(prepared)
    assert summary["dataset"] == "cifar10" and summary["directory"] == str(target)
    assert sorted(summary["files"]) == sorted(FILES)
    assert summary["bytes"] == sum((prepared / name).stat().st_size for name in FILES)
    assert summary["seconds"] >= 0
    assert leftovers(target.parent) == []


def test_staging_again_replaces_the_previous_copy(s3, efs_root, prepared):
    stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)
    target = efs_root / "datasets" / "cifar10"
    (target / "stale.txt").write_text("from an older copy")

    stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)

    assert snapshot(target) == snapshot(prepared)
    assert leftovers(target.parent) == []


def test_uploads_from_prep_upload_are_staged(s3, efs_root, prepared):
    """The CLI's uploader and the staging function agree on keys and layout."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    location = upload.S3Location.parse(f"s3://{BUCKET}/datasets/other/prefix/")
    upload.upload_dataset(prepared, manifest, location, s3_client=s3)

    event = {"stage": {"bucket": BUCKET, "prefix": "datasets/other/prefix", "dataset": "cifar10-copy"}}
    stage.stage_dataset(stage.parse_stage_event(event), s3_client=s3, efs_root=efs_root)

    assert snapshot(efs_root / "datasets" / "cifar10-copy") == snapshot(prepared)


# --- Bad objects: a clear error, and the previous EFS copy intact ---------------------------------------


def _delete(name: str) -> Callable[[Any, Path], None]:
    return lambda s3, prepared: s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}")


def _put(name: str, make: Callable[[bytes], bytes]) -> Callable[[Any, Path], None]:
    def put(s3: Any, prepared: Path) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=make((prepared / name).read_bytes()))

    return put


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _npy_of_shorter_labels(data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(99, dtype=np.uint8))
    return buffer.getvalue()


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def make(data: bytes) -> bytes:
        manifest = json.loads(data)
        edit(manifest)
        return json.dumps(manifest).encode()

    return make


BAD_OBJECTS = [
    ("array-missing", _delete("test_y.npy"), r"s3://lambdatrain-datasets/datasets/cifar10/test_y.npy: not found"),
    ("manifest-missing", _delete("manifest.json"), r"datasets/cifar10/manifest.json: not found"),
    ("truncated-array", _put("train_x.npy", lambda d: d[:-100]), r"train_x.npy: 614428 bytes, expected 614528 for shape \[200, 32, 32, 3\] uint8 .*wrong size"),
    ("padded-array", _put("test_x.npy", lambda d: d + b"\0" * 10), r"test_x.npy: 307338 bytes, expected 307328 .*wrong size"),
    ("too-small-object", _put("train_y.npy", lambda d: b"\x93NUM"), r"train_y.npy: 4 bytes, too small .*wrong size"),
    ("sha256-mismatch", _put("train_y.npy", _flip_last_byte), r"efs/datasets/\.tmp-cifar10-\w+/train_y.npy: sha256 \w+ does not match the manifest's"),
    ("header-disagrees", _put("test_y.npy", _npy_of_shorter_labels), r"test_y.npy: header says shape \[99\] .*the manifest says shape \[100\]"),
    ("not-an-npy", _put("test_y.npy", lambda d: b"x" * len(d)), r"test_y.npy: not a .npy file"),
    ("manifest-not-json", _put("manifest.json", lambda d: d[:20]), r"manifest.json: not valid JSON"),
    ("manifest-version", _put("manifest.json", _edit_manifest(lambda m: m.update(format_version=2))), r"format_version must be 1, got 2"),
    ("manifest-path-escape", _put("manifest.json", _edit_manifest(lambda m: m["arrays"]["train_x"].update(file="../../x.npy"))), r"arrays.train_x.file must be 'train_x.npy'"),
    ("manifest-bad-sha", _put("manifest.json", _edit_manifest(lambda m: m["arrays"]["test_x"].update(sha256="abc"))), r"arrays.test_x.sha256 must be 64 lower-case hex digits"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "pattern"), [c[1:] for c in BAD_OBJECTS], ids=[c[0] for c in BAD_OBJECTS])
def test_bad_object_fails_clearly_and_keeps_the_previous_copy(s3, efs_root, prepared, damage, pattern):
    stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)
    target = efs_root / "datasets" / "cifar10"
    before, inode = snapshot(target), target.stat().st_ino
    damage(s3, prepared)

    with pytest.raises(stage.StagingError, match=pattern):
        stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)

    assert snapshot(target) == before and target.stat().st_ino == inode
    assert leftovers(target.parent) == []


def test_bad_object_with_no_previous_copy_writes_nothing(s3, efs_root, prepared):
    _put("train_y.npy", _flip_last_byte)(s3, prepared)
    with pytest.raises(stage.StagingError, match=r"sha256"):
        stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)
    assert list((efs_root / "datasets").iterdir()) == []


def test_handler_re_raises_so_lambda_records_the_failure(s3, efs_root, monkeypatch, caplog):
    monkeypatch.setenv("EFS_ROOT", str(efs_root))
    s3.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.json")
    with pytest.raises(stage.StagingError, match="not found"):
        stage.lambda_handler(EVENT, None)
    assert "staging_failed" in caplog.text


def test_refuses_to_replace_an_efs_folder_it_did_not_write(s3, efs_root):
    foreign = efs_root / "datasets" / "cifar10"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(stage.StagingError, match=r"not empty and holds no manifest.json"):
        stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root)
    assert (foreign / "notes.txt").read_text() == "precious"


# --- The event ----------------------------------------------------------------------------------------


def _event(**changes: Any) -> dict[str, Any]:
    return {"stage": {**EVENT["stage"], **changes}}


BAD_EVENTS = [
    ("not-a-dict", ["stage"], r"event must be"),
    ("no-stage-key", {"bucket": BUCKET}, r"event must be"),
    ("missing-key", {"stage": {"bucket": BUCKET, "prefix": PREFIX}}, r"keys must be \['bucket', 'dataset', 'prefix'\]"),
    ("extra-key", _event(force=True), r"keys must be"),
    ("dataset-with-slash", _event(dataset="a/b"), r"stage.dataset must match"),
    ("dataset-dotdot", _event(dataset=".."), r"stage.dataset must match"),
    ("dataset-empty", _event(dataset=""), r"stage.dataset must match"),
    ("dataset-too-long", _event(dataset="x" * 65), r"stage.dataset must match"),
    ("dataset-not-str", _event(dataset=7), r"stage.dataset must match"),
    ("bad-bucket", _event(bucket="Bad_Bucket"), r"stage.bucket must be an S3 bucket name"),
    ("prefix-dotdot", _event(prefix="a/../b"), r"no '\.\.'"),
    ("prefix-not-str", _event(prefix=None), r"prefix must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "pattern"), [c[1:] for c in BAD_EVENTS], ids=[c[0] for c in BAD_EVENTS])
def test_invalid_event_is_rejected_before_any_io(event, pattern):
    with pytest.raises(stage.StagingError, match=pattern):
        stage.parse_stage_event(event)


@pytest.mark.parametrize(
    ("prefix", "key"), [("", "manifest.json"), ("/a/b/", "a/b/manifest.json"), ("a", "a/manifest.json")]
)
def test_prefix_is_normalised(prefix, key):
    assert stage.parse_stage_event(_event(prefix=prefix)).key("manifest.json") == key


# --- Helpers ------------------------------------------------------------------------------------------


def test_replace_directory_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "cifar10", tmp_path / ".tmp-cifar10-x"
    target.mkdir(), new.mkdir()
    (target / "manifest.json").write_text("old")
    (new / "manifest.json").write_text("new")
    real_rename = stage.os.rename

    def rename(source, destination):
        if Path(source) == new:
            raise OSError(5, "injected")
        real_rename(source, destination)

    monkeypatch.setattr(stage.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        stage.replace_directory(new, target)
    assert (target / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cifar10-x", "cifar10"]


def test_npy_header_parser_agrees_with_numpy():
    for array in (np.zeros((3, 32, 32, 3), np.uint8), np.zeros(0, np.uint8), np.zeros((2, 2), np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        header = stage.parse_npy_header(buffer.getvalue()[:4096], "x.npy")
        assert header.shape == array.shape and header.descr == np.lib.format.dtype_to_descr(array.dtype)
        assert header.header_bytes + array.nbytes == len(buffer.getvalue())


def test_stage_module_imports_only_the_standard_library_and_boto3():
    """In the Lambda zip stage.py is a top-level module next to nothing it could import from prep."""
    tree = ast.parse(Path(stage.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - sys.stdlib_module_names == {"boto3"}


def test_replace_directory_replaces_a_symlinked_target_without_touching_what_it_pointed_to(tmp_path):
    elsewhere, target, new = tmp_path / "elsewhere", tmp_path / "cifar10", tmp_path / ".tmp-cifar10-x"
    elsewhere.mkdir(), new.mkdir()
    (elsewhere / "manifest.json").write_text("old")
    (new / "manifest.json").write_text("new")
    target.symlink_to(elsewhere)

    stage.replace_directory(new, target)

    assert not target.is_symlink() and (target / "manifest.json").read_text() == "new"
    assert (elsewhere / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10", "elsewhere"]


# --- A dataset in use -----------------------------------------------------------------------------------------


@pytest.fixture
def status_table(s3) -> Any:
    """The status table (moto's DynamoDB, inside the same mock as the bucket), built from template.yaml."""
    from localrun import template

    client = boto3.client("dynamodb", region_name="us-east-1")
    definition = template.table_definition(template.load_template(template.DEFAULT_TEMPLATE))
    client.create_table(TableName="status", **definition)
    return boto3.resource("dynamodb", region_name="us-east-1").Table("status")


def start_run(status_table: Any, run_id: str, dataset: str) -> None:
    from trainer.config import TrainConfig
    from trainer.coordination import RunStatus, StatusTable

    StatusTable(status_table).create_run(RunStatus.new(run_id, TrainConfig(workers=2, dataset=dataset), 100))


def upload_changed_manifest(s3, prepared: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["source"] = {**manifest.get("source", {}), "name": "a-newer-archive.tar.gz"}
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.json", Body=json.dumps(manifest).encode())


def test_a_dataset_an_active_run_uses_is_not_replaced_by_different_data(s3, efs_root, prepared, status_table):
    stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root, status_table=status_table)
    target = efs_root / "datasets" / "cifar10"
    before = snapshot(target)
    start_run(status_table, "r1", "cifar10")
    start_run(status_table, "other", "cifar100")
    stage.stage_dataset(
        request(), s3_client=s3, efs_root=efs_root, status_table=status_table
    )  # same: allowed
    upload_changed_manifest(s3, prepared)

    with pytest.raises(stage.StagingError, match=r"in use by active run\(s\) \['r1'\]"):
        stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root, status_table=status_table)

    assert snapshot(target) == before and leftovers(target.parent) == []
    from trainer.coordination import StatusTable

    StatusTable(status_table).fail_run("r1", "ended")  # no longer active: the new data may come in
    stage.stage_dataset(request(), s3_client=s3, efs_root=efs_root, status_table=status_table)
    assert snapshot(target) != before
