"""The local runtime as one context manager: DynamoDB Local with the status table, the Lambda Invoke API, and one
function behind it in a warm worker pool.

Entering starts them in that order (the function's environment needs both endpoints); leaving stops them in
reverse: the function (queued events dropped, every worker process stopped), the API, then DynamoDB Local. The
handler needs no change to run here (see :mod:`localrun.environment`)::

    with LocalRuntime(FunctionSettings(...), efs_root=Path(".local/efs")) as local:
        local.invoke_event({"start": True, "workers": 2})
        local.function.wait_idle(60)
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from localrun import dynamodb_local, environment, faults, function, lambda_api, settings, template
from localrun.errors import LocalRuntimeError

log = logging.getLogger(__name__)

DEFAULT_TABLE = "lambdatrain-status"
NO_DYNAMODB_URL = (
    "http://127.0.0.1:9"  # the discard port: what a runtime without DynamoDB Local hands the handler
)


class LocalRuntime:
    """DynamoDB Local (unless ``with_dynamodb`` is False), the Invoke API and one function, started together.

    ``check_table`` is called with the status table (a boto3 ``Table``) once it exists and before the API and
    the function start: a place to refuse a run before any process starts; what it returns is kept in
    :attr:`checked`. Handler output goes to ``log_path``; ``log_level`` is the handler's ``LOG_LEVEL``.
    """

    def __init__(
        self,
        function_settings: settings.FunctionSettings,
        *,
        efs_root: Path,
        table_name: str = DEFAULT_TABLE,
        template_path: Path = template.DEFAULT_TEMPLATE,
        with_dynamodb: bool = True,
        db_path: Path | None = None,
        dynamodb_log_path: Path | None = None,
        port: int = 0,
        log_level: str = "INFO",
        fault_plan: faults.FaultPlan | None = None,
        log_path: Path | None = None,
        check_table: Callable[[Any], Any] | None = None,
    ) -> None:
        self.settings = function_settings
        self.efs_root = efs_root
        self.table_name = table_name
        self.template_path = template_path
        self.with_dynamodb = with_dynamodb
        self.db_path = db_path
        self.dynamodb_log_path = dynamodb_log_path
        self.port = port
        self.log_level = log_level
        self.fault_plan = fault_plan
        self.log_path = log_path
        self.check_table = check_table
        self.checked: Any = None
        self.database: dynamodb_local.DynamoDBLocal | None = None
        self.table: Any = None
        self.api: lambda_api.LambdaApiServer | None = None
        self.function: function.LocalFunction | None = None
        self._stack = contextlib.ExitStack()

    @property
    def dynamodb_endpoint_url(self) -> str:
        return self.database.endpoint_url if self.database else NO_DYNAMODB_URL

    @property
    def lambda_endpoint_url(self) -> str:
        if self.api is None:
            raise LocalRuntimeError("the local runtime is not running; use it as a context manager")
        return self.api.endpoint_url

    def __enter__(self) -> LocalRuntime:
        with self._stack as stack:  # on a failure while starting, whatever started is stopped again
            if self.with_dynamodb:
                self.database = stack.enter_context(
                    dynamodb_local.DynamoDBLocal(db_path=self.db_path, log_path=self.dynamodb_log_path)
                )
                client = self.database.client()
                dynamodb_local.create_table(client, self.table_name, self.template_path)
                self.table = self.database.resource().Table(self.table_name)
                dynamodb_local.add_missing_indexes(client, self.table_name, self.template_path)
                if self.check_table is not None:
                    self.checked = self.check_table(self.table)
            self.api = stack.enter_context(lambda_api.LambdaApiServer([], port=self.port))
            self.function = stack.enter_context(
                function.LocalFunction(
                    self._with_local_wiring(self.settings), faults=self.fault_plan, log_path=self.log_path
                )
            )
            self.api.add_function(self.function)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()  # in reverse: function, API, database

    def invoke_event(self, event: Mapping[str, Any]) -> None:
        """Send an ``Event`` invocation through boto3's Lambda client, as an operator's script would."""
        client = boto3.client("lambda", **environment.client_settings(self.lambda_endpoint_url))
        try:
            client.invoke(
                FunctionName=self.settings.name, InvocationType="Event", Payload=json.dumps(event).encode()
            )
        except (BotoCoreError, ClientError) as exc:
            raise LocalRuntimeError(
                f"sending {describe_event(event)} to {self.settings.name} failed: {exc}"
            ) from exc

    def _with_local_wiring(self, declared: settings.FunctionSettings) -> settings.FunctionSettings:
        """The function as SAM would run it, pointed at the local Invoke API, DynamoDB Local and the EFS folder;
        its own variables are applied last."""
        wired = environment.handler_environment(
            function_name=declared.name,
            efs_root=self.efs_root,
            status_table=self.table_name,
            lambda_endpoint_url=self.lambda_endpoint_url,
            dynamodb_endpoint_url=self.dynamodb_endpoint_url,
            memory_mb=declared.memory_mb,
            timeout_s=declared.timeout_s,
            log_level=self.log_level,
            extra=declared.environment,
        )
        unset = tuple(dict.fromkeys((*environment.UNSET_FOR_HANDLER, *declared.unset_environment)))
        return declared.overridden({"environment": wired, "unset_environment": unset})


def describe_event(event: Any) -> str:
    """A few identifying keys of an event, for one line of output."""
    if not isinstance(event, Mapping):
        return "event"
    keys = ("start", "resume", "stop", "combine", "workerno", "round", "attempt")
    return " ".join(f"{key}={event[key]}" for key in keys if key in event) or "event"
