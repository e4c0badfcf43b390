"""A toy backbone for tests and benchmark smoke runs: two strided convolutions and global
average pooling (dim 16). Not registered by default: call :func:`register_toy` first."""
from __future__ import annotations

import keras

from dfl_tf.backbones.layers import PREPROCESSING, wrap
from dfl_tf.backbones.registry import BackboneSpec, register


def register_toy(name: str = "toy", input_size: int = 32) -> BackboneSpec:
    """Register the toy backbone under ``name`` (random init with ``weights="none"``)."""

    def build(size: int, weights: str | None) -> keras.Model:
        base = keras.Sequential([
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
        ], name=f"{name}_base")
        model = wrap(base, size, "unit", name)
        if weights:
            model.load_weights(weights)
        return model

    return register(BackboneSpec(name=name, builder=build, input_size=input_size, dim=16, default_weights="none",
                                 params=1_392, preprocessing=PREPROCESSING["unit"],
                                 description="toy backbone for tests and smoke runs"))
