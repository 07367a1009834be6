"""The account's Lambda concurrency, checked when a run starts instead of throttling it halfway.

A run executes ``workers`` worker invocations at once, plus the combiner that the last of them invokes: it needs
``workers + 1`` concurrent executions of the trainer. Lambda throttles asynchronous invocations beyond the
account's unreserved concurrency (or the function's reservation) and retries them for up to six hours, so a run
that does not fit stalls instead of failing. :func:`check_concurrency` refuses such a start with the numbers and
the quota to ask for.

Where the Lambda API has no ``GetAccountSettings`` (the local runtime's Invoke API answers 404/501, an emulator
may answer ``UnknownOperationException``), the check is skipped with a logged ``concurrency_check_skipped``:
a local run has no account quota to exceed. Every other error propagates.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import ClientError

from trainer import logs
from trainer.errors import InvalidEventError

log = logging.getLogger(__name__)

QUOTA_NAME = "Concurrent executions"  # Service Quotas -> AWS Lambda
QUOTA_CODE = "L-B99A9384"
# What an endpoint without GetAccountSettings answers: the local Invoke API (HTTP 501 for a GET, 404 for an
# unknown path) or an emulator's error code.
NOT_IMPLEMENTED_CODES = frozenset(
    {"404", "501", "UnknownOperationException", "NotImplemented", "InvalidAction"}
)


def executions_needed(workers: int) -> int:
    """Concurrent executions a run of ``workers`` workers needs: every worker, plus the combiner."""
    return workers + 1


def check_concurrency(
    lambda_client: Any, workers: int, reserved: int | None = None, function_name: str | None = None
) -> None:
    """Raise :class:`InvalidEventError` if the trainer cannot run ``workers + 1`` executions at once.

    ``reserved`` is the trainer's own reserved concurrency when it has one (then that is its limit, not the
    account's unreserved pool); with ``function_name`` it is read with ``GetFunctionConcurrency``.
    """
    needed = executions_needed(workers)
    if reserved is None and function_name is not None:
        try:
            reserved = lambda_client.get_function_concurrency(FunctionName=function_name).get(
                "ReservedConcurrentExecutions"
            )
        except ClientError as exc:
            if not _not_implemented(exc):
                raise
            logs.event(log, "concurrency_check_skipped", reason="GetFunctionConcurrency is not available")
            return
    if reserved is not None and reserved > 0:
        if reserved < needed:
            raise InvalidEventError(
                f"workers {workers} needs {needed} concurrent executions, but the trainer's reserved concurrency "
                f"is {reserved}; redeploy with ReservedConcurrency={needed} or more, or start with workers "
                f"<= {reserved - 1}"
            )
        return
    try:
        limits = lambda_client.get_account_settings()["AccountLimit"]
    except ClientError as exc:
        if not _not_implemented(exc):
            raise
        logs.event(log, "concurrency_check_skipped", reason="GetAccountSettings is not available")
        return
    total = int(limits["ConcurrentExecutions"])
    unreserved = int(limits["UnreservedConcurrentExecutions"])
    logs.event(log, "concurrency_checked", needed=needed, unreserved=unreserved, account_limit=total)
    if unreserved < needed:
        reserved_elsewhere = total - unreserved
        raise InvalidEventError(
            f"workers {workers} needs {needed} concurrent executions, but the account's unreserved concurrency is "
            f"{unreserved} (limit {total}, {reserved_elsewhere} reserved by other functions); ask for at least "
            f"{needed + reserved_elsewhere} in Service Quotas (AWS Lambda, '{QUOTA_NAME}', {QUOTA_CODE}), or start "
            f"with workers <= {max(unreserved - 1, 0)}"
        )


def _not_implemented(exc: ClientError) -> bool:
    """Whether the endpoint lacks the call (the local Invoke API, an emulator), rather than refusing it."""
    code = exc.response.get("Error", {}).get("Code")
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in NOT_IMPLEMENTED_CODES or status in ("404", "501")
