"""Backbone selection: ranking, cache reuse, outputs, maps, projector, split rules, CLI."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from dfl_tf import select_backbones
from dfl_tf.cli import main
from dfl_tf.data.sources import load_source
from dfl_tf.errors import DflError
from dfl_tf.select.maps import export_projector, project_2d, resolve_method, subsample
from dfl_tf.select.protocol import CONTROL_SUFFIX, parse_weights, split_samples
from tests.helpers import REPO

SIZE = 32


def write_colour_images(root: Path, per_class: int = 16, seed: int = 0) -> Path:
    """Class a red-ish, class b blue-ish, strong per-pixel noise: obvious from the mean colour only."""
    rng = np.random.default_rng(seed)
    bases = {"a": (170, 100, 90), "b": (90, 100, 170)}
    for name, base in bases.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-70, 71, (SIZE, SIZE, 3))
            img = np.clip(np.array(base)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


class _ColourStats(tf.Module):
    """Informative: per-channel mean and std of the image."""

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    def __call__(self, x):
        return {"features": tf.concat([tf.reduce_mean(x, [1, 2]), tf.math.reduce_std(x, [1, 2])], -1)}


class _Hash(tf.Module):
    """Uninformative: a chaotic (hash-like) random projection of the pixels."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal([SIZE * SIZE * 3, 8], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)])
    def __call__(self, x):
        z = tf.reshape(x, [-1, SIZE * SIZE * 3]) @ self.w
        return {"features": tf.sin(1000.0 * z)}


def _save(module: tf.Module, path: Path) -> str:
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = write_colour_images(root / "data")
    colour = _save(_ColourStats(), root / "colour")
    hashed = _save(_Hash(), root / "hash")
    return root, data, colour, hashed


FAST = dict(seeds=2, epochs=10, lr=0.05, head_batch_size=8, input_size=SIZE, batch_size=16, progress=False)


def test_ranking_outputs_maps_projector_and_cache(setup, tmp_path, monkeypatch):
    root, data, colour, hashed = setup
    out = tmp_path / "sel"
    res = select_backbones(data, [hashed, colour], out, control="efficientnet_lite0", max_points=24, **FAST)

    rows = {r["backbone"]: r for r in res["results"]}
    assert res["best"] == "colour" and res["ranking"][0] in ("colour", "efficientnet_lite0" + CONTROL_SUFFIX)
    real = [r for r in res["results"] if not r["control"]]
    assert real[0]["backbone"] == "colour"
    assert rows["colour"]["balanced_accuracy"]["mean"] >= 0.9
    assert rows["colour"]["balanced_accuracy"]["mean"] > rows["hash"]["balanced_accuracy"]["mean"]
    assert rows["colour"]["knn_accuracy"] > rows["hash"]["knn_accuracy"]
    assert rows["colour"]["silhouette"] > rows["hash"]["silhouette"]
    assert len(rows["colour"]["balanced_accuracy"]["values"]) == 2
    control = rows["efficientnet_lite0" + CONTROL_SUFFIX]
    assert control["control"] and control["weights"] == "none" and res["control"] == control["backbone"]
    assert [r["rank"] for r in res["results"]] == [1, 2, 3]
    for r in res["results"]:
        assert not r["cached"] and r["extract_seconds"] > 0 and r["train_seconds"] > 0
        for key in ("balanced_accuracy", "cohen_kappa", "f1_weighted"):
            assert set(r[key]) == {"mean", "std", "values"}
        assert r["records"] == {"train": 24, "val": 8, "missing": 0}
        assert 0.0 <= r["probe_balanced_accuracy"] <= 1.0  # the linear-probe reference, same split
    assert res["split"]["method"] == "stratified" and res["split"]["val"] == 8

    # files: results.json == return value, csv rows, markdown table
    assert json.loads((out / "results.json").read_text())["ranking"] == res["ranking"]
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["backbone"] for t in table] == res["ranking"]
    md = (out / "table.md").read_text()
    assert "| rank | backbone | bal. acc | probe bal. acc | kappa | weighted F1 | kNN acc |" in md
    assert all(t["probe_balanced_accuracy"] for t in table)
    assert "(random init control)" in md and not list(out.glob(".*tmp*"))

    # maps.png: a real, non-uniform image
    png = out / "maps.png"
    assert png.stat().st_size > 5000
    img = np.asarray(Image.open(png).convert("RGB"), np.float32)
    assert img.std() > 5 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    assert res["maps"]["method"] == resolve_method("auto")

    # projector: config entries consistent with tsv files
    config = (out / "projector" / "projector_config.pbtxt").read_text()
    entries = re.findall(r'tensor_path: "([^"]+)"\s+tensor_shape: (\d+)\s+tensor_shape: (\d+)\s+'
                         r'metadata_path: "([^"]+)"', config)
    assert len(entries) == 3
    for tensor_path, n, dim, meta_path in entries:
        rows_t = (out / "projector" / tensor_path).read_text().strip().split("\n")
        meta = (out / "projector" / meta_path).read_text().strip().split("\n")
        assert len(rows_t) == int(n) == len(meta) - 1 == 24  # header + rows; subsampled to 24
        assert {len(r.split("\t")) for r in rows_t} == {int(dim)}
        assert meta[0] == "label\tid" and {m.split("\t")[0] for m in meta[1:]} == {"a", "b"}

    # second run (CLI): everything comes from the cache, nothing is extracted, shards untouched
    shards = sorted(Path(r["cache"]) / "shard-00000-of-00001.tfrecord" for r in res["results"])
    mtimes = [p.stat().st_mtime_ns for p in shards]
    import dfl_tf.extraction.local

    calls = []
    real_extract = dfl_tf.extraction.local.extract
    monkeypatch.setattr(dfl_tf.extraction.local, "extract", lambda *a, **k: calls.append(a) or real_extract(*a, **k))
    args = ["select", str(data), "--backbones", f"{hashed},{colour}", "--out", str(out), "--control",
            "efficientnet_lite0", "--input-size", "32", "--seeds", "1", "--epochs", "3", "--no-maps",
            "--no-progress", "--batch-size", "16"]
    result = CliRunner().invoke(main, args)  # finished results are replaced only with --overwrite
    assert result.exit_code == 2 and "already holds a backbone selection folder" in result.output
    result = CliRunner().invoke(main, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert "colour" in result.output
    assert calls == []
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    again = json.loads((out / "results.json").read_text())
    assert all(r["cached"] and r["extract_seconds"] == 0 for r in again["results"])
    assert all(r["extract_seconds_original"] > 0 for r in again["results"])
    assert "cached" in (out / "table.md").read_text()


def test_prescreen_only_and_control_skipped(setup, tmp_path):
    root, data, colour, hashed = setup
    res = select_backbones(data, f"{colour},{hashed}", tmp_path / "pre", seeds=0, maps=False,
                           cache_dir=tmp_path / "cache", input_size=SIZE, progress=False)
    assert res["control"] is None and any("control skipped" in n for n in res["notes"])
    assert res["best"] == "colour" and res["results"][0]["balanced_accuracy"]["values"] == []
    assert res["ranked_by"] == "knn_balanced_accuracy" and res["results"][0]["balanced_accuracy"]["mean"] is None
    assert "| 1 | colour | - |" in (tmp_path / "pre" / "table.md").read_text()
    assert (tmp_path / "cache").is_dir() and not (tmp_path / "pre" / "cache").exists()


def _csv_source(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_split_rules(tmp_path):
    # split column: train / val, test rows left out
    rows = [{"path": f"img{i}.png", "label": "ab"[i % 2], "split": ["train", "train", "val", "test"][i % 4]}
            for i in range(16)]
    src = _csv_source(tmp_path, rows)
    samples = load_source(src)
    train, val, how = split_samples(src, samples)
    assert how["method"] == "split column" and how["left_out"] == 4
    assert len(train) == 8 and len(val) == 4

    # groups: no group in both parts, stratified, deterministic
    rows = [{"path": f"img{i}.png", "label": "ab"[i % 2], "group": f"p{i // 4}"} for i in range(40)]
    src = _csv_source(tmp_path, rows)
    samples = load_source(src)
    train, val, how = split_samples(src, samples, val_fraction=0.25, seed=3)
    group = {s.id: s.group for s in samples.samples}
    assert not {group[i] for i in train} & {group[i] for i in val}
    assert "group" in how["method"] and how["groups"] == 10
    assert split_samples(src, samples, val_fraction=0.25, seed=3)[1] == val
    label = {s.id: s.label for s in samples.samples}
    assert {label[i] for i in val} == {0, 1}

    with pytest.raises(DflError, match="val_fraction"):
        split_samples(src, samples, val_fraction=1.5)


def test_weights_parsing_and_map_helpers(tmp_path):
    assert parse_weights("imagenet", ["a", "b"]) == {"a": "imagenet", "b": "imagenet"}
    assert parse_weights("imagenet,b=none", ["a", "b"]) == {"a": "imagenet", "b": "none"}
    assert parse_weights({"a": "none"}, ["a", "b"]) == {"a": "none", "b": "default"}
    with pytest.raises(DflError, match="not among"):
        parse_weights("c=none", ["a", "b"])
    y = np.array([0] * 90 + [1] * 10)
    idx = subsample(y, 20, seed=0)
    assert len(idx) == 20 and set(y[idx]) == {0, 1}
    X = np.random.default_rng(0).normal(size=(30, 5))
    assert project_2d(X, "pca").shape == (30, 2) and project_2d(X, "tsne").shape == (30, 2)
    if resolve_method("auto") == "pca":
        with pytest.raises(DflError, match="umap-learn"):
            resolve_method("umap")
    info = export_projector([{"name": "x y", "X": X, "metadata": {"label": ["a"] * 30}}], tmp_path / "p")
    assert info["embeddings"][0]["name"] == "x_y"
    meta = (tmp_path / "p" / "x_y" / "metadata.tsv").read_text().strip().split("\n")
    assert len(meta) == 30  # one column: no header row


def test_config_file_fields_are_known():
    from dfl_tf.config import merge
    from dfl_tf.baselines.finetune import finetune

    root = REPO / "configs" / "backbone_selection.yaml"
    sel = merge(select_backbones, root, "select", {"seeds": 2})
    assert sel["seeds"] == 2 and sel["control"] is True and "resnet50" in sel["backbones"]
    ft = merge(finetune, root, "finetune", {})
    assert ft["views"] == "x20:rgb" and ft["augment"] is True
