"""Exceptions of the local runtime. Each message is one line that says what failed and how to fix it."""


class LocalRuntimeError(Exception):
    """Base class: ``lambdatrain local`` prints these as ``error: <message>`` and exits with 1."""


class PortInUseError(LocalRuntimeError):
    """The requested loopback port is taken by another process."""


class DynamoDBLocalError(LocalRuntimeError):
    """DynamoDB Local is not installed, cannot start, or stopped answering."""


class TemplateError(LocalRuntimeError):
    """``template.yaml`` is missing or does not declare what the local runtime reads from it."""


class OperatorError(LocalRuntimeError):
    """An operator command (``lambdatrain runs``, ``status`` ...) cannot do what was asked: an unknown run or
    stack, a state directory without a table, a run in the wrong state. Nothing was changed."""
