"""Slide readers: geometry, pyramid levels, padding, mpp, fallbacks, errors, threads."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfl_tf.data import slides as slides_mod
from dfl_tf.data.slides import borrow_reader, open_slide, parse_magnification, read_views
from dfl_tf.errors import DflError
from tests.helpers.slide_utils import make_pyramid_tiff, rings, smooth_noise, truncate
from tests.helpers import FIXTURES

DATA = FIXTURES  # carried by the repository (tests/fixtures/README.md)
CMU = DATA / "cmu-1-small-region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
BACKENDS = ["openslide", "tifffile"]

CX, CY = 520, 400  # ring centre (a level-0 pixel corner)


@pytest.fixture(scope="module")
def ring_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "rings.tif"
    return make_pyramid_tiff(path, rings(1024, 896, CX, CY, period=40.0), mpp=0.25, levels=3)


@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "noise.tif"
    return make_pyramid_tiff(path, smooth_noise(1536, 1536, cell=24, seed=1), mpp=0.25, levels=3)


def _symmetry_error(tile: np.ndarray) -> float:
    t = tile.astype(np.int16)
    return max(np.abs(t - t[::-1]).max(), np.abs(t - t[:, ::-1]).max())


# --- magnification -----------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (0.5, 0.5), ("0.5", 0.5), ("20x", 0.5), ("20X", 0.5), (" 40x ", 0.25), ("10x", 1.0),
    ("5x", 2.0), (1, 1.0), ("0.25um", 0.25), ("2.5e-1", 0.25),
])
def test_parse_magnification(value, expected):
    assert parse_magnification(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["", "x", "abc", "-0.5", "0", "0x", "20y", None, True, [0.5], float("nan")])
def test_parse_magnification_invalid(value):
    with pytest.raises(DflError):
        parse_magnification(value)


# --- synthetic pyramid ---------------------------------------------------------------------------

def test_synthetic_pyramid_opens_as_generic_tiff_with_mpp(ring_slide):
    import openslide

    with openslide.OpenSlide(ring_slide) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert slide.level_count == 3
    for backend in BACKENDS:
        with open_slide(ring_slide, backend=backend) as reader:
            assert reader.backend == backend
            assert reader.mpp == pytest.approx(0.25)
            assert reader.dimensions == (1024, 896)
            assert reader.level_count == 3
            assert reader.level_downsamples == pytest.approx([1.0, 2.0, 4.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0, 0.35, 0.8])
def test_read_is_centred(ring_slide, backend, mpp):
    with open_slide(ring_slide, backend=backend) as reader:
        tile = reader.read_region_at_mpp(CX, CY, mpp, 96)
    assert tile.shape == (96, 96, 3) and tile.dtype == np.uint8
    # Mirror-symmetric around the ring centre; exact at pyramid mpps, resampling noise otherwise.
    assert _symmetry_error(tile) <= (0 if mpp in (0.25, 0.5, 1.0) else 3)
    with open_slide(ring_slide, backend=backend) as reader:
        off = reader.read_region_at_mpp(CX + 6, CY, mpp, 96)
    assert _symmetry_error(off) > 20  # a shifted centre is visibly asymmetric


def test_backends_agree(noise_slide):
    with open_slide(noise_slide, backend="openslide") as a, open_slide(noise_slide, backend="tifffile") as b:
        for cx, cy, mpp in [(700, 650, 0.25), (701, 333, 0.5), (1000, 900, 0.6), (768, 768, 1.7)]:
            ta = a.read_region_at_mpp(cx, cy, mpp, 64).astype(int)
            tb = b.read_region_at_mpp(cx, cy, mpp, 64).astype(int)
            assert np.abs(ta - tb).max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_matches_pixels_at_level0(noise_slide, backend):
    image = smooth_noise(1536, 1536, cell=24, seed=1)
    with open_slide(noise_slide, backend=backend) as reader:
        tile = reader.read_region_at_mpp(600, 500, 0.25, 64)
    np.testing.assert_array_equal(tile, image[500 - 32:500 + 32, 600 - 32:600 + 32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_x5_sibling_geometry(noise_slide, backend, monkeypatch):
    slides_mod.close_pooled_readers()  # read_views must open the slide with this backend
    monkeypatch.setattr(slides_mod, "open_slide",
                        lambda p, mpp_override=None: open_slide(p, mpp_override, backend=backend))
    size = 128
    x20, x5 = read_views(noise_slide, 760, 740, 0.25, size, context=True)
    assert x20.shape == x5.shape == (size, size, 3)
    # x5: same centre, 4x the field of view -> its central quarter is the x20 view at 1/4 scale.
    small = np.asarray(Image.fromarray(x20).reduce(4)).astype(int)
    centre = x5[size * 3 // 8:size * 5 // 8, size * 3 // 8:size * 5 // 8].astype(int)
    err = np.abs(small - centre).mean()
    shifted = np.abs(small - x5[size * 3 // 8 + 2:size * 5 // 8 + 2, size * 3 // 8:size * 5 // 8].astype(int)).mean()
    assert err < 4.0 and shifted > 2 * err
    x20_only, none = read_views(noise_slide, 760, 740, 0.25, size, context=False)
    assert none is None
    np.testing.assert_array_equal(x20_only, x20)
    slides_mod.close_pooled_readers()


def test_read_views_reuses_pooled_readers_across_threads(ring_slide, monkeypatch):
    """TensorFlow's threads lose threading.local state between calls; the pool must not."""
    slides_mod.close_pooled_readers()
    opened = []
    monkeypatch.setattr(slides_mod, "open_slide",
                        lambda p, mpp_override=None: opened.append(p) or open_slide(p, mpp_override))
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda i: read_views(ring_slide, 100 + i, 100, 0.5, 32, context=True), range(30)))
    for _ in range(5):  # fresh threads each time: still no new opens beyond the pool's readers
        t = threading.Thread(target=read_views, args=(ring_slide, 120, 120, 0.5, 32, False))
        t.start()
        t.join()
    assert 1 <= len(opened) <= 3
    slides_mod.close_pooled_readers()


@pytest.mark.parametrize("backend", BACKENDS)
def test_border_is_padded_white(ring_slide, backend):
    with open_slide(ring_slide, backend=backend) as reader:
        corner = reader.read_region_at_mpp(0, 0, 0.25, 64)
        assert (corner[:32, :] == 255).all() and (corner[:, :32] == 255).all()
        assert (corner[32:, 32:] != 255).any()
        far = reader.read_region_at_mpp(1024, 896, 1.0, 32)  # bottom-right corner, coarse level
        assert (far[16:, :] == 255).all() and (far[:, 16:] == 255).all()
        assert (far[:15, :15] != 255).any()
        outside = reader.read_region_at_mpp(-5000, 10000, 0.5, 16)
        assert (outside == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_level_choice(tmp_path, backend):
    base = smooth_noise(1024, 1024, cell=16, seed=3)
    red = np.zeros((512, 512, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((256, 256, 3), np.uint8)
    blue[..., 2] = 200
    path = make_pyramid_tiff(tmp_path / "levels.tif", base, mpp=0.25, level_images=[red, blue])
    with open_slide(path, backend=backend) as reader:
        assert reader.best_level(0.5) == 1
        # 1% tolerance: 0.497 um/px is served by the 0.5 um/px level.
        assert [reader.best_level(m) for m in (0.1, 0.25, 0.3, 0.45, 0.497, 0.7, 1.0, 4.0)] == [0, 0, 0, 0, 1, 1, 2, 2]
        assert (reader.read_region_at_mpp(512, 512, 0.5, 32) == [200, 0, 0]).all()   # level 1
        assert (reader.read_region_at_mpp(512, 512, 0.7, 32) == [200, 0, 0]).all()   # never upsample 2
        assert (reader.read_region_at_mpp(512, 512, 1.0, 32) == [0, 0, 200]).all()   # level 2
        assert (reader.read_region_at_mpp(512, 512, 3.0, 16) == [0, 0, 200]).all()
        fine = reader.read_region_at_mpp(512, 512, 0.3, 32)
        assert fine[..., 1].std() > 5  # level 0 content, not the solid levels


def test_thumbnail(ring_slide):
    for backend in BACKENDS:
        with open_slide(ring_slide, backend=backend) as reader:
            thumb, ds = reader.thumbnail(300)
            assert thumb.dtype == np.uint8 and thumb.ndim == 3 and max(thumb.shape[:2]) <= 300
            assert ds == pytest.approx(1024 / thumb.shape[1])
            assert ds * thumb.shape[0] == pytest.approx(896, rel=0.02)


# --- mpp ------------------------------------------------------------------------------------------

def test_missing_mpp_error_and_override(tmp_path):
    path = make_pyramid_tiff(tmp_path / "nompp.tif", smooth_noise(512, 512), mpp=None, levels=2)
    for backend in BACKENDS:
        with pytest.raises(DflError, match=r"nompp\.tif.*--slide-mpp"):
            open_slide(path, backend=backend)
        with open_slide(path, mpp_override=0.3, backend=backend) as reader:
            assert reader.mpp == pytest.approx(0.3)
            assert reader.read_region_at_mpp(256, 256, 0.6, 32).shape == (32, 32, 3)
        with open_slide(path, mpp_override="40x", backend=backend) as reader:
            assert reader.mpp == pytest.approx(0.25)
    with pytest.raises(DflError, match="nompp"):
        open_slide(path, mpp_override="fast")


def test_override_wins_over_metadata(ring_slide):
    with open_slide(ring_slide, mpp_override=0.5) as reader:
        assert reader.mpp == pytest.approx(0.5) and reader.mpp_source == "override"


def test_mpp_from_aperio_description(tmp_path):
    path = make_pyramid_tiff(tmp_path / "desc.tif", smooth_noise(512, 512), mpp=None, levels=1,
                             description="Scanner v1 512x512|AppMag = 20|MPP = 0.4990")
    with open_slide(path, backend="tifffile") as reader:
        assert reader.mpp == pytest.approx(0.499)


# --- real slides ----------------------------------------------------------------------------------

def test_test_data_is_in_the_repository():
    import hashlib

    assert CMU.is_file(), f"{CMU} missing: the suite carries its data (tests/fixtures/README.md)"
    assert hashlib.sha256(CMU.read_bytes()).hexdigest() == CMU_SHA256


@pytest.fixture(scope="module")
def plain_tiff(tmp_path_factory) -> Path:
    """A plain TIFF like the histolab fixture kidney-48-5.tif: strips (not tiled), uncompressed RGB,
    no physical resolution (tifffile writes unit NONE), 301 x 181 px. OpenSlide refuses it."""
    import tifffile

    path = tmp_path_factory.mktemp("plain") / "plain.tif"
    tifffile.imwrite(path, smooth_noise(301, 181, cell=16, seed=3), photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert not page.is_tiled and page.compression == 1 and page.tags["ResolutionUnit"].value == 1
    return path


def test_cmu_svs_single_level_x5_by_downscaling():
    slides_mod.close_pooled_readers()
    with borrow_reader(CMU) as reader:
        assert reader.backend == "openslide"
        assert reader.mpp == pytest.approx(0.499)
        assert reader.level_count == 1 and reader.dimensions == (2220, 2967)
    x20, x5 = read_views(CMU, 1100, 1500, 0.5, 128, context=True)
    assert x20.shape == x5.shape == (128, 128, 3)
    assert x20.std() > 10 and x5.std() > 10
    assert x20.flags.writeable and x5.flags.writeable
    small = np.asarray(Image.fromarray(x20).reduce(4)).astype(int)
    err = np.abs(small - x5[48:80, 48:80].astype(int)).mean()
    shifted = np.abs(small - x5[49:81, 48:80].astype(int)).mean()
    assert err < 8 and shifted > 2 * err
    slides_mod.close_pooled_readers()


def test_plain_tiff_falls_back_to_tifffile(plain_tiff):
    import openslide

    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        openslide.OpenSlide(str(plain_tiff))
    with pytest.raises(DflError, match=r"plain\.tif.*--slide-mpp"):
        open_slide(plain_tiff)
    with open_slide(plain_tiff, mpp_override=0.5) as reader:
        assert reader.backend == "tifffile"
        assert reader.dimensions == (301, 181) and reader.level_count == 1
        tile = reader.read_region_at_mpp(150, 90, 0.5, 64)
        assert tile.shape == (64, 64, 3)
        np.testing.assert_array_equal(tile, smooth_noise(301, 181, cell=16, seed=3)[58:122, 118:182])
        x5 = reader.read_region_at_mpp(0, 0, 2.0, 64)
        assert (x5[:31, :31] == 255).all()
        thumb, ds = reader.thumbnail(100)
        assert max(thumb.shape[:2]) <= 100 and ds == pytest.approx(301 / thumb.shape[1])
    with open_slide(plain_tiff, mpp_override="20x") as reader:  # an objective power works too
        assert reader.mpp == pytest.approx(0.5)


# --- errors ---------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DflError, match="nowhere.svs"):
        open_slide(tmp_path / "nowhere.svs")


def test_not_a_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("hello")
    with pytest.raises(DflError, match="notes.svs"):
        open_slide(path)


@pytest.mark.parametrize("keep", [0.6, 0.05])
def test_truncated_tiff(tmp_path, keep):
    path = tmp_path / "broken.tif"
    make_pyramid_tiff(path, smooth_noise(1024, 1024), mpp=0.5, levels=2)
    truncate(path, keep)
    with pytest.raises(DflError, match=r"broken\.tif"):
        with open_slide(path) as reader:
            for mpp in (0.5, 1.0):
                for cy in range(0, 1024, 256):
                    reader.read_region_at_mpp(512, cy, mpp, 256)
            reader.thumbnail(256)


# --- threads --------------------------------------------------------------------------------------

def test_reader_pool_lends_one_reader_per_borrower_and_reuses_it(ring_slide):
    slides_mod.close_pooled_readers()
    with borrow_reader(ring_slide) as first:
        with borrow_reader(ring_slide) as second:  # lent meanwhile: a reader of its own
            assert second is not first
    seen = {}

    def borrow():
        with borrow_reader(ring_slide) as reader:
            seen["reader"] = reader

    thread = threading.Thread(target=borrow)  # another thread reuses a pooled reader, opens nothing
    thread.start()
    thread.join()
    assert seen["reader"] in (first, second)
    slides_mod.close_pooled_readers()
    assert first._backend is None and second._backend is None


def test_thread_pool_reads_match_serial(noise_slide):
    centres = [(200 + 97 * i, 300 + 61 * i) for i in range(12)]
    serial = [read_views(noise_slide, x, y, 0.5, 64, True) for x, y in centres]
    with ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(lambda c: read_views(noise_slide, c[0], c[1], 0.5, 64, True), centres))
    for (a20, a5), (b20, b5) in zip(serial, parallel):
        np.testing.assert_array_equal(a20, b20)
        np.testing.assert_array_equal(a5, b5)
    slides_mod.close_pooled_readers()


@pytest.mark.parametrize("layout", ["strips-zlib", "planar-separate", "tiles-raw", "gray"])
def test_tifffile_layouts(tmp_path, layout):
    import tifffile

    image = smooth_noise(300, 200, cell=16, seed=4)
    path = tmp_path / f"{layout}.tif"
    kwargs = dict(resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)
    if layout == "strips-zlib":
        tifffile.imwrite(path, image, photometric="rgb", compression="zlib", rowsperstrip=16, **kwargs)
    elif layout == "planar-separate":
        tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate",
                         compression="zlib", **kwargs)
    elif layout == "tiles-raw":
        tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), **kwargs)
    else:
        image = np.repeat(image[..., :1], 3, axis=2)
        tifffile.imwrite(path, image[..., 0], photometric="minisblack", **kwargs)
    with open_slide(path, backend="tifffile") as reader:
        assert reader.mpp == pytest.approx(0.5) and reader.dimensions == (300, 200)
        tile = reader.read_region_at_mpp(150, 100, 0.5, 80)
        np.testing.assert_array_equal(tile, image[60:140, 110:190])
        corner = reader.read_region_at_mpp(300, 200, 0.5, 20)
        np.testing.assert_array_equal(corner[:10, :10], image[190:, 290:])
        assert (corner[10:] == 255).all() and (corner[:, 10:] == 255).all()
