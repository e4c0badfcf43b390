"""The built backbone: a frozen Keras model with its provenance (name, weights, fingerprint).

Below :mod:`dfl_tf.backbones.registry` and the builders that make one (the registry,
:mod:`dfl_tf.backbones.savedmodel`), so they import it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf


@dataclass
class Backbone:
    """A built, frozen backbone with its provenance."""

    name: str
    model: keras.Model
    input_size: int
    dim: int
    weights: str
    fingerprint: str
    precision: str = "float32"

    def __call__(self, images):
        return self.model(images, training=False)

    def compiled(self, jit: bool = False):
        """``images [N, S, S, 3] float32 -> embeddings`` as a tf.function, traced once per backbone
        and jit setting, so repeated extractions in one process (selection, the API) reuse it."""
        cache = self.__dict__.setdefault("_compiled", {})
        if jit not in cache:
            size, model = self.input_size, self.model
            cache[jit] = tf.function(lambda x: model(x, training=False), jit_compile=jit, reduce_retracing=True,
                                     input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        return cache[jit]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "input_size": self.input_size,
            "dim": self.dim,
        }
