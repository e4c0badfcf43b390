"""dfl extract --stain-norm / --stain-target (issue 31 item 2): every field normalised before the
backbone, the fit recorded in the read geometry, background tiles passed through and counted, and
the compatibility check refusing to mix normalised and raw artefacts (train --val, evaluate)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfl_tf import extract, load_backbone, load_embeddings, train_head
from dfl_tf.data.views import compose_views, parse_views
from dfl_tf.stain.normalize import fit_target, normalize_batch
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl
from tests.helpers.tiny import TINY_FAST, he_image, write_he_images

HEAD = dict(epochs=1, batch_size=8, progress=False, hidden=0)
FLAGS = ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stain")
    images = write_he_images(root / "imgs")
    Image.fromarray(he_image(np.random.default_rng(9), (64, 64), 0.7)).save(root / "target.png")
    extract(images, root / "raw", **TINY_FAST)
    result = run_dfl(["extract", images, "--out", root / "norm", "--stain-norm", "macenko",
                      "--stain-target", root / "target.png", *FLAGS])
    assert result.exit_code == 0, result.output
    return {"root": root, "images": images, "raw": root / "raw", "norm": root / "norm", "note": result.output}


def test_normalised_extraction_records_the_fit_and_passes_background_through(stores):
    manifest = json.loads((stores["norm"] / "manifest.json").read_text())
    fit = manifest["geometry"]["stain"]["normalize"]
    assert fit["method"] == "macenko" and np.asarray(fit["stain_matrix"]).shape == (3, 2)
    assert manifest["stain"] == {"method": "macenko", "passed_through": 1, "passed_through_ids": ["a/white.png"]}
    assert "note: 1 sample(s) passed through macenko stain normalisation unchanged" in stores["note"]
    assert "a/white.png" in stores["note"]
    raw, norm = load_embeddings(stores["raw"]), load_embeddings(stores["norm"])
    assert list(raw.ids) == list(norm.ids)
    assert np.isfinite(norm.X).all()
    white = list(norm.ids).index("a/white.png")
    np.testing.assert_array_equal(norm.X[white], raw.X[white])  # passed through: the raw pixels
    tissue = [i for i in range(len(norm.ids)) if i != white]
    assert np.abs(norm.X[tissue] - raw.X[tissue]).max() > 1e-2  # normalised: other pixels


def test_stored_embedding_is_the_backbone_on_the_normalised_pixels(stores):
    """Extraction = normalize_batch on the decoded field, then the usual composition and backbone."""
    fit = fit_target(stores["root"] / "target.png", "macenko")
    pixels = np.asarray(Image.open(stores["images"] / "b" / "001.png").convert("RGB"))
    normed, passed = normalize_batch(pixels[None], fit)
    assert not bool(passed[0])
    bb = load_backbone("tiny_test", weights="none", input_size=32)
    views = compose_views(normed[0], None, parse_views("x20:rgb"), 32)
    expected = bb.model(views, training=False).numpy()[0]
    norm = load_embeddings(stores["norm"])
    stored = norm.X[list(norm.ids).index("b/001.png")].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_stored_fit_as_json_gives_the_same_store(stores, tmp_path):
    fit = fit_target(stores["root"] / "target.png", "reinhard")
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    a = extract(stores["images"], tmp_path / "img", stain_norm="reinhard", stain_target=str(stores["root"] / "target.png"),
                **TINY_FAST)
    b = extract(stores["images"], tmp_path / "json", stain_norm="reinhard", stain_target=str(tmp_path / "fit.json"),
                **TINY_FAST)
    assert a["geometry"]["stain"] == b["geometry"]["stain"] and a["stain"]["passed_through"] == 1
    np.testing.assert_array_equal(load_embeddings(tmp_path / "img").X, load_embeddings(tmp_path / "json").X)
    wrong = run_dfl(["extract", stores["images"], "--out", tmp_path / "x", "--stain-norm", "macenko",
                     "--stain-target", tmp_path / "fit.json", *FLAGS])
    assert_one_line_error(wrong, "fit.json", "reinhard")


def test_target_without_tissue_and_missing_target_refused(stores, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(tmp_path / "blank.png")
    for method in ("macenko", "reinhard"):
        result = run_dfl(["extract", stores["images"], "--out", tmp_path / "out", "--stain-norm", method,
                          "--stain-target", tmp_path / "blank.png", *FLAGS])
        assert_one_line_error(result, "blank.png", "tissue")
        assert not (tmp_path / "out").exists()
    result = run_dfl(["extract", stores["images"], "--out", tmp_path / "out", "--stain-norm", "macenko", *FLAGS])
    assert_one_line_error(result, "--stain-target")
    result = run_dfl(["extract", stores["images"], "--out", tmp_path / "out", "--stain-norm", "macenko",
                      "--stain-target", tmp_path / "nope.png", *FLAGS])
    assert_one_line_error(result, "nope.png")
    assert not (tmp_path / "out").exists()


def test_mixing_normalised_and_raw_artefacts_refused(stores, tmp_path):
    result = run_dfl(["train", stores["norm"], "--val", stores["raw"], "--out", tmp_path / "head", "--epochs", "1",
                      "--no-progress"])
    line = assert_one_line_error(result, "stain", "macenko normalisation", "none (raw pixels)")
    assert str(stores["raw"]) in line and not (tmp_path / "head").exists()
    train_head(stores["norm"], tmp_path / "normhead", **HEAD)
    result = run_dfl(["evaluate", tmp_path / "normhead", stores["raw"], "--out", tmp_path / "report"])
    assert_one_line_error(result, "stain", str(stores["raw"]))
    assert not (tmp_path / "report").exists()
    result = run_dfl(["evaluate", tmp_path / "normhead", stores["norm"], "--out", tmp_path / "report"])
    assert result.exit_code == 0, result.output
