"""The head: raw embedding -> fixed standardisation -> augmentations -> MLP -> softmax.

The standardisation statistics live inside the model (``keras.layers.Normalization(mean=,
variance=)``, layer ``standardize``) as well as in ``head.json``, so ``head.keras`` can be
called directly on backbone embeddings. Heads use Keras built-in layers only (unless the
``scaled-noise`` augmentation is asked for), so ``keras.saving.load_model("head.keras")``
works without importing ``dfl_tf``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.heads import augment as _augment  # noqa: F401  (registers the augmentation layers)

HEAD_FILE = "head.keras"
HEAD_JSON = "head.json"
EPS = 1e-6


@keras.saving.register_keras_serializable(package="dfl_tf")
class Standardize(keras.layers.Layer):
    """``(x - mean) / std`` with fixed statistics (non-trainable weights saved with the model).

    Kept only so that ``head.keras`` files saved before heads used
    ``keras.layers.Normalization`` (class ``dfl_tf>Standardize``) still load; new heads use the
    built-in (:func:`standardize_layer`), which computes the same values.
    """

    def __init__(self, dim: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self._init = (None if mean is None else np.asarray(mean, np.float32).reshape(self.dim),
                      None if std is None else np.asarray(std, np.float32).reshape(self.dim))

    def build(self, input_shape):
        mean, std = self._init
        self.mean = self.add_weight(
            name="mean", shape=(self.dim,), trainable=False,
            initializer=keras.initializers.Constant(mean) if mean is not None else "zeros")
        self.std = self.add_weight(
            name="std", shape=(self.dim,), trainable=False,
            initializer=keras.initializers.Constant(std) if std is not None else "ones")
        self.built = True

    def call(self, inputs):
        return (inputs - keras.ops.cast(self.mean, inputs.dtype)) / keras.ops.cast(self.std, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim}


def standardize_layer(dim: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      name: str = "standardize") -> keras.layers.Normalization:
    """``(x - mean) / std`` as ``keras.layers.Normalization(mean=mean, variance=std**2)``.

    ``std`` is floored (:func:`safe_std`) before, so Normalization's own ``max(sqrt(var),
    1e-7)`` never applies; ``sqrt(std**2)`` equals ``std`` to float32 rounding.
    """
    mean = np.zeros(dim, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(int(dim))
    std = np.ones(dim, np.float32) if std is None else safe_std(np.asarray(std).reshape(int(dim)))
    variance = np.square(std.astype(np.float64)).astype(np.float32)
    return keras.layers.Normalization(mean=mean, variance=variance, name=name)


def standardize_values(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, denominator)``, float32, with which :func:`standardize_layer` (Keras'
    ``Normalization``) computes ``(x - mean) / denominator``: the same numbers, for standardising
    data outside the model (:func:`training_view`)."""
    dim = len(np.asarray(mean).reshape(-1))
    layer = standardize_layer(dim, mean, std)
    layer.build((None, dim))
    mean32 = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float32).reshape(-1)
    var32 = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float32).reshape(-1)
    return mean32, np.maximum(np.sqrt(var32), np.float32(keras.backend.epsilon())).astype(np.float32)


def training_view(model: keras.Model) -> keras.Model | None:
    """The part of a :func:`build_head` model after its ``standardize`` layer, as a model of its own
    on standardised embeddings that shares the head's layers and weights (training it trains the
    head), or ``None`` when layers come before the standardisation (``scaled-noise``)."""
    layer = model.get_layer("standardize")
    if layer.input is not model.inputs[0]:
        return None
    return keras.Model(layer.output, model.output, name=f"{model.name}_on_standardised")


def standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float64 accumulation; std floored at 1e-6 -> 1)."""
    X = np.asarray(X)
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), safe_std(std)


def safe_std(std: np.ndarray) -> np.ndarray:
    std = np.asarray(std, np.float64)
    return np.where(std < EPS, 1.0, std).astype(np.float32)


def build_head(dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.0,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               augment: Sequence[keras.layers.Layer] = (), pre_augment: Sequence[keras.layers.Layer] = (),
               name: str = "head", reduce: keras.layers.Dense | None = None) -> keras.Model:
    """A softmax head on raw ``float32 [dim]`` embeddings.

    ``pre_augment`` layers act on the raw embedding, ``augment`` layers on the standardised
    one (both only in training). ``hidden=0`` gives a linear softmax head. The output kernel
    starts at zero (uniform probabilities); the hidden layer is Glorot-initialised. ``reduce``: a
    frozen Dense layer (``dfl train --reduce``) applied first; ``mean``/``std`` then describe its output.
    """
    if n_classes < 2:
        raise DflError(f"a head needs at least 2 classes, got {n_classes}")
    inputs = keras.Input(shape=(int(dim),), dtype="float32", name="embedding")
    x = inputs if reduce is None else reduce(inputs)
    for layer in pre_augment:
        x = layer(x)
    x = standardize_layer(int(dim) if reduce is None else int(reduce.units), mean, std)(x)
    for layer in augment:
        x = layer(x)
    if hidden and hidden > 0:
        x = keras.layers.Dense(int(hidden), activation="relu", name="hidden")(x)
        if dropout and dropout > 0:
            x = keras.layers.Dropout(float(dropout), name="dropout")(x)
    # Zero-initialised output kernel: training starts from uniform probabilities instead of a random
    # projection of thousands of features (at small n that projection is not trained away and costs
    # ~0.05 balanced accuracy; benchmarks/bench_heads_study.py).
    outputs = keras.layers.Dense(int(n_classes), activation="softmax", kernel_initializer="zeros",
                                 name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def load_head(head_dir: str | Path) -> tuple[keras.Model, dict[str, Any]]:
    """``(model, head.json)`` of a head directory written by :func:`dfl_tf.train_head`."""
    head_dir = Path(head_dir)
    info_path, model_path = head_dir / HEAD_JSON, head_dir / HEAD_FILE
    if not info_path.exists() or not model_path.exists():
        raise DflError(f"{head_dir}: not a head directory (needs {HEAD_FILE} and {HEAD_JSON})")
    info = json.loads(info_path.read_text())
    model = keras.saving.load_model(model_path, compile=False)
    return model, info


def resolve_positive(classes: Sequence[str], positive_class: str | None, where: str) -> int:
    """Index of the positive class of a two-class task (default: the second class, index 1).

    ``positive_class`` names it; it only applies to two-class tasks.
    """
    classes = list(classes)
    if positive_class is None:
        return 1
    if len(classes) != 2:
        raise DflError(f"positive_class applies to two-class tasks; {where} has {len(classes)} classes {classes}")
    if str(positive_class) not in classes:
        raise DflError(f"positive_class '{positive_class}' is not a class of {where} (classes: {classes})")
    return classes.index(str(positive_class))
