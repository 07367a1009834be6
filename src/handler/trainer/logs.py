"""One JSON object per log line, with per-invocation keys bound through a context variable.

Keys always present: ``level``, ``timestamp``, ``location``, ``message``. Keys bound per invocation
(``run_id``, ``request_id``, ``worker_index``, ``round``, ``epoch`` ...) come from :func:`bind`. Fields travel as
plain ``extra=`` keys, as in aws-lambda-powertools' formatter: every record attribute that is not one of
logging's own is a field (``log.info("gradients_written", extra={"size_bytes": n})``, or the :func:`event`
shortcut). ``None`` values are dropped; values JSON cannot encode are written with ``str``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
from typing import Any

ENV_LOG_LEVEL = "LOG_LEVEL"
DEFAULT_LOG_LEVEL = "INFO"

# Attributes every LogRecord has (and ``message``/``asctime``, which formatting adds): never fields.
RESERVED_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}

_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_keys", default=None)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record: every attribute logging itself does not set."""
    return {key: value for key, value in vars(record).items() if key not in RESERVED_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "level": record.levelname,
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "location": f"{record.name}:{record.lineno}",
            "message": record.getMessage(),
        }
        payload.update(_bound.get() or {})
        payload.update(record_fields(record))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
            payload["exception_name"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps({k: v for k, v in payload.items() if v is not None}, default=str)


def setup(level: str | None = None, stream: Any = None) -> None:
    """Install the JSON formatter on the root logger (idempotent; Lambda's own handler is replaced)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get(ENV_LOG_LEVEL) or DEFAULT_LOG_LEVEL)


def bind(**keys: Any) -> None:
    """Bind keys for every following log line of this invocation (replaces earlier bindings)."""
    _bound.set({k: v for k, v in keys.items() if v is not None})


def bind_more(**keys: Any) -> None:
    current = dict(_bound.get() or {})
    current.update({k: v for k, v in keys.items() if v is not None})
    _bound.set(current)


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a stable snake_case event name with numeric fields: ``event(log, "gradients_written", size_bytes=n)``."""
    logger.log(level, message, extra=fields, stacklevel=2)
