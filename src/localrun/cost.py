"""What a run cost, from what it measured, priced with a dated prices file (``prices.json`` by default).

- **Lambda**: GB-seconds and requests summed over every invocation of the run: each ``REPORT`` line (Lambda's in
  the function's CloudWatch log; the local runtime writes the same line into the run's log) whose request id
  logged a line of this run. Crashed, timed-out, retried and duplicated invocations each wrote their own
  REPORT line and count; an invocation that died before its first log line (an init failure) cannot be told
  apart from another run's and is left out.
- **EFS**: the bytes the round metrics recorded (the workers' weights, saved states and shards read, their
  update files and saved states written; the combine's reads and writes), priced as Elastic Throughput. The
  start's initial weights and the exported model are not in them.
- **Per hour, separately**: what the stack costs while it exists whatever it runs: its NAT gateway, or (with
  ``EnableNatGateway=false``) the Lambda interface endpoint in two Availability Zones.

Where the numbers come from is a :mod:`localrun.targets` adapter (``log_lines``, ``stack_parameters``); the
arithmetic here is the same for a stack and a local run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun import reports
from localrun.errors import OperatorError
from trainer import coordination

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
PRICE_KEYS = (
    "lambda_gb_second_x86",
    "lambda_requests_per_million",
    "efs_elastic_read_per_gb",
    "efs_elastic_write_per_gb",
    "nat_gateway_per_hour",
    "interface_endpoint_per_az_hour",
)
GB = 1024**3  # AWS bills data in GB of 2^30 bytes
ENDPOINT_ZONES = (
    2  # template.yaml's LambdaEndpoint has a network interface in each of the two private subnets
)


@dataclass(frozen=True)
class Prices:
    taken_on: str
    region: str
    values: dict[str, float]
    source: str  # the file, for the printout


def load_prices(path: Path | None = None) -> Prices:
    """Read and check a prices file; anything missing or not a price is an :class:`OperatorError`."""
    path = path or DEFAULT_PRICES
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OperatorError(f"cannot read prices file {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise OperatorError(f"prices file {path}: expected a JSON object, got {type(document).__name__}")
    taken_on = document.get("taken_on")
    try:
        dt.date.fromisoformat(str(taken_on))
    except ValueError:
        raise OperatorError(
            f"prices file {path}: taken_on is {taken_on!r}; expected the date the prices were taken (YYYY-MM-DD)"
        ) from None
    values: dict[str, float] = {}
    for key in PRICE_KEYS:
        value = document.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise OperatorError(
                f"prices file {path}: {key} is {value!r}; expected a non-negative number of dollars"
            )
        values[key] = float(value)
    return Prices(str(taken_on), str(document.get("region", "?")), values, str(path))


@dataclass(frozen=True)
class Usage:
    """What a run measured."""

    invocations: int
    gb_s: float
    billed_s: float
    memory_mb: tuple[int, ...]  # the memory sizes the invocations ran with
    efs_read_bytes: int
    efs_written_bytes: int
    rounds: int


def measure(run_id: str, log_lines: Iterable[str], rounds: Sequence[coordination.RoundRecord]) -> Usage:
    """Sum every REPORT line whose request id logged a line of ``run_id`` (a request id may repeat: Lambda keeps
    it across retries, and a duplicated delivery is billed twice), and the EFS bytes of the committed rounds."""
    run_requests: set[str] = set()
    found: list[reports.Report] = []
    for line in log_lines:
        report = reports.parse_report(line)
        if report is not None:
            found.append(report)
            continue
        fields = _json_fields(line)
        if fields.get("run_id") == run_id and isinstance(fields.get("request_id"), str):
            run_requests.add(fields["request_id"])
    mine = [report for report in found if report.request_id in run_requests]
    metrics = [record.metrics for record in rounds if record.completed and record.metrics is not None]
    return Usage(
        invocations=len(mine),
        gb_s=sum(report.gb_s for report in mine),
        billed_s=sum(report.billed_ms for report in mine) / 1000,
        memory_mb=tuple(sorted({report.memory_mb for report in mine})),
        efs_read_bytes=sum(int(m.bytes_read) + int(m.worker_bytes_read) for m in metrics),
        efs_written_bytes=sum(int(m.bytes_written) + int(m.worker_bytes_written) for m in metrics),
        rounds=len(metrics),
    )


def _json_fields(line: str) -> dict[str, Any]:
    text = line.strip()
    if not text.startswith("{"):
        return {}
    try:
        fields = json.loads(text)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


@dataclass(frozen=True)
class CostLine:
    item: str
    quantity: str
    dollars: float


def price_run(usage: Usage, prices: Prices) -> list[CostLine]:
    p = prices.values
    return [
        CostLine(
            "Lambda compute",
            f"{usage.gb_s:,.1f} GB-s ({usage.billed_s:,.1f} s billed at {_memory(usage)})",
            usage.gb_s * p["lambda_gb_second_x86"],
        ),
        CostLine(
            "Lambda requests",
            f"{usage.invocations:,} invocations",
            usage.invocations / 1e6 * p["lambda_requests_per_million"],
        ),
        CostLine(
            "EFS reads",
            f"{usage.efs_read_bytes / GB:,.3f} GB",
            usage.efs_read_bytes / GB * p["efs_elastic_read_per_gb"],
        ),
        CostLine(
            "EFS writes",
            f"{usage.efs_written_bytes / GB:,.3f} GB",
            usage.efs_written_bytes / GB * p["efs_elastic_write_per_gb"],
        ),
    ]


def hourly_costs(parameters: dict[str, str] | None, prices: Prices) -> list[CostLine]:
    """What the stack costs per hour while it exists: a NAT gateway, or the Lambda interface endpoint (without
    parameters, the template's default, a NAT gateway)."""
    p = prices.values
    if (parameters or {}).get("EnableNatGateway", "true") == "true":
        return [CostLine("NAT gateway", "1 gateway", p["nat_gateway_per_hour"])]
    return [
        CostLine(
            "Lambda interface endpoint",
            f"{ENDPOINT_ZONES} Availability Zones",
            ENDPOINT_ZONES * p["interface_endpoint_per_az_hour"],
        )
    ]


def _memory(usage: Usage) -> str:
    return " / ".join(f"{mb} MB" for mb in usage.memory_mb) or "-"


def format_report(
    run: coordination.RunStatus,
    usage: Usage,
    prices: Prices,
    parameters: dict[str, str] | None,
    note: str | None,
) -> str:
    lines = [
        f"run {run.run_id}: {run.state}, {usage.rounds} rounds committed, {usage.invocations} invocations",
        f"prices: {prices.source} ({prices.region}, taken {prices.taken_on})",
    ]
    run_lines = price_run(usage, prices)
    width = max(len(line.quantity) for line in run_lines)
    lines.append("")
    for line in run_lines:
        lines.append(f"  {line.item:<17} {line.quantity:<{width}}  ${line.dollars:,.4f}")
    lines.append(f"  {'total':<17} {'':<{width}}  ${sum(line.dollars for line in run_lines):,.4f}")
    lines.append("")
    where = "the stack" if parameters is not None else "a stack deployed with the template's defaults"
    lines.append(f"per hour while {where} exists, whatever it runs (not in the total):")
    for line in hourly_costs(parameters, prices):
        lines.append(f"  {line.item:<26} {line.quantity:<20}  ${line.dollars:,.4f}/hour")
    if note:
        lines.append("")
        lines.append(f"note: {note}")
    return "\n".join(lines)
