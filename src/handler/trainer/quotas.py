"""What a run needs from Lambda, checked when it starts instead of failing halfway: the account's concurrency,
and the function's memory for the round's combine (or commit).

A run executes ``workers`` worker invocations at once, plus the combiner that the last of them invokes: it needs
``workers + 1`` concurrent executions of the trainer (a sharded run with more reducers than workers:
``reducers + 1``). Lambda throttles asynchronous invocations beyond the
account's unreserved concurrency (or the function's reservation) and retries them for up to six hours, so a run
that does not fit stalls instead of failing. :func:`check_concurrency` refuses such a start with the numbers and
the quota to ask for.

Where the Lambda API has no ``GetAccountSettings`` (the local runtime's Invoke API answers 404/501, an emulator
may answer ``UnknownOperationException``), the check is skipped with a logged ``concurrency_check_skipped``:
a local run has no account quota to exceed. Every other error propagates.

:func:`check_memory` refuses a run whose combine cannot fit the function's memory (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``,
which Lambda sets, and ``localrun`` from its settings): a measured baseline (the runtime, TensorFlow, the model's
graph and an evaluation) plus the model-sized arrays the largest reducing invocation holds at once.
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


def executions_needed(workers: int, reducers: int = 1) -> int:
    """Concurrent executions a run needs: every worker (or every reducer of a sharded round, if there are more),
    plus the invocation that starts the next phase (the claimant worker while the combiner or reducers run)."""
    return max(workers, reducers) + 1


def check_concurrency(
    lambda_client: Any,
    workers: int,
    reserved: int | None = None,
    function_name: str | None = None,
    reducers: int = 1,
) -> None:
    """Raise :class:`InvalidEventError` if the trainer cannot run ``workers + 1`` executions at once.

    ``reserved`` is the trainer's own reserved concurrency when it has one (then that is its limit, not the
    account's unreserved pool); with ``function_name`` it is read with ``GetFunctionConcurrency``.
    """
    needed = executions_needed(workers, reducers)
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
                f"{_who(workers, reducers)} needs {needed} concurrent executions, but the trainer's reserved concurrency "
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
            f"{_who(workers, reducers)} needs {needed} concurrent executions, but the account's unreserved concurrency is "
            f"{unreserved} (limit {total}, {reserved_elsewhere} reserved by other functions); ask for at least "
            f"{needed + reserved_elsewhere} in Service Quotas (AWS Lambda, '{QUOTA_NAME}', {QUOTA_CODE}), or start "
            f"with workers <= {max(unreserved - 1, 0)}"
        )


# Peak RSS through the handler in a fresh process minus the model-sized arrays counted below, the largest over the
# combines and commits bench/scale_bench.py measured at full width (bench/RESULTS.md, "Scale"): a commit's 1,027 MiB
# minus 2.2 copies of 76.5 MiB (a combine's 1,330 MiB minus 7 copies is 795). The runtime, TensorFlow, Keras and
# the model's graph; an evaluation's activations at batch 256 are not in it (a worker's training peak, 2 GB, is).
BASELINE_MB = 870
# Model-sized float32 arrays held at once (trainer/combine.py; trainer/reduce.py):
COMBINE_COPIES = (
    7  # the model, the round's weights, the float64 sum (2), an update, the average, the new weights
)
COMMIT_COPIES = 2  # a sharded round's commit: the model and the assembled weights (plus one slice)
REDUCER_COPIES = 7  # a reducer holds the combine's arrays, but only on its 1/K slice
MOMENTUM_COPIES = 2  # the outer momentum, old and new (combine), or new (commit) and a slice's old


def combine_memory_mb(parameters: int, reducers: int, outer_momentum: bool) -> tuple[float, str]:
    """Peak memory of the round's largest reducing invocation in MB, and the arithmetic as words."""
    model_mb = parameters * 4 / 2**20
    momentum = MOMENTUM_COPIES if outer_momentum else 0
    if reducers == 1:
        copies: float = COMBINE_COPIES + momentum
        who = "a combine"
    else:
        copies = max(COMMIT_COPIES + momentum / 2 + 1 / reducers, (REDUCER_COPIES + momentum) / reducers)
        who = f"the commit of {reducers} reducers"
    total = BASELINE_MB + copies * model_mb
    arithmetic = (
        f"{who} holds {copies:.2f} copies of the {model_mb:.0f} MB model ({parameters:,} float32 weights) = "
        f"{copies * model_mb:.0f} MB, plus a {BASELINE_MB} MB baseline = {total:.0f} MB"
    )
    return total, arithmetic


def check_memory(parameters: int, reducers: int, outer_momentum: bool, memory_mb: int) -> None:
    """Raise :class:`InvalidEventError` if the round's combine (or commit) cannot fit ``memory_mb``; skipped
    where the function's memory is not known (0)."""
    if memory_mb <= 0:
        logs.event(log, "memory_check_skipped", reason="AWS_LAMBDA_FUNCTION_MEMORY_SIZE is not set")
        return
    needed, arithmetic = combine_memory_mb(parameters, reducers, outer_momentum)
    logs.event(log, "memory_checked", needed_mb=round(needed), memory_mb=memory_mb)
    if needed > memory_mb:
        raise InvalidEventError(
            f"this configuration's round does not fit the function's {memory_mb} MB: {arithmetic}; use a "
            "smaller model (width, model), more reducers (reducers), or more memory (MemorySize, at most 10240)"
        )


def _who(workers: int, reducers: int) -> str:
    return f"workers {workers}" if reducers <= workers else f"reducers {reducers}"


def _not_implemented(exc: ClientError) -> bool:
    """Whether the endpoint lacks the call (the local Invoke API, an emulator), rather than refusing it."""
    code = exc.response.get("Error", {}).get("Code")
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code in NOT_IMPLEMENTED_CODES or status in ("404", "501")
