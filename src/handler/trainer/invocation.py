"""Asynchronous self-invocation: fan-out of worker events, the combine, chained continuations.

The trainer invokes its own function by name with ``InvocationType="Event"``. boto3 reads
``AWS_ENDPOINT_URL_LAMBDA``, so on a laptop the same call reaches ``localrun``'s Invoke API.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from trainer import logs
from trainer.errors import InvocationError

log = logging.getLogger(__name__)

FAN_OUT_THREADS = 16


class Invoker(Protocol):
    def invoke_async(self, payloads: Sequence[dict[str, Any]]) -> None:
        """Queue one asynchronous invocation per payload; raise :class:`InvocationError` if any was refused."""


class LambdaInvoker:
    def __init__(self, function_name: str, client: Any | None = None) -> None:
        self.function_name = function_name
        self.client = client or boto3.client(
            "lambda",
            config=Config(
                retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5, read_timeout=30
            ),
        )

    def invoke_async(self, payloads: Sequence[dict[str, Any]]) -> None:
        if len(payloads) <= 1:
            for payload in payloads:
                self._invoke(payload)
            return
        with ThreadPoolExecutor(max_workers=min(FAN_OUT_THREADS, len(payloads))) as pool:
            list(pool.map(self._invoke, payloads))  # re-raises the first failure

    def _invoke(self, payload: dict[str, Any]) -> None:
        try:
            response = self.client.invoke(
                FunctionName=self.function_name, InvocationType="Event", Payload=json.dumps(payload).encode()
            )
        except (BotoCoreError, ClientError) as exc:
            raise InvocationError(f"invoking {self.function_name} with {payload} failed: {exc}") from exc
        if response.get("StatusCode") != 202:
            raise InvocationError(
                f"invoking {self.function_name}: status {response.get('StatusCode')}, expected 202"
            )
        logs.event(log, "invoked", function=self.function_name, payload=payload)
