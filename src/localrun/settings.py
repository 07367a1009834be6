"""How one local function runs: what SAM declares for it, and how many processes may run it at once.

:class:`FunctionSettings` is the one settings type of the local runtime: the worker pool reads the process side
(handler, code, timeout, memory, environment), the function its ``EventInvokeConfig`` side (retries, failure
records), and ``lambdatrain local`` builds it from ``template.yaml`` and its options.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FUNCTION_NAME = "lambdatrain-trainer"
DEFAULT_HANDLER = "app.lambda_handler"
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_MEMORY_MB = 10240
# One handler process per core: TensorFlow already uses every core of its process, so more only contend.
DEFAULT_CONCURRENCY = max(2, min(os.cpu_count() or 2, 8))
ACCOUNT_ID = "123456789012"  # the placeholder account of AWS's own examples
LAMBDA_DESTINATION = "lambda"  # a failure record itself is the event
SQS_DESTINATION = "sqs"  # a failure record is the body of the one message of an aws:sqs event
FAILURE_DESTINATIONS = (LAMBDA_DESTINATION, SQS_DESTINATION)


@dataclass(frozen=True)
class FunctionSettings:
    """One function, as SAM would describe it (Handler, CodeUri, Timeout, MemorySize, Environment,
    EventInvokeConfig), plus the local runtime's concurrency."""

    name: str = DEFAULT_FUNCTION_NAME
    handler: str = DEFAULT_HANDLER
    code_dir: Path = Path("src/handler")
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    # The handler's variables. Under LocalRuntime these are the function's own, applied over the local wiring
    # (endpoints, credentials, EFS_ROOT); a WorkerPool on its own uses them as the whole environment.
    environment: Mapping[str, str] = field(default_factory=dict)
    unset_environment: tuple[str, ...] = ()
    region: str = "us-east-1"
    concurrency: int = DEFAULT_CONCURRENCY  # processes (and invocations) at most
    maximum_retry_attempts: int = 0  # 0-2, as in Lambda
    retry_delay_s: float = 1.0  # Lambda waits about 1 min, then 2 min; locally a second is enough
    deliver_failure_records: bool = True  # the OnFailure destination leads back to this same function
    failure_destination: str = LAMBDA_DESTINATION  # how a record arrives: "lambda" (as is) or "sqs" (wrapped)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not 0 <= self.maximum_retry_attempts <= 2:
            raise ValueError(f"maximum_retry_attempts must be 0, 1 or 2, got {self.maximum_retry_attempts}")
        if self.failure_destination not in FAILURE_DESTINATIONS:
            raise ValueError(
                f"failure_destination must be one of {list(FAILURE_DESTINATIONS)}, got {self.failure_destination!r}"
            )

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{ACCOUNT_ID}:function:{self.name}"

    def overridden(self, values: Mapping[str, Any]) -> FunctionSettings:
        """These settings with ``values`` (field name to value) applied; None values are skipped."""
        return dataclasses.replace(
            self, **{name: value for name, value in values.items() if value is not None}
        )
