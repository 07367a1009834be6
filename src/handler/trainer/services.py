"""What every flow needs: the adapters (EFS layout, status table, invoker, S3), warm-container caches of the
model, and two lookups that fail clearly (the run item, the round's global weights)."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from botocore.exceptions import ClientError

from trainer import config, data, logs, models
from trainer.coordination import RunStatus, StatusTable
from trainer.efs_layout import MANIFEST_FILE, EfsLayout, load_arrays
from trainer.errors import DatasetChangedError, InvalidEventError, LayoutError, TrainingError
from trainer.invocation import Invoker, LambdaInvoker
from trainer.protocol import S3StartEvent, StartEvent, parse_start_object

log = logging.getLogger(__name__)

MAX_START_OBJECT_BYTES = 64 * 1024


@dataclass
class Services:
    """Everything a flow touches outside memory; tests build their own."""

    layout: EfsLayout
    status: StatusTable
    invoker: Invoker
    environment: config.Environment
    s3: Any = None
    lambda_api: Any = None  # a boto3 Lambda client for account checks; None skips them (tests, harnesses)

    @classmethod
    def from_environment(cls, environment: config.Environment) -> Services:
        invoker = LambdaInvoker(environment.function_name)
        return cls(
            layout=EfsLayout(environment.efs_root),
            status=StatusTable.from_name(environment.status_table),
            invoker=invoker,
            environment=environment,
            lambda_api=invoker.client,
        )

    def read_start_object(self, event: S3StartEvent) -> StartEvent:
        """The start event in an S3 start object (at most ``MAX_START_OBJECT_BYTES``)."""
        try:
            response = self.s3_client().get_object(Bucket=event.bucket, Key=event.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "AccessDenied"):
                raise InvalidEventError(
                    f"cannot read start object s3://{event.bucket}/{event.key}: {exc}"
                ) from exc
            raise TrainingError(
                f"reading start object s3://{event.bucket}/{event.key} failed: {exc}"
            ) from exc
        if int(response.get("ContentLength", 0)) > MAX_START_OBJECT_BYTES:
            raise InvalidEventError(
                f"start object {event.key!r} is larger than {MAX_START_OBJECT_BYTES} bytes"
            )
        return parse_start_object(response["Body"].read(MAX_START_OBJECT_BYTES + 1), event.key)

    def s3_client(self) -> Any:
        if self.s3 is None:
            import boto3

            self.s3 = boto3.client("s3")
        return self.s3


# --- warm-container caches ------------------------------------------------------------------------------

_models: dict[tuple[Any, ...], keras.Model] = {}


def _model_key(cfg: config.TrainConfig) -> tuple[Any, ...]:
    return (cfg.model, cfg.width, cfg.image_size, cfg.weights, cfg.momentum, cfg.weight_decay)


def _build(cfg: config.TrainConfig, efs_root: Path) -> keras.Model:
    began = time.perf_counter()
    model = models.build_model(cfg, efs_root)
    logs.event(
        log,
        "model_built",
        model=cfg.model,
        width=cfg.width,
        parameters=models.count_parameters(model),
        duration_s=round(time.perf_counter() - began, 3),
    )
    return model


def model_for(cfg: config.TrainConfig, efs_root: Path) -> keras.Model:
    """The compiled model for a configuration, built once per container and reused while warm."""
    key = _model_key(cfg)
    cold = key not in _models
    if cold:
        _models.clear()  # one model per container: memory is for vCPUs, not for a zoo
        _models[key] = _build(cfg, efs_root)
    logs.bind_more(container="cold" if cold else "warm")
    return _models[key]


def clear_warm_caches() -> None:
    """Forget the cached model, as a new (cold) container would start without it."""
    _models.clear()


def initial_weights(cfg: config.TrainConfig, efs_root: Path) -> list[np.ndarray]:
    """Round-0 weights from the seed. A warm container's cached (already traced) model is left as it is."""
    model = _build(cfg, efs_root)
    if _model_key(cfg) not in _models:  # keep a warm container's traced model; never hold two
        _models.clear()
        _models[_model_key(cfg)] = model
    return model.get_weights()


def dataset_digest(cfg: config.TrainConfig, layout: EfsLayout) -> str:
    """The sha256 of the dataset's manifest (which holds every array's sha256): what a run pins at start."""
    path = layout.dataset_dir(cfg.dataset) / MANIFEST_FILE
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as exc:
        raise LayoutError(f"{path}: missing; prepare the dataset first (make preprocess)") from exc


def dataset_for(cfg: config.TrainConfig, layout: EfsLayout) -> data.Dataset:
    return data.open_dataset(layout.dataset_dir(cfg.dataset)).limited(cfg.train_samples, cfg.test_samples)


def run_dataset(run: RunStatus, layout: EfsLayout) -> data.Dataset:
    """The dataset a run started with; another one (prepared or staged again since) is refused."""
    if run.dataset_sha256 is not None and dataset_digest(run.config, layout) != run.dataset_sha256:
        raise DatasetChangedError(
            f"dataset {run.config.dataset!r} changed since run {run.run_id!r} started (its manifest's sha256 is no "
            f"longer {run.dataset_sha256[:12]}...); a run trains on one dataset: start a new run"
        )
    return dataset_for(run.config, layout)


# --- helpers --------------------------------------------------------------------------------------------


def require_run(run_id: str, services: Services) -> RunStatus:
    run = services.status.get_run(run_id)
    if run is None:
        raise InvalidEventError(f"run {run_id!r} does not exist (start it first)")
    return run


def load_global_weights(path: Path, model: keras.Model) -> list[np.ndarray]:
    arrays, _ = load_arrays(path)
    expected = [tuple(variable.shape) for variable in model.weights]
    if [tuple(array.shape) for array in arrays] != expected:
        raise LayoutError(f"{path}: {len(arrays)} arrays do not match the model's {len(expected)} weights")
    return arrays
