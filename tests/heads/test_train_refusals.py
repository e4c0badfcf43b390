"""``dfl train`` refuses, in one line naming the culprit, what it used to accept or crash on (issue 29):
numeric options out of range (flag or ``--config``), a head too large for memory, a class without records."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers.emb_utils import blobs, make_embedding_dir
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl, snapshot

#: (flag, value, what the message says): values outside the documented ranges
OUT_OF_RANGE = [
    ("noise", "-0.5", "noise std must be in [0, 1]"), ("noise", "1.5", "noise std must be in [0, 1]"),
    ("dropout", "1", "dropout must be in [0, 1)"), ("dropout", "-0.1", "dropout must be in [0, 1)"),
    ("epochs", "0", "epochs must be >= 1"), ("batch-size", "0", "batch_size must be >= 1"),
    ("hidden", "-1", "hidden must be >= 0"), ("patience", "-1", "patience must be >= 0"),
    ("cv-folds", "1", "cv_folds must be >= 2"), ("weight-decay", "-1", "weight_decay must be >= 0"),
    ("lr", "0", "lr must be > 0"), ("lr", "nan", "lr must be > 0"), ("gamma", "-1", "gamma must be >= 0"),
    ("alpha", "1.5", "alpha must be in [0, 1]"), ("alpha", "-0.1", "alpha must be in [0, 1]"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refusals")
    X, y = blobs(40, 16, 2, seed=0)
    make_embedding_dir(root / "train", X, y, ["neg", "pos"])
    make_embedding_dir(root / "gap", X, y, ["neg", "pos", "empty"])  # a class without records
    return root


def refused(store: Path, tmp_path: Path, args, *culprits: str, epochs: bool = True) -> str:
    """Run ``dfl train ARGS`` (1 epoch unless ``epochs`` is False); one line, exit 2, nothing written."""
    before = snapshot(store)
    result = run_dfl(["train", "--out", tmp_path / "head", "--no-progress", *(["--epochs", "1"] if epochs else []),
                      *args])
    line = assert_one_line_error(result, *culprits)
    assert not (tmp_path / "head").exists() and snapshot(store) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".head")]
    return line


@pytest.mark.parametrize("flag,value,message", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v, _ in OUT_OF_RANGE])
def test_out_of_range_flag_refused(store, tmp_path, flag, value, message):
    refused(store, tmp_path, [store / "train", f"--{flag}", value], message, f"--{flag}", value)


@pytest.mark.parametrize("flag,value,message", OUT_OF_RANGE[::2], ids=[f"{f}={v}" for f, v, _ in OUT_OF_RANGE[::2]])
def test_out_of_range_config_refused(store, tmp_path, flag, value, message):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {flag.replace("-", "_"): yaml.safe_load(value)}}))
    refused(store, tmp_path, [store / "train", "--config", config], message, f"--{flag}", epochs=flag != "epochs")


def test_head_too_large_for_memory_refused(store, tmp_path, monkeypatch):
    import dfl_tf.heads.inputs as inputs

    # a size no machine has: refused before TensorFlow allocates anything (it was an OOM traceback)
    line = refused(store, tmp_path, [store / "train", "--hidden", str(10 ** 12)], "--hidden 1000000000000",
                   "needs at least", "GB of memory")
    need = inputs.head_memory(16, 2, 10 ** 12, 256)
    assert need > 1e15 and f"needs at least {need / 1e9:.3g} GB" in line
    # 100,000 hidden units on 16-dim embeddings, batch 256
    one = inputs.head_memory(16, 2, 100_000, 256)
    assert one == 4 * (4 * (16 * 100_000 + 100_000 + 2 * 100_000 + 2) + 256 * 100_002 * 2)
    monkeypatch.setattr(inputs, "available_memory", lambda: one - 1)
    line = refused(store, tmp_path, [store / "train", "--hidden", "100000", "--select", "never"], "--hidden 100000")
    assert f"needs at least {one / 1e9:.3g} GB" in line and f"{(one - 1) / 1e9:.3g} GB is available" in line
    # the final head fits, the selection's heads trained together (3 noise values x 2 folds) do not
    monkeypatch.setattr(inputs, "available_memory", lambda: one + 1)
    refused(store, tmp_path, [store / "train", "--hidden", "100000", "--cv-folds", "2", "--weight-decay", "0",
                              "--select", "always"], "--hidden 100000", "selection (6 heads of hidden 100000")


@pytest.mark.parametrize("select", ["auto", "always", "never"])
def test_class_without_records_refused_whatever_select(store, tmp_path, select):
    line = refused(store, tmp_path, [store / "gap", "--select", select, "--hidden", "4"], "'empty'", "gap")
    assert "no labeled training records" in line and "empty 0" in line


def test_non_number_refused_in_one_line(store, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {"lr": "fast"}}))
    refused(store, tmp_path, [store / "train", "--config", config], "train.yaml", "'lr' must be a number", "'fast'")
