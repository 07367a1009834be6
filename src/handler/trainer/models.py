"""VGG-19 variants, built with the Keras 3 functional API (any Keras backend).

Both models take raw 0-255 RGB pixels of any size and resize them to ``image_size`` inside the model, so the
exported ``final.keras`` needs no separate preprocessing. Both end in a 10-way softmax.

- ``vgg19_bn``: the CIFAR variant of VGG-19 (conv stacks 2-2-4-4-4 with BatchNorm, one dense head), with a
  ``width`` multiplier so tests and benchmarks run narrow copies of the same architecture.
- ``vgg19``: ``keras.applications.VGG19`` without its top (ImageNet weights optional: the paper's transfer
  setting at 224 px), with the Caffe-style preprocessing it expects and a new dense head.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from trainer.config import TrainConfig
from trainer.errors import LayoutError

NUM_CLASSES = 10
CIFAR_MEAN = (125.3, 123.0, 113.9)  # per-channel pixel mean of the CIFAR-10 training set
CIFAR_STD = (63.0, 62.1, 66.7)
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)  # what keras.applications.vgg19.preprocess_input subtracts
VGG19_STAGES = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))


def build_model(config: TrainConfig, efs_root: Path) -> keras.Model:
    """The model a run trains, compiled with its local optimizer; its initial weights follow ``config.seed``."""
    if config.model == "vgg19_bn":
        model = build_vgg19_bn(NUM_CLASSES, config.image_size, config.width)
        seed_kernels(model, config.seed)
    else:
        weights = _weights_argument(config.weights, efs_root)
        model = build_vgg19(NUM_CLASSES, config.image_size, weights)
        seed_kernels(model if weights is None else model.get_layer("predictions"), config.seed)
    optimizer = keras.optimizers.SGD(
        learning_rate=config.lr, momentum=config.momentum, weight_decay=config.weight_decay or None
    )
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    optimizer.build(model.trainable_variables)
    return model


def build_vgg19_bn(num_classes: int, image_size: int, width: float = 1.0) -> keras.Model:
    inputs = keras.Input(shape=(None, None, 3), name="pixels")
    x = _resize(inputs, image_size)
    x = layers.Normalization(mean=CIFAR_MEAN, variance=np.square(CIFAR_STD), name="normalize")(x)
    for stage, (filters, convs) in enumerate(VGG19_STAGES, start=1):
        channels = max(1, round(filters * width))
        for index in range(1, convs + 1):
            name = f"block{stage}_conv{index}"
            x = layers.Conv2D(
                channels, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=name
            )(x)
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{stage}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"vgg19_bn_w{width:g}")


def build_vgg19(num_classes: int, image_size: int, weights: str | None) -> keras.Model:
    inputs = keras.Input(shape=(None, None, 3), name="pixels")
    x = _resize(inputs, image_size)
    # Caffe preprocessing (RGB -> BGR, subtract the ImageNet mean) as a frozen 1x1 convolution: exact, and it
    # serialises with the model without a custom layer.
    caffe = layers.Conv2D(3, 1, trainable=False, name="caffe_preprocess")
    x = caffe(x)
    caffe.set_weights(
        [np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3), -np.array(IMAGENET_MEAN_BGR, "float32")]
    )
    base = keras.applications.VGG19(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
    )
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="vgg19")


def seed_kernels(root: keras.Layer, seed: int) -> None:
    """Redraw every trainable kernel under ``root`` from NumPy generators seeded by ``(seed, position)``.

    Convolutions get He-normal, dense layers Glorot-uniform; biases and BatchNorm keep their constant
    initialisation. This makes initial weights a function of the seed alone, without
    ``keras.utils.set_random_seed``, which resets global state and makes TensorFlow retrace the next training
    step of a model already in the process (a warm container's).
    """
    position = 0
    for layer in _walk(root):
        if not isinstance(layer, layers.Conv2D | layers.Dense) or not layer.trainable:
            continue
        rng = np.random.default_rng([seed, position])
        kernel = layer.kernel
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:-1]))
        if isinstance(layer, layers.Conv2D):
            values = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        else:
            limit = np.sqrt(6.0 / (fan_in + shape[-1]))
            values = rng.uniform(-limit, limit, shape)
        kernel.assign(values.astype(kernel.dtype))
        position += 1


def _walk(layer: keras.Layer):
    yield layer
    for child in getattr(layer, "layers", ()):
        yield from _walk(child)


def _resize(inputs: keras.KerasTensor, image_size: int) -> keras.KerasTensor:
    return layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(inputs)


def _weights_argument(weights: str | None, efs_root: Path) -> str | None:
    if weights in (None, "imagenet"):
        return weights
    path = efs_root / weights
    if not path.is_file():
        raise LayoutError(f"weights file {path} (config 'weights' = {weights!r}) does not exist")
    return str(path)


def trainable_mask(model: keras.Model) -> list[bool]:
    """For each entry of ``model.get_weights()``: True if trained by SGD, False for BatchNorm statistics."""
    trainable = {id(variable) for variable in model.trainable_weights}
    return [id(variable) in trainable for variable in model.weights]


def count_parameters(model: keras.Model) -> int:
    return int(sum(np.prod(variable.shape) for variable in model.trainable_weights))
