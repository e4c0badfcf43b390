"""Slide heads end to end through the CLI: dfl train --slide-labels, dfl evaluate --slide-labels,
dfl export refusing a slide head (dfl_tf/heads/slide/train.py, evaluate.py)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.helpers.emb_utils import make_bags, make_embedding_dir
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl

DIM = 16


def _store(path, n_bags: int, seed: int, prefix: str, labels: list[str]) -> np.ndarray:
    """A slide store of synthetic bags (slides ``/data/{prefix}{b}.svs``); appends label rows; returns is_tumour."""
    X, bag, tum, lab = make_bags(n_bags, DIM, seed=seed, shift=4.0, nuisance=0.25)
    ids = [f"{'t' if t else 'n'}{i}" for i, t in enumerate(tum)]
    xy = np.stack([np.arange(len(bag)) * 10, np.arange(len(bag)) * 20], axis=1)
    make_embedding_dir(path, X, -np.ones(len(bag)), ["a", "b"], ids=ids,
                       slides=[f"/data/{prefix}{b}.svs" for b in bag], xy=xy)
    labels += [f"{prefix}{b},{'tumour' if l else 'normal'}" for b, l in enumerate(lab)]
    return tum


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    labels = ["slide,label"]
    _store(root / "train", 60, 0, "tr", labels)
    _store(root / "val", 30, 1, "va", labels)
    _store(root / "test", 40, 2, "te", labels)
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return root


def _train(cohort, out, *extra):
    return run_dfl(["train", cohort / "train", "--val", cohort / "val", "--slide-labels", cohort / "labels.csv",
                    "--out", out, "--epochs", "20", "--lr", "0.005", "--max-instances", "32", "--no-progress",
                    *extra])


def test_abmil_separates_tumour_bags_where_mean_pooling_does_worse(cohort, tmp_path):
    auc = {}
    for agg in ("abmil", "mean"):
        r = _train(cohort, tmp_path / agg, "--aggregator", agg)
        assert r.exit_code == 0, r.output
        assert f"slide head ({agg}), 60 training slides, best epoch" in r.stdout
        assert "mean-pool linear probe" in r.stdout
        info = json.loads((tmp_path / agg / "head.json").read_text())
        assert info["kind"] == "slide" and info["aggregator"] == agg and info["classes"] == ["normal", "tumour"]
        assert info["bags"]["max_instances"] == 32 and info["backbone"]["fingerprint"] == "f" * 64
        metrics = json.loads((tmp_path / agg / "metrics.json").read_text())
        assert metrics["level"] == "slide" and metrics["num_records"] == 30 and "C" in metrics["linear_probe"]
        assert (tmp_path / agg / "history.csv").read_text().startswith("epoch,loss")
        r = run_dfl(["evaluate", tmp_path / agg, cohort / "test", "--slide-labels", cohort / "labels.csv",
                     "--out", tmp_path / f"eval_{agg}"])
        assert r.exit_code == 0, r.output
        assert r.stdout.startswith("40 slides: balanced accuracy")
        auc[agg] = json.loads((tmp_path / f"eval_{agg}" / "metrics.json").read_text())["roc_auc_macro_ovr"]
    assert auc["abmil"] >= 0.95 and auc["abmil"] > auc["mean"], auc
    with open(tmp_path / "eval_abmil" / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    assert len(preds) == 40 and preds[0]["slide"] == "/data/te0.svs"
    with open(tmp_path / "eval_abmil" / "attention.csv") as fh:
        att = list(csv.DictReader(fh))
    assert set(att[0]) == {"slide", "id", "x", "y", "attention"}
    by_slide: dict[str, list] = {}
    for row in att:
        by_slide.setdefault(row["slide"], []).append(row)
    assert abs(sum(float(r["attention"]) for r in by_slide["/data/te0.svs"]) - 1) < 1e-4
    hits = total = 0
    for slide, rows in by_slide.items():
        k = sum(r["id"].startswith("t") for r in rows)
        if k:  # a tumour bag: its k highest-attention instances are mostly the tumour ones
            top = sorted(rows, key=lambda r: -float(r["attention"]))[:k]
            hits, total = hits + sum(r["id"].startswith("t") for r in top), total + k
    assert hits / total >= 0.7, (hits, total)


def test_same_seed_same_head_and_bags_larger_than_max_instances(cohort, tmp_path):
    probs = []
    for name in ("a", "b"):
        r = run_dfl(["train", cohort / "train", "--slide-labels", cohort / "labels.csv", "--out", tmp_path / name,
                     "--epochs", "2", "--max-instances", "8", "--seed", "3", "--no-progress"])
        assert r.exit_code == 0, r.output
        assert "train balanced accuracy" in r.stdout  # no --val: metrics on the training bags
        r = run_dfl(["evaluate", tmp_path / name, cohort / "val", "--slide-labels", cohort / "labels.csv",
                     "--out", tmp_path / f"eval_{name}"])
        assert r.exit_code == 0, r.output
        probs.append((tmp_path / f"eval_{name}" / "predictions.csv").read_text())
    assert probs[0] == probs[1]
    attention = (tmp_path / "eval_a" / "attention.csv").read_text().splitlines()
    records = json.loads((cohort / "val" / "manifest.json").read_text())["num_records"]
    assert len(attention) == records + 1  # every instance of every bag (20-40 each, > 8) is evaluated


def test_label_csv_matching_no_slide_names_both_sides(cohort, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("slide,label\nslideA,tumour\nslideB,normal\n")
    r = run_dfl(["train", cohort / "train", "--slide-labels", bad, "--out", tmp_path / "h"])
    assert_one_line_error(r, "none of its 60 slides matches", "/data/tr0.svs", "slideA")
    assert not (tmp_path / "h").exists()
    one_class = tmp_path / "one_class.csv"  # training slides all normal, the tumour slides elsewhere
    one_class.write_text("slide,label\n" + "".join(f"tr{b},normal\n" for b in range(60)) + "va0,tumour\n")
    r = run_dfl(["train", cohort / "train", "--slide-labels", one_class, "--out", tmp_path / "h"])
    assert_one_line_error(r, "'tumour'", "no slide in the training store", "normal 60, tumour 0")


def test_slide_head_export_refused_and_evaluate_needs_labels(cohort, tmp_path):
    r = run_dfl(["train", cohort / "train", "--slide-labels", cohort / "labels.csv", "--out", tmp_path / "h",
                 "--epochs", "1", "--aggregator", "max", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert_one_line_error(run_dfl(["export", tmp_path / "h", "--out", tmp_path / "m"]), "cannot be exported yet")
    assert_one_line_error(run_dfl(["evaluate", tmp_path / "h", cohort / "val"]), "give --slide-labels")
    other = tmp_path / "other.csv"
    other.write_text("slide,label\nva0,benign\nva1,tumour\n")
    r = run_dfl(["evaluate", tmp_path / "h", cohort / "val", "--slide-labels", other])
    assert_one_line_error(r, "['benign']", "are not classes of head")


def test_one_class_validation_prints_no_auc(cohort, tmp_path):
    labels = tmp_path / "labels.csv"  # validation slides: only the normal ones are labeled
    labels.write_text("slide,label\n" + "".join(f"tr{b},{'tumour' if b % 2 else 'normal'}\n" for b in range(60))
                      + "".join(f"va{b},normal\n" for b in range(0, 30, 2)))
    r = run_dfl(["train", cohort / "train", "--val", cohort / "val", "--slide-labels", labels, "--out",
                 tmp_path / "h", "--epochs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "validation balanced accuracy" in r.stdout and "ROC-AUC -;" in r.stdout and r.stdout.count("ROC-AUC -") == 2
    assert "15 slides without a label" in r.stderr
    r = run_dfl(["evaluate", tmp_path / "h", cohort / "val", "--slide-labels", labels])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith("15 slides: balanced accuracy") and r.stdout.strip().endswith("ROC-AUC -")
