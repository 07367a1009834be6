"""Environment variable names and the training configuration.

Environment (set by ``template.yaml`` in the cloud and by ``localrun`` on a laptop):

- ``EFS_ROOT``        where the EFS access point is mounted (default ``/mnt/efs``)
- ``STATUS_TABLE``    the DynamoDB status table
- ``AWS_LAMBDA_FUNCTION_NAME``  set by Lambda itself; the trainer invokes itself by this name
- ``TF_ENABLE_ONEDNN_OPTS``     ``1`` (2.5x faster convolutions on x86 CPUs): with the other TensorFlow variables
  in :data:`TENSORFLOW_ENVIRONMENT`, set before TensorFlow is imported (:func:`set_tensorflow_defaults`)
- ``LOG_LEVEL``       ``INFO`` by default
- ``SAFETY_MARGIN_S`` seconds a worker keeps in reserve before the Lambda deadline to save its state (default 60)
- ``FUNCTION_TIMEOUT_S``  the function's timeout (default 900); the watchdog calls a run stalled after
  ``2 x timeout + 60`` seconds without a heartbeat, which no live invocation can be silent for
- ``MODEL_BUCKET``    the stack's bucket: every run exports ``final.keras`` to ``models/<run>/`` there (empty or
  unset: no export, as locally)
- ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``  set by Lambda itself (and by ``localrun``): the memory in MB, which with the
  measured seconds gives a round's GB-seconds (the ``max_gb_s`` budget); a start refuses a run whose round's
  combine (or commit) cannot fit it

Endpoints are never configured here: boto3 reads ``AWS_ENDPOINT_URL_LAMBDA`` / ``AWS_ENDPOINT_URL_DYNAMODB``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import logs
from trainer.efs_layout import check_name
from trainer.errors import ConfigurationError, InvalidEventError

ENV_EFS_ROOT = "EFS_ROOT"
ENV_STATUS_TABLE = "STATUS_TABLE"
ENV_FUNCTION_NAME = "AWS_LAMBDA_FUNCTION_NAME"
ENV_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
ENV_LOG_LEVEL = logs.ENV_LOG_LEVEL
ENV_SAFETY_MARGIN_S = "SAFETY_MARGIN_S"
ENV_FUNCTION_TIMEOUT_S = "FUNCTION_TIMEOUT_S"
ENV_MODEL_BUCKET = "MODEL_BUCKET"
MODEL_PREFIX = "models/"  # final.keras goes to s3://<export bucket>/models/<run>/final.keras
ENV_MEMORY_SIZE = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
DEFAULT_EFS_ROOT = "/mnt/efs"
DEFAULT_SAFETY_MARGIN_S = 60.0
DEFAULT_FUNCTION_TIMEOUT_S = 900.0

# What TensorFlow and Keras read at import: oneDNN kernels (2.5x on x86 CPUs), quiet C++ logs, the TensorFlow
# backend. The handler, the local runtime and the benchmarks take them from here; template.yaml and the
# Dockerfile declare the same (the template gate checks them).
TENSORFLOW_ENVIRONMENT = {ENV_ONEDNN: "1", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}

MAX_WORKERS = 256  # workers per run: the start event's and the template's upper bound

# The variables the handler reads that the deployment must set (Lambda sets the function name itself).
REQUIRED_ENV = (ENV_EFS_ROOT, ENV_STATUS_TABLE, ENV_ONEDNN)

# The status table's key schema; template.yaml declares the same (checked by the template gate).
TABLE_KEY_SCHEMA = (("pk", "HASH"), ("sk", "RANGE"))

MODELS = ("vgg19_bn", "vgg19")
UPDATE_DTYPES = ("float32", "float16")
LR_SCHEDULES = ("cosine", "constant")
LOCAL_OPTIMIZER_MODES = ("keep", "reset")

# Named bundles of the algorithm's keys; a start event's own keys override its preset's.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's rule: each worker trains a whole epoch of its shard from the global weights with fresh
    # momentum, the combine averages once per epoch (this project's defaults before the accuracy study).
    "paper": {
        "rounds_per_epoch": 1,
        "local_steps": 0,
        "lr": 0.02,
        "warmup_epochs": 0.0,
        "local_optimizer": "reset",
        "outer_lr": 1.0,
        "outer_momentum": 0.0,
    },
}


@dataclass(frozen=True)
class Environment:
    efs_root: Path
    status_table: str
    function_name: str
    safety_margin_s: float
    function_timeout_s: float = DEFAULT_FUNCTION_TIMEOUT_S
    model_bucket: str | None = None  # every run exports final.keras to s3://<model_bucket>/models/<run>/
    memory_mb: int = 0  # the function's memory (0: unknown, then rounds record no GB-seconds)

    @property
    def stalled_after_s(self) -> float:
        """Silence after which the watchdog calls an active run stalled: longer than any live invocation."""
        return 2 * self.function_timeout_s + 60.0


def set_tensorflow_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`TENSORFLOW_ENVIRONMENT` where the environment does not already say otherwise; call it before
    anything imports TensorFlow or Keras."""
    environ = os.environ if environ is None else environ
    for name, value in TENSORFLOW_ENVIRONMENT.items():
        environ.setdefault(name, value)


def load(environ: Mapping[str, str] | None = None) -> Environment:
    """Read the environment once per invocation; a missing required variable is a deployment error."""
    # An empty value counts as unset: the template declares variables empty so `sam local invoke --env-vars`
    # may override them, and Lambda passes the empty strings through.
    environ = {name: value for name, value in (os.environ if environ is None else environ).items() if value}
    table = environ.get(ENV_STATUS_TABLE, "")
    if not table:
        raise ConfigurationError(
            f"environment variable {ENV_STATUS_TABLE} is not set; expected the table name"
        )
    return Environment(
        efs_root=Path(environ.get(ENV_EFS_ROOT, DEFAULT_EFS_ROOT)),
        status_table=table,
        function_name=environ.get(ENV_FUNCTION_NAME, "lambdatrain-trainer"),
        safety_margin_s=_seconds(environ, ENV_SAFETY_MARGIN_S, DEFAULT_SAFETY_MARGIN_S),
        function_timeout_s=_seconds(environ, ENV_FUNCTION_TIMEOUT_S, DEFAULT_FUNCTION_TIMEOUT_S),
        model_bucket=environ.get(ENV_MODEL_BUCKET) or None,
        memory_mb=_memory_mb(environ),
    )


def _memory_mb(environ: Mapping[str, str]) -> int:
    raw = environ.get(ENV_MEMORY_SIZE, "0")
    if not raw.isdigit():
        raise ConfigurationError(f"{ENV_MEMORY_SIZE} must be a whole number of MB, got {raw!r}")
    return int(raw)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(environ.get(name) or default)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number of seconds, got {environ.get(name)!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(
            f"{name} must be a non-negative number of seconds, got {environ.get(name)!r}"
        )
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run. Every field may be set in the start event; the README documents each."""

    # metadata["help"]: the option's help in `lambdatrain local`, which has one option per field.
    # Lambda workers, 1-MAX_WORKERS.
    workers: int = dataclasses.field(default=4, metadata={"help": "parallel workers"})
    epochs: int = dataclasses.field(default=10, metadata={"help": "passes over the training set"})
    # "vgg19_bn" (CIFAR VGG-19 with BatchNorm) or "vgg19" (keras.applications).
    model: str = dataclasses.field(default="vgg19_bn", metadata={"help": "vgg19_bn or vgg19"})
    # 0.25 = a quarter of the channels.
    width: float = dataclasses.field(default=1.0, metadata={"help": "channel multiplier of vgg19_bn"})
    image_size: int = dataclasses.field(
        default=32,
        metadata={"help": "inputs are resized to this many pixels (the paper's transfer setting: 224)"},
    )
    weights: str | None = dataclasses.field(
        default=None, metadata={"help": "vgg19 only: imagenet, or a weights file relative to EFS_ROOT"}
    )
    batch_size: int = dataclasses.field(default=128, metadata={"help": "per worker and step"})
    # Local SGD, the schedule's peak; 0.05 diverges early without warm-up.
    lr: float = dataclasses.field(default=0.05, metadata={"help": "local learning rate"})
    lr_schedule: str = dataclasses.field(
        default="cosine", metadata={"help": "cosine decay over rounds, or constant"}
    )
    warmup_epochs: float = dataclasses.field(
        default=1.0, metadata={"help": "linear warm-up of the local learning rate over this many epochs"}
    )
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "local SGD momentum"})
    local_optimizer: str = dataclasses.field(
        default="keep",
        metadata={
            "help": "keep: each worker's momentum carries over to its next round (on EFS); reset: it restarts at "
            "zero every round (the paper)"
        },
    )
    weight_decay: float = dataclasses.field(
        default=5e-4, metadata={"help": "decoupled weight decay of the local optimizer"}
    )
    # Each worker trains 1/rounds_per_epoch of its shard per round.
    rounds_per_epoch: int = dataclasses.field(default=4, metadata={"help": "combines per epoch"})
    local_steps: int = dataclasses.field(
        default=0, metadata={"help": "if > 0: mini-batches per worker per round (overrides rounds_per_epoch)"}
    )
    outer_lr: float = dataclasses.field(
        default=1.0,
        metadata={"help": "server learning rate on the averaged update (1.0, momentum 0: averaging)"},
    )
    outer_momentum: float = dataclasses.field(
        default=0.0, metadata={"help": "Nesterov momentum of the outer update (0 disables it)"}
    )
    update_dtype: str = dataclasses.field(
        default="float32", metadata={"help": "dtype of the weight deltas on EFS (float16 halves the bytes)"}
    )
    # 0 = auto (trainer/sharding.py: one combine while a round's updates fit 512 MiB, else enough reducers that
    # each reads at most that); 1 = always one combine; K > 1 = K reducers, each averaging 1/K of every update.
    reducers: int = dataclasses.field(
        default=0, metadata={"help": "reducers per round: 0 = auto, 1 = one combine, K = a sharded reduce"}
    )
    eval_every: int = dataclasses.field(
        default=0, metadata={"help": "evaluate every N rounds; 0 = at each epoch end"}
    )
    augment: bool = dataclasses.field(
        default=True, metadata={"help": "random crop (4 px padding) and horizontal flip"}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seeds initial weights, data order and augmentation"}
    )
    dataset: str = dataclasses.field(
        default="cifar10", metadata={"help": "folder under <EFS_ROOT>/datasets/"}
    )
    train_samples: int = dataclasses.field(
        default=0, metadata={"help": "use the first N training images (0 = all)"}
    )
    test_samples: int = dataclasses.field(
        default=0, metadata={"help": "evaluate on the first N test images (0 = all)"}
    )
    max_attempts: int = dataclasses.field(
        default=3, metadata={"help": "attempts per worker/combine event before the run is marked FAILED"}
    )
    preset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "start from a named set of algorithm keys (paper); keys given beside it win"},
    )
    # The run's budget: past either, the run stops itself (STOPPED, with the reason) after the round it is in.
    max_wall_s: float = dataclasses.field(
        default=0.0,
        metadata={"help": "stop after the round that passes N seconds since the start; 0 = no limit"},
    )
    max_gb_s: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "stop after the round that passes N GB-seconds of measured Lambda time; 0 = no limit"
        },
    )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Validate a start event's configuration keys; unknown keys and wrong types are rejected."""
        known = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidEventError(
                f"unknown configuration key(s) {unknown}; expected some of {sorted(known)}"
            )
        values = {name: _coerce(name, value, known[name].type) for name, value in raw.items()}
        preset = values.get("preset")
        if preset is not None:
            _check_choice("preset", preset, tuple(PRESETS))
            values = {**PRESETS[preset], **values}
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        _check_range("workers", self.workers, 1, MAX_WORKERS)
        _check_range("epochs", self.epochs, 1, 10_000)
        _check_choice("model", self.model, MODELS)
        _check_range("width", self.width, 1 / 64, 4.0)
        _check_range("image_size", self.image_size, 32, 512)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("lr", self.lr, 0.0, 10.0)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_range("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs))
        _check_range("momentum", self.momentum, 0.0, 0.999)
        _check_choice("local_optimizer", self.local_optimizer, LOCAL_OPTIMIZER_MODES)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("rounds_per_epoch", self.rounds_per_epoch, 1, 10_000)
        _check_range("local_steps", self.local_steps, 0, 1_000_000)
        _check_range("outer_lr", self.outer_lr, 0.0, float(MAX_WORKERS))
        _check_range("outer_momentum", self.outer_momentum, 0.0, 0.999)
        _check_choice("update_dtype", self.update_dtype, UPDATE_DTYPES)
        _check_range("reducers", self.reducers, 0, MAX_WORKERS)
        _check_range("eval_every", self.eval_every, 0, 1_000_000)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        check_name("dataset", self.dataset)
        _check_range("train_samples", self.train_samples, 0, 100_000_000)
        _check_range("test_samples", self.test_samples, 0, 100_000_000)
        _check_range("max_attempts", self.max_attempts, 1, 10)
        if self.preset is not None:
            _check_choice("preset", self.preset, tuple(PRESETS))
        _check_range("max_wall_s", self.max_wall_s, 0.0, 366 * 86_400.0)
        _check_range("max_gb_s", self.max_gb_s, 0.0, 1e12)
        if self.model == "vgg19_bn" and self.weights is not None:
            raise InvalidEventError("weights is only supported for model 'vgg19', got model 'vgg19_bn'")
        if self.weights is not None and self.weights != "imagenet":
            relative = Path(self.weights)
            if relative.is_absolute() or ".." in relative.parts or not self.weights.strip():
                raise InvalidEventError(
                    f"weights must be None, 'imagenet' or a path relative to EFS_ROOT, got {self.weights!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check a JSON value against the field's annotation; ints stay ints, bools are never numbers."""
    kinds = {
        "int": (int,),
        "float": (int, float),
        "str": (str,),
        "bool": (bool,),
        "str | None": (str, type(None)),
    }
    allowed = kinds[annotation]
    if isinstance(value, bool) and bool not in allowed:
        raise InvalidEventError(f"{name} must be {annotation}, got boolean {value!r}")
    if not isinstance(value, allowed):
        raise InvalidEventError(f"{name} must be {annotation}, got {type(value).__name__} {value!r}")
    if annotation == "float":
        value = float(value)
        if not math.isfinite(value):
            raise InvalidEventError(f"{name} must be a finite number, got {value!r}")
    return value


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidEventError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidEventError(f"{name} must be one of {list(choices)}, got {value!r}")
