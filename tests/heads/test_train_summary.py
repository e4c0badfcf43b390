"""Every summary line ``dfl train`` prints, through the CLI (issue 28): no selection, a head chosen,
the linear probe chosen (it crashed the summary once), by cross-validation and on ``--val``, with and
without the two-class threshold and the linear probe's C."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers.emb_utils import blobs, make_embedding_dir
from tests.helpers.hostile_utils import run_dfl

NUM = r"\d+\.\d{4}"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """Small separable stores: two classes (train/val) and three classes (train/val), dim 16."""
    root = tmp_path_factory.mktemp("summary")
    for name, n, C, seed in (("two", 60, 2, 0), ("two_val", 40, 2, 1), ("three", 60, 3, 2), ("three_val", 45, 3, 3)):
        X, y = blobs(n, 16, C, sep=4.0, seed=seed)
        make_embedding_dir(root / name, X, y, ["neg", "pos"] if C == 2 else ["a", "b", "c"])
    # one small grid: selection runs fast; hidden is in it, so the linear probe competes
    (root / "grid.yaml").write_text(yaml.safe_dump({"train": {"cv_grid": {"hidden": [4], "weight_decay": [1e-4],
                                                                         "noise": [0.1, 0.5]}}}, sort_keys=False))
    return root


def train(stores: Path, tmp_path: Path, train_set: str, *args: str):
    """``dfl train`` on one store; (summary line, head.json)."""
    out = tmp_path / "head"
    result = run_dfl(["train", stores / train_set, "--out", out, "--epochs", "2", "--batch-size", "16",
                      "--no-progress", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(f"-> {out}"), result.stdout
    return lines[0], json.loads((out / "head.json").read_text())


def test_no_selection_two_classes_threshold_and_probe(stores, tmp_path):
    line, info = train(stores, tmp_path, "two", "--val", stores / "two_val", "--select", "never", "--hidden", "4")
    assert re.fullmatch(rf"best epoch [12]/2: validation balanced accuracy {NUM}, threshold {NUM}; "
                        rf"linear probe C [\d.e+-]+ -> .*", line), line
    assert info["selection"] == {"performed": False, "reason": "select=never"}
    assert f"linear probe C {info['linear_probe']['C']:g} " in line
    assert f"threshold {info['threshold']:.4f};" in line


def test_no_selection_three_classes_no_threshold_no_probe(stores, tmp_path):
    line, info = train(stores, tmp_path, "three", "--select", "never", "--hidden", "4", "--no-probe")
    assert re.fullmatch(rf"best epoch 2/2: train balanced accuracy {NUM} -> .*", line), line
    assert info["threshold"] is None and info["linear_probe"] is None


def test_cross_validation_chose_a_head(stores, tmp_path):
    # --hidden given: only noise is selected (weight decay fixed by the grid), the probe cannot win
    line, info = train(stores, tmp_path, "three", "--hidden", "4", "--cv-folds", "2", "--config", stores / "grid.yaml")
    sel = info["selection"]
    assert sel["performed"] and sel["method"].startswith("2-fold stratified") and sel["folds"] == 2
    noise = sel["choice"]["noise"]
    assert sel["choice"] == {"weight_decay": 1e-4, "noise": noise} and noise in (0.1, 0.5)
    assert re.fullmatch(rf"best epoch 2/2: train balanced accuracy {NUM}; cross-validation chose "
                        rf"weight_decay 0\.0001, noise {noise:g}; linear probe C [\d.e+-]+ -> .*", line), line
    assert info["linear_probe"]["C_chosen_by"].startswith("cross-validation")


def test_cross_validation_chose_the_probe(stores, tmp_path):
    """An untrainable head (lr 1e-7, 2 epochs: chance level) loses to the probe: the summary names the probe
    and its C (this path once crashed formatting the choice with :g)."""
    line, info = train(stores, tmp_path, "three", "--lr", "1e-7", "--cv-folds", "2", "--config",
                       stores / "grid.yaml")
    sel = info["selection"]
    C = info["linear_probe"]["C"]
    assert sel["choice"] == {"model": "linear probe", "C": C} and sel["linear_probe_cv"] > 0.9
    assert re.fullmatch(rf"best epoch 0/0: train balanced accuracy {NUM}; cross-validation chose the linear "
                        rf"probe \(C {C:g}\); linear probe C {C:g} -> .*", line), line


def test_selection_on_validation_chose_a_head(stores, tmp_path):
    line, info = train(stores, tmp_path, "two", "--val", stores / "two_val", "--hidden", "4",
                       "--config", stores / "grid.yaml")
    sel = info["selection"]
    assert sel["performed"] and sel["method"] == "validation" and sel["validation_records"] == 40
    assert sel["records"] == 60 and "folds" not in sel
    assert [set(s) for s in sel["scores"]] == [{"weight_decay", "noise", "validation"}] * 2
    noise = sel["choice"]["noise"]
    assert re.fullmatch(rf"best epoch [12]/2: validation balanced accuracy {NUM}, threshold {NUM}; selection on "
                        rf"validation \(40 records\) chose weight_decay 0\.0001, noise {noise:g}; linear probe C "
                        rf"[\d.e+-]+ -> .*", line), line
    assert info["linear_probe"]["C_chosen_by"] == "validation set"
    assert sel["linear_probe_validation"] == max(s["mean"] for s in info["linear_probe"]["scores"])


def test_selection_on_validation_chose_the_probe_without_probe_file(stores, tmp_path):
    line, info = train(stores, tmp_path, "three", "--val", stores / "three_val", "--lr", "1e-7", "--no-probe",
                       "--config", stores / "grid.yaml")
    sel = info["selection"]
    assert sel["method"] == "validation" and sel["choice"]["model"] == "linear probe"
    C = sel["choice"]["C"]
    # --no-probe: the head is the probe, but no reference is stored or printed
    assert info["linear_probe"] is None and not (tmp_path / "head" / "probe.npz").exists()
    assert re.fullmatch(rf"best epoch 0/0: validation balanced accuracy {NUM}; selection on validation "
                        rf"\(45 records\) chose the linear probe \(C {C:g}\) -> .*", line), line
    assert float(re.search(NUM, line).group()) > 0.9  # the probe's weights, not an untrained head


def test_describe_choice_any_value():
    from dfl_tf.cli import _describe_choice

    assert _describe_choice({"model": "linear probe", "C": 0.01}) == "the linear probe (C 0.01)"
    assert _describe_choice({"hidden": 0, "noise": None, "mode": "x", "flag": True}) == \
        "hidden 0, noise none, mode x, flag True"
    assert _describe_choice({"model": "linear probe"}) == "the linear probe"
    assert np.isclose(float(_describe_choice({"weight_decay": 1e-4}).split()[1]), 1e-4)
