"""A tiny ViT (registers, SwiGLU, LayerScale, resampled position grid) through the whole product:
tile -> extract (two views) -> train -> export (parity) -> heatmap (predicting through the export);
bfloat16 extraction against float32, the Beam runner, and backbone selection."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.helpers.tiny import write_images
from dfl_tf import extract, load_embeddings, load_model, select_backbones
from dfl_tf.backbones.registry import load_backbone
from dfl_tf.backbones.vit.model import ViTConfig
from dfl_tf.backbones.vit.presets import register_vit
from dfl_tf.demo import demo
from tests.helpers import REPO as ROOT

# patch 8 on a 4x4 stored grid: 48 px inputs resample it to 6x6 (timm's antialiased bicubic)
TINY_VIT = ViTConfig(patch=8, dim=32, depth=2, heads=2, mlp_hidden=48, grid=4, mlp="swiglu", registers=2,
                     pos_prefix=0, layer_scale=True, interpolation="bicubic_aa")
register_vit("tiny_vit", TINY_VIT, {}, "tests/backbones/test_vit_pipeline.py", "tiny ViT for tests")
TINY = dict(backbone="tiny_vit", weights="none", input_size=48, batch_size=8, progress=False)


def test_tiny_vit_demo_pipeline(tmp_path):
    overrides = {
        "data": {"width": 1000, "height": 800},
        "tile": {"size": 64, "min_tissue": 0.6},
        "extract": {"backbone": "tiny_vit", "weights": "none", "input_size": 40, "batch_size": 32},
        "train": {"epochs": 2, "hidden": 16, "patience": 2},
    }
    summary = demo(ROOT / "configs" / "demo.yaml", out=tmp_path / "out", export_dir=tmp_path / "models" / "vit",
                   overrides=overrides, progress=False)
    out = tmp_path / "out"
    train = load_embeddings(out / "emb" / "train")
    assert train.manifest["backbone"]["name"] == "tiny_vit"
    assert train.manifest["views"] == ["x20:rgb", "x5:rgb"] and train.X.shape[1] == 2 * 32
    assert np.isfinite(train.X).all() and train.X.std() > 0.05
    assert summary["parity"]["passed"]  # the serving graph with the ViT reproduces the stored embeddings
    # the heatmap predicts every tissue tile through the exported SavedModel (bytes in, x20 + x5 context)
    rows = list(csv.DictReader(open(out / "heatmap" / "predictions.csv")))
    assert len(rows) == summary["heatmap_tiles"] > 0
    model = load_model(summary["outputs"]["model"])
    assert model.needs_context and model.embed  # the embed signature serves the ViT's embeddings
    print("demo stages (s):", summary["seconds"])


def test_tiny_vit_bfloat16_extraction_close_to_float32(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    f32 = np.asarray(load_backbone("tiny_vit", weights="none", input_size=48)(x))
    bf16 = load_backbone("tiny_vit", weights="none", input_size=48, precision="bfloat16")
    out = np.asarray(bf16(x))
    assert out.dtype == np.float32 and out.shape == (4, 32)
    assert np.abs(out - f32).max() <= 0.05 * np.abs(f32).max()
    images = write_images(tmp_path / "imgs", per_class=3, size=(48, 48))
    kw = dict(TINY, input_size=48, x5_from_image=True)  # 48 px images: x5 from the image itself, asked for
    extract(images, tmp_path / "f32", views="x20:rgb,x20:gray", **kw)
    manifest = extract(images, tmp_path / "bf16", views="x20:rgb,x20:gray", precision="bfloat16", **kw)
    assert manifest["settings"]["precision"] == "bfloat16" and manifest["dim"] == 64
    a, b = load_embeddings(tmp_path / "f32").X, load_embeddings(tmp_path / "bf16").X
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


@pytest.mark.parametrize("precision,tol", [("bfloat16", 0.05), ("mixed_float16", 0.01)])
def test_tiny_vit_half_precision_close_to_float32_with_large_activations(precision, tol):
    """Half-precision attention (matmuls in the compute dtype) stays close to float32 even when
    q and k are large: under float16 q is scaled before the product, so the logits stay in range."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    f32 = load_backbone("tiny_vit", weights="none", input_size=48)
    half = load_backbone("tiny_vit", weights="none", input_size=48, precision=precision)
    for layer in (f32.model.get_layer("blocks_0"), half.model.get_layer("blocks_0")):
        layer.qkv.kernel.assign(layer.qkv.kernel * 100.0)  # q.k up to 1.1e5 > 65504 unscaled
    half.model.set_weights(f32.model.get_weights())
    want, got = np.asarray(f32(x)), np.asarray(half(x))
    assert np.isfinite(got).all() and np.abs(got - want).max() <= tol * np.abs(want).max()


def test_tiny_vit_beam_equals_local(tmp_path):
    images = write_images(tmp_path / "imgs", per_class=5, size=(56, 56))
    local = extract(images, tmp_path / "emb", views="x20:rgb,x20:gray", shard_size=4, **TINY)
    beam = extract(images, tmp_path / "beam", views="x20:rgb,x20:gray", shard_size=4, runner="beam",
                   beam_options=["direct_num_workers=2", "direct_running_mode=multi_threading"], **TINY)
    a, b = load_embeddings(tmp_path / "emb"), load_embeddings(tmp_path / "beam")
    np.testing.assert_array_equal(a.X, b.X)
    assert local["num_records"] == beam["num_records"] == 10 and a.X.shape[1] == 64


def test_select_ranks_a_vit_beside_a_cnn(tmp_path):
    images = write_images(tmp_path / "imgs", per_class=8, size=(48, 48))
    res = select_backbones(images, "tiny_vit,tiny_test", tmp_path / "sel", weights="none", seeds=1, epochs=3,
                           input_size=48, batch_size=16, maps=False, control=False, progress=False)
    assert {r["backbone"] for r in res["results"]} == {"tiny_vit", "tiny_test"}
    assert json.loads((tmp_path / "sel" / "results.json").read_text())["best"] in ("tiny_vit", "tiny_test")
