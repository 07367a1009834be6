"""Starting a run from an S3 start object, and the transfer-learning VGG-19 with a weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from trainer import models
from trainer.config import TrainConfig
from trainer.errors import InvalidEventError, LayoutError
from trainer_harness import BUCKET, Harness, s3_event, start_event


def test_start_object_starts_a_run_named_after_it_and_exports_the_model_there(
    harness: Harness, bucket: Any
) -> None:
    body = {key: value for key, value in start_event().items() if key != "run"}
    bucket.put_object(Bucket=BUCKET, Key="start/from-s3.json", Body=json.dumps(body).encode())
    assert harness.invoke(s3_event("start/from-s3.json"))["run"] == "from-s3"
    assert harness.invoke(s3_event("start/from-s3.json"))["status"] == "duplicate"  # S3 redelivery
    harness.drain()
    item = harness.run("from-s3")
    assert item.state == "SUCCEEDED"
    assert item.summary.final_model_s3 == f"s3://{BUCKET}/models/from-s3/final.keras"
    exported = bucket.get_object(Bucket=BUCKET, Key="models/from-s3/final.keras")["Body"].read()
    assert exported == harness.layout.final_model_path("from-s3").read_bytes()


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "not valid JSON"), (b'{"start": true, "workers": 0}', "workers must be between")],
    ids=["not-json", "bad-config"],
)
def test_bad_start_object_changes_nothing(harness: Harness, bucket: Any, body: bytes, message: str) -> None:
    bucket.put_object(Bucket=BUCKET, Key="start/bad.json", Body=body)
    with pytest.raises(InvalidEventError, match=message):
        harness.invoke(s3_event("start/bad.json"))
    assert harness.status.table.scan()["Items"] == []
    assert not harness.invoker.sent


def test_missing_start_object_is_a_clear_error(harness: Harness, bucket: Any) -> None:
    with pytest.raises(InvalidEventError, match="cannot read start object"):
        harness.invoke(s3_event("start/absent.json"))


def test_vgg19_loads_a_weights_file_relative_to_the_efs_root(tmp_path: Path) -> None:
    base = keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 32, 3))
    base.save_weights(tmp_path / "vgg19_notop.weights.h5")
    model = models.build_model(
        TrainConfig(model="vgg19", weights="vgg19_notop.weights.h5"), efs_root=tmp_path
    )
    loaded = model.get_layer("vgg19").get_weights()
    for expected, actual in zip(base.get_weights(), loaded, strict=True):
        np.testing.assert_array_equal(expected, actual)
    assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 10)


def test_vgg19_with_a_missing_weights_file_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="does not exist"):
        models.build_model(TrainConfig(model="vgg19", weights="absent.weights.h5"), efs_root=tmp_path)


def test_vgg19_bn_width_scales_the_channels() -> None:
    narrow = models.build_vgg19_bn(10, 32, width=0.25)
    assert narrow.get_layer("block1_conv1").filters == 16 and narrow.get_layer("block5_conv4").filters == 128
    assert len([layer for layer in narrow.layers if isinstance(layer, keras.layers.Conv2D)]) == 16


def test_vgg19_resizes_to_the_transfer_resolution() -> None:
    model = models.build_vgg19_bn(10, 64, width=0.0625)
    assert model.get_layer("resize").output.shape[1:3] == (64, 64)
