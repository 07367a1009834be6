"""Fixtures for the trainer's tests (the harness itself lives in ``trainer_harness``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from trainer_harness import BUCKET, Harness, write_synthetic_dataset


@pytest.fixture
def synthetic_efs(efs_root: Path) -> Path:
    """An EFS root holding a small learnable dataset under ``datasets/cifar10``."""
    write_synthetic_dataset(efs_root / "datasets" / "cifar10")
    return efs_root


@pytest.fixture
def harness(synthetic_efs: Path, table: Any, aws_env: None, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(synthetic_efs, table, monkeypatch)


@pytest.fixture
def bucket(harness: Harness) -> Any:
    """A moto bucket ``BUCKET`` that the harness's handler reads start objects from and exports models to."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        harness.services.s3 = client
        yield client
