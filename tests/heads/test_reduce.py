"""dfl train --reduce: PCA / whitening fitted on the training embeddings, folded into a frozen
Dense layer of the head (issue 33, item 3)."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from sklearn.decomposition import PCA

from dfl_tf import export_model, extract, train_head
from dfl_tf.errors import DflError
from dfl_tf.heads.reduce import fit_reduction
from dfl_tf.options import TrainOptions
from tests.helpers.emb_utils import blobs, make_embedding_dir
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl
from tests.helpers.tiny import TINY_FAST, write_images


@pytest.mark.parametrize("spec,whiten,k", [("pca:3", False, 3), ("pca:0.9", False, 0.9), ("whiten", True, None)])
def test_layer_equals_sklearn_transform(spec, whiten, k):
    X = blobs(60, 12, seed=2)[0]
    red = fit_reduction(X, spec)
    ref = PCA(n_components=k, whiten=whiten, svd_solver="full").fit(X.astype(np.float64))
    layer = red.layer()
    got = np.asarray(layer(X.astype(np.float32)))
    assert red.dim == ref.n_components_ and not layer.trainable
    np.testing.assert_allclose(got, ref.transform(X), atol=2e-4 * np.abs(ref.transform(X)).max())
    assert red.info["explained_variance"] == pytest.approx(float(ref.explained_variance_ratio_.sum()))


def test_bad_specs_refused():
    for bad in ("pca", "pca:0", "pca:1.5", "svd:3", "pca:x"):
        with pytest.raises(DflError, match="--reduce must be pca:K"):
            TrainOptions(reduce=bad)
    with pytest.raises(DflError, match="at most 12 components"):
        fit_reduction(blobs(60, 12)[0], "pca:20")


def test_train_cli_with_reduce_records_it(tmp_path):
    X, y = blobs(80, 10, seed=5)
    make_embedding_dir(tmp_path / "emb", X, y, ["a", "b"])
    head = tmp_path / "head"
    result = run_dfl(["train", tmp_path / "emb", "--val", tmp_path / "emb", "--out", head, "--reduce", "pca:4",
                      "--epochs", "3"])
    assert result.exit_code == 0, result.output
    info = json.loads((head / "head.json").read_text())
    assert info["reduce"]["components"] == 4 and 0 < info["reduce"]["explained_variance"] <= 1
    assert info["dim"] == 10 and info["selection"] == {"performed": False, "reason": "--reduce"}
    model = keras.saving.load_model(head / "head.keras", compile=False)  # plain Keras
    assert model.get_layer("reduce").kernel.shape == (10, 4) and not model.get_layer("reduce").trainable
    assert model.get_layer("standardize").mean.shape[-1] == 4
    evaluated = run_dfl(["evaluate", head, tmp_path / "emb"])
    assert evaluated.exit_code == 0, evaluated.output
    assert_one_line_error(run_dfl(["train", tmp_path / "emb", "--out", tmp_path / "h2", "--reduce", "pca"]),
                          "--reduce must be")


def test_reduced_head_exports_with_parity(tmp_path):
    images = write_images(tmp_path / "imgs", per_class=4, size=(40, 40))
    extract(images, tmp_path / "emb", views="x20:rgb", **TINY_FAST)
    train_head(tmp_path / "emb", tmp_path / "head", val=tmp_path / "emb", reduce="pca:4", hidden=4, epochs=2,
               batch_size=4, progress=False)
    info = export_model([tmp_path / "head"], tmp_path / "m")
    assert info["parity"]["passed"] and info["parity"]["samples"] > 0
    assert json.loads((tmp_path / "head" / "head.json").read_text())["reduce"]["components"] == 4


def test_null_components_dropped():
    X = blobs(6, 12, seed=1)[0]  # 6 records: rank 5 once centred
    red = fit_reduction(X, "whiten")
    assert red.dim == 5 and red.info["null_components_dropped"] == 1
    assert np.abs(red.transform(X)).max() < 10  # no component blown up by 1 / sqrt(~0)
