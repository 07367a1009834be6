"""Predict with a trained ``final.keras``: the top-1 class and its probability per image, a grid of images with
predicted and true labels (the paper's Fig. 6), and a check on random images of the prepared test set.

The model takes raw 0-255 RGB pixels and resizes them itself (``trainer.models``); images of any size and
format Pillow reads are converted to RGB and resized to the model's input size here, so that they batch."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localrun.errors import OperatorError
from localrun.outputs import atomic_output

DEFAULT_IMAGE_SIZE = 32  # a model without trainer.models' "resize" layer: CIFAR-10's size
RESIZE_LAYER = "resize"  # trainer.models names its Resizing layer so


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


def load_model(path: Path) -> Any:
    """The Keras model in ``path``; a file that is not one is an :class:`OperatorError` naming it."""
    if not path.is_file():
        raise OperatorError(f"{path}: no such model file")
    from trainer import config

    config.set_tensorflow_defaults()  # before Keras imports TensorFlow
    with _native_stderr_silenced():
        import keras

        try:
            return keras.models.load_model(path, compile=False)
        except (
            Exception
        ) as exc:  # Keras raises ValueError, OSError, zipfile errors ... for what is not a model
            raise OperatorError(f"{path} is not a Keras model: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines (absl "oneDNN custom operations
    are on" ...) ignore TF_CPP_MIN_LOG_LEVEL and would bury the command's own output and one-line errors.
    Python's exceptions are unaffected; they are printed after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def input_size(model: Any) -> int:
    """The pixels the model resizes its input to (its "resize" layer), or its fixed input size."""
    try:
        layer = model.get_layer(RESIZE_LAYER)
        return int(layer.height)
    except (ValueError, AttributeError):
        shape = model.input_shape
        return int(shape[1]) if shape[1] else DEFAULT_IMAGE_SIZE


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as ``(size, size, 3)`` uint8 RGB; a file Pillow cannot read is an :class:`OperatorError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise OperatorError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise OperatorError(f"{path} is not an image Pillow can read: {exc}") from exc


def load_array(image: np.ndarray, size: int) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 image (a test-set row) at the model's input size."""
    if image.shape[:2] == (size, size):
        return np.asarray(image, dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size)), dtype=np.uint8)


def predict(model: Any, images: np.ndarray, label_names: Sequence[str]) -> list[Prediction]:
    """Top-1 class and probability for each image of a ``(N, H, W, 3)`` uint8 batch."""
    with _native_stderr_silenced():  # the first call initialises more of TensorFlow
        outputs = np.asarray(model.predict(images.astype("float32"), batch_size=64, verbose=0))
    if outputs.ndim != 2:
        raise OperatorError(f"the model returns shape {outputs.shape}; expected one score per class")
    probabilities = outputs if _is_distribution(outputs) else _softmax(outputs)
    names = list(label_names) if len(label_names) == outputs.shape[1] else []
    predictions = []
    for row in probabilities:
        index = int(np.argmax(row))
        predictions.append(Prediction(index, names[index] if names else f"class {index}", float(row[index])))
    return predictions


def _is_distribution(outputs: np.ndarray) -> bool:
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def sample_test_set(
    dataset_dir: Path, count: int, seed: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """``count`` random test images of a prepared dataset: (images, labels, their indices, label names)."""
    from trainer import data, errors

    try:
        dataset = data.open_dataset(dataset_dir)
    except errors.TrainingError as exc:
        raise OperatorError(f"no prepared dataset in {dataset_dir}: {exc}") from exc
    total = len(dataset.test_y)
    if not 1 <= count <= total:
        raise OperatorError(f"--cifar-test must be between 1 and the {total} test images, got {count}")
    indices = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    return (
        np.asarray(dataset.test_x[indices]),
        np.asarray(dataset.test_y[indices]),
        indices,
        dataset.label_names,
    )


def label_names_of(dataset_dir: Path | None) -> tuple[str, ...]:
    """The dataset's class names if it is prepared there, else CIFAR-10's."""
    if dataset_dir is not None:
        from trainer import data, errors

        try:
            return data.open_dataset(dataset_dir).label_names
        except errors.TrainingError:
            pass
    from prep import cifar

    return cifar.LABEL_NAMES


def draw_grid(
    images: np.ndarray,
    predictions: Sequence[Prediction],
    true_labels: Sequence[str | None],
    path: Path,
    title: str,
) -> None:
    """The paper's Fig. 6: each image with its predicted label and probability, and its true label when known
    (green when right, red when wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = min(10, len(images))
    rows = math.ceil(len(images) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, prediction, truth in zip(axes.flat, images, predictions, true_labels, strict=False):
        axis.imshow(image)
        color = "black" if truth is None else ("tab:green" if truth == prediction.label else "tab:red")
        text = f"{prediction.label} {prediction.probability:.0%}"
        if truth is not None:
            text += f"\n(true: {truth})"
        axis.set_title(text, fontsize=8, color=color)
    figure.suptitle(title)
    figure.tight_layout()
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        pyplot.close(figure)
