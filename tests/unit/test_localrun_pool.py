"""The worker pool: warm reuse, deadlines, crashes, concurrency and the handler's environment."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from localrun_handlers import HANDLER, HERE

from localrun import environment, pool, settings
from trainer_harness import race


def make_pool(
    timeout_s: float = 30.0, concurrency: int = 2, handler: str = HANDLER, **config: Any
) -> pool.WorkerPool:
    function = settings.FunctionSettings(
        name="toy", handler=handler, code_dir=HERE, timeout_s=timeout_s, concurrency=concurrency, **config
    )
    return pool.WorkerPool(function)


@pytest.fixture
def toy_pool() -> Iterator[pool.WorkerPool]:
    with make_pool() as worker_pool:
        yield worker_pool


def invoke(worker_pool: pool.WorkerPool, **event: Any) -> pool.InvocationResult:
    return worker_pool.invoke(json.dumps(event))


def result_of(result: pool.InvocationResult) -> dict[str, Any]:
    assert result.ok, result.payload
    return json.loads(result.payload)


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_warm_process_serves_the_next_invocation_with_its_module_state(toy_pool: pool.WorkerPool) -> None:
    first = invoke(toy_pool, action="echo")
    second = invoke(toy_pool, action="echo")

    assert (first.cold, second.cold) == (True, False)
    assert result_of(first)["pid"] == result_of(second)["pid"] == first.pid
    assert (result_of(first)["invocations"], result_of(second)["invocations"]) == (1, 2)
    assert toy_pool.processes_started == 1


def test_context_has_lambda_attributes_and_counts_down_from_the_timeout() -> None:
    with make_pool(timeout_s=5.0, memory_mb=2048) as worker_pool:
        first = result_of(invoke(worker_pool, action="sleep", seconds=1.0))

    assert first["function_name"] == "toy"
    assert first["invoked_function_arn"] == "arn:aws:lambda:us-east-1:123456789012:function:toy"
    assert first["memory_limit_in_mb"] == "2048"
    assert len(first["request_id"]) == 36
    assert 3_500 <= first["remaining_ms"] <= 4_100  # 5 s timeout, 1 s slept


def test_deadline_kills_the_process_and_the_next_invocation_starts_cold() -> None:
    with make_pool(timeout_s=2.0) as worker_pool:
        began = time.monotonic()
        timed_out = invoke(worker_pool, action="sleep", seconds=10)
        elapsed = time.monotonic() - began
        after = invoke(worker_pool, action="echo")

    assert timed_out.function_error == "Unhandled"
    assert timed_out.error()["errorType"] == "Sandbox.Timedout"
    assert timed_out.error()["errorMessage"] == "Task timed out after 2.00 seconds"
    assert 2.0 <= elapsed < 4.0
    assert not process_exists(timed_out.pid)
    assert after.cold and after.pid != timed_out.pid
    assert result_of(after)["invocations"] == 1


def test_crashed_process_is_reported_and_replaced(toy_pool: pool.WorkerPool) -> None:
    crashed = invoke(toy_pool, action="crash")
    after = invoke(toy_pool, action="echo")

    assert crashed.error() == {
        "errorMessage": "Runtime exited with error: exit status 3",
        "errorType": "Runtime.ExitError",
        "stackTrace": [],
    }
    assert after.ok and after.cold and after.pid != crashed.pid


def test_handler_exception_is_a_lambda_shaped_error_and_keeps_the_process(toy_pool: pool.WorkerPool) -> None:
    failed = invoke(toy_pool, action="fail", message="boom")
    after = invoke(toy_pool, action="echo")

    error = failed.error()
    assert set(error) == {"errorMessage", "errorType", "stackTrace"}
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "failing on purpose: boom"
    assert any("localrun_handlers.py" in frame for frame in error["stackTrace"])
    assert not any("bootstrap.py" in frame for frame in error["stackTrace"])
    assert after.pid == failed.pid and not after.cold


def test_result_that_is_not_json_is_a_marshal_error(toy_pool: pool.WorkerPool) -> None:
    error = invoke(toy_pool, action="not_json").error()

    assert error["errorType"] == "Runtime.MarshalError"
    assert "not JSON serializable" in error["errorMessage"]


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        ("missing_module.handle", "Runtime.ImportModuleError", "Unable to import module 'missing_module'"),
        ("localrun_handlers.missing", "Runtime.HandlerNotFound", "Handler 'missing' missing on module"),
        ("handle", "Runtime.MalformedHandlerName", "Bad handler 'handle'"),
    ],
    ids=["module-missing", "function-missing", "malformed"],
)
def test_handler_that_cannot_be_loaded_fails_each_invocation(
    handler: str, error_type: str, message: str
) -> None:
    with make_pool(handler=handler) as worker_pool:
        result = invoke(worker_pool, action="echo")
        assert worker_pool.live_pids() == []

    assert result.error()["errorType"] == error_type
    assert message in result.error()["errorMessage"]


def test_module_colon_function_names_the_handler_too() -> None:
    with make_pool(handler="localrun_handlers:handle") as worker_pool:
        assert invoke(worker_pool, action="echo").ok


def test_at_most_concurrency_invocations_run_at_once(toy_pool: pool.WorkerPool) -> None:
    results = race(4, lambda _: result_of(invoke(toy_pool, action="sleep", seconds=0.6)))

    def running_at(moment: float) -> int:
        return sum(result["started"] <= moment < result["finished"] for result in results)

    assert max(running_at(result["started"]) for result in results) == 2  # concurrency of toy_pool
    assert len({result["pid"] for result in results}) == 2
    assert toy_pool.processes_started == 2


def test_handler_sees_the_function_environment_and_not_the_callers_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "real-secret")
    monkeypatch.setenv("AWS_PROFILE", "production")
    variables = environment.handler_environment(
        function_name="toy",
        efs_root=tmp_path / "efs",
        status_table="status",
        lambda_endpoint_url="http://127.0.0.1:1111",
        dynamodb_endpoint_url="http://127.0.0.1:2222",
        memory_mb=1024,
        extra={"CUSTOM": "yes"},
    )
    names = ["EFS_ROOT", "STATUS_TABLE", "AWS_LAMBDA_FUNCTION_NAME", "AWS_ENDPOINT_URL_LAMBDA"]
    names += ["AWS_ENDPOINT_URL_DYNAMODB", "AWS_DEFAULT_REGION", "TF_ENABLE_ONEDNN_OPTS", "CUSTOM"]
    names += ["AWS_SESSION_TOKEN", "AWS_PROFILE"]
    with make_pool(environment=variables, unset_environment=environment.UNSET_FOR_HANDLER) as worker_pool:
        seen = result_of(invoke(worker_pool, action="echo", show_env=names))["environment"]

    assert seen == {
        "EFS_ROOT": str((tmp_path / "efs").resolve()),
        "STATUS_TABLE": "status",
        "AWS_LAMBDA_FUNCTION_NAME": "toy",
        "AWS_ENDPOINT_URL_LAMBDA": "http://127.0.0.1:1111",
        "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:2222",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TF_ENABLE_ONEDNN_OPTS": "1",
        "CUSTOM": "yes",
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
    }


def test_close_stops_idle_and_busy_processes(toy_pool: pool.WorkerPool) -> None:
    busy = threading.Thread(target=invoke, args=(toy_pool,), kwargs={"action": "sleep", "seconds": 30})
    busy.start()
    while not toy_pool.live_pids():
        time.sleep(0.05)
    idle_pid = invoke(toy_pool, action="echo").pid  # a second, cold process: the first one is busy
    pids = toy_pool.live_pids()

    toy_pool.close()
    busy.join(timeout=5)

    assert len(pids) == 2 and idle_pid in pids
    assert not busy.is_alive()
    assert [pid for pid in pids if process_exists(pid)] == []
    assert invoke(toy_pool, action="echo").error()["errorType"] == "Runtime.Unavailable"
