"""Fine-tuning baseline: runs end to end, writes model, metrics (with wall time) and history."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tests.helpers.tiny import write_images
from dfl_tf import finetune
from dfl_tf.backbones.registry import BackboneSpec, register
from dfl_tf.cli import main
from dfl_tf.errors import DflError
from dfl_tf.baselines.finetune import augment_image


def _tiny_cnn(input_size, weights):
    """A tiny registry-style backbone (float32 [0, 255] -> pooled features) for fast tests."""
    import keras

    inputs = keras.Input((input_size, input_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="dfltest_tiny_cnn")


register(BackboneSpec(name="dfltest_tiny_cnn", builder=_tiny_cnn, input_size=32, dim=8))


def test_finetune_writes_metrics_history_model(tmp_path):
    data = write_images(tmp_path / "data", per_class=8, size=(36, 40))
    out = tmp_path / "ft"
    m = finetune(data, out, backbone="dfltest_tiny_cnn", weights="none", input_size=32, epochs=2,
                 batch_size=4, lr=1e-3, progress=False)
    assert m["wall_seconds"] > 0 and m["train_seconds"] > 0 and m["epochs_run"] == 2
    assert 1 <= m["best_epoch"] <= 2 and m["num_records"] == 4
    for key in ("balanced_accuracy", "cohen_kappa", "f1_weighted", "confusion_matrix"):
        assert key in m
    assert json.loads((out / "metrics.json").read_text())["wall_seconds"] == m["wall_seconds"]
    # fine-tuning trains the backbone's normalisation: it is not folded into the convolution
    import keras

    saved = keras.saving.load_model(out / "model.keras")
    bns = [layer for layer in saved.get_layer("dfltest_tiny_cnn").layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 1 and float(np.abs(bns[0].moving_mean.numpy()).max()) > 0  # and it moved
    with open(out / "history.csv") as fh:
        hist = list(csv.DictReader(fh))
    assert len(hist) == 2 and {"loss", "val_loss", "val_balanced_accuracy"} <= set(hist[0])
    assert (out / "model.keras").stat().st_size > 1000
    info = json.loads((out / "finetune.json").read_text())
    assert info["trainable_params"] > 200 and info["split"]["train"] == 12 and info["split"]["val"] == 4
    assert info["settings"]["augment"][:2] == ["flip", "rot90"]

    with pytest.raises(DflError, match="already holds a fine-tuning folder.*--overwrite"):
        finetune(data, out, backbone="dfltest_tiny_cnn", weights="none", input_size=32, epochs=1,
                 progress=False)
    with pytest.raises(DflError, match="one view"):
        finetune(data, tmp_path / "ft2", views="x20:rgb,x5:rgb", progress=False)


def test_augment_image_shapes_and_range():
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (16, 16, 3)), tf.float32)
    a = augment_image(x, tf.constant([1, 2], tf.int64))
    b = augment_image(x, tf.constant([1, 2], tf.int64))
    assert a.shape == (16, 16, 3) and float(tf.reduce_min(a)) >= 0 and float(tf.reduce_max(a)) <= 255
    np.testing.assert_allclose(a.numpy(), b.numpy())  # stateless: same seed, same result
    assert not np.allclose(a.numpy(), augment_image(x, tf.constant([3, 4], tf.int64)).numpy())


def test_finetune_cli_help():
    result = CliRunner().invoke(main, ["finetune", "--help"])
    assert result.exit_code == 0 and "--augment" in result.output


def test_finetune_cli_and_saved_model_loads(tmp_path):
    import keras

    data = write_images(tmp_path / "data", per_class=6, size=(32, 32))
    out = tmp_path / "ft"
    result = CliRunner().invoke(main, ["finetune", str(data), "--out", str(out), "--backbone", "dfltest_tiny_cnn",
                                       "--weights", "none", "--input-size", "32", "--epochs", "1",
                                       "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output and "wall" in result.output
    model = keras.saving.load_model(out / "model.keras", compile=False)
    probs = model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
