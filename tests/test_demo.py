"""A fast variant of `make demo`: tiny slide, small input, every output checked."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dfl_tf import load_embeddings, load_model
from dfl_tf.data.synthetic import region_of
from dfl_tf.demo import demo
from tests.helpers import REPO as ROOT


def test_demo_end_to_end(tmp_path):
    overrides = {
        "data": {"width": 1600, "height": 1100},
        "tile": {"size": 96, "min_tissue": 0.6},
        "extract": {"input_size": 64, "batch_size": 16},
        "train": {"epochs": 15, "hidden": 32},
    }
    summary = demo(ROOT / "configs" / "demo.yaml", out=tmp_path / "out", export_dir=tmp_path / "models" / "demo",
                   overrides=overrides, progress=False)
    out = tmp_path / "out"
    assert summary["tiles"]["train"] > 20 and summary["tiles"]["val"] > 10
    assert summary["metrics"]["balanced_accuracy"] > 0.6  # three drawn textures, real ImageNet features
    for name in ("data/demo_slide.tiff", "tiles.csv", "labelled.csv", "summary.json", "head/head.keras",
                 "head/head.json", "head/history.csv", "head/metrics.json", "report/metrics.json",
                 "report/report.md", "report/confusion_matrix.png", "report/pr_curves.png",
                 "heatmap/predictions.csv", "heatmap/head.geojson", "heatmap/heatmap.json"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "head" / "logs").rglob("events.out.tfevents.*"))
    # slide coordinates land in the records; both views were embedded
    train = load_embeddings(out / "emb" / "train")
    assert train.manifest["views"] == ["x20:rgb", "x5:rgb"] and train.manifest["backbone"]["name"] == "efficientnet_lite0"
    assert train.X.shape[1] == 2 * 1280 and all(s.endswith("demo_slide.tiff") for s in train.slides)
    assert (train.xy >= 0).all() and train.manifest["settings"]["context"] == "separate"
    # the export: version 1 with the parity check passed, and it needs context bytes
    model = load_model(summary["outputs"]["model"])
    assert Path(summary["outputs"]["model"]).name == "1" and model.needs_context and summary["parity"]["passed"]
    # heatmaps: one per class, over a thumbnail; predictions for every tile
    classes = json.loads((out / "head" / "head.json").read_text())["classes"]
    for cls in classes:
        png = np.asarray(Image.open(out / "heatmap" / f"heatmap_head_{cls}.png"))
        assert png.ndim == 3 and png.std() > 10
    rows = list(csv.DictReader(open(out / "heatmap" / "predictions.csv")))
    tiles = list(csv.DictReader(open(out / "heatmap" / "tiles.csv")))
    assert len(rows) == len(tiles) > 0 and set(rows[0]) >= {"slide", "x", "y", "head_class"}
    geo = json.loads((out / "heatmap" / "head.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    for feature in geo["features"]:
        assert feature["properties"]["classification"]["name"] in classes[1:]
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5
    assert len(summary["commands"]) == 7 and summary["commands"][0].startswith("dfl tile")
    # the heatmap reads tiles at the trained geometry, and the predictions agree with the regions
    export_info = json.loads((Path(summary["outputs"]["model"]) / "export.json").read_text())
    hm_info = json.loads((out / "heatmap" / "heatmap.json").read_text())
    assert (export_info["mpp"], export_info["patch_size"]) == (0.5, 96) == (hm_info["mpp"], hm_info["size"])
    assert summary["heatmap_geometry"] == {"mpp": 0.5, "size": 96}
    regions = json.loads((out / "data" / "regions.json").read_text())["regions"]
    inside = [(r, region_of(regions, float(r["x"]), float(r["y"]))) for r in rows]
    inside = [(r, reg) for r, reg in inside if reg is not None]
    agree = sum(r["head_class"] == reg["class"] for r, reg in inside)
    assert len(inside) > 20 and agree >= 0.95 * len(inside), f"{agree}/{len(inside)} tiles agree"
