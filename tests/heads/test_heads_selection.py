"""Heads at small n (issue 15), positive class and training fallbacks (issue 13), Keras built-ins
and old head directories (issue 18)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.helpers.emb_utils import blobs, make_embedding_dir

from dfl_tf.errors import DflError
from tests.helpers import FIXTURES, REPO

DATA = FIXTURES
QUIET = dict(progress=False, histogram_freq=0)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Small-n, high-dim, 3 classes, groups: a task where a linear probe is known to do well."""
    root = tmp_path_factory.mktemp("small")
    X, y = blobs(60, 256, 3, sep=3.0, seed=0)
    make_embedding_dir(root / "train", X, y, ["a", "b", "c"])
    Xt, yt = blobs(300, 256, 3, sep=3.0, seed=1)
    make_embedding_dir(root / "test", Xt, yt, ["a", "b", "c"])
    return root


@pytest.fixture(scope="module")
def small_head(small_set):
    from dfl_tf import train_head

    summary = train_head(small_set / "train", small_set / "head", seed=0, **QUIET)
    return small_set / "head", summary


def test_default_head_within_probe_at_small_n(small_set, small_head, tmp_path):
    from dfl_tf import evaluate

    head, summary = small_head
    info = json.loads((head / "head.json").read_text())
    assert info["selection"]["performed"] and summary["selection"]["choice"] == info["selection"]["choice"]
    assert len(info["selection"]["scores"]) == 12 and info["selection"]["folds"] == 5  # DEFAULT_GRID
    assert info["selection"]["choice"] in [{k: s[k] for k in ("hidden", "weight_decay", "noise")}
                                           for s in info["selection"]["scores"]] + [
        {"model": "linear probe", "C": info["linear_probe"]["C"]}]
    assert info["linear_probe"]["C_chosen_by"].startswith("cross-validation") and (head / "probe.npz").exists()
    m = evaluate(head, small_set / "test", tmp_path / "report")
    probe = m["linear_probe"]
    assert probe["balanced_accuracy"] > 0.8  # the probe is good here...
    assert m["balanced_accuracy"] >= probe["balanced_accuracy"] - 0.02  # ...and the default head keeps up
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["linear_probe"]["balanced_accuracy"] == pytest.approx(probe["balanced_accuracy"])
    assert saved["linear_probe"]["head_minus_probe_balanced_accuracy"] == pytest.approx(
        m["balanced_accuracy"] - probe["balanced_accuracy"])
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Head vs linear probe" in report and "| linear probe (C=" in report


def test_cv_folds_grouped_stratified_deterministic():
    from dfl_tf.heads.tuning import cv_folds

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    groups = [f"g{i % 17}" for i in range(120)]
    folds, method = cv_folds(y, groups, k=5, seed=3)
    assert "grouped" in method and len(folds) == 5
    seen: dict[str, int] = {}
    for f, (tr, va) in enumerate(folds):
        assert not set(tr) & set(va) and len(tr) + len(va) == 120
        for g in {groups[i] for i in va}:
            assert seen.setdefault(g, f) == f, f"group {g} in two folds"
        assert set(y[va]) == {0, 1, 2}  # stratified: every class in every held-out fold
    assert sorted(np.concatenate([va for _, va in folds]).tolist()) == list(range(120))
    again, _ = cv_folds(y, groups, k=5, seed=3)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again))
    other, _ = cv_folds(y, groups, k=5, seed=4)
    assert any(len(a[1]) != len(b[1]) or (a[1] != b[1]).any() for a, b in zip(folds, other))
    plain, method = cv_folds(y, None, k=4, seed=0)
    assert method == "4-fold stratified" and len(plain) == 4
    # one group (every tile from one slide): stratified folds, and the method says they are not grouped
    single, method = cv_folds(y, ["one"] * 120, k=5, seed=0)
    assert method == "5-fold stratified, not grouped (only 1 group)" and len(single) == 5
    with pytest.raises(DflError, match="at least 2 folds"):
        cv_folds(np.arange(3), ["one"] * 3, k=5)  # one record per class


def test_cv_folds_fall_back_to_stratified_when_groups_are_class_pure():
    """Grouped folds where a validation part holds a class its training part lacks (one region per
    class, as in the demo) cannot score that class: the folds become stratified, and method says why."""
    from dfl_tf.heads.tuning import cv_folds

    y = np.repeat([0, 1, 0], 40)
    groups = np.repeat(["tumour band", "stroma band", "normal band"], 40).tolist()
    folds, method = cv_folds(y, groups, k=3, seed=0)
    assert method.startswith("3-fold stratified, not grouped (grouped folds would leave a class out")
    for train, val in folds:
        assert set(y[val]) <= set(y[train]) and np.bincount(y[val]).min() >= 13
    mixed = np.repeat(["a", "b", "c", "d", "e", "f"], 20).tolist()  # every group holds both classes
    y_mixed = np.tile([0, 1], 60)
    _, method = cv_folds(y_mixed, mixed, k=3, seed=0)
    assert method == "3-fold stratified, grouped by group (6 groups)"


def test_selection_deterministic_under_seed(small_set):
    from dfl_tf.heads.tuning import cross_validate, cv_folds, grid_candidates
    from dfl_tf.store.shards import load_embeddings

    emb = load_embeddings(small_set / "train")
    folds, _ = cv_folds(emb.y, emb.groups, 3, seed=1)
    cands = grid_candidates({"noise": [0.1, 1.0]})
    kw = dict(hidden=8, weight_decay=1e-4, seed=1, epochs=5, batch_size=32)
    a = cross_validate(emb.X, emb.y, 3, folds, cands, [], **kw)
    b = cross_validate(emb.X, emb.y, 3, folds, cands, [], **kw)
    assert [s["folds"] for s in a["scores"]] == [s["folds"] for s in b["scores"]]


def test_batched_fits_match_keras(small_set):
    """The cross-validation trainer takes the same steps as train_head's Keras model (AdamW, focal loss)."""
    import keras

    from dfl_tf.heads.batched import fit_predict
    from dfl_tf.heads.model import build_head, standardisation
    from dfl_tf.heads.tuning import make_optimizer
    from dfl_tf.store.shards import load_embeddings

    emb = load_embeddings(small_set / "train")
    X, y = emb.X, emb.y
    mean, std = standardisation(X)
    keras.utils.set_random_seed(0)
    model = build_head(X.shape[1], 3, 8, mean=mean, std=std)
    kernel, bias = model.get_layer("probabilities").get_weights()
    model.get_layer("probabilities").set_weights([np.random.default_rng(0).normal(0, 0.1, kernel.shape), bias])
    start = [w[None] for w in (model.get_layer("hidden").get_weights()[0],
                               model.get_layer("probabilities").get_weights()[0],
                               model.get_layer("hidden").get_weights()[1],
                               model.get_layer("probabilities").get_weights()[1])]
    model.compile(optimizer=make_optimizer(1e-2, 0.5), loss=keras.losses.CategoricalFocalCrossentropy())
    model.fit(X, np.eye(3, dtype=np.float32)[y], batch_size=len(y), epochs=4, shuffle=False, verbose=0)
    ours = fit_predict(X, y, 3, [np.arange(len(y))], [np.arange(len(y))], hidden=8, noise=[0.0], weight_decay=[0.5],
                       lr=1e-2, epochs=4, batch_size=len(y), init_weights=start)[0]
    np.testing.assert_allclose(ours, model.predict(X, verbose=0), atol=2e-4)


def test_old_head_dir_still_evaluates(tmp_path):
    """A head directory saved before the built-in layers and the probe: loads, same outputs, evaluates."""
    from dfl_tf import evaluate
    from dfl_tf.heads.model import load_head

    head = tmp_path / "old_head"
    shutil.copytree(DATA / "old_head", head)
    model, info = load_head(head)
    np.testing.assert_allclose(model.predict(np.load(head / "inputs.npy"), verbose=0), np.load(head / "probs.npy"),
                               atol=1e-6)
    X, y = blobs(60, 8, 3, seed=0)
    make_embedding_dir(tmp_path / "emb", X, y, ["a", "b", "c"])
    m = evaluate(head, tmp_path / "emb", tmp_path / "report")
    assert m["linear_probe"] is None and m["num_records"] == 60
    assert "No linear probe" in (tmp_path / "report" / "report.md").read_text()


def test_head_loads_with_plain_keras(small_head):
    """head.keras uses Keras built-ins only: loadable without importing dfl_tf (issue 18/19)."""
    head, _ = small_head
    layers = json.loads(__import__("zipfile").ZipFile(head / "head.keras").read("config.json"))["config"]["layers"]
    assert {layer["class_name"] for layer in layers} <= {"InputLayer", "Normalization", "GaussianNoise", "Dense"}
    code = ("import sys, numpy as np, keras; m = keras.saving.load_model(sys.argv[1]); "
            "assert not any(k.startswith('dfl_tf') for k in sys.modules); "
            "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0))")
    X = blobs(5, 256, 3, seed=5)[0]
    np.save(head.parent / "x.npy", X)
    subprocess.run([sys.executable, "-c", code, str(head / "head.keras"), str(head.parent / "p.npy"),
                    str(head.parent / "x.npy")], check=True, cwd="/", capture_output=True,
                   env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    from dfl_tf.heads.model import load_head

    model, _ = load_head(head)
    np.testing.assert_allclose(np.load(head.parent / "p.npy"), model.predict(X, verbose=0), atol=1e-6)


def test_mitosis_config_makes_mitosis_positive(tmp_path):
    from click.testing import CliRunner

    from dfl_tf import evaluate
    from dfl_tf.cli import main
    from dfl_tf.serve.heatmap import _geojson

    assert yaml.safe_load((REPO / "configs" / "mitosis.yaml").read_text())["train"][
        "positive_class"] == "mitosis"
    classes = ["mitosis", "non-mitosis"]  # alphabetical: mitosis is index 0
    X, y = blobs(80, 8, 2, sep=3.0, seed=2, weights=[0.3, 0.7])
    make_embedding_dir(tmp_path / "train", X, y, classes)
    Xv, yv = blobs(60, 8, 2, sep=3.0, seed=3, weights=[0.3, 0.7])
    make_embedding_dir(tmp_path / "val", Xv, yv, classes)
    result = CliRunner().invoke(main, ["train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--out",
                                       str(tmp_path / "head"), "--config", "configs/mitosis.yaml", "--epochs", "3",
                                       "--hidden", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "head" / "head.json").read_text())
    assert info["positive_class"] == "mitosis" and info["threshold_tuned"]
    m = evaluate(tmp_path / "head", tmp_path / "val")
    assert m["positive_class"]["name"] == "mitosis" and m["positive_class"]["index"] == 0
    from dfl_tf.heads.model import load_head

    from dfl_tf.store.shards import load_embeddings

    model, _ = load_head(tmp_path / "head")
    p = model.predict(load_embeddings(tmp_path / "val").X, verbose=0)  # stored as float16
    t = info["threshold"]
    assert m["at_threshold"]["recall"] == pytest.approx(((p[:, 0] >= t) & (yv == 0)).sum() / (yv == 0).sum())
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    geo = _geojson(np.zeros((3, 2)), 10.0, probs, classes, 0.5, "mit", "mitosis")
    assert [f["properties"]["classification"]["name"] for f in geo["features"]] == ["mitosis", "mitosis"]
    with pytest.raises(DflError, match="positive_class 'tumour' is not a class"):
        from dfl_tf import train_head

        train_head(tmp_path / "train", tmp_path / "h2", positive_class="tumour", **QUIET)


def test_no_val_threshold_untuned_and_nan_monitor_falls_back(tmp_path, capfd):
    from dfl_tf import train_head

    X, y = blobs(80, 8, 2, sep=3.0, seed=4)
    make_embedding_dir(tmp_path / "train", X, y, ["neg", "pos"])
    train_head(tmp_path / "train", tmp_path / "h1", hidden=4, epochs=2, select="never", **QUIET)
    info = json.loads((tmp_path / "h1" / "head.json").read_text())
    assert info["threshold"] == 0.5 and info["threshold_tuned"] is False and "not tuned" in info["threshold_chosen_by"]
    assert info["selection"] == {"performed": False, "reason": "select=never"}
    Xv, yv = blobs(20, 8, 2, sep=3.0, seed=5)
    make_embedding_dir(tmp_path / "val", Xv, np.zeros_like(yv), ["neg", "pos"])  # no 'pos': ROC-AUC undefined
    capfd.readouterr()
    train_head(tmp_path / "train", tmp_path / "h2", val=tmp_path / "val", hidden=4, epochs=3, patience=1,
               monitor="val_roc_auc", select="never", **QUIET)
    assert "warning: monitored metric val_roc_auc is undefined" in capfd.readouterr().err
    info = json.loads((tmp_path / "h2" / "head.json").read_text())
    assert info["monitor"] == "val_loss" and "val_roc_auc" in info["monitor_fallback"]
    assert info["best_value"] is not None  # early stopping / best weights on val_loss


def test_non_finite_embeddings_refused(tmp_path):
    from dfl_tf import train_head

    X, y = blobs(40, 8, 2, seed=6)
    X[17, 3] = np.nan
    make_embedding_dir(tmp_path / "train", X, y, ["neg", "pos"], dtype="float32", shard_size=16)
    with pytest.raises(DflError, match="record 's000017' in shard shard-00001.tfrecord has a non-finite"):
        train_head(tmp_path / "train", tmp_path / "h", hidden=4, epochs=1, **QUIET)
    assert not (tmp_path / "h").exists()


def test_regularisation_options_validated(small_set, tmp_path):
    from dfl_tf import train_head

    for kwargs, match in (({"weight_decay": -1}, "weight_decay must be >= 0"), ({"select": "sometimes"}, "select"),
                          ({"noise": 2.0}, r"noise std must be in \[0, 1\]"),
                          ({"cv_grid": {"lr": [1]}}, "unknown key"),
                          ({"positive_class": "a"}, "two-class tasks")):
        with pytest.raises(DflError, match=match):
            train_head(small_set / "train", tmp_path / "h", **kwargs, **QUIET)
    # given values are not overridden by the selection
    train_head(small_set / "train", tmp_path / "h", hidden=8, epochs=2, noise=0.3, cv_folds=3, **QUIET)
    info = json.loads((tmp_path / "h" / "head.json").read_text())
    assert info["settings"]["augment"] == [{"name": "noise", "std": 0.3, "sampler": "table"}]
    assert [set(s) - {"mean", "std", "folds"} for s in info["selection"]["scores"]] == [{"weight_decay"}] * 2
