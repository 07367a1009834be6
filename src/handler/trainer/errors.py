"""Exception hierarchy for the trainer. Messages name the field, the value received and what was expected."""


class TrainingError(Exception):
    """Base class for every error the trainer raises on purpose."""


class InvalidEventError(TrainingError, ValueError):
    """An event or configuration value is malformed; nothing was written."""


class LayoutError(TrainingError):
    """A file under the EFS root is missing, partial or of the wrong shape."""


class CoordinationConflictError(TrainingError):
    """A DynamoDB conditional write lost: another invocation got there first."""


class InvocationError(TrainingError):
    """Invoking the trainer function asynchronously failed."""


class ConfigurationError(TrainingError):
    """The function's environment is wrong (a deployment problem, not the event's)."""
