"""Extraction: shapes, read-back, views, fit, determinism, resume after SIGKILL, bad input."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from tests.helpers.tiny import TINY, write_images
from dfl_tf import extract, load_backbone, load_embeddings
from dfl_tf.cli import main
from dfl_tf.data.views import compose_views, fit_field, parse_views, resize_field
from dfl_tf.errors import DflError
from dfl_tf.store.shards import verify_shards
from tests.helpers import FIXTURES


def assert_f16_close(stored, computed):
    """Equal within float16 rounding (plus float32 batch-order noise)."""
    np.testing.assert_allclose(stored, computed, rtol=2e-3, atol=1e-4)


def _embed_directly(paths, views, size=32, fit="scale"):
    bb = load_backbone("resnet50", weights="none", input_size=size)
    out = []
    for path in paths:
        img = np.asarray(Image.open(path).convert("RGB"))
        stacked = compose_views(tf.constant(img), None, parse_views(views), size, fit)
        out.append(bb(stacked).numpy().reshape(-1))
    return np.stack(out)


def test_shapes_dtype_and_read_back(image_folder, tmp_path):
    m = extract(image_folder, tmp_path / "emb", views="x20:rgb,x5:gray", shard_size=5, x5_from_image=True,
                **TINY)
    assert m["dim"] == 2 * 2048 and m["dtype"] == "float16"
    assert m["num_records"] == 12 and [s["records"] for s in m["shards"]] == [5, 5, 2]
    assert m["classes"] == ["a", "b"] and m["counts"] == {"a": 6, "b": 6}
    assert m["views"] == ["x20:rgb", "x5:gray"] and m["backbone"]["dim"] == 2048
    assert len(m["backbone"]["fingerprint"]) == 64 and verify_shards(tmp_path / "emb") == []
    raw = tf.data.TFRecordDataset(str(tmp_path / "emb" / m["shards"][0]["file"]))
    first = tf.train.Example.FromString(next(iter(raw)).numpy())
    assert len(first.features.feature["embedding"].bytes_list.value[0]) == 2 * 2048 * 2  # float16
    emb = load_embeddings(tmp_path / "emb")
    assert emb.X.shape == (12, 4096) and emb.X.dtype == np.float32
    assert emb.y.tolist() == [0] * 6 + [1] * 6 and emb.ids[0] == "a/000.png"
    expected = _embed_directly(emb.sources, "x20:rgb,x5:gray")
    assert_f16_close(emb.X, expected)


def test_gray_view_equals_backbone_on_gray_image(image_folder, tmp_path):
    src = sorted((image_folder / "a").glob("*.png"))[0]
    rgb = np.asarray(Image.open(src).convert("RGB").resize((32, 32))).astype(np.float32)
    lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gray3 = np.repeat(lum[..., None], 3, axis=-1)  # the gray image, as a 3-channel picture
    bb = load_backbone("resnet50", weights="none", input_size=32)
    via_view = bb(compose_views(tf.constant(rgb), None, parse_views("x20:gray"), 32)).numpy()
    via_image = bb(compose_views(tf.constant(gray3), None, parse_views("x20:rgb"), 32)).numpy()
    np.testing.assert_allclose(via_view, via_image, atol=1e-5, rtol=1e-5)
    out = extract(image_folder, tmp_path / "emb", views="x20:gray", **TINY)
    emb = load_embeddings(tmp_path / "emb")
    full = np.asarray(Image.open(src).convert("RGB")).astype(np.float32)
    direct = bb(compose_views(tf.constant(full), None, parse_views("x20:gray"), 32)).numpy()
    assert_f16_close(emb.X[emb.ids.index("a/000.png")], direct[0])
    assert out["views"] == ["x20:gray"]


def test_fit_pad_scale_and_x5_rule():
    img = tf.fill((50, 50, 3), 10.0)
    padded = fit_field(img, 64, "pad").numpy()
    assert padded.shape == (64, 64, 3)
    assert (padded[7:57, 7:57] == 10).all() and (padded[:7] == 255).all() and (padded[:, 57:] == 255).all()
    scaled = fit_field(img, 64, "scale").numpy()
    assert scaled.shape == (64, 64, 3) and np.allclose(scaled, 10)
    ps = fit_field(img, 128, "pad-scale", pad_to=100).numpy()  # 50 in 100, then x1.28
    assert ps.shape == (128, 128, 3) and ps[64, 64, 0] == pytest.approx(10) and ps[2, 2, 0] == pytest.approx(255)
    big = fit_field(tf.zeros((80, 80, 3)), 64, "pad").numpy()  # larger than input: centre crop
    assert big.shape == (64, 64, 3) and (big == 0).all()
    # x5 rule without context: the image is the x5 field, x20 its centre quarter.
    field = np.zeros((64, 64, 3), np.float32)
    field[24:40, 24:40] = 200.0
    views = compose_views(tf.constant(field), None, parse_views("x20:rgb,x5:rgb"), 16, "scale").numpy()
    assert np.allclose(views[0], 200.0)  # centre 16x16 is the bright square
    assert views[1].mean() == pytest.approx(200.0 * 16 * 16 / (64 * 64), rel=0.05)


def test_field_already_at_input_size_skips_the_resize_with_the_same_numbers():
    """resize_field passes a size x size field through: exactly what the resize returns, with a
    static shape, with a dynamic one (the extraction pipeline's) and in a batch."""
    rng = np.random.default_rng(3)
    for shape in [(32, 32, 3), (5, 32, 32, 3)]:
        field = tf.constant(rng.integers(0, 256, shape).astype(np.float32))
        resized = tf.image.resize(field, (32, 32), method="bilinear", antialias=True)
        assert (resize_field(field, 32).numpy() == resized.numpy()).all()
        dynamic = tf.function(lambda t: fit_field(t, 32, "scale"),
                              input_signature=[tf.TensorSpec([None] * len(shape[:-1]) + [3], tf.float32)])
        graph = dynamic.get_concrete_function().graph
        assert (dynamic(field).numpy() == resized.numpy()).all()
        assert any(op.type in ("If", "StatelessIf") for op in graph.get_operations())
    # other sizes still resize; uint8 comes back float32 either way
    odd = tf.constant(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8))
    assert resize_field(odd, 32).dtype == tf.float32 and resize_field(odd, 32).shape == (32, 32, 3)
    assert resize_field(tf.constant(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)), 32).dtype == tf.float32


def test_context_path_csv_split_and_tiff(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.tif")
        Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(tmp_path / f"c{i}.jpg")
        rows.append({"path": f"p{i}.tif", "label": "pos" if i % 2 else "neg", "context_path": f"c{i}.jpg",
                     "group": f"patient{i // 2}", "split": "train" if i < 3 else "val"})
    with open(tmp_path / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    m = extract(tmp_path / "data.csv", tmp_path / "emb", views="x20:rgb,x5:rgb", split="train", **TINY)
    assert m["num_records"] == 3 and m["classes"] == ["neg", "pos"] and m["source"]["split"] == "train"
    emb = load_embeddings(tmp_path / "emb")
    assert emb.groups == ["patient0", "patient0", "patient1"]
    bb = load_backbone("resnet50", weights="none", input_size=32)
    img = np.asarray(Image.open(tmp_path / "p0.tif"))
    ctx = np.asarray(Image.open(tmp_path / "c0.jpg"))
    direct = bb(compose_views(tf.constant(img), tf.constant(ctx), parse_views("x20:rgb,x5:rgb"), 32)).numpy()
    assert_f16_close(emb.X[0], direct.reshape(-1))


def test_determinism_same_bytes(image_folder, tmp_path):
    a = extract(image_folder, tmp_path / "a", shard_size=8, **TINY)
    b = extract(image_folder, tmp_path / "b", shard_size=8, **TINY)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_rerun_skips_completed_shards_and_keeps_manifest(image_folder, tmp_path):
    first = extract(image_folder, tmp_path / "emb", shard_size=5, **TINY)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("shard-*")}
    again = extract(image_folder, tmp_path / "emb", shard_size=5, **TINY)
    assert again == first
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("shard-*")}
    fresh = extract(image_folder, tmp_path / "emb", shard_size=5, overwrite=True, **TINY)
    assert [s["sha256"] for s in fresh["shards"]] == [s["sha256"] for s in first["shards"]]


_KILLABLE = """
import sys
from dfl_tf import extract
extract(sys.argv[1], sys.argv[2], backbone="resnet50", weights="none", input_size=48, batch_size=2,
        shard_size=3, progress=False)
"""


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, caplog):
    images = write_images(tmp_path / "imgs", per_class=12, seed=3)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(images), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / ".parts" / "shard-00001.json").exists():
        assert proc.poll() is None, "extraction ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".parts").glob("shard-*.json")))
    assert 2 <= done_before < 8, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    assert f'"pid": {proc.pid}' in (out / ".dfl.lock").read_text()  # the killed run's lock stays behind
    kw = dict(backbone="resnet50", weights="none", input_size=48, batch_size=2, shard_size=3, progress=False)
    with caplog.at_level("WARNING", logger="dfl_tf.runtime.locks"):
        resumed = extract(images, out, **kw)
    assert f"taking over the stale lock {out / '.dfl.lock'} of pid {proc.pid}" in caplog.text
    assert not (out / ".dfl.lock").exists()
    clean = extract(images, tmp_path / "clean", **kw)
    assert not list(out.glob(".shard-*"))  # no temporary leftovers
    assert resumed["shards"] == clean["shards"] and resumed["num_records"] == 24
    a, b = load_embeddings(out), load_embeddings(tmp_path / "clean")
    assert a.ids == b.ids and np.array_equal(a.X, b.X)


def _corrupt_set(tmp_path: Path) -> Path:
    root = write_images(tmp_path / "imgs", per_class=3)
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "001.png").write_bytes(good[: len(good) // 3])  # truncated
    (root / "b" / "002.png").write_bytes(b"not an image at all")
    return root


def test_corrupt_image_stops_with_its_name_and_no_shard(tmp_path):
    root = _corrupt_set(tmp_path)
    with pytest.raises(DflError, match=r"a/001\.png"):
        extract(root, tmp_path / "emb", shard_size=100, **TINY)
    assert not list((tmp_path / "emb").glob("*shard-*")) and not (tmp_path / "emb" / "manifest.json").exists()
    result = CliRunner().invoke(main, ["extract", str(root), "--out", str(tmp_path / "cli"), "--weights", "none",
                                       "--input-size", "32", "--no-progress"])
    assert result.exit_code == 2 and "001.png" in result.output and "--skip-bad" in result.output


def test_skip_bad_records_skipped(tmp_path):
    root = _corrupt_set(tmp_path)
    m = extract(root, tmp_path / "emb", skip_bad=True, **TINY)
    assert m["num_records"] == 4 and m["counts"] == {"a": 2, "b": 2}
    skipped = {s["id"]: s["error"] for s in m["skipped"]}
    assert set(skipped) == {"a/001.png", "b/002.png"} and all(skipped.values())


def test_missing_file_in_csv(tmp_path):
    (tmp_path / "d.csv").write_text("path,label\nnope.png,a\n")
    with pytest.raises(DflError, match="nope.png"):
        extract(tmp_path / "d.csv", tmp_path / "emb", **TINY)


def test_clear_errors(image_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DflError, match="no samples"):
        extract(tmp_path / "empty", tmp_path / "e1", **TINY)
    with pytest.raises(DflError, match="unknown backbone 'nonet'"):
        extract(image_folder, tmp_path / "e2", **{**TINY, "backbone": "nonet"})
    with pytest.raises(DflError, match="unknown view 'x10:rgb'"):
        extract(image_folder, tmp_path / "e3", views="x10:rgb", **TINY)
    extract(image_folder, tmp_path / "out", **TINY)
    with pytest.raises(DflError, match="already holds embeddings of backbone resnet50 .* views x20:rgb"):
        extract(image_folder, tmp_path / "out", views="x20:rgb,x5:rgb", **TINY)
    with pytest.raises(DflError, match="already holds embeddings"):
        extract(image_folder, tmp_path / "out", **{**TINY, "backbone": "densenet121"})
    with pytest.raises(DflError, match=r"already holds embeddings of backbone resnet50 \(\w+, 32 px\).* 40 px"):
        extract(image_folder, tmp_path / "out", **{**TINY, "input_size": 40})  # same weights, other size
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(image_folder), "--out", str(tmp_path / "out"), "--weights", "none",
                                  "--input-size", "32", "--views", "x5:gray", "--no-progress"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "already holds" in result.output


def test_cli_config_file_and_flag_override(image_folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extract:\n  backbone: resnet50\n  weights: none\n  input_size: 32\n  views: x20:gray\n"
                   "  dtype: float32\n")
    result = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(tmp_path / "o"), "--config", str(cfg),
                                       "--views", "x20:rgb", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["views"] == ["x20:rgb"] and manifest["dtype"] == "float32"
    assert manifest["backbone"]["input_size"] == 32
    cfg.write_text("extract:\n  colour: red\n")
    bad = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(tmp_path / "p"), "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown field 'colour'" in bad.output


def test_bfloat16_embedding_is_its_own_float32_one():
    """Pretrained EfficientNet-Lite0 on distinct real H&E tiles (CMU-1): each image's bfloat16
    embedding is within cosine 0.99 of its own float32 one and nearer to it than to any other
    image's float32 embedding."""
    from dfl_tf.data.slides import open_slide

    with open_slide(FIXTURES / "cmu-1-small-region.svs") as reader:
        width, height = reader.dimensions
        tiles = [reader.read_region_at_mpp(width * i // 5, height * j // 4, 1.0, 96)
                 for i in range(1, 5) for j in range(1, 4)]
    imgs = np.stack([t for t in tiles if t.std() > 20][:6]).astype(np.float32)  # tissue, not background
    assert len(imgs) == 6
    f32 = load_backbone("efficientnet_lite0", input_size=96)(imgs).numpy()
    bf16 = load_backbone("efficientnet_lite0", input_size=96, precision="bfloat16")(imgs).numpy()
    cos = (bf16 * f32).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() >= 0.99, cos
    dist = np.linalg.norm(bf16[:, None] - f32[None], axis=2)  # [bf16 image, f32 image]
    others = dist + np.diag(np.full(len(imgs), np.inf))
    assert (np.diag(dist) < others.min(axis=1)).all(), dist


def _slide_csv(tmp_path, rows, header="slide,x,y,label"):
    (tmp_path / "coords.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return tmp_path / "coords.csv"


def test_slide_coordinates_source(tmp_path):
    from tests.helpers.slide_utils import make_pyramid_tiff

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    make_pyramid_tiff(tmp_path / "s.tiff", image, mpp=0.5, levels=3, tile=128)
    make_pyramid_tiff(tmp_path / "nompp.tiff", image, mpp=None, levels=1, tile=128)
    csv_path = _slide_csv(tmp_path, ["s.tiff,100,120,a", "s.tiff,400,300,b", "s.tiff,790,590,a"])
    m = extract(csv_path, tmp_path / "emb", views="x20:rgb,x5:rgb", patch_size=64, mpp="20x", **TINY)
    emb = load_embeddings(tmp_path / "emb")
    assert m["num_records"] == 3 and m["settings"]["context"] == "separate"
    assert m["settings"]["slide_read"] == {"mpp": 0.5, "patch_size": 64, "slide_mpp": None}
    assert emb.xy.tolist() == [[100, 120], [400, 300], [790, 590]] and emb.ids[0] == "s.tiff@100,120"
    assert all(s.endswith("s.tiff") for s in emb.slides) and emb.groups == ["s"] * 3
    # the record equals the backbone on the reads at the same centre
    from dfl_tf.data.slides import read_views

    x20, x5 = read_views(str(tmp_path / "s.tiff"), 400, 300, 0.5, 64, True)
    bb = load_backbone("resnet50", weights="none", input_size=32)
    direct = bb(compose_views(tf.constant(x20), tf.constant(x5), parse_views("x20:rgb,x5:rgb"), 32)).numpy()
    assert_f16_close(emb.X[1], direct.reshape(-1))
    # bounds are validated, naming the slide
    with pytest.raises(DflError, match=r"s\.tiff: centre \(900, 10\) lies outside the slide \(800 x 600"):
        extract(_slide_csv(tmp_path, ["s.tiff,900,10,a"]), tmp_path / "e2", patch_size=64, **TINY)
    # no mpp metadata: a clear error, then the override works (flag or column)
    nompp = _slide_csv(tmp_path, ["nompp.tiff,200,200,a"])
    with pytest.raises(DflError, match=r"nompp\.tiff.*--slide-mpp"):
        extract(nompp, tmp_path / "e3", patch_size=64, **TINY)
    assert extract(nompp, tmp_path / "e4", patch_size=64, slide_mpp=0.5, **TINY)["num_records"] == 1
    col = _slide_csv(tmp_path, ["nompp.tiff,200,200,a,0.25"], header="slide,x,y,label,slide_mpp")
    assert extract(col, tmp_path / "e5", patch_size=64, **TINY)["num_records"] == 1


def test_partial_context_column_refused(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "d.csv").write_text("path,label,context_path\np0.png,a,p1.png\np1.png,b,\n")
    with pytest.raises(DflError, match=r"1 of 2 rows have a context_path, p1\.png has none"):
        extract(tmp_path / "d.csv", tmp_path / "emb", views="x20:rgb,x5:rgb", **TINY)


def test_16bit_images_decode_as_in_serving(tmp_path):
    """The shared decoder (extraction) and tf.io.decode_image (what the graph runs for PNG) agree."""
    from dfl_tf.data.sources import read_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    served = tf.io.decode_image((tmp_path / "g16.png").read_bytes(), channels=3, dtype=tf.uint8).numpy()
    assert np.array_equal(read_image(str(tmp_path / "g16.png")), served)
