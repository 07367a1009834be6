"""Lambda's per-invocation ``REPORT`` line: the local runtime writes one into the run's log after every
invocation, as the Lambda platform writes one into the function's CloudWatch log stream, so that
``lambdatrain cost`` reads both with one parser.

The platform's line (text log format) is ``REPORT RequestId: <id>\\tDuration: 1234.56 ms\\tBilled Duration:
1235 ms\\tMemory Size: 10240 MB\\tMax Memory Used: 2048 MB`` (``Init Duration`` and ``Status`` are added on cold
starts and failures). Locally ``Duration`` is the invocation's wall time in the worker pool, a cold process's
start included, and ``Max Memory Used`` is left out: the local runtime does not limit or measure memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

_FIELD = re.compile(r"([A-Za-z ]+): ([^\t]+)")


@dataclass(frozen=True)
class Report:
    request_id: str
    billed_ms: float
    memory_mb: int

    @property
    def gb_s(self) -> float:
        """GB-seconds as Lambda bills them (1 GB = 1024 MB)."""
        return self.billed_ms / 1000 * self.memory_mb / 1024


def format_report(request_id: str, duration_s: float, memory_mb: int) -> str:
    duration_ms = duration_s * 1000
    return (
        f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
        f"Billed Duration: {math.ceil(duration_ms)} ms\tMemory Size: {memory_mb} MB\t\n"
    )


def parse_report(line: str) -> Report | None:
    """The report in a log line, or None if the line is not a ``REPORT`` line (or lacks its billing fields).
    Lambda's JSON log format writes the same as a ``platform.report`` record, which is read too."""
    text = line.strip()
    if text.startswith("{") and '"platform.report"' in text:
        return _parse_platform_report(text)
    if not text.startswith("REPORT RequestId:"):
        return None
    fields = {name.strip(): value.strip() for name, value in _FIELD.findall(text.removeprefix("REPORT "))}
    try:
        return Report(
            request_id=fields["RequestId"],
            billed_ms=float(fields["Billed Duration"].removesuffix("ms")),
            memory_mb=int(fields["Memory Size"].removesuffix("MB")),
        )
    except (KeyError, ValueError):
        return None


def _parse_platform_report(text: str) -> Report | None:
    """``{"type": "platform.report", "record": {"requestId", "metrics": {"billedDurationMs", "memorySizeMB"}}}``."""
    try:
        event = json.loads(text)
        record = event["record"]
        metrics = record["metrics"]
        if event.get("type") != "platform.report":
            return None
        return Report(
            str(record["requestId"]), float(metrics["billedDurationMs"]), int(metrics["memorySizeMB"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def append_report(log_path: Path, request_id: str, duration_s: float, memory_mb: int) -> None:
    """Append a report line with one ``write`` (O_APPEND): lines of concurrent writers never interleave."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, format_report(request_id, duration_s, memory_mb).encode())
    finally:
        os.close(fd)
