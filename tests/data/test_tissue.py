"""Tissue masks, tiling grids and the `tile` CSV + thumbnails."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfl_tf.data.slides import open_slide
from dfl_tf.data.tissue import grid_centres, otsu_threshold, tile, tile_slide, tissue_mask
from dfl_tf.errors import DflError
from tests.helpers.slide_utils import make_pyramid_tiff, tissue_like
from tests.helpers import FIXTURES

CMU = FIXTURES / "cmu-1-small-region.svs"  # in the repository

BLOBS = [(300, 300, 200), (1100, 700, 150)]


@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("tissue") / "blobs.tif"
    return make_pyramid_tiff(path, tissue_like(1536, 1024, BLOBS), mpp=0.5, levels=3)


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("tissue") / "blank.tif"
    rng = np.random.default_rng(0)
    image = np.clip(243 + rng.normal(0, 4, size=(768, 1024, 3)), 0, 255).astype(np.uint8)
    return make_pyramid_tiff(path, image, mpp=0.5, levels=2)


def test_otsu_threshold():
    values = np.concatenate([np.full(1000, 0.1), np.full(500, 0.6)])
    assert 0.1 < otsu_threshold(values) <= 0.6
    assert otsu_threshold(np.full(100, 0.3)) == 0.0


@pytest.mark.parametrize("value", [255, 240, 228])
def test_blank_image_has_no_tissue(value):
    rng = np.random.default_rng(1)
    image = np.clip(value + rng.normal(0, 5, size=(200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(image).any()


def test_mask_finds_blobs_and_rejects_pen():
    image = tissue_like(400, 300, [(100, 150, 60)])
    image[40:260, 300:312] = (30, 160, 60)    # green ink stroke
    image[250:262, 180:380] = (40, 70, 200)   # blue ink stroke
    image[20:30, 200:280] = (10, 10, 10)      # black ink
    mask = tissue_mask(image)
    yy, xx = np.mgrid[0:300, 0:400]
    disc = (xx - 100) ** 2 + (yy - 150) ** 2 <= 55 ** 2
    assert mask[disc].mean() > 0.98
    assert not mask[:, 250:].any()
    assert mask.sum() < 1.2 * (np.pi * 60 ** 2)
    assert tissue_mask(image, reject_pen=False)[40:260, 300:312].mean() > 0.9


def test_mask_keeps_pale_tissue_on_all_tissue_crop():
    rng = np.random.default_rng(2)
    pale = np.clip(np.array([235, 195, 215]) + rng.normal(0, 4, (128, 128, 3)), 0, 255)
    dark = np.clip(np.array([120, 60, 150]) + rng.normal(0, 4, (128, 128, 3)), 0, 255)
    image = np.concatenate([pale, dark], axis=1).astype(np.uint8)
    assert tissue_mask(image).mean() > 0.95


def test_grid_centres():
    centres = grid_centres(1000, 256, 256)
    assert list(centres) == pytest.approx([500 - 256, 500, 500 + 256])  # 3 tiles, centred
    assert grid_centres(100, 256, 256).size == 0
    assert len(grid_centres(1000, 256, 128)) == 6


def test_tile_slide_blobs(blob_slide):
    tiles = tile_slide(blob_slide, mpp=1.0, size=64, min_tissue=0.5, thumbnail_side=512)
    assert tiles, "no tiles on the blobs"
    for t in tiles:
        assert set(t) == {"slide", "x", "y", "mpp", "tissue"}
        assert t["mpp"] == 1.0 and t["tissue"] >= 0.5
        # every kept tile centre lies on a blob (tile side 128 level-0 px)
        assert any((t["x"] - bx) ** 2 + (t["y"] - by) ** 2 <= (r + 64) ** 2 for bx, by, r in BLOBS)
    # every grid tile lying wholly inside a blob is kept
    kept = {(t["x"], t["y"]) for t in tiles}
    inside = [(int(round(x)), int(round(y))) for x in grid_centres(1536, 128, 128) for y in grid_centres(1024, 128, 128)
              if any(np.hypot(x - bx, y - by) + 64 * np.sqrt(2) <= r - 4 for bx, by, r in BLOBS)]
    assert len(inside) >= 2 and set(inside) <= kept
    dense = tile_slide(blob_slide, mpp=1.0, size=64, min_tissue=0.5, overlap=0.5, thumbnail_side=512)
    assert len(dense) > 3 * len(tiles)
    strict = tile_slide(blob_slide, mpp=1.0, size=64, min_tissue=1.0, thumbnail_side=512)
    assert 0 < len(strict) < len(tiles)
    # the tile read around a kept centre is mostly tissue-coloured
    with open_slide(blob_slide) as reader:
        t = strict[0]
        pixels = reader.read_region_at_mpp(t["x"], t["y"], 1.0, 64)
    assert (pixels.astype(int).max(-1) - pixels.min(-1) > 40).mean() > 0.9


def test_blank_slide_has_no_tiles(blank_slide):
    assert tile_slide(blank_slide, mpp=0.5, size=64, min_tissue=0.1, thumbnail_side=512) == []


def test_bad_grid_arguments(blob_slide):
    with pytest.raises(DflError):
        tile_slide(blob_slide, overlap=1.0)
    with pytest.raises(DflError):
        tile_slide(blob_slide, min_tissue=1.5)
    with pytest.raises(DflError):
        tile_slide(blob_slide, mpp="fast")
    with pytest.raises(DflError):
        tile([], "x.csv")


def test_cmu_tissue():
    with open_slide(CMU) as reader:
        thumb, ds = reader.thumbnail(512)
    mask = tissue_mask(thumb)
    assert 0.2 < mask.mean() < 0.6
    assert not mask[220:400, 0:80].any()  # blank glass left of the tissue strip
    tiles = tile_slide(CMU, mpp="20x", size=256, thumbnail_side=512)
    assert 15 <= len(tiles) <= 60
    assert all(0 <= t["x"] < 2220 and 0 <= t["y"] < 2967 for t in tiles)


def test_tile_writes_csv_and_thumbnails(tmp_path, blob_slide, blank_slide):
    out = tmp_path / "out" / "grid.csv"
    out.parent.mkdir()
    summary = tile([blob_slide, blank_slide], out, mpp=1.0, size=64, min_tissue=0.5, thumbnail_side=512)
    assert summary["csv"] == os.fspath(out)
    assert [s["tiles"] > 0 for s in summary["slides"]] == [True, False]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide", "x", "y", "mpp", "size", "tissue"] and rows[0]["size"] == "64"
    assert len(rows) == summary["tiles"] == summary["slides"][0]["tiles"]
    expected = tile_slide(blob_slide, mpp=1.0, size=64, min_tissue=0.5, thumbnail_side=512)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(t["x"], t["y"]) for t in expected]
    for row in rows:
        assert not os.path.isabs(row["slide"])  # relative to the CSV's folder
        resolved = (out.parent / row["slide"]).resolve()
        assert resolved == Path(blob_slide).resolve()
        assert float(row["mpp"]) == 1.0 and 0.5 <= float(row["tissue"]) <= 1.0
    for name in ("grid_blobs_tiles.png", "grid_blank_tiles.png"):
        png = out.parent / name
        assert png.exists()
        with Image.open(png) as im:
            assert max(im.size) <= 512
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_tile_with_slide_mpp_override(tmp_path):
    path = make_pyramid_tiff(tmp_path / "nompp.tif", tissue_like(512, 512, [(256, 256, 200)]), mpp=None,
                             levels=1)
    with pytest.raises(DflError, match="nompp.tif"):
        tile([path], tmp_path / "a.csv")
    assert not (tmp_path / "a.csv").exists()
    summary = tile([path], tmp_path / "b.csv", mpp=0.5, size=64, slide_mpp=0.25, thumbnails=False)
    assert summary["tiles"] > 0
    with open(tmp_path / "b.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["slide"] == "nompp.tif" and rows[0]["slide_mpp"] == "0.25"
    assert not list(tmp_path.glob("*.png"))


def test_tile_csv_is_an_extraction_source(tmp_path, blob_slide):
    sources = pytest.importorskip("dfl_tf.data.sources")
    out = tmp_path / "grid.csv"
    tile([blob_slide], out, mpp=1.0, size=32, min_tissue=0.5, slide_mpp=0.5, thumbnails=False,
         thumbnail_side=512)
    samples = list(sources.load_source(out).samples)
    assert samples
    first = samples[0]
    assert Path(first.slide).resolve() == Path(blob_slide).resolve()
    assert first.mpp == 1.0 and first.slide_mpp == 0.5
    x20, x5 = sources.load_sample(first, context=True, slide_read=sources.SlideRead(patch_size=32))
    with open_slide(blob_slide) as reader:
        np.testing.assert_array_equal(x20, reader.read_region_at_mpp(first.x, first.y, 1.0, 32))
        np.testing.assert_array_equal(x5, reader.read_region_at_mpp(first.x, first.y, 4.0, 32))
