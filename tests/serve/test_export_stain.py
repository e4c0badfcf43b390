"""Stain normalisation inside the exported SavedModel (issue 31 item 2): heads extracted with
--stain-norm export a graph that normalises decoded pixels in every signature with the recorded fit,
so the parity check (bytes and pixels in) and dfl predict match the stored, normalised embeddings."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfl_tf import export_model, extract, load_embeddings, load_model, train_head
from dfl_tf.heads.model import load_head
from tests.helpers.hostile_utils import run_dfl
from tests.helpers.tiny import TINY_FAST, he_image, write_he_images

HEAD = dict(epochs=2, batch_size=8, progress=False, hidden=0)


@pytest.fixture(scope="module", params=["macenko", "reinhard"])
def exported(request, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    images = write_he_images(root / "imgs", size=(64, 64))
    Image.fromarray(he_image(np.random.default_rng(9), (64, 64), 0.7)).save(root / "target.png")
    extract(images, root / "emb", views="x20:rgb,x5:gray", x5_from_image=True, stain_norm=request.param,
            stain_target=str(root / "target.png"), **TINY_FAST)
    train_head(root / "emb", root / "head", **HEAD)
    result = run_dfl(["export", root / "head", "--out", root / "models" / "m", "--parity-samples", "7"])
    assert result.exit_code == 0, result.output
    version = root / "models" / "m" / "1"
    return {"root": root, "images": images, "path": version, "method": request.param,
            "info": json.loads((version / "export.json").read_text())}


def test_export_records_the_fit_and_parity_passes_on_every_signature(exported):
    info = exported["info"]
    assert info["geometry"]["stain"]["normalize"]["method"] == exported["method"]
    parity = info["parity"]
    assert parity["passed"] and parity["samples"] == 7 and parity["bytes_samples"] == 7
    assert parity["max_rel_diff_embedding_vs_stored"] <= parity["embedding_tolerance"]
    assert parity["bytes_max_rel_diff_embedding_vs_stored"] <= parity["embedding_tolerance"]


def test_served_embeddings_equal_stored_and_predict_matches(exported, tmp_path):
    stored = load_embeddings(exported["root"] / "emb")
    files = [exported["images"] / i for i in stored.ids]
    model = load_model(exported["path"])
    served = model.embed([f.read_bytes() for f in files])
    scale = float(np.abs(stored.X).max())
    assert np.abs(served - stored.X.astype(np.float32)).max() / scale <= 2e-3
    white = list(stored.ids).index("a/white.png")  # passed through in the graph too: finite, equal
    assert np.isfinite(served[white]).all()
    result = run_dfl(["predict", exported["path"], exported["images"], "--out", tmp_path / "p.csv", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    head, _ = load_head(exported["root"] / "head")
    expected = head(stored.X.astype(np.float32), training=False).numpy()
    predicted = np.array([[float(rows[i]["head_p_a"]), float(rows[i]["head_p_b"])] for i in stored.ids])
    np.testing.assert_allclose(predicted, expected, atol=2e-3)


def test_context_images_are_normalised_too_and_parity_passes(tmp_path):
    """Two fields (x20 image, x5 context image): both normalised, in extraction and in the graph."""
    rng = np.random.default_rng(3)
    rows = ["path,label,context_path"]
    for i in range(4):
        Image.fromarray(he_image(rng, (32, 32), 1.0 + i % 2)).save(tmp_path / f"{i}.png")
        Image.fromarray(he_image(rng, (64, 64), 1.0 + i % 2)).save(tmp_path / f"{i}-ctx.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},{i}-ctx.png")
    (tmp_path / "tiles.csv").write_text("\n".join(rows) + "\n")
    Image.fromarray(he_image(rng, (64, 64), 0.7)).save(tmp_path / "target.png")
    raw = extract(tmp_path / "tiles.csv", tmp_path / "raw", views="x20:rgb,x5:rgb", **TINY_FAST)
    manifest = extract(tmp_path / "tiles.csv", tmp_path / "emb", views="x20:rgb,x5:rgb", stain_norm="macenko",
                       stain_target=str(tmp_path / "target.png"), **TINY_FAST)
    assert raw["geometry"]["context"] == "separate" and manifest["stain"]["passed_through"] == 0
    x_raw, x_norm = load_embeddings(tmp_path / "raw").X, load_embeddings(tmp_path / "emb").X
    assert np.abs(x_raw[:, 16:] - x_norm[:, 16:]).max() > 1e-2  # the x5 half changed: context normalised
    train_head(tmp_path / "emb", tmp_path / "head", **HEAD)
    info = export_model([tmp_path / "head"], tmp_path / "models" / "m", parity_samples=4)
    assert info["parity"]["passed"] and info["parity"]["bytes_samples"] == 4
