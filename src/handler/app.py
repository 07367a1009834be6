"""Lambda entry point: parse the event, bind log keys, route to one flow, return a small dict.

Configured by environment only (``trainer.config``); boto3 reaches DynamoDB Local and the local Invoke API through
``AWS_ENDPOINT_URL_DYNAMODB`` / ``AWS_ENDPOINT_URL_LAMBDA``, so this file is the same in the cloud and on a laptop.
"""

import os

# Before TensorFlow loads: oneDNN kernels (2.5x on x86 CPUs), quiet C++ logs, the TensorFlow backend by default.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import logging
from typing import Any

from trainer import combine, config, errors, failures, logs, protocol, runs, worker
from trainer import services as services_module

logs.setup()
log = logging.getLogger("app")
_services: dict[config.Environment, services_module.Services] = {}


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    request_id = getattr(context, "aws_request_id", None) or "local"
    logs.bind(request_id=request_id)
    try:
        parsed = protocol.parse_event(event)
        services = _services_for(config.load())
        match parsed:
            case protocol.StartEvent():
                return runs.start_run(parsed, services, default_run_id=f"run-{request_id[:8]}")
            case protocol.S3StartEvent():
                return runs.start_from_s3(parsed, services)
            case protocol.WorkerEvent():
                return worker.run_worker(parsed, services, context)
            case protocol.CombineEvent():
                return combine.run_combine(parsed, services)
            case protocol.StopEvent():
                return runs.stop_run(parsed, services)
            case protocol.FailureRecord():
                return failures.handle_failure(parsed, services)
    except errors.TrainingError as exc:  # expected failures: one line, no traceback
        logs.event(log, "invocation_failed", logging.ERROR, error_type=type(exc).__name__, error=str(exc))
        raise
    except Exception:  # a bug or an outage: keep the traceback
        log.exception("invocation_failed")
        raise
    raise AssertionError(
        f"unrouted event {type(parsed).__name__}"
    )  # unreachable: parse_event returns one of the above


def _services_for(environment: config.Environment) -> services_module.Services:
    """Clients are created once per container (and per environment, for tests)."""
    if environment not in _services:
        _services[environment] = services_module.Services.from_environment(environment)
    return _services[environment]
