"""Lambda entry point: parse the event, bind log keys, route to one flow, return a small dict.

Configured by environment only (``trainer.config``); boto3 reaches DynamoDB Local and the local Invoke API through
``AWS_ENDPOINT_URL_DYNAMODB`` / ``AWS_ENDPOINT_URL_LAMBDA``, so this file is the same in the cloud and on a laptop.
"""

from trainer import config

config.set_tensorflow_defaults()  # before anything below imports TensorFlow

import logging  # noqa: E402
from typing import Any  # noqa: E402

from trainer import combine, errors, failures, logs, protocol, reduce, runs, watchdog, worker  # noqa: E402
from trainer.services import Services  # noqa: E402

logs.setup()
log = logging.getLogger("app")
_services: dict[config.Environment, Services] = {}


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    return handle(event, context)


def handle(event: Any, context: Any, services: Services | None = None) -> dict[str, Any]:
    """Handle one event. ``services``: the adapters to use (tests hand in their own); by default they are built
    from the environment once per container."""
    request_id = getattr(context, "aws_request_id", None) or "local"
    logs.bind(request_id=request_id)
    parsed: protocol.Event | None = None
    try:
        parsed = protocol.parse_event(event)
        services = services or services_for(config.load())
        match parsed:
            case protocol.StartEvent():
                return runs.start_run(parsed, services, default_run_id=protocol.default_run_id(request_id))
            case protocol.S3StartEvent():
                return runs.start_from_s3(parsed, services)
            case protocol.WorkerEvent():
                return worker.run_worker(parsed, services, context)
            case protocol.CombineEvent():
                return combine.run_combine(parsed, services)
            case protocol.ReduceEvent():
                return reduce.run_reducer(parsed, services)
            case protocol.StopEvent():
                return runs.stop_run(parsed, services)
            case protocol.WatchdogEvent():
                return watchdog.check_runs(
                    services, run_id=parsed.run_id, stalled_after_s=parsed.stalled_after_s
                )
            case protocol.FailureRecord():
                return failures.handle_failure(parsed, services)
    except errors.TrainingError as exc:  # expected failures: one line, no traceback
        logs.event(log, "invocation_failed", logging.ERROR, error_type=type(exc).__name__, error=str(exc))
        if services is not None and parsed is not None:
            failures.fail_for_error(parsed, exc, services)  # an error that ends the run does so at once
        raise
    except Exception:  # a bug or an outage: keep the traceback
        log.exception("invocation_failed")
        raise
    raise AssertionError(f"unrouted event {type(parsed).__name__}")  # parse_event returns one of the above


def services_for(environment: config.Environment) -> Services:
    """The adapters for an environment, created once per container (and per environment, for tests)."""
    if environment not in _services:
        _services[environment] = Services.from_environment(environment)
    return _services[environment]
