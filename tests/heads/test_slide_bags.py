"""Bags and slide labels (dfl_tf/heads/slide/bags.py) and the slide head's layers (model.py)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from dfl_tf.errors import DflError
from dfl_tf.heads.slide.bags import load_bags, read_slide_labels
from dfl_tf.heads.slide.model import build_slide_head
from tests.helpers.emb_utils import make_embedding_dir


def test_image_source_bags_by_group_with_unlabeled_and_unknown_slides(tmp_path, capsys):
    rng = np.random.default_rng(0)
    groups = [f"case{i % 5}" for i in range(50)]
    make_embedding_dir(tmp_path / "emb", rng.normal(size=(50, 4)), np.zeros(50), ["a", "b"], groups=groups)
    labels = tmp_path / "labels.csv"  # case4 has no label; case9 is not in the store
    labels.write_text("slide,label,patient\ncase0,pos,p0\ncase1,neg,p0\ncase2,pos,p1\ncase3,neg,p2\ncase9,pos,p3\n")
    bags = load_bags(tmp_path / "emb", read_slide_labels(labels))
    assert bags.names == ["case0", "case1", "case2", "case3"] and bags.y.tolist() == [1, 0, 1, 0]
    assert [len(r) for r in bags.rows] == [10, 10, 10, 10] and bags.classes == ["neg", "pos"]
    assert bags.left_out == {"records_without_slide_or_group": 0, "slides_without_label": 1,
                             "records_of_slides_without_label": 10}
    assert "1 slides without a label (10 records)" in capsys.readouterr().err
    assert bags.bag(0).shape == (10, 4) and bags.mean_pooled().shape == (4, 4)


def test_label_csv_refusals_name_the_file(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("name,label\nx,1\n")
    with pytest.raises(DflError, match="missing slide"):
        read_slide_labels(bad)
    bad.write_text("slide,label\nx,pos\nx,neg\n")
    with pytest.raises(DflError, match="'x' is listed with two labels"):
        read_slide_labels(bad)
    bad.write_text("slide,label\nx,pos\ny,pos\n")
    with pytest.raises(DflError, match="at least 2 classes"):
        read_slide_labels(bad)


@pytest.mark.parametrize("aggregator", ["abmil", "mean", "max"])
def test_slide_head_masks_padding_and_saves_as_keras(tmp_path, aggregator):
    model = build_slide_head(4, 2, aggregator, hidden=8, noise=0.1, mean=np.ones(4), std=np.full(4, 2.0))
    x = np.random.default_rng(0).normal(size=(1, 5, 4)).astype(np.float32)
    padded = np.concatenate([x, np.full((1, 3, 4), 50.0, np.float32)], axis=1)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], np.float32)
    a = model({"embeddings": x, "mask": np.ones((1, 5), np.float32)})
    b = model({"embeddings": padded, "mask": mask})
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(b["attention"])[0, 5:], 0.0)
    assert abs(float(np.sum(b["attention"])) - 1.0) < 1e-5
    model.save(tmp_path / "head.keras")
    loaded = keras.saving.load_model(tmp_path / "head.keras", compile=False)
    c = loaded({"embeddings": padded, "mask": mask})
    np.testing.assert_allclose(b["attention"], c["attention"], atol=1e-6)
