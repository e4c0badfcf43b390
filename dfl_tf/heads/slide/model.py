"""The slide head: a bag of raw embeddings -> standardisation -> instance noise (training) ->
instance layer -> aggregator -> softmax.

Inputs ``embeddings`` float32 ``[B, N, dim]`` and ``mask`` float32 ``[B, N]`` (1 for a real
instance, 0 for padding); outputs ``probabilities`` ``[B, C]`` and ``attention`` ``[B, N]`` (the
weight of each instance in the pooled vector; 0 on padding). Aggregators:

* ``abmil``: gated attention (Ilse et al. 2018): ``a = w^T (tanh(V h) * sigmoid(U h))``, softmax
  over the bag's instances, weighted sum;
* ``mean``: mean pooling (attention ``1/n``);
* ``max``: per-dimension max (attention: the share of dimensions where the instance is the max).

The layers are registered (``package="dfl_tf"``), so ``head.keras`` loads with ``dfl_tf`` imported.
"""
from __future__ import annotations

from typing import Any, Sequence

import keras
from keras import ops

from dfl_tf.errors import DflError
from dfl_tf.heads.model import standardize_layer

AGGREGATORS = ("abmil", "mean", "max")


@keras.saving.register_keras_serializable(package="dfl_tf")
class MILPooling(keras.layers.Layer):
    """Pool instance features ``[B, N, D]`` under ``mask`` ``[B, N]`` to ``[B, D]``; also returns the
    attention ``[B, N]``. ``attention_dim`` sizes the gated attention's V and U (abmil only)."""

    def __init__(self, aggregator: str = "abmil", attention_dim: int = 128, **kwargs: Any):
        super().__init__(**kwargs)
        if aggregator not in AGGREGATORS:
            raise DflError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {aggregator!r}")
        self.aggregator, self.attention_dim = aggregator, int(attention_dim)
        if aggregator == "abmil":
            self.V = keras.layers.Dense(self.attention_dim, activation="tanh", name="attention_V")
            self.U = keras.layers.Dense(self.attention_dim, activation="sigmoid", name="attention_U")
            self.w = keras.layers.Dense(1, name="attention_w")

    def build(self, input_shape):
        if self.aggregator == "abmil":
            features = input_shape[0]
            for layer in (self.V, self.U):
                layer.build(features)
            self.w.build(tuple(features[:-1]) + (self.attention_dim,))
        self.built = True

    def call(self, inputs):
        h, mask = inputs
        mask = ops.cast(mask, h.dtype)
        if self.aggregator == "abmil":
            logits = ops.squeeze(self.w(self.V(h) * self.U(h)), -1)
            logits = ops.where(mask > 0, logits, ops.full_like(logits, -1e9))
            att = ops.softmax(logits, axis=-1) * mask
            att = att / ops.maximum(ops.sum(att, axis=-1, keepdims=True), 1e-9)
            return ops.sum(h * att[..., None], axis=1), att
        if self.aggregator == "mean":
            att = mask / ops.maximum(ops.sum(mask, axis=-1, keepdims=True), 1.0)
            return ops.sum(h * att[..., None], axis=1), att
        masked = ops.where(mask[..., None] > 0, h, ops.full_like(h, -1e9))
        pooled = ops.max(masked, axis=1)
        wins = ops.cast(ops.equal(masked, pooled[:, None, :]), h.dtype) * mask[..., None]
        att = ops.mean(wins, axis=-1)
        return pooled, att / ops.maximum(ops.sum(att, axis=-1, keepdims=True), 1e-9)

    def compute_output_shape(self, input_shape):
        features, mask = input_shape
        return (features[0], features[-1]), tuple(mask)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "aggregator": self.aggregator, "attention_dim": self.attention_dim}


def build_slide_head(dim: int, n_classes: int, aggregator: str = "abmil", hidden: int = 128,
                     dropout: float = 0.0, noise: float = 0.0, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, seed: int = 0, name: str = "slide_head") -> keras.Model:
    """A slide head on raw embeddings (see the module docstring). ``noise``: std of the Gaussian
    noise added to each standardised instance embedding in training. ``hidden``: units of the
    instance layer (ReLU) and of the attention (abmil). The output kernel starts at zero."""
    if n_classes < 2:
        raise DflError(f"a slide head needs at least 2 classes, got {n_classes}")
    hidden = max(int(hidden), 1)
    emb = keras.Input(shape=(None, int(dim)), dtype="float32", name="embeddings")
    mask = keras.Input(shape=(None,), dtype="float32", name="mask")
    x = standardize_layer(int(dim), mean, std)(emb)
    if noise and noise > 0:
        x = keras.layers.GaussianNoise(float(noise), seed=int(seed), name="instance_noise")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="instance")(x)
    pooled, attention = MILPooling(aggregator, attention_dim=hidden, name="pooling")([x, mask])
    if dropout and dropout > 0:
        pooled = keras.layers.Dropout(float(dropout), seed=int(seed), name="dropout")(pooled)
    probs = keras.layers.Dense(int(n_classes), activation="softmax", kernel_initializer="zeros",
                               name="probabilities")(pooled)
    attention = keras.layers.Identity(name="attention")(attention)
    return keras.Model({"embeddings": emb, "mask": mask}, {"probabilities": probs, "attention": attention},
                       name=name)
