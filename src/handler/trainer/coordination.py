"""Run and round state in the DynamoDB status table: the typed records and every state transition.

This module is the only one that knows attribute names: flows, the local runtime and the tests read and write
:class:`RunStatus`, :class:`RoundRecord`, :class:`RoundMetrics` and :class:`RunSummary`.

Key schema (``template.yaml`` declares the same; the template gate checks it): ``pk`` (S, HASH), ``sk`` (S, RANGE).

Run item ``pk="RUN#<run>"``, ``sk="RUN"``
    ``state``          RUNNING | STOP_REQUESTED | STOPPED | SUCCEEDED | FAILED
    ``round``          the round being trained now (its global weights exist on EFS)
    ``total_rounds``, ``rounds_per_epoch``, ``workers``, ``epochsdone``
    ``num_train``      training examples in use, fixed at start: with ``config`` it determines the run's plan
    ``dataset_sha256`` the dataset manifest's digest at start: workers and combines refuse another dataset
    ``weights_token``  names the files of the current round's global weights (and outer momentum): each
                       combine writes its own, the commit records the winner's, so committed files never change
    ``heartbeat_at``   written by every invocation that works on the run (the watchdog's progress signal)
    ``watchdog_resends``  how often the watchdog re-sent the current round (reset by every commit)
    ``instance``       a random id of this run: events carry it, so events of a removed run with the same id
                       never touch a new one
    ``operator_at``    when an operator last stopped or resumed the run: an older failed stop or resume is not
                       replayed over it
    ``active``         "1" while RUNNING or STOP_REQUESTED, absent after: the sparse index ``ActiveRuns``
    ``kind``           "RUN" on every run item (never on round items): with ``created_at`` the sparse index
                       ``Runs``, which lists runs newest first without scanning the table
    ``schema``         the item layout's version (``SCHEMA_VERSION``); items of another version are refused
    ``generation``     incremented by every resume, so a resumed run can claim a combine again
    ``fanned_out``     the last round whose worker events were all sent
    ``config``         the resolved TrainConfig as JSON
    ``parameters``     elements in the model's weights, counted at start: with ``config`` it determines how many
                       reducers a round uses (``sharding.reducer_count``; absent: one combine)
    ``reason``         why a run FAILED; ``final_model`` where ``final.keras`` is; latest ``test_accuracy``/``test_loss``
    ``export_bucket``  the bucket ``final.keras`` is also uploaded to (``models/<run>/``): the start object's for
                       runs started from S3, else the stack's ``MODEL_BUCKET``; absent locally
    ``gb_s``           GB-seconds the committed rounds measured (``ADD`` by each commit): the ``max_gb_s`` budget
Round item ``pk="RUN#<run>"``, ``sk="ROUND#000012"`` (one Query lists a run's rounds in order)
    ``done``                number set of the workers whose update is written (``ADD`` is idempotent)
    ``claimed_generation``, ``claimed_by``, ``claimed_attempt``   the combine claim: won once per generation,
                            re-won only by the same worker on a later attempt (its crash was retried)
    ``reduced``             sharded rounds: number set of the reducers whose slice is written
    ``commit_claimed_generation``, ``commit_claimed_by``, ``commit_claimed_attempt``   the claim of the reducer
                            that commits a sharded round (the same rule as the combine claim)
    ``epochsdone``, ``train_loss``, ``test_loss``, ``test_accuracy``, ``duration_s`` (map), ``bytes_read``,
    ``bytes_written``       the combine's metrics (or the reducers' and the commit's), written by the commit
    ``worker_bytes_read``, ``worker_bytes_written``, ``invocation_s``, ``memory_mb``   the workers' EFS bytes and
                            the handler seconds of the round's worker and combine (or reducer) invocations
    ``phase_bytes_read``, ``phase_bytes_written``   maps of bytes per phase (``worker``, ``combine`` or ``reduce``
                            and ``commit``: each phase's total; ``<phase>_max``: its largest single invocation)
    ``completed_at``        set by the commit itself (one transaction with the run item's advance), with the
                            metrics; later registrations are refused

State transitions (run creation, the round advance, stop, failure, resume, registration, the claim) are
conditional writes; a round's metrics are written only by the transaction that commits it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import boto3
from botocore.exceptions import ClientError

from trainer import logs, sharding
from trainer.config import TrainConfig
from trainer.efs_layout import check_name
from trainer.errors import CoordinationConflictError, InvalidEventError, LayoutError
from trainer.schedule import Schedule

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
MAX_ROUNDS = 999_999  # round sort keys have six digits: a run may not plan more rounds (they would misorder)
# Keys a run stored before they existed had these values (not today's defaults): such a run goes on as it began.
LEGACY_CONFIG = {"local_optimizer": "reset", "warmup_epochs": 0.0}
SCHEMA_VERSION = 2  # 1: items before num_train, tokens and the active index; refused with a clear reason
ACTIVE_INDEX = "ActiveRuns"  # sparse GSI over run items that carry ``active`` (template.yaml declares it)
RUNS_INDEX = (
    "Runs"  # sparse GSI over run items: HASH ``kind``, RANGE ``created_at`` (template.yaml declares it)
)
RUN_KIND = "RUN"  # the ``kind`` of run items, the one key of the Runs index
INITIAL_TOKEN = "init"  # the weights token of round 0 (written by the start)


def run_key(run_id: str) -> dict[str, str]:
    return {"pk": f"RUN#{run_id}", "sk": RUN_SORT_KEY}


def round_key(run_id: str, round_index: int) -> dict[str, str]:
    return {"pk": f"RUN#{run_id}", "sk": f"{ROUND_PREFIX}{round_index:06d}"}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def now_precise() -> str:
    """Now to the millisecond (``operator_at`` is compared with failure records' millisecond timestamps)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def new_instance() -> str:
    """A random id for one run of an id: events carry it, so a removed run's events never touch a new run."""
    return uuid.uuid4().hex[:12]


def ended_run_condition() -> dict[str, Any]:
    """``delete_item`` arguments that let only a run item that has ended go: exists, not RUNNING or
    STOP_REQUESTED (the operator's ``lambdatrain rm`` deletes with it; the trainer never deletes items)."""
    return {
        "ConditionExpression": "attribute_exists(pk) AND NOT #state IN (:running, :stop)",
        "ExpressionAttributeNames": {"#state": "state"},
        "ExpressionAttributeValues": {":running": RUNNING, ":stop": STOP_REQUESTED},
    }


def run_items_query(run_id: str) -> dict[str, Any]:
    """``query`` arguments for the keys of every item of a run (its run item and its round items)."""
    return {
        "KeyConditionExpression": "pk = :pk",
        "ExpressionAttributeValues": {":pk": f"RUN#{run_id}"},
        "ProjectionExpression": "pk, sk",
        "ConsistentRead": True,
    }


# --- records --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """What a commit writes on the run item besides the state: the latest test metrics, where the model is."""

    test_accuracy: float | None = None
    test_loss: float | None = None
    final_model: str | None = None  # the path of final.keras on EFS (set when the run SUCCEEDED)
    final_model_s3: str | None = None  # its copy in the export bucket, for runs started from S3

    def to_item(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> RunSummary:
        return cls(**{name: item.get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RunStatus:
    """The run item."""

    run_id: str
    state: str
    round_index: int
    total_rounds: int
    epochs_done: int
    generation: int
    fanned_out: int
    config: TrainConfig
    num_train: int  # training examples in use (after train_samples), fixed at start
    dataset_sha256: str | None = None  # the dataset manifest's digest at start
    weights_token: str = (
        INITIAL_TOKEN  # names the committed weights (and momentum) files of the current round
    )
    reason: str | None = None
    export_bucket: str | None = None  # final.keras is also uploaded there (a stack's runs; none locally)
    summary: RunSummary = field(default_factory=RunSummary)
    created_at: str | None = None
    updated_at: str | None = None
    heartbeat_at: str | None = None
    watchdog_resends: int = 0
    instance: str = ""  # set by new(); events name it
    operator_at: str | None = None
    gb_s: float = 0.0  # GB-seconds the committed rounds measured (the max_gb_s budget)
    parameters: int = 0  # elements in the model's weights (0: unknown, from an older start: one combine)

    @classmethod
    def new(
        cls,
        run_id: str,
        config: TrainConfig,
        num_train: int,
        export_bucket: str | None = None,
        dataset_sha256: str | None = None,
        parameters: int = 0,
    ) -> RunStatus:
        """A run about to be created: RUNNING at round 0, nothing fanned out yet."""
        schedule = Schedule(config, num_train)
        return cls(
            run_id=run_id,
            state=RUNNING,
            round_index=0,
            total_rounds=schedule.total_rounds,
            epochs_done=0,
            generation=1,
            fanned_out=-1,
            config=config,
            num_train=num_train,
            dataset_sha256=dataset_sha256,
            export_bucket=export_bucket,
            instance=new_instance(),
            parameters=parameters,
        )

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The run's plan: rounds, shards and learning rates, from its configuration and training-set size."""
        return Schedule(self.config, self.num_train)

    @property
    def reducers(self) -> int:
        """Reducers a round of this run uses (1: one combine), from its configuration and model size."""
        itemsize = 2 if self.config.update_dtype == "float16" else 4
        return sharding.reducer_count(self.config.reducers, self.config.workers, self.parameters, itemsize)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def owns(self, event: Any) -> bool:
        """Whether a worker or combine event was sent for this run (not for a removed run of the same id)."""
        return event.instance is None or event.instance == self.instance

    def is_current(self, round_index: int) -> bool:
        """An event for ``round_index`` has work to do: the run is active and training that round."""
        return self.active and self.round_index == round_index < self.total_rounds

    def awaits_follow_up(self, round_index: int) -> bool:
        """``round_index`` was committed, but the invocation that committed it died before its follow-up: sending
        the next round's workers, or after the last round exporting the model and finishing the run. Whoever
        sees this does the follow-up."""
        return self.active and self.round_index == round_index + 1 and self.fanned_out < self.round_index

    @property
    def all_rounds_committed(self) -> bool:
        return self.round_index >= self.total_rounds

    @property
    def last_progress_at(self) -> dt.datetime | None:
        """When an invocation last worked on the run (its heartbeat, else its last update or creation)."""
        stamp = self.heartbeat_at or self.updated_at or self.created_at
        return dt.datetime.fromisoformat(stamp) if stamp else None

    def check(self) -> None:
        """Refuse values no transition writes (a crafted or damaged item): ``ValueError`` naming the field."""
        check_name("run", self.run_id)
        check_name("weights_token", self.weights_token)
        check_name("instance", self.instance)
        if self.state not in ACTIVE_STATES + TERMINAL_STATES:
            raise ValueError(
                f"state must be one of {list(ACTIVE_STATES + TERMINAL_STATES)}, got {self.state!r}"
            )
        if self.total_rounds != self.schedule.total_rounds:
            raise ValueError(
                f"total_rounds is {self.total_rounds}, but its configuration plans {self.schedule.total_rounds}"
            )
        if not 0 <= self.round_index <= self.total_rounds:
            raise ValueError(
                f"round must be between 0 and total_rounds {self.total_rounds}, got {self.round_index}"
            )
        if self.parameters < 0:
            raise ValueError(f"parameters must be >= 0, got {self.parameters}")
        if not -1 <= self.fanned_out <= self.round_index or self.generation < 1 or self.epochs_done < 0:
            raise ValueError(
                f"fanned_out {self.fanned_out}, generation {self.generation} or epochsdone {self.epochs_done} "
                f"is out of range for round {self.round_index}"
            )

    def to_item(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            **run_key(self.run_id),
            "state": self.state,
            "round": self.round_index,
            "total_rounds": self.total_rounds,
            "rounds_per_epoch": self.schedule.rounds_per_epoch,  # for people reading the table
            "workers": self.config.workers,
            "epochsdone": self.epochs_done,
            "generation": self.generation,
            "fanned_out": self.fanned_out,
            "num_train": self.num_train,
            "weights_token": self.weights_token,
            "watchdog_resends": self.watchdog_resends,
            "instance": self.instance,
            "gb_s": self.gb_s,
            "schema": SCHEMA_VERSION,
            "kind": RUN_KIND,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "created_at": self.created_at or now_iso(),
            "updated_at": self.updated_at or now_iso(),
            **self.summary.to_item(),
        }
        optional = {
            "reason": self.reason,
            "export_bucket": self.export_bucket,
            "dataset_sha256": self.dataset_sha256,
            "heartbeat_at": self.heartbeat_at,
            "operator_at": self.operator_at,
            "parameters": self.parameters or None,
            "active": "1" if self.active else None,
        }
        item.update({name: value for name, value in optional.items() if value is not None})
        return item

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> RunStatus:
        """Parse a run item; one that does not hold a valid run is a :class:`LayoutError`, never a guess."""
        item = _plain(item)
        run_id = str(item.get("pk", "")).removeprefix("RUN#")
        if item.get("schema") != SCHEMA_VERSION:
            raise LayoutError(
                f"run {run_id!r} was written by another version of the trainer (item schema "
                f"{item.get('schema', 1)}, this version reads {SCHEMA_VERSION}); finish or delete it with the "
                "version that started it"
            )
        try:
            config = TrainConfig.from_mapping({**LEGACY_CONFIG, **json.loads(item["config"])})
            run = cls(
                run_id=run_id,
                state=item["state"],
                round_index=int(item["round"]),
                total_rounds=int(item["total_rounds"]),
                epochs_done=int(item["epochsdone"]),
                generation=int(item["generation"]),
                fanned_out=int(item.get("fanned_out", -1)),
                config=config,
                num_train=int(item["num_train"]),
                dataset_sha256=item.get("dataset_sha256"),
                weights_token=str(item["weights_token"]),
                reason=item.get("reason"),
                export_bucket=item.get("export_bucket"),
                summary=RunSummary.from_item(item),
                created_at=item.get("created_at"),
                updated_at=item.get("updated_at"),
                heartbeat_at=item.get("heartbeat_at"),
                watchdog_resends=int(item.get("watchdog_resends", 0)),
                instance=str(item["instance"]),
                operator_at=item.get("operator_at"),
                gb_s=float(item.get("gb_s", 0)),
                parameters=int(item.get("parameters", 0)),
            )
            run.check()
            return run
        except KeyError as exc:
            raise LayoutError(
                f"run {run_id!r}: the status item has no {exc.args[0]!r} (written by an older version?)"
            ) from exc
        except (InvalidEventError, TypeError, ValueError) as exc:
            raise LayoutError(f"run {run_id!r}: the status item is not a valid run: {exc}") from exc


@dataclass(frozen=True)
class RoundMetrics:
    """What the combine measured for a round (deterministic, so a duplicate combine writes the same)."""

    epochs_done: int
    samples: int
    train_loss: float
    duration_s: dict[str, float]
    bytes_read: int  # by the combine (or every reducer and the commit of a sharded round)
    bytes_written: int
    test_loss: float | None = None  # only on rounds followed by an evaluation
    test_accuracy: float | None = None
    worker_bytes_read: int = 0  # what the workers read from EFS (global weights, saved state, their shards)
    worker_bytes_written: int = 0  # their update files and saved states
    invocation_s: float = (
        0.0  # handler seconds of the round's worker invocations (chained ones too) and combine
    )
    memory_mb: int = 0  # the function's memory (0: not recorded)

    @property
    def gb_s(self) -> float:
        """The round's measured GB-seconds: what the ``max_gb_s`` budget counts."""
        return self.invocation_s * self.memory_mb / 1024

    # Bytes per phase (``worker``, ``combine`` or ``reduce`` and ``commit``: each phase's total over its
    # invocations; ``<phase>_max``: its largest single invocation), the N-dependent costs of a round.
    phase_bytes_read: dict[str, int] = field(default_factory=dict)
    phase_bytes_written: dict[str, int] = field(default_factory=dict)

    def to_item(self) -> dict[str, Any]:
        item = {key: value for key, value in dataclasses.asdict(self).items() if value not in (None, {})}
        item["epochsdone"] = item.pop("epochs_done")
        return item

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> RoundMetrics | None:
        if "train_loss" not in item:
            return None  # the combine has not written them yet
        values = {
            name: item[name] for name in cls.__dataclass_fields__ if name != "epochs_done" and name in item
        }
        for name in ("phase_bytes_read", "phase_bytes_written"):
            values[name] = {str(key): int(value) for key, value in (values.get(name) or {}).items()}
        return cls(epochs_done=int(item.get("epochsdone", 0)), **values)


@dataclass(frozen=True)
class RoundRecord:
    """A round item: who registered, who claimed the combine, what it measured, when it was committed."""

    run_id: str
    round_index: int
    done: frozenset[int] = frozenset()
    claimed_generation: int | None = None
    claimed_by: int | None = None
    claimed_attempt: int | None = None
    reduced: frozenset[int] = frozenset()  # sharded rounds: reducers whose slice is written
    commit_claimed_generation: int | None = None
    commit_claimed_by: int | None = None
    completed_at: str | None = None
    committed_token: str | None = None  # the weights token the commit recorded for the next round
    metrics: RoundMetrics | None = None

    @property
    def completed(self) -> bool:
        return self.completed_at is not None

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> RoundRecord:
        item = _plain(item)
        return cls(
            run_id=str(item["pk"]).removeprefix("RUN#"),
            round_index=int(str(item["sk"]).removeprefix(ROUND_PREFIX)),
            done=frozenset(int(worker) for worker in item.get("done", [])),
            claimed_generation=item.get("claimed_generation"),
            claimed_by=item.get("claimed_by"),
            claimed_attempt=item.get("claimed_attempt"),
            reduced=frozenset(int(reducer) for reducer in item.get("reduced", [])),
            commit_claimed_generation=item.get("commit_claimed_generation"),
            commit_claimed_by=item.get("commit_claimed_by"),
            completed_at=item.get("completed_at"),
            committed_token=item.get("committed_token"),
            metrics=RoundMetrics.from_item(item),
        )


@dataclass(frozen=True)
class RunListing:
    """Every run item from the Runs index, newest first; items this version cannot read are named, not hidden."""

    runs: list[RunStatus] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # run id -> why it cannot be read


# --- the table ------------------------------------------------------------------------------------------


class StatusTable:
    """The status table. Pass a boto3 ``Table`` resource (tests hand in DynamoDB Local's)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    @classmethod
    def from_name(cls, name: str) -> StatusTable:
        # boto3 honours AWS_ENDPOINT_URL_DYNAMODB, so the same call reaches DynamoDB Local.
        return cls(boto3.resource("dynamodb").Table(name))

    # --- runs -------------------------------------------------------------------------------------------

    def create_run(self, run: RunStatus) -> None:
        """Create the run item; a second start with the same id raises :class:`CoordinationConflictError`."""
        self._conditional(
            "put_item",
            f'run {run.run_id!r} already exists (send "resume": true to continue it)',
            Item=_dynamo(run.to_item()),
            ConditionExpression="attribute_not_exists(pk)",
        )

    def resume_run(self, run_id: str) -> RunStatus:
        """Make a STOPPED/FAILED/RUNNING run RUNNING again under a new generation."""
        attributes = self._conditional(
            "update_item",
            f"run {run_id!r} does not exist or has already SUCCEEDED; nothing to resume",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :running, generation = generation + :one, updated_at = :now, "
            "heartbeat_at = :now, active = :active, watchdog_resends = :zero, operator_at = :op REMOVE reason",
            ConditionExpression="attribute_exists(pk) AND #state <> :succeeded",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":running": RUNNING,
                ":one": 1,
                ":now": now_iso(),
                ":succeeded": SUCCEEDED,
                ":active": "1",
                ":zero": 0,
                ":op": now_precise(),
            },
            ReturnValues="ALL_NEW",
        )
        return RunStatus.from_item(attributes)

    def get_run(self, run_id: str) -> RunStatus | None:
        item = self.table.get_item(Key=run_key(run_id), ConsistentRead=True).get("Item")
        return RunStatus.from_item(item) if item else None

    def commit_round(
        self,
        run: RunStatus,
        epochs_done: int,
        new_state: str,
        weights_token: str,
        summary: RunSummary,
        metrics: RoundMetrics,
        reason: str | None = None,
    ) -> None:
        """Commit round r of ``run`` once: in one transaction the run item moves to r+1 (condition on round, state
        and generation) naming the winner's weights token and adding the round's GB-seconds, and the round item
        gets the metrics and ``completed_at``. ``reason``: why the run stops here (its budget). A loser raises
        :class:`CoordinationConflictError` and has written nothing."""
        now = now_iso()
        names = {"#round": "round", "#state": "state"}
        values: dict[str, Any] = {
            ":r": run.round_index,
            ":seen": run.state,
            ":g": run.generation,
            ":next": run.round_index + 1,
            ":e": epochs_done,
            ":state": new_state,
            ":token": weights_token,
            ":now": now,
            ":zero": 0,
            ":gbs": metrics.gb_s,
        }
        sets = [
            "#round = :next",
            "epochsdone = :e",
            "#state = :state",
            "weights_token = :token",
            "updated_at = :now",
            "heartbeat_at = :now",
            "watchdog_resends = :zero",
        ]
        if reason is not None:
            sets.append("reason = :reason")
            values[":reason"] = reason[:1000]
        for index, (name, value) in enumerate(summary.to_item().items()):
            sets.append(f"#s{index} = :s{index}")
            names[f"#s{index}"] = name
            values[f":s{index}"] = value
        update_run = {
            "Key": run_key(run.run_id),
            "UpdateExpression": "SET "
            + ", ".join(sets)
            + " ADD gb_s :gbs"
            + ("" if new_state in ACTIVE_STATES else " REMOVE active"),
            "ConditionExpression": "#round = :r AND #state = :seen AND generation = :g",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }
        fields = {**metrics.to_item(), "round": run.round_index, "committed_token": weights_token}
        update_round = {
            "Key": round_key(run.run_id, run.round_index),
            "UpdateExpression": "SET completed_at = if_not_exists(completed_at, :now), "
            + ", ".join(f"#m{index} = :m{index}" for index in range(len(fields))),
            "ExpressionAttributeNames": {f"#m{index}": name for index, name in enumerate(fields)},
            "ExpressionAttributeValues": {
                ":now": now,
                **{f":m{index}": value for index, value in enumerate(fields.values())},
            },
        }
        self._transaction(
            f"run {run.run_id!r} is no longer at round {run.round_index} in state {run.state}",
            update_run,
            update_round,
        )

    def finish_run(self, run: RunStatus, summary: RunSummary) -> bool:
        """After the last round's commit and the model's export: SUCCEEDED, once. False if it already ended."""
        return self._transition(
            "update_item",
            "run is not waiting to finish",
            Key=run_key(run.run_id),
            UpdateExpression="SET #state = :succeeded, updated_at = :now, "
            + ", ".join(f"#s{index} = :s{index}" for index in range(len(summary.to_item())))
            + " REMOVE active",
            ConditionExpression="#round = :total AND #state IN (:running, :stop) AND generation = :g",
            ExpressionAttributeNames={
                "#round": "round",
                "#state": "state",
                **{f"#s{index}": name for index, name in enumerate(summary.to_item())},
            },
            ExpressionAttributeValues=_dynamo(
                {
                    ":succeeded": SUCCEEDED,
                    ":now": now_iso(),
                    ":total": run.total_rounds,
                    ":running": RUNNING,
                    ":stop": STOP_REQUESTED,
                    ":g": run.generation,
                    **{f":s{index}": value for index, value in enumerate(summary.to_item().values())},
                }
            ),
        )

    def resend_round(self, run: RunStatus) -> RunStatus | None:
        """The watchdog's re-send: a new generation (so the round's combine can be claimed again) if the run is
        still where ``run`` saw it, with no heartbeat since. The run as it now is, or None if it moved on."""
        try:
            attributes = self._conditional(
                "update_item",
                "the run made progress",
                Key=run_key(run.run_id),
                UpdateExpression="SET generation = generation + :one, watchdog_resends = watchdog_resends + :one, "
                "heartbeat_at = :now, updated_at = :now",
                ConditionExpression="#round = :r AND generation = :g AND #state IN (:running, :stop) AND "
                "(attribute_not_exists(heartbeat_at) OR heartbeat_at = :seen)",
                ExpressionAttributeNames={"#round": "round", "#state": "state"},
                ExpressionAttributeValues={
                    ":one": 1,
                    ":now": now_iso(),
                    ":r": run.round_index,
                    ":g": run.generation,
                    ":running": RUNNING,
                    ":stop": STOP_REQUESTED,
                    ":seen": run.heartbeat_at or "",
                },
                ReturnValues="ALL_NEW",
            )
        except CoordinationConflictError:
            return None
        return RunStatus.from_item(attributes)

    def list_active_run_ids(self) -> list[str]:
        """Runs that are RUNNING or STOP_REQUESTED, from the sparse index (never a table scan)."""
        run_ids: list[str] = []
        kwargs: dict[str, Any] = {
            "IndexName": ACTIVE_INDEX,
            "KeyConditionExpression": "active = :one",
            "ExpressionAttributeValues": {":one": "1"},
        }
        while True:
            page = self.table.query(**kwargs)
            run_ids.extend(str(item["pk"]).removeprefix("RUN#") for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return run_ids
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def list_runs(self) -> RunListing:
        """Every run, newest first, from the sparse ``Runs`` index (one paginated Query, never a table scan)."""
        listing = RunListing()
        kwargs: dict[str, Any] = {
            "IndexName": RUNS_INDEX,
            "KeyConditionExpression": "kind = :kind",
            "ExpressionAttributeValues": {":kind": RUN_KIND},
            "ScanIndexForward": False,
        }
        while True:
            page = self.table.query(**kwargs)
            for item in page.get("Items", []):
                try:
                    listing.runs.append(RunStatus.from_item(item))
                except LayoutError as exc:
                    listing.unreadable[str(item.get("pk", "")).removeprefix("RUN#")] = str(exc)
            if "LastEvaluatedKey" not in page:
                return listing
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def index_run(self, run_id: str) -> bool:
        """Give a run item written before the ``Runs`` index its ``kind`` (and a ``created_at`` if it has none),
        so that :meth:`list_runs` finds it. False if there is no such run or it is already indexed."""
        return self._transition(
            "update_item",
            "run does not exist or is already indexed",
            Key=run_key(run_id),
            UpdateExpression="SET kind = :kind, created_at = if_not_exists(created_at, :now)",
            ConditionExpression="attribute_exists(pk) AND attribute_not_exists(kind)",
            ExpressionAttributeValues={":kind": RUN_KIND, ":now": now_iso()},
        )

    def halt_run(self, run_id: str, reason: str) -> bool:
        """The operator's stop at once: an active run becomes STOPPED now, with the reason (its current round is
        lost; a resume redoes it). Invocations still in flight find the run inactive and do nothing. False if it
        was not active."""
        return self._transition(
            "update_item",
            "run is not active",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :stopped, reason = :reason, updated_at = :now, operator_at = :op "
            "REMOVE active",
            ConditionExpression="#state IN (:running, :stop)",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":stopped": STOPPED,
                ":reason": reason[:1000],
                ":now": now_iso(),
                ":op": now_precise(),
                ":running": RUNNING,
                ":stop": STOP_REQUESTED,
            },
        )

    def heartbeat(self, run_id: str) -> None:
        """Record that an invocation is working on an active run (the watchdog's measure of progress)."""
        self._transition(
            "update_item",
            "run is not active",
            Key=run_key(run_id),
            UpdateExpression="SET heartbeat_at = :now",
            ConditionExpression="#state IN (:running, :stop)",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={":now": now_iso(), ":running": RUNNING, ":stop": STOP_REQUESTED},
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
            UpdateExpression="SET #state = :stop, updated_at = :now, operator_at = :op",
            ConditionExpression="#state = :running",
            ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues={
                ":stop": STOP_REQUESTED,
                ":running": RUNNING,
                ":now": now_iso(),
                ":op": now_precise(),
            },
        )

    def fail_run(
        self,
        run_id: str,
        reason: str,
        round_index: int | None = None,
        generation: int | None = None,
        instance: str | None = None,
    ) -> bool:
        """Mark an active run FAILED with a reason. False if it had already ended, or (when given) is no longer
        at ``round_index`` in ``generation``: a failure of a stale event never fails the run."""
        condition = "#state IN (:running, :stop)"
        values: dict[str, Any] = {
            ":failed": FAILED,
            ":reason": reason[:1000],
            ":now": now_iso(),
            ":running": RUNNING,
            ":stop": STOP_REQUESTED,
        }
        if round_index is not None:
            condition += " AND #round = :r"
            values[":r"] = round_index
        if generation is not None:
            condition += " AND generation = :g"
            values[":g"] = generation
        if instance is not None:
            condition += " AND instance = :i"
            values[":i"] = instance
        return self._transition(
            "update_item",
            "run is not active",
            Key=run_key(run_id),
            UpdateExpression="SET #state = :failed, reason = :reason, updated_at = :now REMOVE active",
            ConditionExpression=condition,
            ExpressionAttributeNames={
                "#state": "state",
                **({"#round": "round"} if round_index is not None else {}),
            },
            ExpressionAttributeValues=values,
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
        return set(RoundRecord.from_item(attributes).done)

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

    def register_reducer(self, run_id: str, round_index: int, reducer_index: int) -> set[int]:
        """Add a reducer to the round's set of written slices (idempotent); the set as it now stands."""
        attributes = self._conditional(
            "update_item",
            f"round {round_index} of run {run_id!r} is already committed",
            Key=round_key(run_id, round_index),
            UpdateExpression="ADD reduced :k SET #round = :r",
            ConditionExpression="attribute_not_exists(completed_at)",
            ExpressionAttributeNames={"#round": "round"},
            ExpressionAttributeValues={":k": {reducer_index}, ":r": round_index},
            ReturnValues="ALL_NEW",
        )
        return set(RoundRecord.from_item(attributes).reduced)

    def claim_commit(
        self, run_id: str, round_index: int, generation: int, reducer_index: int, attempt: int
    ) -> bool:
        """True for exactly one reducer per (round, generation): the one that commits a sharded round. The same
        reducer re-dispatched after a crash (a higher attempt) may claim again, as with :meth:`claim_combine`."""
        return self._transition(
            "update_item",
            "commit already claimed",
            Key=round_key(run_id, round_index),
            UpdateExpression="SET commit_claimed_generation = :g, commit_claimed_by = :k, "
            "commit_claimed_attempt = :a",
            ConditionExpression="attribute_exists(reduced) AND attribute_not_exists(completed_at) AND "
            "(attribute_not_exists(commit_claimed_generation) OR commit_claimed_generation < :g OR "
            "(commit_claimed_generation = :g AND commit_claimed_by = :k AND commit_claimed_attempt < :a))",
            ExpressionAttributeValues={":g": generation, ":k": reducer_index, ":a": attempt},
        )

    def get_round(self, run_id: str, round_index: int) -> RoundRecord | None:
        item = self.table.get_item(Key=round_key(run_id, round_index), ConsistentRead=True).get("Item")
        return RoundRecord.from_item(item) if item else None

    def list_rounds(self, run_id: str) -> list[RoundRecord]:
        """The run's round items in order (one Query, paginated)."""
        records: list[RoundRecord] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": f"RUN#{run_id}", ":prefix": ROUND_PREFIX},
            "ConsistentRead": True,
        }
        while True:
            page = self.table.query(**kwargs)
            records.extend(RoundRecord.from_item(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return records
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # --- plumbing ---------------------------------------------------------------------------------------

    def _transition(self, operation: str, conflict_message: str, **kwargs: Any) -> bool:
        """A conditional write whose losing is an answer, not an error: True if this caller made it."""
        try:
            self._conditional(operation, conflict_message, **kwargs)
        except CoordinationConflictError:
            return False
        return True

    def _transaction(self, conflict_message: str, *updates: dict[str, Any]) -> None:
        """Several updates that all happen or none; a failed condition is a :class:`CoordinationConflictError`."""
        items = [
            {
                "Update": {
                    "TableName": self.table.name,
                    **update,
                    "ExpressionAttributeValues": _dynamo(update["ExpressionAttributeValues"]),
                }
            }
            for update in updates
        ]
        try:
            self.table.meta.client.transact_write_items(TransactItems=items)
        except ClientError as exc:
            reasons = exc.response.get("CancellationReasons") or []
            if exc.response.get("Error", {}).get("Code") == "TransactionCanceledException" and any(
                reason.get("Code") == "ConditionalCheckFailed" for reason in reasons
            ):
                raise CoordinationConflictError(conflict_message) from exc
            raise

    def _conditional(self, operation: str, conflict_message: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = getattr(self.table, operation)(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise CoordinationConflictError(conflict_message) from exc
            raise
        return response.get("Attributes", {})


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
