"""Following a run from the status table, as an operator would: refuse or resume it, show its progress, relay
invocation failures, and turn Ctrl-C into a stop request.

Every read or write of the status table that ``lambdatrain local`` makes is here (:func:`check_run_id`,
:meth:`Monitor.read`, the stop request in :meth:`Monitor.watch`).

Ctrl-C asks the run to stop after its current round (STOP_REQUESTED on the run item, what the stop event
writes); a second Ctrl-C (or SIGTERM) stops at once.

When nothing is queued or running but the run is still active (its events were lost), the monitor does what the
cloud's watchdog schedule does, sooner, because here it knows that nothing is in flight: it sends the trainer's
watchdog event for this run, which re-sends the round (or, once the re-sends are used up, fails the run).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from localrun import function, progress, runtime
from localrun.errors import LocalRuntimeError
from trainer import coordination

POLL_S = 1.0
STALL_POLLS = 5  # polls with nothing queued or running while the run is not finished: it can never finish


def check_run_id(
    status: coordination.StatusTable, run_id: str, resume: bool
) -> coordination.RunStatus | None:
    """Refuse a start that the trainer would refuse, before any process starts; return the existing run."""
    run = status.get_run(run_id)
    if resume and run is None:
        raise LocalRuntimeError(f"run {run_id!r} does not exist in this state directory; nothing to resume")
    if resume and run.state == coordination.SUCCEEDED:
        raise LocalRuntimeError(f"run {run_id!r} already SUCCEEDED; nothing to resume")
    if not resume and run is not None:
        raise LocalRuntimeError(
            f"run {run_id!r} already exists ({run.state}); continue it with --resume {run_id} or pick another --run"
        )
    return run


@dataclass(frozen=True)
class Outcome:
    message: str | None = None  # why the watch ended before the run did (stalled, aborted)
    drain: bool = False  # the run ended: wait for its last invocations before shutting down


class Monitor:
    """Follows a run in the status table, relays invocation failures, and handles Ctrl-C."""

    def __init__(
        self,
        run_id: str,
        status: coordination.StatusTable,
        local_function: function.LocalFunction,
        log_path: Path,
        send_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.status = status
        self.function = local_function
        self.log_path = log_path
        self.bar = progress.ProgressBar(run_id)
        self.last_error: str | None = None
        self.snapshot = progress.Snapshot(run_id, None)  # the last one read successfully
        self.watching = True
        self.send_event = send_event  # how to send the watchdog event (None: only report a stall)
        self.watchdog_calls = 0
        local_function.add_listener(self._on_invocation)

    def read(self) -> progress.Snapshot:
        """Read the run from the status table; on a read error keep (and return) the last snapshot."""
        try:
            self.snapshot = progress.read_snapshot(self.status, self.run_id)
        except (BotoCoreError, ClientError) as exc:
            self.bar.write(f"warning: cannot read the status table: {exc}")
        return self.snapshot

    def watch(self, previous_run: coordination.RunStatus | None = None) -> Outcome:
        """Poll until the run ends, stalls or is aborted. ``previous_run``: the item before a resume, whose
        old terminal state must not be mistaken for the resumed run's end."""
        interrupts = Interrupts()
        idle_polls = 0
        stop_sent = False
        with interrupts.installed():
            try:
                while True:
                    snapshot = self.read()
                    self.bar.update(snapshot)
                    if snapshot.terminal and snapshot.run != previous_run:
                        return Outcome(drain=True)
                    if interrupts.count >= 2:
                        return Outcome("stopped at once; the current round is lost")
                    if interrupts.count == 1 and not stop_sent:
                        stop_sent = True
                        self.bar.write("stopping after the current round (Ctrl-C again to stop now)")
                        # As an operator would: flag the run item now (the stop event's own write), rather
                        # than queue a stop event behind the invocations that are keeping every slot busy.
                        self.status.request_stop(self.run_id)
                    idle_polls = idle_polls + 1 if self.function.in_flight == 0 else 0
                    if idle_polls >= STALL_POLLS and self._ask_watchdog(snapshot):
                        idle_polls = 0
                    if idle_polls >= STALL_POLLS:
                        state = snapshot.state or "not created"
                        cause = f"; last error: {self.last_error}" if self.last_error else ""
                        return Outcome(
                            f"run {self.run_id} is {state} but no invocation is queued or running{cause} "
                            f"(see {display_path(self.log_path)})"
                        )
                    interrupts.wait(POLL_S)
            finally:
                self.watching = False  # failures after this are the shutdown's own doing
                self.bar.close()

    def _ask_watchdog(self, snapshot: progress.Snapshot) -> bool:
        """Nothing is in flight for an active run: send the watchdog event for it, at most one more time than
        the watchdog re-sends (its last call fails the run). False when that is not possible any more."""
        run = snapshot.run
        if self.send_event is None or run is None or not run.active:
            return False
        if self.watchdog_calls > run.config.max_attempts:
            return False
        self.watchdog_calls += 1
        self.bar.write(
            f"nothing is queued or running for active run {self.run_id}: sending the watchdog event"
        )
        self.send_event({"watchdog": True, "run": self.run_id, "stalled_after_s": 0})
        return True

    def _on_invocation(self, completed: function.CompletedInvocation) -> None:
        if completed.result.ok or not self.watching:
            return
        error = completed.result.error()
        self.last_error = f"{error.get('errorType')}: {error.get('errorMessage')}"
        what = "failure record" if completed.failure_record else runtime.describe_event(completed.event)
        self.bar.write(f"warning: invocation failed ({what}): {self.last_error}")


class Interrupts:
    """SIGINT and SIGTERM as counted flags instead of exceptions, so the watch loop decides what to do."""

    def __init__(self) -> None:
        self.count = 0
        self._wake = threading.Event()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        self._wake.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1 if signum == signal.SIGINT else 2  # SIGTERM: stop at once
        self._wake.set()


def display_path(path: Path) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
