"""Heads: model, augmentations, training, determinism, TensorBoard, CLI."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from tests.helpers.emb_utils import blobs, make_embedding_dir

from dfl_tf.errors import DflError
from tests.helpers import REPO

FAST = dict(hidden=32, epochs=12, batch_size=64, patience=4, progress=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    X, y = blobs(300, 16, 2, sep=4.0, seed=0)
    y[:4] = -1  # unlabeled records are dropped with a note
    make_embedding_dir(root / "train", X, y, ["neg", "pos"])
    Xv, yv = blobs(150, 16, 2, sep=4.0, seed=1)
    make_embedding_dir(root / "val", Xv, yv, ["neg", "pos"])
    return root


@pytest.fixture(scope="module")
def trained(dirs):
    from dfl_tf import train_head

    summary = train_head(dirs / "train", dirs / "head", val=dirs / "val", seed=3, **FAST)
    return dirs / "head", summary


def test_separable_head_and_head_dir(trained, dirs):
    head, summary = trained
    assert summary["metrics"]["balanced_accuracy"] >= 0.9
    assert sorted(p.name for p in head.iterdir()) == ["head.json", "head.keras", "history.csv", "logs",
                                                      "metrics.json", "probe.npz"]
    info = json.loads((head / "head.json").read_text())
    assert info["classes"] == ["neg", "pos"] and info["views"] == ["x20:rgb"] and info["dim"] == 16
    assert info["backbone"]["fingerprint"] == "f" * 64
    assert len(info["standardisation"]["mean"]) == 16 and 0 < info["threshold"] < 1
    assert info["train"]["unlabeled_dropped"] == 4 and info["train"]["records"] == 296
    # 296 records: a small training set, so weight decay and noise std come from cross-validation
    # (hidden is given, so only weight decay x noise std: 6 candidates, and no probe fallback)
    choice = info["selection"]["choice"]
    assert info["selection"]["performed"] and len(info["selection"]["scores"]) == 6
    assert info["settings"]["augment"] == [{"name": "noise", "std": choice["noise"], "sampler": "table"}]
    assert info["settings"]["weight_decay"] == choice["weight_decay"] and info["settings"]["hidden"] == 32
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= 12 and info["seed"] == 3
    rows = list(csv.DictReader((head / "history.csv").open()))
    assert len(rows) == info["epochs_run"]
    assert {"loss", "val_loss", "val_balanced_accuracy", "learning_rate"} <= set(rows[0])
    best = float(rows[info["best_epoch"] - 1]["val_balanced_accuracy"])
    metrics = json.loads((head / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["balanced_accuracy"] == pytest.approx(best, abs=1e-6)
    assert metrics["positive_class"]["name"] == "pos" and "at_threshold" in metrics
    # head.keras is self-contained: raw embeddings in, the same probabilities as at training
    import keras

    from dfl_tf.store.shards import load_embeddings

    model = keras.saving.load_model(head / "head.keras", compile=False)
    val = load_embeddings(dirs / "val")
    from dfl_tf.heads.evaluate import compute_metrics

    again = compute_metrics(val.y, model.predict(val.X, verbose=0), ["neg", "pos"], info["threshold"])
    assert again["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])


def test_refuses_existing_head_dir(trained, dirs):
    from dfl_tf import train_head

    with pytest.raises(DflError, match="--overwrite"):
        train_head(dirs / "train", trained[0], val=dirs / "val", **FAST)


def test_determinism(dirs, tmp_path):
    import keras

    from dfl_tf import train_head

    opts = dict(FAST, epochs=4, patience=0, augment=[{"name": "mixup", "alpha": 0.3}, {"name": "feature-dropout"}])
    for name in ("a", "b"):
        train_head(dirs / "train", tmp_path / name, val=dirs / "val", seed=7, **opts)
    wa = keras.saving.load_model(tmp_path / "a" / "head.keras", compile=False).get_weights()
    wb = keras.saving.load_model(tmp_path / "b" / "head.keras", compile=False).get_weights()
    assert len(wa) == len(wb) and all(np.array_equal(a, b) for a, b in zip(wa, wb))
    assert (tmp_path / "a" / "metrics.json").read_bytes() == (tmp_path / "b" / "metrics.json").read_bytes()
    assert (tmp_path / "a" / "history.csv").read_bytes() == (tmp_path / "b" / "history.csv").read_bytes()


def test_noise_only_in_training():
    from dfl_tf.heads.augment import FeatureDropout, FeatureNoise, ScaledFeatureNoise
    from dfl_tf.heads.model import build_head

    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=8), rng.uniform(0.5, 2, size=8)
    plain = build_head(8, 3, hidden=4, mean=mean, std=std)
    kernel, bias = plain.get_layer("probabilities").get_weights()
    assert not kernel.any()  # the output kernel starts at zero: give it weights to see the noise
    plain.get_layer("probabilities").set_weights([rng.normal(size=kernel.shape), bias])
    noisy = build_head(8, 3, hidden=4, mean=mean, std=std, augment=[FeatureNoise(0.5), FeatureDropout(0.3)],
                       pre_augment=[ScaledFeatureNoise(8, 0.5, scale=std)])
    for name in ("hidden", "probabilities"):
        noisy.get_layer(name).set_weights(plain.get_layer(name).get_weights())
    x = rng.normal(size=(5, 8)).astype(np.float32)
    t1, t2 = noisy(x, training=True).numpy(), noisy(x, training=True).numpy()
    assert not np.allclose(t1, t2)
    i1, i2 = noisy(x, training=False).numpy(), noisy(x, training=False).numpy()
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(i1, plain(x, training=False).numpy(), rtol=1e-6, atol=1e-7)
    # each augmentation layer on its own
    for layer in (FeatureNoise(0.5), FeatureDropout(0.3), ScaledFeatureNoise(8, 0.5, scale=std)):
        np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
        assert not np.allclose(layer(x, training=True).numpy(), x)


def test_mixup_batch_is_convex():
    import tensorflow as tf

    from dfl_tf.heads.augment import mixup_batch

    x = tf.constant(np.arange(12, dtype=np.float32).reshape(6, 2))
    y = tf.one_hot([0, 1, 0, 1, 1, 0], 2)
    w = tf.ones([6])
    mx, my, mw = mixup_batch(x, y, w, tf.constant([1, 2], tf.int64), alpha=0.4)
    np.testing.assert_allclose(my.numpy().sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mw.numpy(), 1.0, rtol=1e-6)
    assert mx.numpy().min() >= 0 and mx.numpy().max() <= 11
    again = mixup_batch(x, y, w, tf.constant([1, 2], tf.int64), alpha=0.4)[0]
    np.testing.assert_array_equal(mx.numpy(), again.numpy())


def test_resolve_augment():
    from dfl_tf.heads.augment import resolve_augment

    T = "table"
    assert resolve_augment(None, None) == [{"name": "noise", "std": 0.1, "sampler": T}]
    assert resolve_augment(None, 0) == []
    assert resolve_augment([{"name": "noise", "std": 0.3}], None) == [{"name": "noise", "std": 0.3, "sampler": T}]
    assert resolve_augment([{"name": "noise", "std": 0.3}, "mixup"], 0.05) == [
        {"name": "noise", "std": 0.05, "sampler": T}, {"name": "mixup", "alpha": 0.2}]
    assert resolve_augment([{"name": "noise", "sampler": "exact"}], None) == [
        {"name": "noise", "std": 0.1, "sampler": "exact"}]
    with pytest.raises(DflError, match="sampler must be one of table, exact"):
        resolve_augment([{"name": "noise", "sampler": "philox"}], None)
    with pytest.raises(DflError, match="unknown augmentation"):
        resolve_augment([{"name": "rotate"}], None)
    with pytest.raises(DflError, match="no parameter"):
        resolve_augment([{"name": "mixup", "std": 1}], None)


@pytest.mark.parametrize("change", ["fingerprint", "views", "dim", "classes"])
def test_mismatched_manifests_refused(dirs, tmp_path, change):
    from dfl_tf import train_head

    X, y = blobs(20, 16, 2, seed=2)
    kwargs = dict(classes=["neg", "pos"])
    if change == "fingerprint":
        kwargs["fingerprint"] = "e" * 64
    elif change == "views":
        kwargs["views"] = ["x20:gray"]
    elif change == "dim":
        X = np.concatenate([X, X], axis=1)
    else:
        kwargs["classes"] = ["pos", "neg"]
    make_embedding_dir(tmp_path / "val", X, y, **kwargs)
    with pytest.raises(DflError, match="disagree on") as info:
        train_head(dirs / "train", tmp_path / "head", val=tmp_path / "val", **FAST)
    assert {"fingerprint": "backbone fingerprint", "views": "views", "dim": "dim",
            "classes": "classes"}[change] in str(info.value)
    assert not (tmp_path / "head").exists()


def test_streamed_pipeline(trained, dirs, tmp_path):
    """cache_gb=0: records streamed from the shards (plain and balanced sampling)."""
    from dfl_tf import train_head

    ref = json.loads((trained[0] / "head.json").read_text())["standardisation"]
    for name, balanced in (("plain", False), ("balanced", True)):
        summary = train_head(dirs / "train", tmp_path / name, val=dirs / "val", cache_gb=0,
                             balanced_sampling=balanced, **dict(FAST, epochs=2))
        info = json.loads((tmp_path / name / "head.json").read_text())
        assert info["settings"]["in_memory"] is False and info["train"]["records"] == 296
        np.testing.assert_allclose(info["standardisation"]["mean"], ref["mean"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(info["standardisation"]["std"], ref["std"], rtol=1e-5, atol=1e-5)
        assert summary["epochs_run"] == 2


def test_configs_parse():
    from dfl_tf.config import merge
    from dfl_tf.extraction.local import extract
    from dfl_tf.heads.augment import resolve_augment
    from dfl_tf.heads.train import train_head

    root = REPO / "configs"
    for name in ("lymph_nodes", "microcalcifications", "mitosis"):
        assert merge(extract, root / f"{name}.yaml", "extract", {})["views"]
        kwargs = merge(train_head, root / f"{name}.yaml", "train", {})
        assert resolve_augment(kwargs.get("augment"), kwargs.get("noise"))[0]["name"] == "noise"


def test_tensorboard_events(trained):
    import tensorflow as tf

    head, _ = trained
    tags: dict[str, set] = {"train": set(), "validation": set()}
    for split in tags:
        files = list((head / "logs" / split).glob("events.out.tfevents.*"))
        assert files
        for path in files:
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    tags[split].add(value.tag)
                    if value.tag == "epoch_loss":
                        assert np.isfinite(tf.make_ndarray(value.tensor))
                    if value.tag == "hidden/kernel":
                        assert value.metadata.plugin_data.plugin_name == "histograms"
                        assert tf.make_ndarray(value.tensor).shape == (30, 3)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "hidden/kernel",
            "probabilities/bias"} <= tags["train"]
    assert {"epoch_loss", "epoch_balanced_accuracy", "epoch_accuracy"} <= tags["validation"]


def test_class_imbalance(tmp_path):
    from dfl_tf import evaluate, train_head

    X, y = blobs(400, 8, 2, sep=1.5, seed=4, weights=[0.9, 0.1])
    make_embedding_dir(tmp_path / "train", X, y, ["neg", "pos"])
    Xv, yv = blobs(300, 8, 2, sep=1.5, seed=5, weights=[0.5, 0.5])
    make_embedding_dir(tmp_path / "val", Xv, yv, ["neg", "pos"])
    recall = {}
    for name, opts in (("none", {}), ("weights", {"class_weight": "balanced"}),
                       ("sampling", {"balanced_sampling": True})):
        # no --val: final weights (early stopping on a balanced validation set would hide the effect)
        train_head(tmp_path / "train", tmp_path / name, hidden=0, epochs=8, lr=1e-2, loss="crossentropy",
                   noise=0, batch_size=64, progress=False, **opts)
        recall[name] = evaluate(tmp_path / name, tmp_path / "val")["per_class"]["pos"]["recall"]
        info = json.loads((tmp_path / name / "head.json").read_text())
        assert info["settings"]["class_weight"] == opts.get("class_weight")
        assert info["settings"]["balanced_sampling"] == opts.get("balanced_sampling", False)
        assert json.loads((tmp_path / name / "metrics.json").read_text())["split"] == "train"
    assert recall["weights"] > recall["none"] + 0.1, recall
    assert recall["sampling"] > recall["none"] + 0.1, recall


def test_augmentations_train_and_are_inactive_at_inference(dirs, tmp_path):
    import keras

    from dfl_tf import train_head
    from dfl_tf.store.shards import load_embeddings

    augment = [{"name": "scaled-noise", "std": 0.2}, {"name": "feature-dropout", "rate": 0.2},
               {"name": "mixup", "alpha": 0.2}]
    train_head(dirs / "train", tmp_path / "h", val=dirs / "val", augment=augment, noise=0.05,
               **dict(FAST, epochs=3))
    info = json.loads((tmp_path / "h" / "head.json").read_text())
    assert [a["name"] for a in info["settings"]["augment"]] == ["noise", "scaled-noise", "feature-dropout",
                                                                "mixup"]
    model = keras.saving.load_model(tmp_path / "h" / "head.keras", compile=False)
    names = {layer.name for layer in model.layers}
    assert {"noise", "scaled_noise", "feature_dropout", "standardize"} <= names
    X = load_embeddings(dirs / "val").X[:32]
    np.testing.assert_array_equal(model(X, training=False).numpy(), model(X, training=False).numpy())
    np.testing.assert_array_equal(model.predict(X, verbose=0), model.predict(X, verbose=0))


def test_cli_train_and_evaluate(dirs, tmp_path):
    from click.testing import CliRunner

    from dfl_tf.cli import main

    config = tmp_path / "task.yaml"
    config.write_text(yaml.safe_dump({
        "extract": {"backbone": "resnet50"},
        "train": {"hidden": 16, "epochs": 5, "batch_size": 64, "patience": 3, "loss": "crossentropy",
                  "augment": [{"name": "noise", "std": 0.3}, {"name": "mixup", "alpha": 0.2}]}}))
    runner = CliRunner()
    args = ["train", str(dirs / "train"), "--val", str(dirs / "val"), "--out", str(tmp_path / "head"),
            "--config", str(config), "--epochs", "2", "--noise", "0.2", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output
    settings = json.loads((tmp_path / "head" / "head.json").read_text())["settings"]
    assert settings["epochs"] == 2 and settings["hidden"] == 16 and settings["loss"] == "crossentropy"
    assert settings["augment"] == [{"name": "noise", "std": 0.2, "sampler": "table"}, {"name": "mixup", "alpha": 0.2}]
    # an existing head directory is refused (one-line error, exit 2) unless --overwrite
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert runner.invoke(main, args + ["--overwrite", "--class-weight", "balanced"]).exit_code == 0
    assert json.loads((tmp_path / "head" / "head.json").read_text())["settings"]["class_weight"] == "balanced"
    result = runner.invoke(main, ["evaluate", str(tmp_path / "head"), str(dirs / "val"),
                                  "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert {"metrics.json", "report.md", "confusion_matrix.png", "pr_curves.png", "predictions.csv"} <= {
        p.name for p in (tmp_path / "report").iterdir()}
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  hiddn: 3\n")
    result = runner.invoke(main, ["train", str(dirs / "train"), "--out", str(tmp_path / "x"), "--config", str(bad)])
    assert result.exit_code == 2 and "unknown field 'hiddn'" in result.output
