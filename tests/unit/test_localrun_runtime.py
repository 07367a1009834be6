"""The local runtime as one context manager, and the one settings type of a local function."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from localrun_handlers import HANDLER, HERE

from localrun import runtime, settings
from localrun.errors import LocalRuntimeError


@pytest.mark.java
def test_runtime_serves_a_function_that_reaches_its_status_table(tmp_path: Path) -> None:
    toy = settings.FunctionSettings(name="toy", handler=HANDLER, code_dir=HERE, timeout_s=30.0, concurrency=1)

    with runtime.LocalRuntime(toy, efs_root=tmp_path / "efs", table_name="toy-status") as local:
        shown = ["STATUS_TABLE", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL_LAMBDA"]
        result = local.function.invoke(json.dumps({"show_env": shown}))
        local.table.put_item(Item={"pk": "RUN#x", "sk": "RUN"})
        endpoints = (local.dynamodb_endpoint_url, local.lambda_endpoint_url)
        database_pid = local.database.pid

    environment = json.loads(result.payload)["environment"]
    assert environment["STATUS_TABLE"] == "toy-status"
    assert (environment["AWS_ENDPOINT_URL_DYNAMODB"], environment["AWS_ENDPOINT_URL_LAMBDA"]) == endpoints
    assert not Path(f"/proc/{database_pid}").exists()
    assert multiprocessing.active_children() == []


@pytest.mark.java
def test_refusal_once_the_table_exists_stops_the_database_before_anything_else_starts(tmp_path: Path) -> None:
    seen: list[Any] = []

    def refuse(table: Any) -> None:
        seen.extend([table.name, local.database.pid])
        raise LocalRuntimeError("run exists")

    local = runtime.LocalRuntime(
        settings.FunctionSettings(handler=HANDLER, code_dir=HERE), efs_root=tmp_path, check_table=refuse
    )
    with pytest.raises(LocalRuntimeError, match="run exists"), local:
        pass

    table_name, database_pid = seen
    assert table_name == runtime.DEFAULT_TABLE
    assert local.api is None and local.function is None
    assert not Path(f"/proc/{database_pid}").exists()


def test_settings_take_overrides_and_skip_unset_values() -> None:
    base = settings.FunctionSettings(timeout_s=60.0)

    changed = base.overridden({"timeout_s": None, "memory_mb": 512, "maximum_retry_attempts": 2})

    assert (changed.timeout_s, changed.memory_mb, changed.maximum_retry_attempts) == (60.0, 512, 2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("concurrency", 0, "concurrency must be at least 1, got 0"),
        ("maximum_retry_attempts", 3, "maximum_retry_attempts must be 0, 1 or 2, got 3"),
        ("failure_destination", "sns", "failure_destination must be one of ['lambda', 'sqs'], got 'sns'"),
    ],
    ids=["no-concurrency", "too-many-retries", "unknown-destination"],
)
def test_impossible_settings_are_refused(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings.FunctionSettings(**{field: value})
