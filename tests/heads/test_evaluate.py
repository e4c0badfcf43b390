"""evaluate(): numbers equal scikit-learn's on the same predictions; reports; refusals."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from tests.helpers.emb_utils import blobs, make_embedding_dir

from dfl_tf.errors import DflError


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    from dfl_tf import train_head

    root = tmp_path_factory.mktemp("eval")
    classes = ["tumor", "stroma", "lymph"]
    X, y = blobs(240, 12, 3, sep=2.5, seed=0)
    make_embedding_dir(root / "train", X, y, classes)
    Xt, yt = blobs(150, 12, 3, sep=2.5, seed=1)
    yt[:3] = -1
    make_embedding_dir(root / "test", Xt, yt, classes)
    train_head(root / "train", root / "head", val=root / "train", hidden=16, epochs=4, batch_size=64,
               patience=0, progress=False)
    return root, classes


def _predictions(head, emb):
    import keras

    from dfl_tf.store.shards import load_embeddings

    model = keras.saving.load_model(head / "head.keras", compile=False)
    data = load_embeddings(emb)
    keep = data.y >= 0
    return data.y[keep], model.predict(data.X[keep], verbose=0)


def test_evaluate_matches_sklearn(three_class, tmp_path):
    from dfl_tf import evaluate

    root, classes = three_class
    m = evaluate(root / "head", root / "test", tmp_path / "report")
    y, probs = _predictions(root / "head", root / "test")
    pred = probs.argmax(axis=1)
    assert m["num_records"] == 147 and m["unlabeled_records"] == 3
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["cohen_kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["recall_weighted"] == pytest.approx(skm.recall_score(y, pred, average="weighted"))
    assert m["roc_auc_macro_ovr"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), rel=1e-5)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for c, name in enumerate(classes):
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(skm.precision_score(y == c, pred == c))
        assert pc["recall"] == pytest.approx(skm.recall_score(y == c, pred == c))
        assert pc["f1"] == pytest.approx(skm.f1_score(y == c, pred == c))
        assert pc["average_precision"] == pytest.approx(skm.average_precision_score(y == c, probs[:, c]), rel=1e-5)
        assert pc["roc_auc"] == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]), rel=1e-5)
        assert pc["support"] == int((y == c).sum())
    assert "at_threshold" not in m and "positive_class" not in m
    out = tmp_path / "report"
    assert json.loads((out / "metrics.json").read_text())["balanced_accuracy"] == m["balanced_accuracy"]
    report = (out / "report.md").read_text()
    assert "## Per class" in report and "| lymph |" in report
    for png in ("confusion_matrix.png", "pr_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 150 and set(rows[0]) == {"id", "label", "predicted", "p_tumor", "p_stroma", "p_lymph"}
    assert sum(r["label"] == "" for r in rows) == 3


def test_binary_threshold_metrics(tmp_path):
    from dfl_tf import evaluate, train_head

    X, y = blobs(200, 8, 2, sep=2.0, seed=2, weights=[0.8, 0.2])
    make_embedding_dir(tmp_path / "train", X, y, ["normal", "mitosis"])
    Xv, yv = blobs(120, 8, 2, sep=2.0, seed=3, weights=[0.8, 0.2])
    make_embedding_dir(tmp_path / "val", Xv, yv, ["normal", "mitosis"])
    summary = train_head(tmp_path / "train", tmp_path / "head", val=tmp_path / "val", hidden=8, epochs=4,
                         batch_size=32, patience=0, progress=False)
    info = json.loads((tmp_path / "head" / "head.json").read_text())
    t = info["threshold"]
    y, probs = _predictions(tmp_path / "head", tmp_path / "val")
    # the stored threshold maximises F1 on validation
    best = max(skm.f1_score(y, probs[:, 1] >= c) for c in np.unique(probs[:, 1]))
    assert skm.f1_score(y, probs[:, 1] >= t) == pytest.approx(best)
    m = evaluate(tmp_path / "head", tmp_path / "val")
    at = m["at_threshold"]
    assert at["threshold"] == t
    assert at["f1"] == pytest.approx(skm.f1_score(y, probs[:, 1] >= t))
    assert at["recall"] == pytest.approx(skm.recall_score(y, probs[:, 1] >= t))
    assert m["positive_class"]["name"] == "mitosis"
    assert m["positive_class"]["average_precision"] == pytest.approx(skm.average_precision_score(y, probs[:, 1]),
                                                                     rel=1e-5)
    assert m["roc_auc_macro_ovr"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]), rel=1e-5)
    # metrics.json of the head directory comes from the same function
    saved = json.loads((tmp_path / "head" / "metrics.json").read_text())
    assert saved["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    assert saved["at_threshold"]["f1"] == pytest.approx(at["f1"])
    assert summary["threshold"] == t


@pytest.mark.parametrize("change", ["fingerprint", "views", "dim", "classes"])
def test_evaluate_refuses_incompatible(three_class, tmp_path, change):
    from dfl_tf import evaluate

    root, classes = three_class
    X, y = blobs(10, 12, 3, seed=4)
    kwargs = dict(classes=classes)
    if change == "fingerprint":
        kwargs["fingerprint"] = "0" * 64
    elif change == "views":
        kwargs["views"] = ["x20:rgb", "x5:rgb"]
    elif change == "dim":
        X = X[:, :10]
    else:
        kwargs["classes"] = ["tumor", "stroma", "fat"]
    make_embedding_dir(tmp_path / "emb", X, y, **kwargs)
    with pytest.raises(DflError, match="disagree on"):
        evaluate(root / "head", tmp_path / "emb", tmp_path / "report")
    assert not (tmp_path / "report").exists()
