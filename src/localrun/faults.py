"""Fault injection: make the local runtime misbehave the way AWS Lambda is allowed to, on purpose.

Asynchronous invocation is at-least-once and unordered, and a container can die at any moment. Tests use a
:class:`FaultPlan` to provoke exactly that for chosen events::

    plan = faults.FaultPlan()
    plan.duplicate(faults.where(workerno=1, round=0))           # delivered twice, concurrently
    plan.delay(faults.where(combine=True), seconds=2.0)         # held back for 2 s before it is delivered
    plan.kill(faults.where(workerno=2), after_s=0.5)            # its process is SIGKILLed 0.5 s in
    plan.drop(faults.where(combine=True))                        # accepted (202) but never delivered

Each fault applies to ``times`` matching deliveries (default 1; ``None`` = all). ``duplicate``, ``delay`` and
``drop`` (an event lost for good, as one throttled past every retry is) act on ``Event`` invocations when they
are queued; ``kill`` acts on every delivery, including retries and
synchronous invocations. The same faults can be written as text for ``lambdatrain local --fault`` or the
``LOCALRUN_FAULTS`` variable (``;``-separated)::

    kill:workerno=1,round=0        delay=2.5:combine=true        duplicate=1:workerno=0      drop:combine=true
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ENV_FAULTS = "LOCALRUN_FAULTS"
DUPLICATE = "duplicate"
DELAY = "delay"
KILL = "kill"
DROP = "drop"
ACTIONS = (DUPLICATE, DELAY, KILL, DROP)

Predicate = Callable[[Any], bool]


def where(**fields: Any) -> Predicate:
    """A predicate true for events (JSON objects) whose top-level keys equal all of ``fields``."""

    def matches(event: Any) -> bool:
        return isinstance(event, Mapping) and all(
            key in event and event[key] == value for key, value in fields.items()
        )

    matches.__qualname__ = "where(" + ", ".join(f"{key}={value!r}" for key, value in fields.items()) + ")"
    return matches


def every_event(event: Any) -> bool:
    return True


@dataclass
class Fault:
    """One fault. ``seconds``: delay -> how long the event waits; duplicate -> how much later the copy
    arrives; kill -> how long after the handler started its process is killed."""

    action: str
    matches: Predicate
    seconds: float = 0.0
    times: int | None = 1
    applied: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"fault action must be one of {list(ACTIONS)}, got {self.action!r}")
        if self.seconds < 0:
            raise ValueError(f"fault seconds must be >= 0, got {self.seconds}")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.applied >= self.times


class FaultPlan:
    """A thread-safe list of faults, consulted by :class:`localrun.function.LocalFunction`."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._faults = list(faults)
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def duplicate(self, matches: Predicate, later_s: float = 0.0, times: int | None = 1) -> Fault:
        """Deliver matching events twice; the copy arrives ``later_s`` after the original."""
        return self.add(Fault(DUPLICATE, matches, later_s, times))

    def delay(self, matches: Predicate, seconds: float, times: int | None = 1) -> Fault:
        """Hold matching events back for ``seconds`` before delivering them."""
        return self.add(Fault(DELAY, matches, seconds, times))

    def kill(self, matches: Predicate, after_s: float = 0.0, times: int | None = 1) -> Fault:
        """SIGKILL the process running a matching invocation ``after_s`` after it started."""
        return self.add(Fault(KILL, matches, after_s, times))

    def drop(self, matches: Predicate, times: int | None = 1) -> Fault:
        """Accept matching events but never deliver them."""
        return self.add(Fault(DROP, matches, 0.0, times))

    def take(self, action: str, event: Any) -> Fault | None:
        """The first unexhausted fault of ``action`` matching ``event``, counted as applied; else None."""
        with self._lock:
            for fault in self._faults:
                if fault.action == action and not fault.exhausted and fault.matches(event):
                    fault.applied += 1
                    log.warning(
                        "fault_injected",
                        extra={"action": action, "seconds": fault.seconds, "event": event},
                    )
                    return fault
        return None

    def __len__(self) -> int:
        return len(self._faults)


def parse_fault(spec: str) -> Fault:
    """Parse ``ACTION[=SECONDS][:KEY=VALUE[,KEY=VALUE...]]``; values are JSON where they parse (``true``, ``3``)."""
    head, _, condition = spec.strip().partition(":")
    action, _, seconds_text = head.partition("=")
    action = action.strip().lower()
    if action not in ACTIONS:
        raise ValueError(f"fault {spec!r}: action must be one of {list(ACTIONS)}, got {action!r}")
    try:
        seconds = float(seconds_text) if seconds_text else 0.0
    except ValueError:
        raise ValueError(f"fault {spec!r}: seconds must be a number, got {seconds_text!r}") from None
    fields: dict[str, Any] = {}
    for pair in filter(None, (part.strip() for part in condition.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"fault {spec!r}: expected KEY=VALUE in the condition, got {pair!r}")
        fields[key.strip()] = _json_or_text(value.strip())
    return Fault(action, where(**fields) if fields else every_event, seconds)


def parse_faults(text: str) -> list[Fault]:
    """Parse a ``;``-separated list of fault specs (the ``LOCALRUN_FAULTS`` variable)."""
    return [parse_fault(spec) for spec in text.split(";") if spec.strip()]


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
