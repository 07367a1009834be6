"""CloudWatch embedded metric format (EMF) for the combine's per-round log line: CloudWatch Logs turns the
line's test accuracy, training loss and phase seconds into metrics of namespace :data:`NAMESPACE`, with one
dimension, the function's name (one series per stack, not per run: runs come and go, and each metric series
costs money). ``template.yaml``'s optional dashboard plots the same names (the template gate checks them).

Specification: https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping
from typing import Any

NAMESPACE = "lambdatrain"
DIMENSION = "FunctionName"
# Metric name -> unit. Phases: the combine's own (load, aggregate, eval, write) and the slowest worker's.
METRICS = {
    "test_accuracy": "None",
    "test_loss": "None",
    "train_loss": "None",
    "load": "Seconds",
    "aggregate": "Seconds",
    "eval": "Seconds",
    "write": "Seconds",
    "worker_compute": "Seconds",
    "worker_load": "Seconds",
}


def block(function_name: str, values: Mapping[str, Any], now_s: float | None = None) -> dict[str, Any]:
    """The fields to add to a JSON log line: ``_aws`` naming the metrics present in ``values`` (finite numbers
    only: EMF rejects a line that declares a metric without a value), the dimension's value, and the values."""
    present = {
        name: float(values[name])
        for name in METRICS
        if isinstance(values.get(name), numbers.Real)  # NumPy's scalars too
        and not isinstance(values[name], bool)
        and math.isfinite(float(values[name]))
    }
    if not present:
        return {}
    return {
        "_aws": {
            "Timestamp": int((time.time() if now_s is None else now_s) * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": NAMESPACE,
                    "Dimensions": [[DIMENSION]],
                    "Metrics": [{"Name": name, "Unit": METRICS[name]} for name in present],
                }
            ],
        },
        DIMENSION: function_name,
        **present,
    }
