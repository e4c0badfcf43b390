"""Export, reload, parity, signatures, multi-head equality, TFSMLayer, predict."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tests.helpers.tiny import TINY_FAST as TINY, write_images
from dfl_tf import export_model, extract, load_model, predict, train_head
from dfl_tf.cli import main
from dfl_tf.errors import DflError

HEAD = dict(epochs=2, batch_size=8, progress=False, noise=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    images = write_images(root / "imgs", per_class=5, size=(40, 40))
    extract(images, root / "emb", views="x20:rgb,x5:gray", x5_from_image=True, **TINY)
    train_head(root / "emb", root / "tumour", val=root / "emb", hidden=8, **HEAD)
    train_head(root / "emb", root / "linear", val=root / "emb", hidden=0, **HEAD)
    info = export_model([root / "tumour", root / "linear"], root / "saved_models" / "both")
    return {"root": root, "images": images, "emb": root / "emb", "both": Path(info["path"]), "info": info}


def test_export_layout_parity_and_signatures(trained):
    info, path = trained["info"], trained["both"]
    assert path.name == "1" and (path / "saved_model.pb").exists() and (path / "export.json").exists()
    assert info["parity"]["passed"] and info["parity"]["samples"] == 4
    assert info["parity"]["max_abs_diff_probabilities"] <= 1e-4
    assert info["parity"]["max_rel_diff_embedding_vs_stored"] <= 2e-3
    assert [h["task"] for h in info["heads"]] == ["tumour", "linear"]
    assert not list(path.parent.glob(".tmp-*"))
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"serving_default", "serve_pixels", "embed", "embed_pixels"}
    sd = loaded.signatures["serving_default"]
    assert {k: v.dtype for k, v in sd.structured_input_signature[1].items()} == {"image_bytes": tf.string}
    outputs = sd.structured_outputs
    assert outputs["tumour_probabilities"].dtype == tf.float32 and outputs["tumour_class_id"].dtype == tf.int64
    assert outputs["linear_class_name"].dtype == tf.string
    sp = loaded.signatures["serve_pixels"].structured_input_signature[1]
    assert sp["images"].dtype == tf.uint8 and sp["images"].shape.rank == 4
    assert loaded.signatures["embed"].structured_outputs["embedding"].shape[-1] == 2 * 16


def test_serving_default_matches_python_pipeline(trained):
    from dfl_tf.serve.export import ServingGraph, load_tasks, rebuild_backbone

    files = sorted(trained["images"].rglob("*.png"))[:3]
    model = load_model(trained["both"].parent)  # NAME dir -> latest version
    out = model([f.read_bytes() for f in files])
    tasks = load_tasks([trained["root"] / "tumour", trained["root"] / "linear"])
    graph = ServingGraph(rebuild_backbone(tasks[0].info), tasks)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    emb = graph.embed_views(graph.views_from_pixels(tf.constant(pixels), None))
    for task in tasks:
        expected = task.model(emb).numpy()
        np.testing.assert_allclose(out[f"{task.name}_probabilities"], expected, atol=1e-5)
        names = [task.classes[i] for i in out[f"{task.name}_class_id"]]
        assert [n.decode() for n in out[f"{task.name}_class_name"]] == names
    np.testing.assert_allclose(model.embed([f.read_bytes() for f in files]), emb.numpy(), atol=1e-4)


def test_two_heads_equal_each_alone(trained, tmp_path):
    alone = load_model(export_model([trained["root"] / "tumour"], tmp_path / "alone")["path"])
    both = load_model(trained["both"])
    data = [f.read_bytes() for f in sorted(trained["images"].rglob("*.png"))[:4]]
    a, b = alone(data), both(data)
    np.testing.assert_allclose(a["tumour_probabilities"], b["tumour_probabilities"], atol=1e-6)
    assert a["tumour_class_id"].tolist() == b["tumour_class_id"].tolist()
    assert set(a) == {"tumour_probabilities", "tumour_class_id", "tumour_class_name"}
    second = export_model([trained["root"] / "tumour"], tmp_path / "alone")
    assert Path(second["path"]).name == "2"


def test_tfsmlayer_inside_keras_model(trained):
    layer = keras.layers.TFSMLayer(str(trained["both"]), call_endpoint="embed_pixels")
    inputs = keras.Input((40, 40, 3), dtype="uint8")
    features = layer(inputs)
    features = features["embedding"] if isinstance(features, dict) else features
    outputs = keras.layers.Dense(3)(features)
    model = keras.Model(inputs, outputs)
    pixels = np.stack([np.asarray(Image.open(f)) for f in sorted(trained["images"].rglob("*.png"))[:2]])
    assert model(pixels).shape == (2, 3)


def test_undecodable_bytes_name_their_position(trained):
    model = load_model(trained["both"])
    good = sorted(trained["images"].rglob("*.png"))[0].read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not a JPEG/PNG/GIF/BMP/WebP image at batch positions.*\[1\]"):
        model([good, b"garbage", good])


def _versions(root: Path) -> list[str]:
    """Version (and unfinished .tmp-) directories under an export root."""
    return [p.name for p in root.iterdir() if p.is_dir()] if root.exists() else []


def test_failed_parity_leaves_no_version(tmp_path):
    """A real mismatch: a source image edited after extraction, so the exported graph's embedding
    of that sample no longer equals the stored one."""
    images = write_images(tmp_path / "imgs", per_class=2, size=(40, 40), seed=3)
    extract(images, tmp_path / "emb", views="x20:rgb", **TINY)
    train_head(tmp_path / "emb", tmp_path / "head", hidden=4, **HEAD)
    first = sorted(images.rglob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    with pytest.raises(DflError, match=r"parity check failed: embeddings \(embed_pixels vs stored"):
        export_model([tmp_path / "head"], tmp_path / "m")
    assert _versions(tmp_path / "m") == []


def test_bfloat16_backbone_exports_with_its_precision_tolerance(tmp_path):
    """A bfloat16 backbone: the served embeddings equal the stored ones, and the probability check
    uses the bfloat16 tolerance (recorded), not float32's 1e-4; a source edited after extraction
    still fails the check."""
    images = write_images(tmp_path / "imgs", per_class=4, size=(64, 64), seed=5)
    extract(images, tmp_path / "emb", views="x20:rgb", **{**TINY, "input_size": 64}, precision="bfloat16")
    train_head(tmp_path / "emb", tmp_path / "head", hidden=8, **HEAD)
    info = export_model([tmp_path / "head"], tmp_path / "m", parity_samples=8)
    parity = info["parity"]
    assert parity["passed"] and parity["precision"] == "bfloat16" and parity["probability_tolerance"] == 2e-2
    assert parity["bytes_samples"] == 8 and parity["bytes_max_rel_diff_embedding_vs_stored"] <= 2e-2
    first = sorted(images.rglob("*.png"))[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    with pytest.raises(DflError, match="parity check failed"):
        export_model([tmp_path / "head"], tmp_path / "m2", parity_samples=8)


def test_parity_data_from_another_view_set_refused(trained, tmp_path):
    extract(trained["images"], tmp_path / "x20", views="x20:rgb", **TINY)
    with pytest.raises(DflError, match=r"head .*tumour and embeddings .*x20 disagree on views: "
                                       r"x20:rgb,x5:gray vs x20:rgb"):
        export_model([trained["root"] / "tumour"], tmp_path / "m", parity_data=tmp_path / "x20")
    assert _versions(tmp_path / "m") == []


def test_duplicate_task_names_refused(trained, tmp_path):
    with pytest.raises(DflError, match="task names must be unique"):
        export_model([trained["root"] / "tumour", trained["root"] / "linear"], tmp_path / "m", names=["t", "t"])


def test_incompatible_heads_refused(trained, tmp_path):
    extract(trained["images"], tmp_path / "emb2", views="x20:rgb", **TINY)
    train_head(tmp_path / "emb2", tmp_path / "other", val=tmp_path / "emb2", hidden=4, **HEAD)
    with pytest.raises(DflError, match="disagree on views"):
        export_model([trained["root"] / "tumour", tmp_path / "other"], tmp_path / "m")
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


def test_predict_csv_and_bad_images(trained, tmp_path):
    images = write_images(tmp_path / "imgs", per_class=2, size=(40, 40), seed=5)
    (images / "a" / "bad.png").write_bytes(b"broken")
    with pytest.raises(DflError, match=r"sample 2 \(a/bad\.png\)"):
        predict(trained["both"], images, tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists()
    result = CliRunner().invoke(main, ["predict", str(trained["both"]), str(images), "--out", str(tmp_path / "p.csv"),
                                       "--skip-bad", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 4 and {r["tumour_class"] for r in rows} <= {"a", "b"}
    probs = np.array([[float(r["tumour_p_a"]), float(r["tumour_p_b"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    skipped = list(csv.DictReader(open(tmp_path / "p.skipped.csv")))
    assert [s["id"] for s in skipped] == ["a/bad.png"]
    direct = load_model(trained["both"])([(images / "a" / "000.png").read_bytes()])
    row = next(r for r in rows if r["id"] == "a/000.png")
    assert float(row["tumour_p_b"]) == pytest.approx(float(direct["tumour_probabilities"][0, 1]), abs=1e-5)
