"""Batch normalisation folded into the convolution before it (frozen backbones)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from dfl_tf.backbones.fold import FoldedBatchNorm, fold_batchnorm
from dfl_tf.backbones.registry import load_backbone


def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _randomise_statistics(model, seed=0):
    """Trained-looking normalisation: means, variances, gammas and betas away from 0 / 1."""
    rng = np.random.default_rng(seed)
    for layer in _layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n))
            layer.moving_variance.assign(rng.uniform(0.3, 2.0, n))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, n))


@pytest.mark.parametrize("name,pairs", [("resnet50", 53), ("efficientnet_lite0", 49)])
def test_folded_backbone_gives_the_same_embeddings(name, pairs):
    bb = load_backbone(name, weights="none", input_size=48, fold_bn=False)
    _randomise_statistics(bb.model)
    folded, count = fold_batchnorm(bb.model)
    assert count == pairs  # every conv -> BN pair of the family (depthwise ones too)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in _layers(folded))
    x = np.random.default_rng(1).uniform(0, 255, (3, 48, 48, 3)).astype(np.float32)
    plain, fast = bb.model(x).numpy(), folded(x).numpy()
    assert np.abs(plain - fast).max() <= 1e-5 * np.abs(plain).max()
    # the backbone a user loads is folded, with the fingerprint of the weights as loaded
    default = load_backbone(name, weights="none", input_size=48)
    assert default.fingerprint == bb.fingerprint
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in _layers(default.model))
    assert any(isinstance(layer, FoldedBatchNorm) for layer in _layers(default.model))
    assert np.allclose(default.model(x).numpy(), load_backbone(name, weights="none", input_size=48,
                                                               fold_bn=False).model(x).numpy(), rtol=0, atol=1e-4)


def test_bfloat16_folded_stays_near_unfolded():
    """With trained-looking statistics, the folded bfloat16 backbone stays as near the unfolded
    bfloat16 one as bfloat16 allows (well inside the export parity tolerance)."""
    plain = load_backbone("resnet50", weights="none", input_size=48, precision="bfloat16", fold_bn=False)
    _randomise_statistics(plain.model)
    folded, count = fold_batchnorm(plain.model)
    assert count == 53
    x = np.random.default_rng(2).uniform(0, 255, (3, 48, 48, 3)).astype(np.float32)
    a, b = np.asarray(plain.model(x), np.float32), np.asarray(folded(x), np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999
    assert load_backbone("resnet50", weights="none", input_size=48, precision="bfloat16").fingerprint == \
        plain.fingerprint


def test_seeded_builds_in_threads_match_a_solo_build():
    """Folding runs under the build lock: random-init backbones built in parallel threads (Beam's
    workers) get the weights of a build alone."""
    import threading

    solo = load_backbone("resnet50", weights="none", input_size=32).fingerprint
    got = []
    threads = [threading.Thread(target=lambda: got.append(load_backbone("resnet50", weights="none",
                                                                          input_size=32).fingerprint))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [solo] * 3


def test_only_exact_pairs_fold():
    """A conv read by two layers, a conv with its own activation, a normalisation over another axis,
    and a depthwise conv with a depth multiplier (which folds) in one model."""
    rng = np.random.default_rng(3)
    inputs = keras.Input((12, 12, 3))
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")(inputs)
    a = keras.layers.BatchNormalization(name="bn_shared")(shared)
    b = keras.layers.ReLU()(shared)  # a second reader: the BN cannot change the conv's output
    activated = keras.layers.Conv2D(4, 1, activation="relu", name="activated")(a + b)
    c = keras.layers.BatchNormalization(name="bn_activated")(activated)
    other_axis = keras.layers.Conv2D(4, 1, name="other_axis")(c)
    d = keras.layers.BatchNormalization(axis=1, name="bn_axis1")(other_axis)
    depthwise = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw")(d)
    e = keras.layers.BatchNormalization(center=False, name="bn_dw")(depthwise)
    model = keras.Model(inputs, e)
    _randomise_statistics(model)
    folded, count = fold_batchnorm(model)
    assert count == 1
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert kinds["bn_dw"] == "FoldedBatchNorm"
    assert all(kinds[n] == "BatchNormalization" for n in ("bn_shared", "bn_activated", "bn_axis1"))
    x = rng.uniform(-1, 1, (2, 12, 12, 3)).astype(np.float32)
    assert np.allclose(model(x).numpy(), folded(x).numpy(), rtol=1e-5, atol=1e-5)
    # nothing to fold (a functional model, and one that is not): the model itself comes back
    dense_in = keras.Input((4,))
    functional = keras.Model(dense_in, keras.layers.Dense(2)(dense_in))
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert fold_batchnorm(functional) == (functional, 0) and fold_batchnorm(sequential) == (sequential, 0)
    # a conv whose output is also a model output keeps it
    conv_out = keras.layers.Conv2D(3, 1, name="conv_out")(inputs)
    both = keras.Model(inputs, [conv_out, keras.layers.BatchNormalization()(conv_out)])
    assert fold_batchnorm(both)[1] == 0
