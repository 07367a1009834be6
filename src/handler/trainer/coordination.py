"""Run and round state in the DynamoDB status table. Every state transition is one conditional write.

Key schema (``template.yaml`` declares the same; the template gate checks it): ``pk`` (S, HASH), ``sk`` (S, RANGE).

Run item ``pk="RUN#<run>"``, ``sk="RUN"``
    ``state``          RUNNING | STOP_REQUESTED | STOPPED | SUCCEEDED | FAILED
    ``round``          the round being trained now (its global weights exist on EFS)
    ``total_rounds``, ``rounds_per_epoch``, ``workers``, ``epochsdone``
    ``generation``     incremented by every resume, so a resumed run can claim a combine again
    ``fanned_out``     the last round whose worker events were all sent
    ``config``         the resolved TrainConfig as JSON
    ``reason``         why a run FAILED; ``final_model`` where ``final.keras`` is; latest ``test_accuracy``/``test_loss``
    ``export_bucket``  for runs started by an S3 object: ``final.keras`` is also uploaded to ``models/<run>/``
Round item ``pk="RUN#<run>"``, ``sk="ROUND#000012"`` (one Query lists a run's rounds in order)
    ``done``                number set of the workers whose update is written (``ADD`` is idempotent)
    ``claimed_generation``, ``claimed_by``, ``claimed_attempt``   the combine claim: won once per generation,
                            re-won only by the same worker on a later attempt (its crash was retried)
    ``epochsdone``, ``train_loss``, ``test_loss``, ``test_accuracy``, ``duration_s`` (map), ``bytes_read``,
    ``bytes_written``       the combine's metrics (an idempotent overwrite, written before the commit)
    ``completed_at``        set once the round is committed; later registrations are refused

State transitions (run creation, the round advance, stop, failure, resume, registration, the claim) are
conditional writes; metrics are plain overwrites of deterministic values.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import boto3
from botocore.exceptions import ClientError

from trainer import logs
from trainer.config import TrainConfig
from trainer.errors import CoordinationConflictError

log = logging.getLogger(__name__)

RUNNING = "RUNNING"
STOP_REQUESTED = "STOP_REQUESTED"
STOPPED = "STOPPED"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
ACTIVE_STATES = (RUNNING, STOP_REQUESTED)
TERMINAL_STATES = (STOPPED, SUCCEEDED, FAILED)

RUN_SORT_KEY = "RUN"
ROUND_PREFIX = "ROUND#"


def run_key(run_id: str) -> dict[str, str]:
    return {"pk": f"RUN#{run_id}", "sk": RUN_SORT_KEY}


def round_key(run_id: str, round_index: int) -> dict[str, str]:
    return {"pk": f"RUN#{run_id}", "sk": f"{ROUND_PREFIX}{round_index:06d}"}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str
    round_index: int
    total_rounds: int
    epochs_done: int
    generation: int
    fanned_out: int
    config: TrainConfig
    reason: str | None = None
    export_bucket: str | None = None  # runs started by an S3 object also export final.keras to that bucket

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class StatusTable:
    """The status table. Pass a boto3 ``Table`` resource (tests hand in DynamoDB Local's)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    @classmethod
    def from_name(cls, name: str) -> StatusTable:
        # boto3 honours AWS_ENDPOINT_URL_DYNAMODB, so the same call reaches DynamoDB Local.
        return cls(boto3.resource("dynamodb").Table(name))

    # --- runs -------------------------------------------------------------------------------------------

    def create_run(
        self, run_id: str, config: TrainConfig, total_rounds: int, export_bucket: str | None = None
    ) -> None:
        """Create the run item; a second start with the same id raises :class:`CoordinationConflictError`."""
        item = {
            **run_key(run_id),
            "state": RUNNING,
            "round": 0,
            "total_rounds": total_rounds,
            "rounds_per_epoch": max(1, total_rounds // config.epochs),
            "workers": config.workers,
            "epochsdone": 0,
            "generation": 1,
            "fanned_out": -1,
            "config": json.dumps(config.to_dict(), sort_keys=True),
            "created_at": now_iso(),
            "updated_at": now_iso(),
        }
        if export_bucket:
            item["export_bucket"] = export_bucket
        self._conditional(
            "put_item",
            f'run {run_id!r} already exists (send "resume": true to continue it)',
            Item=item,
            ConditionExpression="attribute_not_exists(pk)",
        )

    def resume_run(self, run_id: str) -> RunStatus:
        """Make a STOPPED/FAILED/RUNNING run RUNNING again under a new generation."""
        attributes = self._conditional(
            "update_item",
            f"run {run_id!r} does not exist or has already SUCCEEDED; nothing to resume",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :running, generation = generation + :one, updated_at = :now "
            "REMOVE reason",
            ConditionExpression="attribute_exists(pk) AND #state <> :succeeded",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":running": RUNNING,
                ":one": 1,
                ":now": now_iso(),
                ":succeeded": SUCCEEDED,
            },
            ReturnValues="ALL_NEW",
        )
        return _run_status(attributes)

    def get_run(self, run_id: str) -> RunStatus | None:
        item = self.table.get_item(Key=run_key(run_id), ConsistentRead=True).get("Item")
        return _run_status(item) if item else None

    def get_run_item(self, run_id: str) -> dict[str, Any] | None:
        item = self.table.get_item(Key=run_key(run_id), ConsistentRead=True).get("Item")
        return _plain(item) if item else None

    def advance_run(
        self, run: RunStatus, next_round: int, epochs_done: int, new_state: str, summary: dict[str, Any]
    ) -> None:
        """Commit a combine: round r -> r+1 happens once (condition on round, state and generation)."""
        values = {
            ":r": run.round_index,
            ":seen": run.state,
            ":g": run.generation,
            ":next": next_round,
            ":e": epochs_done,
            ":state": new_state,
            ":now": now_iso(),
        }
        names = {"#round": "round", "#state": "state"}
        sets = ["#round = :next", "epochsdone = :e", "#state = :state", "updated_at = :now"]
        for index, (name, value) in enumerate(summary.items()):
            sets.append(f"#s{index} = :s{index}")
            names[f"#s{index}"] = name
            values[f":s{index}"] = value
        self._conditional(
            "update_item",
            f"run {run.run_id!r} is no longer at round {run.round_index} in state {run.state}",
            Key=run_key(run.run_id),
            UpdateExpression="SET " + ", ".join(sets),
            ConditionExpression="#round = :r AND #state = :seen AND generation = :g",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=_dynamo(values),
        )

    def mark_fanned_out(self, run_id: str, round_index: int) -> None:
        """Record that every worker event of ``round_index`` was sent (monotonic; a stale write is a no-op)."""
        if not self._transition(
            "update_item",
            "fanned_out already past this round",
            Key=run_key(run_id),
            UpdateExpression="SET fanned_out = :r",
            ConditionExpression="fanned_out < :r",
            ExpressionAttributeValues={":r": round_index},
        ):
            logs.event(log, "fan_out_already_recorded", round=round_index)

    def request_stop(self, run_id: str) -> bool:
        """Flag a RUNNING run to stop after its current round. False if it was not running."""
        return self._transition(
            "update_item",
            "run is not RUNNING",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :stop, updated_at = :now",
            ConditionExpression="#state = :running",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={":stop": STOP_REQUESTED, ":running": RUNNING, ":now": now_iso()},
        )

    def fail_run(self, run_id: str, reason: str) -> bool:
        """Mark an active run FAILED with a reason. False if it had already ended."""
        return self._transition(
            "update_item",
            "run is not active",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :failed, reason = :reason, updated_at = :now",
            ConditionExpression="#state IN (:running, :stop)",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":failed": FAILED,
                ":reason": reason[:1000],
                ":now": now_iso(),
                ":running": RUNNING,
                ":stop": STOP_REQUESTED,
            },
        )

    # --- rounds -----------------------------------------------------------------------------------------

    def register_worker(self, run_id: str, round_index: int, worker_index: int) -> set[int]:
        """Add a worker to the round's done set (idempotent) and return the set as it now stands."""
        attributes = self._conditional(
            "update_item",
            f"round {round_index} of run {run_id!r} is already combined",
            Key=round_key(run_id, round_index),
            UpdateExpression="ADD done :w SET #round = :r",
            ConditionExpression="attribute_not_exists(completed_at)",
            ExpressionAttributeNames={"#round": "round"},
            ExpressionAttributeValues={":w": {worker_index}, ":r": round_index},
            ReturnValues="ALL_NEW",
        )
        return {int(worker) for worker in attributes.get("done", set())}

    def claim_combine(
        self, run_id: str, round_index: int, generation: int, worker_index: int, attempt: int
    ) -> bool:
        """True for exactly one caller per (round, generation): the one that should invoke the combine.

        The claimant's worker index and attempt are stored, so that the same worker re-dispatched after a crash
        (a higher attempt) may claim again; any other worker still loses.
        """
        return self._transition(
            "update_item",
            "combine already claimed",
            Key=round_key(run_id, round_index),
            UpdateExpression="SET claimed_generation = :g, claimed_by = :w, claimed_attempt = :a",
            ConditionExpression="attribute_exists(done) AND attribute_not_exists(completed_at) AND "
            "(attribute_not_exists(claimed_generation) OR claimed_generation < :g OR "
            "(claimed_generation = :g AND claimed_by = :w AND claimed_attempt < :a))",
            ExpressionAttributeValues={":g": generation, ":w": worker_index, ":a": attempt},
        )

    def get_round(self, run_id: str, round_index: int) -> dict[str, Any] | None:
        item = self.table.get_item(Key=round_key(run_id, round_index), ConsistentRead=True).get("Item")
        return _plain(item) if item else None

    def mark_round_completed(self, run_id: str, round_index: int) -> None:
        """After the commit: late registrations for this round are refused from now on."""
        self.table.update_item(
            Key=round_key(run_id, round_index),
            UpdateExpression="SET completed_at = if_not_exists(completed_at, :now)",
            ExpressionAttributeValues={":now": now_iso()},
        )

    def record_round(self, run_id: str, round_index: int, metrics: dict[str, Any]) -> None:
        """Write a round's metrics (deterministic values: a duplicate combine writes the same ones)."""
        values = {f":m{index}": value for index, value in enumerate(metrics.values())}
        names = {f"#m{index}": name for index, name in enumerate(metrics)}
        self.table.update_item(
            Key=round_key(run_id, round_index),
            UpdateExpression="SET " + ", ".join(f"#m{index} = :m{index}" for index in range(len(metrics))),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=_dynamo(values),
        )

    def list_rounds(self, run_id: str) -> list[dict[str, Any]]:
        """The run's round items in order (one Query, paginated)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": f"RUN#{run_id}", ":prefix": ROUND_PREFIX},
            "ConsistentRead": True,
        }
        while True:
            page = self.table.query(**kwargs)
            items.extend(_plain(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # --- plumbing ---------------------------------------------------------------------------------------

    def _transition(self, operation: str, conflict_message: str, **kwargs: Any) -> bool:
        """A conditional write whose losing is an answer, not an error: True if this caller made it."""
        try:
            self._conditional(operation, conflict_message, **kwargs)
        except CoordinationConflictError:
            return False
        return True

    def _conditional(self, operation: str, conflict_message: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = getattr(self.table, operation)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise CoordinationConflictError(conflict_message) from exc
            raise
        return response.get("Attributes", {})


def _run_status(item: dict[str, Any]) -> RunStatus:
    return RunStatus(
        run_id=item["pk"].removeprefix("RUN#"),
        state=item["state"],
        round_index=int(item["round"]),
        total_rounds=int(item["total_rounds"]),
        epochs_done=int(item["epochsdone"]),
        generation=int(item["generation"]),
        fanned_out=int(item.get("fanned_out", -1)),
        config=TrainConfig(**json.loads(item["config"])),
        reason=item.get("reason"),
        export_bucket=item.get("export_bucket"),
    )


def _dynamo(value: Any) -> Any:
    """Python numbers -> Decimal, recursively (DynamoDB rejects floats)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {key: _dynamo(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_dynamo(item) for item in value]
    if isinstance(value, set):
        return value
    return Decimal(repr(float(value)))  # numpy scalars


def _plain(value: Any) -> Any:
    """Decimal -> int/float and sets -> sorted lists, recursively, for callers outside this module."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, set):
        return sorted(_plain(item) for item in value)
    return value
