"""Exception hierarchy for the trainer. Messages name the field, the value received and what was expected.

Two class attributes say what a failure means for delivery (the failure handler and the handler read them):

- ``retryable``  a new attempt of the same event may succeed (an outage, a lost connection, a crashed host);
                 False when a replay would fail the same way (the event is wrong, the state is damaged, the loss
                 diverged).
- ``fails_run``  the run cannot go on: the invocation marks it FAILED with the error as the reason at once.

Exceptions outside this hierarchy (bugs, outages, a killed process) count as retryable.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base class for every error the trainer raises on purpose."""

    retryable = True
    fails_run = False


class InvalidEventError(TrainingError, ValueError):
    """An event or configuration value is malformed; nothing was written."""

    retryable = False


class LayoutError(TrainingError):
    """A file under the EFS root, or a status item, is missing, partial or of the wrong shape."""

    retryable = False
    fails_run = True


class DatasetChangedError(LayoutError):
    """The dataset on EFS is not the one the run started with (it was prepared or staged again)."""


class DivergenceError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite: replaying the round diverges again."""

    retryable = False
    fails_run = True


class CoordinationConflictError(TrainingError):
    """A DynamoDB conditional write lost: another invocation got there first."""

    retryable = False


class InvocationError(TrainingError):
    """Invoking the trainer function asynchronously failed."""


class ConfigurationError(TrainingError):
    """The function's environment is wrong (a deployment problem, not the event's)."""

    retryable = False


def by_name(error_type: str | None) -> type[TrainingError] | None:
    """The trainer's error class called ``error_type`` (as a failure record names it), or None."""
    pending: list[type[TrainingError]] = [TrainingError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == error_type:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def is_retryable(error_type: str | None) -> bool:
    """Whether a failed event whose error was ``error_type`` is worth another attempt."""
    cls = by_name(error_type)
    return cls.retryable if cls is not None else True
