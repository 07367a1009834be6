"""The logging convention: flat ``extra=`` keys become JSON fields; logging's own attributes never do."""

import io
import json
import logging

from trainer import logs


def _emit(logger_name: str, emit) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return json.loads(stream.getvalue())


def test_extra_keys_are_top_level_fields_and_none_is_dropped():
    line = _emit("t.flat", lambda log: log.info("update_written", extra={"size_bytes": 12, "skipped": None}))
    assert line["message"] == "update_written"
    assert line["size_bytes"] == 12
    assert "skipped" not in line
    assert {"level", "timestamp", "location"} <= set(line)
    assert not {"args", "msg", "pathname", "thread", "process"} & set(line)


def test_event_shortcut_and_bound_keys():
    logs.bind(run_id="r1", request_id=None)
    try:
        line = _emit("t.event", lambda log: logs.event(log, "round_combined", test_accuracy=0.5))
    finally:
        logs.bind()
    assert line["run_id"] == "r1" and line["test_accuracy"] == 0.5
    assert line["location"].startswith("t.event:")
    assert "request_id" not in line
