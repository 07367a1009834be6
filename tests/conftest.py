"""Fixtures shared by every test.

- ``load_event(name)`` a fresh copy of ``events/<name>.json``
- ``efs_root``         an empty EFS stand-in under ``tmp_path``
- ``dynamodb_local``   one in-memory DynamoDB Local for the whole session, on a free port
- ``table``            a new, uniquely named status table in it, built from ``template.yaml``'s key schema
- ``aws_env``          dummy credentials, the region, and ``AWS_ENDPOINT_URL_DYNAMODB`` for code that builds
                       its own boto3 clients (the handler); nothing real can be reached with them

Tests that use ``dynamodb_local`` (directly, or through ``table`` or ``aws_env``) are marked ``java``
here; tests that start DynamoDB Local themselves say ``@pytest.mark.java``. ``pytest -m "not java"`` runs the
rest on a machine without Java; ``make test`` runs everything.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localrun import dynamodb_local as dynamodb_local_module
from localrun import environment

REPO_ROOT = Path(__file__).resolve().parents[1]
EVENTS_DIR = REPO_ROOT / "events"
TEMPLATE = REPO_ROOT / "template.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "dynamodb_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.java)


@pytest.fixture
def load_event() -> Callable[[str], Any]:
    """``load_event("worker")`` reads ``events/worker.json``; each call returns a new object to mutate."""

    def load(name: str) -> Any:
        path = EVENTS_DIR / f"{name.removesuffix('.json')}.json"
        return json.loads(path.read_text())

    return load


@pytest.fixture
def efs_root(tmp_path: Path) -> Path:
    root = tmp_path / "efs"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def dynamodb_local() -> Iterator[dynamodb_local_module.DynamoDBLocal]:
    """One DynamoDB Local process (in memory) for the session; stopped when the session ends."""
    with dynamodb_local_module.DynamoDBLocal() as database:
        yield database


@pytest.fixture
def table(dynamodb_local: dynamodb_local_module.DynamoDBLocal) -> Iterator[Any]:
    """A fresh status table (boto3 ``Table`` resource) with the key schema declared in ``template.yaml``."""
    client = dynamodb_local.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    dynamodb_local_module.create_table(client, name, TEMPLATE)
    yield dynamodb_local.resource().Table(name)
    client.delete_table(TableName=name)


@pytest.fixture
def aws_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dynamodb_local: dynamodb_local_module.DynamoDBLocal
) -> None:
    """Point boto3's default session at the session's DynamoDB Local with dummy credentials."""
    for name in environment.UNSET_FOR_HANDLER:
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "no-aws-config"  # the developer's ~/.aws must not leak into tests
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", environment.ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", environment.SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", environment.REGION)
    monkeypatch.setenv("AWS_REGION", environment.REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_local.endpoint_url)
