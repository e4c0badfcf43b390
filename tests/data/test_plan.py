"""The read plan as a value (dfl_tf.data.plan): views as data, built once, recorded by itself; a
third zoom (x10) added in one place, the plan's table, and read from slides at 2x the field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import FIXTURES
from tests.helpers.tiny import TINY_FAST as TINY
from dfl_tf import export_model, extract, train_head
from dfl_tf.data import plan as plan_mod
from dfl_tf.data.plan import ReadPlan, parse_views, register_zoom
from dfl_tf.errors import DflError
from dfl_tf.options import ExtractOptions

DATA = FIXTURES


@pytest.fixture
def x10():
    """x10 registered in the plan's zoom table for the test (the one change a new zoom needs)."""
    assert "x10" not in plan_mod.ZOOMS
    factor = register_zoom("x10")
    yield factor
    plan_mod.ZOOMS.pop("x10", None)


def _slide(tmp_path: Path) -> Path:
    from tests.helpers.slide_utils import make_pyramid_tiff

    rng = np.random.default_rng(3)
    make_pyramid_tiff(tmp_path / "s.tiff", rng.integers(0, 255, (700, 900, 3), dtype=np.uint8), mpp=0.5,
                      levels=3, tile=128)
    (tmp_path / "coords.csv").write_text("slide,x,y,label\ns.tiff,300,300,a\ns.tiff,450,350,b\n"
                                         "s.tiff,600,400,a\ns.tiff,500,250,b\n")
    return tmp_path / "coords.csv"


def test_zoom_table_and_views():
    assert [v.factor for v in parse_views("x20:rgb,x5:gray")] == [1, 4]
    with pytest.raises(DflError, match=r"unknown view 'x10:rgb' \(views are x20:rgb, x20:gray, x5:rgb, x5:gray\)"):
        parse_views("x10:rgb")
    with pytest.raises(DflError, match="zoom 'x3': factor 6.66"):
        register_zoom("x3")
    with pytest.raises(DflError, match="zoom 'big' is not xN"):
        register_zoom("big")
    assert "x3" not in plan_mod.ZOOMS and "big" not in plan_mod.ZOOMS


def test_plan_from_options_and_record_round_trip(tmp_path):
    from dfl_tf.data.sources import load_source

    options = ExtractOptions(views="x20:rgb,x5:rgb", fit="pad-scale", pad_to=48, mpp="20x", patch_size=64)
    plan = options.plan(32, "float32")
    assert plan.factors == (1, 4) and plan.mpp == 0.5 and plan.stain is None and plan.source_kind is None
    bound = plan.bind(load_source(_slide(tmp_path)))
    assert bound.loaded_fields == (1, 4) and bound.serving_fields == (1, 4) and bound.pads() == {1: 48, 4: 48}
    record = bound.to_record()
    # the manifest's geometry layout, unchanged (no zooms/stain keys for x20/x5 without stain handling)
    assert set(record) == {"source_kind", "input_size", "fit", "pad_to", "context", "x5_source", "x5_pad_to",
                           "x5_from_image", "mpp", "patch_size", "mpps", "patch_sizes", "slide_mpp_source",
                           "precision", "decoder"}
    assert record["x5_source"] == "slide" and record["mpps"] == [0.5] and record["patch_size"] == 64
    again = ReadPlan.from_record(record, ["x20:rgb", "x5:rgb"])
    assert again.to_record() == record and again.views == bound.views
    # an artefact older than the record (tests/fixtures/old_head) still gives a plan: its old behaviour
    old = ReadPlan.from_artefact(json.loads((DATA / "old_head" / "head.json").read_text()))
    assert old.views == parse_views("x20:rgb") and old.fit == "scale" and old.min_side() is None


def test_x10_extracts_from_slides_and_is_refused_where_it_cannot_be_served(tmp_path, x10):
    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.data.slides import read_fields
    from dfl_tf.data.views import compose_fields
    from dfl_tf.store.shards import load_embeddings

    assert x10 == 2
    coords = _slide(tmp_path)
    views = "x20:rgb,x10:rgb,x5:rgb"
    m = extract(coords, tmp_path / "emb", views=views, patch_size=64, mpp=0.5, **TINY)
    assert m["views"] == views.split(",") and m["geometry"]["zooms"] == {"x10": 2}
    emb = load_embeddings(tmp_path / "emb")
    bb = load_backbone("tiny_test", weights="none", input_size=32)
    fields = read_fields(str(tmp_path / "s.tiff"), 450, 350, 0.5, 64, (1, 2, 4))
    # the x10 field: same centre, read at 2x the mpp (2x the x20 field of view)
    with_mpp = read_fields(str(tmp_path / "s.tiff"), 450, 350, 1.0, 64, (1,))[1]
    np.testing.assert_array_equal(fields[2], with_mpp)
    x10_direct = bb(compose_fields({2: tf.constant(fields[2])}, parse_views("x10:rgb"), 32)).numpy()
    dim = bb.dim
    np.testing.assert_allclose(emb.X[1][dim:2 * dim], x10_direct.reshape(-1).astype(np.float16), rtol=2e-3,
                               atol=2e-3)
    x5_direct = bb(compose_fields({4: tf.constant(fields[4])}, parse_views("x5:rgb"), 32)).numpy()
    np.testing.assert_allclose(emb.X[1][2 * dim:], x5_direct.reshape(-1).astype(np.float16), rtol=2e-3, atol=2e-3)
    # the record carries the zoom: a process that never registered x10 reads it back
    plan_mod.ZOOMS.pop("x10")
    plan = ReadPlan.from_artefact(json.loads((tmp_path / "emb" / "manifest.json").read_text()))
    assert [v.factor for v in plan.views] == [1, 2, 4] and plan.factors == (1, 2, 4)
    # image sources give x20 and one x5 field: x10 is refused there, naming the source
    images = tmp_path / "imgs" / "a"
    images.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(images / "p.png")
    with pytest.raises(DflError, match=r"imgs: view x10:rgb needs a slide source"):
        extract(tmp_path / "imgs", tmp_path / "e2", views=views, **TINY)
    # the serving signatures carry image_bytes + context_bytes: exporting an x10 model is refused
    train_head(tmp_path / "emb", tmp_path / "head", val=tmp_path / "emb", hidden=0, epochs=1, batch_size=4,
               progress=False)
    with pytest.raises(DflError, match=r"x10:rgb.*carry two fields.*cannot be exported"):
        export_model([tmp_path / "head"], tmp_path / "model", parity_samples=1)
    assert not (tmp_path / "model" / "1").exists()


def test_stain_has_a_place_in_the_plan_and_the_check(tmp_path):
    """Issue 31's stain handling: recorded by the plan when set, compared by the one check."""
    from dfl_tf.data.sources import load_source
    from dfl_tf.provenance import check_compatible

    bound = ExtractOptions(patch_size=64).plan(32).bind(load_source(_slide(tmp_path)))
    raw = bound.to_record()
    assert "stain" not in raw  # stores without stain handling keep their geometry layout
    normalised = bound.replace(stain={"norm": "macenko"}).to_record()
    assert normalised["stain"] == {"norm": "macenko"}
    assert ReadPlan.from_record(normalised, ["x20:rgb"]).stain == {"norm": "macenko"}
    a = {"views": ["x20:rgb"], "dim": 16, "geometry": raw}
    b = {"views": ["x20:rgb"], "dim": 16, "geometry": normalised}
    check_compatible(a, dict(a), "head h", "embeddings e")
    with pytest.raises(DflError, match=r"head h and embeddings e disagree on stain: none \(raw pixels\) vs stain "):
        check_compatible(a, b, "head h", "embeddings e")
