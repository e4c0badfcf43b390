"""Train/serve consistency: one decoder, one recorded read geometry, views that never collapse,
one compatibility check, resolution sanity (issue 13)."""
from __future__ import annotations

import copy
import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.helpers.tiny import TINY_FAST
from dfl_tf import export_model, extract, load_embeddings, load_model, predict, train_head
from dfl_tf.provenance import FIELDS, check_compatible
from dfl_tf.data.decode import decode_bytes, decode_tensor, read_image
from dfl_tf.data.slides import open_slide
from dfl_tf.data.synthetic import make_pyramid_tiff
from dfl_tf.data.views import compose_views, parse_views
from dfl_tf.errors import DflError
from tests.helpers.slide_utils import smooth_noise

HEAD = dict(epochs=1, batch_size=8, hidden=4, progress=False)


def _textured(seed: int, side: int) -> np.ndarray:
    """A smooth, colourful image (JPEG artefacts like real photos, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))


def _folder(root: Path, ext: str, side: int = 40, per_class: int = 3, **save) -> Path:
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_textured(10 * c + i, side)).save(root / name / f"{i}.{ext}", **save)
    return root


# -- one decoder -------------------------------------------------------------------------------

def test_python_and_graph_decoders_agree(tmp_path):
    """read_image (extraction, predict) == the exported graph's decode_tensor, for JPEG (4:2:0,
    4:4:4, progressive, gray), palette and 16-bit PNG; JPEG also equals Pillow's (accurate IDCT)."""
    graph = tf.function(decode_tensor, input_signature=[tf.TensorSpec([], tf.string)])
    image = _textured(1, 64)
    files = {}
    for name, kwargs in {"420.jpg": dict(quality=75, subsampling=2), "444.jpg": dict(quality=95, subsampling=0),
                         "prog.jpg": dict(quality=80, progressive=True)}.items():
        Image.fromarray(image).save(tmp_path / name, **kwargs)
        files[name] = tmp_path / name
    Image.fromarray(image[..., 0]).save(tmp_path / "gray.jpg", quality=85)
    Image.fromarray(image).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    Image.fromarray((image[..., 1].astype(np.uint16) * 257)).save(tmp_path / "g16.png")
    for name in ("gray.jpg", "pal.png", "g16.png"):
        files[name] = tmp_path / name
    for name, path in files.items():
        ours = read_image(str(path))
        assert ours.shape == (64, 64, 3) and ours.dtype == np.uint8, name
        np.testing.assert_array_equal(ours, graph(tf.constant(path.read_bytes())).numpy(), err_msg=name)
        if name.endswith(".jpg") or name == "pal.png":
            np.testing.assert_array_equal(ours, np.asarray(Image.open(path).convert("RGB")), err_msg=name)
    assert (read_image(str(files["g16.png"]))[..., 0] == image[..., 1]).all()  # 16-bit: the high byte
    with pytest.raises(DflError, match=r"cannot read image broken\.jpg"):
        decode_bytes(files["420.jpg"].read_bytes()[:200], "broken.jpg")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """JPEG and PNG files of 128 px, x20 + x5 from the image itself (centre-crop rule), float32
    storage; a head and its export."""
    root = tmp_path_factory.mktemp("served")
    folder = _folder(root / "imgs", "png", side=128, per_class=2)
    for c in ("a", "b"):
        for i in range(2):
            Image.open(folder / c / f"{i}.png").save(folder / c / f"{i}.jpg", quality=80)
    m = extract(folder, root / "emb", views="x20:rgb,x5:rgb", dtype="float32", **TINY_FAST)
    train_head(root / "emb", root / "head", **HEAD)
    info = export_model([root / "head"], root / "m", parity_samples=8)
    return {"root": root, "manifest": m, "info": info}


def test_embed_on_file_bytes_equals_stored_float32(served):
    """The bytes signature on a JPEG or PNG file gives the embedding extraction stored for it."""
    info = served["info"]
    assert info["parity"]["passed"] and info["parity"]["bytes_samples"] == 8
    assert info["parity"]["bytes_max_rel_diff_embedding_vs_stored"] <= 1e-4
    emb = load_embeddings(served["root"] / "emb")
    assert sorted(Path(s).suffix for s in emb.sources) == [".jpg"] * 4 + [".png"] * 4
    got = load_model(info["path"]).embed([Path(s).read_bytes() for s in emb.sources])
    assert np.abs(got - emb.X).max() <= 1e-4 * np.abs(emb.X).max()
    assert info["decoder"].startswith("dfl-decode-1") and info["geometry"]["decoder"] == info["decoder"]


def test_served_centre_crop_rule_refuses_small_images(served, tmp_path):
    """A model extracted with the centre-crop rule on large images refuses small ones when served
    (bytes signature) and in predict (naming the file), as extraction would."""
    geo = served["manifest"]["geometry"]
    assert geo["x5_source"] == "image" and geo["x5_from_image"] is False and geo["context"] == "centre-crop"
    small = _folder(tmp_path / "small", "png", side=40, per_class=1)
    model = load_model(served["info"]["path"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="image smaller than 128 px"):
        model([(small / "a" / "0.png").read_bytes()])
    with pytest.raises(DflError, match=r"0\.png: 40x40 px is smaller than 128 px"):
        predict(served["info"]["path"], small, tmp_path / "p.csv", progress=False)


# -- views never collapse ----------------------------------------------------------------------

def test_x5_with_fit_pad_refused_on_images(tmp_path):
    folder = _folder(tmp_path / "imgs", "png", side=128, per_class=1)
    with pytest.raises(DflError, match=r"--fit pad keeps the pixel scale.*x5"):
        extract(folder, tmp_path / "emb", views="x20:rgb,x5:rgb", fit="pad", **TINY_FAST)
    assert not (tmp_path / "emb").exists()


def test_x5_context_image_under_pad_scale_is_the_wider_field():
    """pad-scale pads the x5 field (a context image at the image's um/px) to 4 x pad_to: x5 is
    not the centre of the context image, i.e. not x20 again."""
    context = _textured(3, 128)
    image = context[48:80, 48:80]  # x20 = the centre quarter of the context, same um/px
    views = parse_views("x20:rgb,x5:rgb")
    out = compose_views(tf.constant(image), tf.constant(context), views, 32, "pad-scale", pad_to=32,
                        x5_pad_to=128).numpy()
    np.testing.assert_allclose(out[0], image, atol=1e-3)  # x20: 32 in 32, no resize
    expected_x5 = tf.image.resize(tf.constant(context, tf.float32), (32, 32), antialias=True).numpy()
    np.testing.assert_allclose(out[1], expected_x5, atol=1e-3)
    assert np.abs(out[0] - out[1]).mean() > 10


def test_small_image_x5_needs_x5_from_image(tmp_path):
    folder = _folder(tmp_path / "imgs", "png", side=40, per_class=2)
    with pytest.raises(DflError, match=r"a[/\\]0\.png: 40x40 px is smaller than 128 px.*--x5-from-image"):
        extract(folder, tmp_path / "emb", views="x20:rgb,x5:rgb", **TINY_FAST)
    m = extract(folder, tmp_path / "emb2", views="x20:rgb,x5:rgb", x5_from_image=True, **TINY_FAST)
    geo = m["geometry"]
    assert geo["context"] == "centre-crop" and geo["x5_source"] == "image" and geo["x5_from_image"] is True
    assert m["num_records"] == 4


# -- one recorded geometry ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slide")
    return Path(make_pyramid_tiff(root / "s.tiff", smooth_noise(640, 480, cell=16, seed=2), mpp=0.5, levels=2,
                                  tile=128))


def _coords(path: Path, slide: Path, sizes: list[int], mpp: str = "") -> Path:
    rows = [{"slide": slide.name, "x": 160 + 80 * i, "y": 200, "label": "ab"[i % 2], "size": s, "mpp": mpp,
             "group": f"g{i}"}
            for i, s in enumerate(sizes)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mixed_geometry_csv_refused_unless_allowed(tmp_path, slide):
    src = _coords(slide.parent / "mixed.csv", slide, [64, 96, 64, 96])
    with pytest.raises(DflError, match=r"'size' column holds 2 different patch sizes \[64, 96\].*"
                                       r"--allow-mixed-geometry"):
        extract(src, tmp_path / "emb", **TINY_FAST)
    m = extract(src, tmp_path / "emb", allow_mixed_geometry=True, **TINY_FAST)
    assert m["geometry"]["patch_sizes"] == [64, 96] and m["geometry"]["patch_size"] is None
    assert m["geometry"]["mpp"] == 0.5 and m["geometry"]["slide_mpp_source"] == "metadata"


def test_geometry_recorded_and_carried_to_predict(tmp_path, slide):
    src = _coords(slide.parent / "one.csv", slide, [64, 64, 64, 64], mpp="20x")
    m = extract(src, tmp_path / "emb", views="x20:rgb,x5:rgb", fit="pad-scale", pad_to=80, **TINY_FAST)
    geo = m["geometry"]
    assert (geo["mpp"], geo["patch_size"], geo["input_size"], geo["fit"], geo["pad_to"]) == (0.5, 64, 32,
                                                                                             "pad-scale", 80)
    assert geo["context"] == "separate" and geo["x5_source"] == "slide" and geo["x5_pad_to"] == 80
    assert geo["precision"] == "float32" and geo["decoder"].startswith("slide reader")
    train_head(tmp_path / "emb", tmp_path / "head", val=tmp_path / "emb", **HEAD)
    info = export_model([tmp_path / "head"], tmp_path / "m")
    assert (info["mpp"], info["patch_size"]) == (0.5, 64) and info["geometry"] == geo
    assert info["parity"]["bytes_samples"] == 4 and info["parity"]["bytes_note"].startswith("slide samples")
    # the same CSV without size/mpp columns: predict reads at the recorded geometry
    plain = tmp_path / "plain.csv"
    plain.write_text("slide,x,y\n" + "".join(f"{slide},{160 + 80 * i},200\n" for i in range(2)))
    out = predict(info["path"], plain, tmp_path / "p.csv", progress=False)
    assert out["predicted"] == 2
    with pytest.raises(DflError, match=r"trained at patch size 64, not --size 96"):
        predict(info["path"], plain, tmp_path / "p2.csv", patch_size=96, progress=False)
    other = _coords(tmp_path / "other.csv", slide, [96, 96])
    with pytest.raises(DflError, match=r"row .* trained at patch size 64, not --size 96"):
        predict(info["path"], other, tmp_path / "p3.csv", progress=False)


def test_trained_read_defaults_and_refusals():
    from dfl_tf.provenance import trained_read

    one = {"mpp": 0.5, "patch_size": 224, "mpps": [0.5], "patch_sizes": [224]}
    assert trained_read(one, None, None, "m") == (0.5, 224)
    assert trained_read(one, 0.5, 224, "m") == (0.5, 224)
    with pytest.raises(DflError, match=r"^m was trained at mpp 0.5, not --mpp 1.0"):
        trained_read(one, 1.0, None, "m")
    mixed = {"mpp": 0.5, "patch_size": None, "mpps": [0.5], "patch_sizes": [64, 96]}
    with pytest.raises(DflError, match=r"several patch sizes \[64, 96\]: pass --size"):
        trained_read(mixed, None, None, "m")
    assert trained_read(mixed, None, 96, "m") == (0.5, 96)
    assert trained_read({"mpp": None, "patch_size": None}, None, None, "m") == (None, None)  # trained on images


# -- one compatibility check -------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    return extract(_folder(root / "imgs", "png", per_class=3), root / "emb", **TINY_FAST)


MUTATIONS = {
    "backbone fingerprint": lambda m: m["backbone"].update(fingerprint="0" * 64),
    "views": lambda m: m.update(views=["x20:gray"]),
    "dim": lambda m: m.update(dim=m["dim"] * 2),
    "input size": lambda m: m["backbone"].update(input_size=64),
    "fit": lambda m: m["geometry"].update(fit="pad"),
    "pad_to": lambda m: m["geometry"].update(pad_to=48),
    "context": lambda m: m["geometry"].update(context="separate"),
    "mpp": lambda m: m["geometry"].update(mpp=0.25),
    "patch size": lambda m: m["geometry"].update(patch_size=128),
    "precision": lambda m: m["geometry"].update(precision="bfloat16"),
    "decoder": lambda m: m["geometry"].update(decoder="pillow"),
    "stain": lambda m: m["geometry"].update(stain={"norm": "macenko"}),  # the read plan's stain field (issue 31)
}


@pytest.mark.parametrize("field", FIELDS)
def test_each_compatibility_field_mismatch_refused(manifest, field):
    other = copy.deepcopy(manifest)
    MUTATIONS[field](other)
    check_compatible(manifest, copy.deepcopy(manifest), "train", "val")  # itself: fine
    with pytest.raises(DflError, match=rf"^head X and embeddings Y disagree on {field}: .+ vs .+$"):
        check_compatible(manifest, other, "head X", "embeddings Y")
    head_like = {k: manifest[k] for k in ("backbone", "views", "dim")}
    head_like["extraction"] = {"geometry": other["geometry"]}
    if field in ("fit", "pad_to", "context", "mpp", "patch size", "precision", "decoder", "stain"):
        with pytest.raises(DflError, match=f"disagree on {field}"):  # head.json carries it as extraction.geometry
            check_compatible(head_like, manifest, "head", "test")


def test_train_evaluate_export_use_the_check(tmp_path, manifest):
    folder = Path(manifest["source"]["path"])
    extract(folder, tmp_path / "scale", **TINY_FAST)
    extract(folder, tmp_path / "pad", fit="pad", **TINY_FAST)
    with pytest.raises(DflError, match=r"training embeddings .*scale and validation embeddings .*pad disagree on "
                                       r"fit: scale vs pad"):
        train_head(tmp_path / "scale", tmp_path / "h", val=tmp_path / "pad", **HEAD)
    train_head(tmp_path / "scale", tmp_path / "h1", **HEAD)
    train_head(tmp_path / "pad", tmp_path / "h2", **HEAD)
    from dfl_tf import evaluate

    with pytest.raises(DflError, match="disagree on fit"):
        evaluate(tmp_path / "h1", tmp_path / "pad")
    with pytest.raises(DflError, match=r"head .*h1 and head .*h2 disagree on fit"):
        export_model([tmp_path / "h1", tmp_path / "h2"], tmp_path / "m")


# -- resolution sanity -------------------------------------------------------------------------

def test_implausible_slide_mpp_needs_override(tmp_path, caplog):
    path = make_pyramid_tiff(tmp_path / "dpi.tiff", smooth_noise(256, 256, seed=3), mpp=25400 / 600, levels=1,
                             tile=128)
    with pytest.raises(DflError, match=r"dpi\.tiff: its metadata gives 42\.3+\d* um/px, outside 0\.05-20 .*"
                                       r"--slide-mpp"):
        open_slide(path)
    with open_slide(path, mpp_override=0.5) as reader:
        assert reader.mpp == 0.5
        with caplog.at_level(logging.WARNING, logger="dfl_tf.slides"):
            reader.read_region_at_mpp(128, 128, 0.25, 32)
            reader.read_region_at_mpp(100, 100, 0.25, 32)  # logged once per slide and mpp
    warnings = [r.getMessage() for r in caplog.records if "finer than level 0" in r.getMessage()]
    assert len(warnings) == 1 and "upsampled 2.00x" in warnings[0]


# -- non-finite embeddings ---------------------------------------------------------------------

def test_non_finite_embedding_refused_naming_the_sample(tmp_path):
    import keras

    from dfl_tf.backbones.registry import Backbone

    inputs = keras.Input((16, 16, 3))
    mean = keras.layers.Lambda(lambda x: tf.reduce_mean(x, axis=[1, 2]))(inputs)
    model = keras.Model(inputs, keras.layers.Lambda(lambda m: tf.math.log(m - 100.0))(mean))
    bb = Backbone("nan_test", model, 16, 3, "none", "f" * 64)
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / "a" / "bright.png")
    Image.fromarray(np.full((16, 16, 3), 20, np.uint8)).save(folder / "a" / "dark.png")
    with pytest.raises(DflError, match=r"a/dark\.png.*non-finite"):
        extract(folder, tmp_path / "emb", model=bb, progress=False)
    assert not list((tmp_path / "emb").glob("shard-*.tfrecord"))
