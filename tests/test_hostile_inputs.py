"""Hostile inputs through the CLI (issue 29): each is refused with exit 2 and one ``error:`` line
naming the culprit, and nothing outside the command's own output changes; the accepted variants
(``--skip-bad``, a capped batch size, warnings) are checked for what they record and print.
Serving-graph cases call the exported signature directly."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers.tiny import TINY_FAST, write_images
from tests.helpers.emb_utils import blobs, make_embedding_dir
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl, snapshot
from tests.helpers import REPO

TINY_FLAGS = ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "4",
              "--no-progress"]
BAD_NAME = b"\xff\xfe.png"  # not valid UTF-8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Images (a/, b/), a CSV with context paths, a 2-view store, a head and its export (max batch 4)."""
    from dfl_tf import export_model, extract, train_head

    root = tmp_path_factory.mktemp("hostile")
    images = write_images(root / "imgs", per_class=3, size=(40, 40))
    with open(root / "ctx.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "context_path"])
        for p in sorted(images.rglob("*.png")):
            rel = p.relative_to(root).as_posix()
            writer.writerow([rel, p.parent.name, rel])
    extract(root / "ctx.csv", root / "emb", views="x20:rgb,x5:rgb", **TINY_FAST)
    train_head(root / "emb", root / "head", val=root / "emb", hidden=0, epochs=1, batch_size=8, progress=False)
    info = export_model([root / "head"], root / "models" / "m", parity_samples=2, max_batch=4)
    extract(images, root / "emb1", **TINY_FAST)  # one view: predicts image folders
    train_head(root / "emb1", root / "head1", hidden=0, epochs=1, batch_size=8, progress=False)
    single = export_model([root / "head1"], root / "models" / "one", parity_samples=0)
    X, y = blobs(24, 8)
    make_embedding_dir(root / "f16", X, y, ["a", "b"], dtype="float16")
    train_head(root / "f16", root / "head16", hidden=0, epochs=1, batch_size=8, progress=False)
    manifest = json.loads((root / "f16" / "manifest.json").read_text())
    manifest["dtype"] = "float32"  # the records are float16
    (root / "f16" / "manifest.json").write_text(json.dumps(manifest))
    return {"root": root, "images": images, "csv": root / "ctx.csv", "emb": root / "emb", "head": root / "head",
            "head16": root / "head16", "model": Path(info["path"]), "single": Path(single["path"]), "f16": root / "f16"}


def _copy_images(world, dest: Path) -> Path:
    shutil.copytree(world["images"], dest)
    return dest


# -- the cases: (world, tmp) -> (args, culprits, own outputs) ----------------------------------------

def _bad_name(world, tmp):
    folder = _copy_images(world, tmp / "imgs")
    os.rename(folder / "a" / "000.png", os.fsencode(folder / "a") + b"/" + BAD_NAME)
    return ["extract", folder, "--out", tmp / "out", *TINY_FLAGS], [r"a/\xff\xfe.png", "UTF-8"], [tmp / "out"]


def _bad_class_folder(world, tmp):
    folder = _copy_images(world, tmp / "imgs")
    os.rename(folder / "b", os.fsencode(folder) + b"/\xe9t\xe9")
    return ["extract", folder, "--out", tmp / "out", "--skip-bad", *TINY_FLAGS], [r"\xe9t\xe9", "class folder"], \
        [tmp / "out"]


def _dangling(world, tmp):
    folder = _copy_images(world, tmp / "imgs")
    os.symlink(tmp / "gone.png", folder / "a" / "zz.png")
    return ["extract", folder, "--out", tmp / "out", *TINY_FLAGS], ["a/zz.png", "dangling symlink"], [tmp / "out"]


def _dangling_predict(world, tmp):
    folder = _copy_images(world, tmp / "imgs")
    os.symlink(tmp / "gone.png", folder / "b" / "zz.png")
    return ["predict", world["single"], folder, "--out", tmp / "p.csv", "--no-progress"], \
        ["b/zz.png", "dangling symlink"], [tmp / "p.csv"]


def _config(command: str, text: str, key: str):
    def case(world, tmp):
        (tmp / "c.yaml").write_text(text)
        source = {"train": world["emb"], "extract": world["images"]}[command]
        return [command, source, "--out", tmp / "out", "--config", tmp / "c.yaml", "--no-progress"], \
            [str(tmp / "c.yaml"), f"'{key}'"], [tmp / "out"]
    return case


def _batch_zero(command: str):
    def case(world, tmp):
        args = {"predict": ["predict", world["model"], world["csv"], "--out", tmp / "out"],
                "heatmap": ["heatmap", world["model"], tmp / "slide.tif", "--out", tmp / "out"],
                "evaluate": ["evaluate", world["head"], world["emb"], "--out", tmp / "out"]}[command]
        return [*args, "--batch-size", "0"], ["--batch-size", "(got 0)"], [tmp / "out"]
    return case


def _incomplete_model(missing: str, command: str):
    def case(world, tmp):
        model = tmp / "m" / "1"
        shutil.copytree(world["model"], model)
        target = model / missing
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        args = {"predict": ["predict", model, world["csv"], "--out", tmp / "out", "--no-progress"],
                "heatmap": ["heatmap", model, tmp / "slide.tif", "--out", tmp / "out", "--no-progress"],
                "extract": ["extract", world["images"], "--out", tmp / "out", "--backbone", model, "--no-progress"]
                }[command]
        return args, [str(model), missing], [tmp / "out"]
    return case


def _dtype_mismatch(command: str):
    def case(world, tmp):
        args = {"train": ["train", world["f16"], "--out", tmp / "out", "--epochs", "1", "--no-progress"],
                "evaluate": ["evaluate", world["head16"], world["f16"], "--out", tmp / "out"]}[command]
        return args, ["shard-00000.tfrecord", "'embedding'", "float32"], [tmp / "out"]
    return case


def _dup_column(command: str):
    def case(world, tmp):
        rel = os.path.relpath(world["images"] / "a" / "000.png", tmp)
        (tmp / "d.csv").write_text(f"path,label,path\n{rel},a,{rel}\n")
        args = {"extract": ["extract", tmp / "d.csv", "--out", tmp / "out", *TINY_FLAGS],
                "predict": ["predict", world["model"], tmp / "d.csv", "--out", tmp / "out", "--no-progress"]}[command]
        return args, [str(tmp / "d.csv"), "'path'", "more than once"], [tmp / "out"]
    return case


def _dup_slide_column(world, tmp):
    (tmp / "s.csv").write_text("slide,x,y,x\ns.tif,1,2,3\n")
    return ["extract", tmp / "s.csv", "--out", tmp / "out", *TINY_FLAGS], [str(tmp / "s.csv"), "'x'"], [tmp / "out"]


def _label_case(world, tmp):
    rows = [f"{os.path.relpath(p, tmp)},{'Tumour' if i else 'tumour'}"
            for i, p in enumerate(sorted(world["images"].rglob("*.png"))[:2])]
    (tmp / "l.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return ["extract", tmp / "l.csv", "--out", tmp / "out", *TINY_FLAGS], ["'Tumour'", "'tumour'", "case"], \
        [tmp / "out"]


def _float_tiff(values: np.ndarray, culprit: str):
    def case(world, tmp):
        (tmp / "imgs" / "a").mkdir(parents=True)
        Image.fromarray(values).save(tmp / "imgs" / "a" / "x.tif")
        return ["extract", tmp / "imgs", "--out", tmp / "out", *TINY_FLAGS], ["a/x.tif", culprit], [tmp / "out"]
    return case


CASES = {
    "non-utf8-file-name": _bad_name,
    "non-utf8-class-folder": _bad_class_folder,
    "dangling-symlink-extract": _dangling,
    "dangling-symlink-predict": _dangling_predict,
    "config-epochs-word": _config("train", 'epochs: "two"\n', "epochs"),
    "config-hidden-word": _config("train", "hidden: abc\n", "hidden"),
    "config-epochs-fraction": _config("train", "epochs: 2.7\n", "epochs"),
    "config-epochs-bool": _config("train", "epochs: true\n", "epochs"),
    "config-lr-word": _config("train", "lr: fast\n", "lr"),
    "config-probe-word": _config("train", "probe: maybe\n", "probe"),
    "config-views-number": _config("extract", "views: 5\n", "views"),
    "config-augment-number": _config("train", "augment: 5\n", "augment"),
    "config-cv-grid-list": _config("train", "cv_grid: [0.1]\n", "cv_grid"),
    "config-skip-bad-string": _config("extract", "skip_bad: 'yes'\n", "skip_bad"),
    "config-duplicate-key": _config("train", "epochs: 2\nlr: 0.01\nepochs: 5\n", "epochs"),
    "config-section-not-mapping": _config("train", "train: [epochs, 2]\n", "train"),
    "extract-workers-zero": lambda world, tmp: (["extract", world["images"], "--out", tmp / "out", "--workers", "0",
                                                 *TINY_FLAGS], ["workers", "(got 0)"], [tmp / "out"]),
    "predict-batch-zero": _batch_zero("predict"),
    "heatmap-batch-zero": _batch_zero("heatmap"),
    "evaluate-batch-zero": _batch_zero("evaluate"),
    "predict-no-variables": _incomplete_model("variables", "predict"),
    "predict-no-saved-model-pb": _incomplete_model("saved_model.pb", "predict"),
    "heatmap-no-variables": _incomplete_model("variables", "heatmap"),
    "backbone-no-variables": _incomplete_model("variables", "extract"),
    "train-dtype-mismatch": _dtype_mismatch("train"),
    "evaluate-dtype-mismatch": _dtype_mismatch("evaluate"),
    "csv-duplicate-column-extract": _dup_column("extract"),
    "csv-duplicate-column-predict": _dup_column("predict"),
    "slide-csv-duplicate-column": _dup_slide_column,
    "labels-differ-by-case": _label_case,
    "float-tiff-out-of-range": _float_tiff(np.full((40, 40), 200.0, np.float32), "[0, 1]"),
    "float-tiff-nan": _float_tiff(np.full((40, 40), np.nan, np.float32), "[0, 1]"),
    "int32-tiff-wide": _float_tiff(np.full((40, 40), 70000, np.int32), "int32"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_one_line_and_nothing_changed(world, tmp_path, name):
    args, culprits, outputs = CASES[name](world, tmp_path)
    roots = [world["root"], tmp_path]
    before = [snapshot(r, exclude=outputs) for r in roots]
    result = run_dfl(args)
    assert_one_line_error(result, *culprits)
    assert [snapshot(r, exclude=outputs) for r in roots] == before
    for out in outputs:  # nothing half-written either
        assert not Path(out).exists(), out


# -- accepted variants -----------------------------------------------------------------------------

def test_skip_bad_records_bad_name_and_dangling_symlink(world, tmp_path):
    folder = _copy_images(world, tmp_path / "imgs")
    os.rename(folder / "a" / "000.png", os.fsencode(folder / "a") + b"/" + BAD_NAME)
    os.symlink(tmp_path / "gone.png", folder / "b" / "zz.png")
    result = run_dfl(["extract", folder, "--out", tmp_path / "out", "--skip-bad", *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_records"] == 5
    skipped = {s["id"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == {r"a/\xff\xfe.png", "b/zz.png"}
    assert "not valid UTF-8" in skipped[r"a/\xff\xfe.png"] and "dangling symlink" in skipped["b/zz.png"]
    assert "2 skipped" in result.stdout
    result = run_dfl(["predict", world["single"], folder, "--out", tmp_path / "p.csv", "--skip-bad", "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p.skipped.csv") as fh:
        listed = {row["id"]: row["error"] for row in csv.DictReader(fh)}
    assert set(listed) == {r"a/\xff\xfe.png", "b/zz.png"} and "5 predictions, 2 skipped" in result.stdout


def test_predict_batch_over_max_batch_is_capped_with_a_note(world, tmp_path):
    result = run_dfl(["predict", world["model"], world["csv"], "--out", tmp_path / "p.csv", "--batch-size", "9",
                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "note: --batch-size 9 is over the model's --max-batch 4" in result.stderr and "using 4" in result.stderr
    with open(tmp_path / "p.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6


def test_csv_duplicates_warned_once_with_counts(world, tmp_path):
    files = [os.path.relpath(p, tmp_path) for p in sorted(world["images"].rglob("*.png"))]
    rows = ["path,label,context_path,id",
            f"{files[0]},a,{files[0]},x", f"{files[1]},a,{files[1]},x",  # id x twice
            f"{files[2]},a,{files[2]},y", f"{files[2]},b,{files[2]},z",  # one path, two labels
            f"{files[3]},b,{files[3]},w", f"{files[3]},b,{files[3]},w"]  # id w twice (same label)
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    result = run_dfl(["predict", world["model"], tmp_path / "d.csv", "--out", tmp_path / "p.csv", "--no-progress"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, result.stderr
    assert "ids that appear more than once: 2 (4 rows" in warnings[0]
    assert "paths listed with more than one label: 1" in warnings[1] and "a, b" in warnings[1]


def test_float_tiff_in_unit_range_scales_to_8_bits(tmp_path):
    from dfl_tf.data.decode import read_image

    values = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    pixels = read_image(str(tmp_path / "f.tif"))
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 40, 3)
    assert np.array_equal(pixels[..., 0], np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    assert pixels.max() == 255  # not the all-black image of before


@pytest.mark.parametrize("dtype,values,expected", [
    (np.uint16, [0, 256, 65535], [0, 1, 255]),  # 16-bit: the high byte
    (np.int32, [0, 17, 255], [0, 17, 255]),  # 8-bit values in 32-bit ints: as they are
    (np.int16, [0, 17, 255], [0, 17, 255]),
])
def test_integer_tiffs_follow_the_rule(tmp_path, dtype, values, expected):
    import tifffile

    from dfl_tf.data.decode import read_image

    tifffile.imwrite(tmp_path / "i.tif", np.array([values], dtype))
    assert read_image(str(tmp_path / "i.tif"))[0, :, 0].tolist() == expected


def test_slide_regions_follow_the_same_rule():
    from dfl_tf.data.slide_backends import _to_rgb_uint8
    from dfl_tf.errors import DflError

    assert _to_rgb_uint8(np.array([[0.0, 0.5, 1.0]], np.float32))[0, :, 0].tolist() == [0, 128, 255]
    with pytest.raises(DflError, match=r"slide s\.tif: floating-point pixels must lie in \[0, 1\]"):
        _to_rgb_uint8(np.array([[0.0, 0.5, 3.0]], np.float32), "slide s.tif")


def test_config_values_converted_or_kept_by_type(tmp_path):
    from dfl_tf.config import load_yaml, merge
    from dfl_tf.extraction.local import extract
    from dfl_tf.heads.train import train_head

    (tmp_path / "c.yaml").write_text("train:\n  lr: 1e-3\n  epochs: '3'\n  hidden: null\n  noise: 0\n"
                                     "extract:\n  views: [x20:rgb, x5:gray]\n  mpp: 20x\n  weights: none\n")
    assert merge(train_head, tmp_path / "c.yaml", "train", {}) == {"lr": 0.001, "epochs": 3, "hidden": None,
                                                                   "noise": 0}
    assert merge(extract, tmp_path / "c.yaml", "extract", {}) == {"views": ["x20:rgb", "x5:gray"], "mpp": "20x",
                                                                  "weights": "none"}
    repo = REPO
    from dfl_tf.heads.evaluate import evaluate
    from dfl_tf.baselines.finetune import finetune
    from dfl_tf.select.protocol import select_backbones

    functions = {"train": train_head, "extract": extract, "select": select_backbones, "finetune": finetune,
                 "evaluate": evaluate}
    checked = 0
    for config in sorted((repo / "configs").glob("*.yaml")):  # the shipped configs all pass
        for command, func in functions.items():
            if command in load_yaml(config):
                assert merge(func, config, command, {})
                checked += 1
    assert checked >= 5


# -- serving graph (the exported signature, bytes in) ---------------------------------------------------

@pytest.fixture(scope="module")
def signature(world):
    return tf.saved_model.load(str(world["model"])).signatures


def _png(world) -> bytes:
    return sorted(world["images"].rglob("*.png"))[0].read_bytes()


@pytest.mark.parametrize("n_images,n_context,message", [
    (1, 2, r"image_bytes and context_bytes must be batches of the same length; got\] \[1\] \[and\] \[2\]"),
    (2, 1, r"image_bytes and context_bytes must be batches of the same length; got\] \[2\] \[and\] \[1\]"),
    (0, 0, r"image_bytes: empty batch"),
])
def test_serving_refuses_mismatched_or_empty_batches(world, signature, n_images, n_context, message):
    png = _png(world)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        signature["serving_default"](image_bytes=tf.constant([png] * n_images, tf.string),
                                     context_bytes=tf.constant([png] * n_context, tf.string))


def test_serve_pixels_refuses_mismatched_or_empty_batches(signature):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images and context must be batches of the same "
                       r"length; got\] \[2\] \[and\] \[1\]"):
        signature["serve_pixels"](images=tf.zeros([2, 40, 40, 3], tf.uint8), context=tf.zeros([1, 40, 40, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images: empty batch"):
        signature["serve_pixels"](images=tf.zeros([0, 40, 40, 3], tf.uint8), context=tf.zeros([0, 40, 40, 3], tf.uint8))


@pytest.mark.parametrize("cut", [36, 200, -1])
@pytest.mark.parametrize("field", ["image_bytes", "context_bytes"])
def test_truncated_png_names_its_batch_position(world, signature, cut, field):
    png = _png(world)
    batch = {"image_bytes": [png, png, png], "context_bytes": [png, png, png]}
    batch[field][2] = png[:cut]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"{field}: truncated PNG \(its chunks end before IEND\) at batch positions\] \[2\]"):
        signature["serving_default"](**{k: tf.constant(v) for k, v in batch.items()})
    out = signature["serving_default"](image_bytes=tf.constant([png + b"trailing"]), context_bytes=tf.constant([png]))
    assert out["head_probabilities"].shape == (1, 2)  # bytes after IEND are not a truncation
