"""The function behind the image test's Invoke API: it records nothing itself and trains nothing.

The trainer in the container fans out by invoking its own name; the local Invoke API (localrun.lambda_api) keeps
each delivered event in ``LocalFunction.history``, which the image test reads. This handler only acknowledges.
"""

from __future__ import annotations

from typing import Any


def handle(event: Any, context: Any) -> dict[str, Any]:
    return {"recorded": True}
