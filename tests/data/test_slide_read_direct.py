"""The OpenSlide backend's direct read (ARGB32 buffer -> RGB in numpy) gives the very pixels of the
Pillow route it replaces (openslide-python's read_region, composite onto white, convert): inside
the slide, across every edge, fully outside, at every level, through read_views at x20 and x5."""
from __future__ import annotations


import numpy as np
import pytest

from dfl_tf.data import slide_backends, slides as slides_mod
from dfl_tf.data.slides import open_slide, read_views
from tests.helpers.slide_utils import make_pyramid_tiff, smooth_noise
from tests.helpers import FIXTURES

CMU = FIXTURES / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def odd_pyramid(tmp_path_factory):
    """Levels 1000x900 -> 333x300 -> 111x100: non-integer downsamples (3.0015, 9.0045), so OpenSlide
    interpolates at fractional level offsets and slide edges come out partly transparent."""
    base = smooth_noise(1000, 900, cell=20, seed=4)
    levels = [smooth_noise(333, 300, cell=8, seed=5), smooth_noise(111, 100, cell=4, seed=6)]
    return make_pyramid_tiff(tmp_path_factory.mktemp("odd") / "odd.tif", base, mpp=0.5, level_images=levels)


@pytest.fixture(scope="module")
def even_pyramid(tmp_path_factory):
    return make_pyramid_tiff(tmp_path_factory.mktemp("even") / "even.tif", smooth_noise(768, 640, cell=16, seed=7),
                             mpp=0.5, levels=3)


def _boxes(width: int, height: int, w: int, h: int) -> list[tuple[int, int]]:
    """Top-left corners inside, across each edge and corner, and fully outside the level."""
    xs = (-w - 5, -w // 2, 0, width // 3, width - w, width - w // 2, width + 3)
    ys = (-h // 3, height // 2, height - h // 4)
    return [(x, y) for x in xs for y in ys]


@pytest.mark.parametrize("slide", ["even", "odd", "cmu"])
def test_direct_read_equals_pillow_route(slide, even_pyramid, odd_pyramid, monkeypatch):
    path = {"even": even_pyramid, "odd": odd_pyramid, "cmu": str(CMU)}[slide]
    with open_slide(path, backend="openslide") as reader:
        backend = reader._backend
        direct_used = fallbacks = 0
        for level, (lw, lh) in enumerate(reader.level_dimensions):
            w, h = min(64, lw), min(48, lh)
            for x, y in _boxes(lw, lh, w, h):
                fast = backend.read(level, x, y, w, h)
                ds = reader.level_downsamples[level]
                inside = x < lw and y < lh and x + w > 0 and y + h > 0
                direct = backend._read_direct(level, round(x * ds), round(y * ds), w, h) if inside else None
                direct_used += direct is not None
                fallbacks += inside and direct is None
                with monkeypatch.context() as m:
                    m.setattr(slide_backends, "_os_read_region", None)
                    slow = backend.read(level, x, y, w, h)
                assert fast.shape == (h, w, 3) and fast.dtype == np.uint8
                np.testing.assert_array_equal(fast, slow, err_msg=f"{slide} level {level} box {x},{y}")
        assert direct_used > 0  # the fast route was taken ...
        assert (fallbacks > 0) == (slide == "odd")  # ... and the Pillow route where an edge is partly transparent


def test_read_views_same_pixels_both_routes(even_pyramid, monkeypatch):
    """x20 and x5 tiles (exact and resized) at the centre and at slide corners: same bytes either route."""
    centres = [(384, 320), (3, 5), (767, 639), (0, 639), (700, 10)]
    for mpp, size in ((0.5, 32), (0.75, 24)):
        slides_mod.close_pooled_readers()
        fast = [read_views(even_pyramid, cx, cy, mpp, size, True) for cx, cy in centres]
        slides_mod.close_pooled_readers()
        with monkeypatch.context() as m:
            m.setattr(slide_backends, "_os_read_region", None)
            slow = [read_views(even_pyramid, cx, cy, mpp, size, True) for cx, cy in centres]
        slides_mod.close_pooled_readers()
        for (a20, a5), (b20, b5) in zip(fast, slow):
            np.testing.assert_array_equal(a20, b20)
            np.testing.assert_array_equal(a5, b5)
        assert (fast[1][1][:4, :4] == 255).all()  # the x5 field of a corner tile runs off the slide: white


# --- strips: overlapping boxes along a row cut from one wider read ---------------------------------

def _row_walk(reader, mpp: float, size: int, step: int) -> list[np.ndarray]:
    """Tiles centred along three rows (top edge, middle, bottom edge), left edge to right edge."""
    width, height = reader.dimensions
    return [reader.read_region_at_mpp(cx, cy, mpp, size) for cy in (2, height // 2, height - 3)
            for cx in range(0, width, step)]


@pytest.mark.parametrize("slide,backend", [("even", "openslide"), ("even", "tifffile"), ("cmu", "openslide"),
                                           ("odd", "openslide")])
def test_strip_reads_equal_box_reads(slide, backend, even_pyramid, odd_pyramid, monkeypatch):
    """x20 with overlap, x5 (exact level and resized): the same bytes with and without strips."""
    path = {"even": even_pyramid, "odd": odd_pyramid, "cmu": str(CMU)}[slide]
    walks = [(0.5, 32, 24), (2.0, 32, 32), (1.5, 24, 40)]  # (mpp, size, step in level-0 px)
    with open_slide(path, backend=backend) as reader:
        with_strips = [_row_walk(reader, *walk) for walk in walks]
        strip_levels = set(reader._strips.strips)
    with monkeypatch.context() as m:
        m.setattr(slides_mod.SlideReader, "_strips_exact", lambda self, level: False)
        with open_slide(path, backend=backend) as reader:
            without = [_row_walk(reader, *walk) for walk in walks]
            assert not reader._strips.strips
    for a_walk, b_walk in zip(with_strips, without):
        for a, b in zip(a_walk, b_walk):
            assert a.flags.writeable
            np.testing.assert_array_equal(a, b)
    # strips at every level read, except the odd slide's levels 1-2 (non-integer downsamples:
    # OpenSlide reads them at a sub-pixel phase of its own per box, so a cut box would differ)
    assert strip_levels == ({0} if slide == "odd" else {0} if slide == "cmu" else {0, 1, 2})


def test_strip_tile_is_a_copy(even_pyramid):
    """A tile cut from a strip is the caller's: writing into it leaves later tiles alone."""
    with open_slide(even_pyramid, backend="openslide") as reader:
        first = reader.read_region_at_mpp(200, 300, 2.0, 32)
        second = reader.read_region_at_mpp(208, 300, 2.0, 32)  # overlaps: cut from a strip
        assert reader._strips.strips
        expected = reader.read_region_at_mpp(216, 300, 2.0, 32).copy()
        second[:] = 0
        first[:] = 0
        again = reader.read_region_at_mpp(216, 300, 2.0, 32)
        np.testing.assert_array_equal(again, expected)


def test_bad_tile_ahead_does_not_fail_the_strip_tile(tmp_path):
    """A corrupt JPEG tile that only a strip would reach leaves the tiles before it readable (and equal)."""
    import shutil

    from tests.data.test_slide_faults import BAD_TILE, TILE, _corrupt_tile

    bad = tmp_path / "bad.svs"
    shutil.copyfile(CMU, bad)
    _corrupt_tile(bad, 0, BAD_TILE)  # level-0 x 1200..1439, y 0..239
    xs = range(700, 1060, 40)  # boxes (+- 28 px at 2 um/px, 16 px) stay left of the bad tile
    with open_slide(CMU) as good:
        expected = [good.read_region_at_mpp(x, 100, 2.0, 16) for x in xs]
    with open_slide(bad) as reader:
        got = [reader.read_region_at_mpp(x, 100, 2.0, 16) for x in xs]
        assert set(reader._strips.no_strip_row) == {0} and not reader.broken  # a strip read failed
        with pytest.raises(Exception, match="cannot read level 0 region"):
            reader.read_region_at_mpp(BAD_TILE * TILE + 20, 100, 2.0, 16)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_threads_share_strips_and_match_box_reads(even_pyramid, monkeypatch):
    """tf.data-like: 4 threads read consecutive tiles (x20 + x5) on pooled handles; they share the
    slide's strips, and every tile equals its box read."""
    from concurrent.futures import ThreadPoolExecutor

    centres = [(cx, cy) for cy in (100, 330) for cx in range(40, 740, 12)]
    slides_mod.close_pooled_readers()
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda c: read_views(even_pyramid, c[0], c[1], 0.5, 32, True), centres))
    cache = next(iter(slides_mod._strip_caches.values()))
    assert cache.strips  # strips were cut
    _assert_same_as_box_reads(monkeypatch, threaded, even_pyramid, centres, 32)


def test_single_level_x20_and_x5_alternating_use_strips(monkeypatch):
    """On a single-level slide the x20 and x5 boxes of each tile alternate on level 0: the x5 boxes
    still come from strips, and read_views gives the bytes of box reads."""
    centres = [(cx, 1500) for cx in range(900, 1300, 24)]
    slides_mod.close_pooled_readers()
    fast = [read_views(CMU, cx, cy, 0.5, 24, True) for cx, cy in centres]
    cache = next(iter(slides_mod._strip_caches.values()))
    assert max(arr.shape[0] for _, _, arr in cache.strips[0]) > 100  # x5 boxes (~123 rows) cut from strips
    _assert_same_as_box_reads(monkeypatch, fast, CMU, centres, 24)


def _assert_same_as_box_reads(monkeypatch, views, slide, centres, size):
    """``views`` (x20, x5 pairs read with strips) equal plain box reads of the same centres."""
    slides_mod.close_pooled_readers()
    with monkeypatch.context() as m:
        m.setattr(slides_mod.SlideReader, "_strips_exact", lambda self, level: False)
        boxes = [read_views(slide, cx, cy, 0.5, size, True) for cx, cy in centres]
    slides_mod.close_pooled_readers()
    for (a20, a5), (b20, b5) in zip(views, boxes):
        np.testing.assert_array_equal(a20, b20)
        np.testing.assert_array_equal(a5, b5)


@pytest.mark.parametrize("rows", [(100, 300), (100, 180, 260, 340, 420, 500)])
def test_rows_read_in_turn_keep_their_strips(even_pyramid, monkeypatch, rows):
    """Rows walked in turn (as threads on different rows, or a short tissue row beside the next,
    interleave their reads): each row still reads strips, fewer pixels than box by box, and the
    tiles equal box reads. Six rows: more than the strips a row keeps, still no eviction churn."""
    centres = [(cx, cy) for cx in range(40, 740, 12) for cy in rows]  # row 1, row 2, ..., row 1, ...
    with open_slide(even_pyramid, backend="openslide") as reader:
        reads = []  # (level y, width, height) of each backend read
        plain_read = reader._read
        monkeypatch.setattr(reader, "_read", lambda backend, level, x, y, w, h: reads.append((y, w, h))
                            or plain_read(backend, level, x, y, w, h))
        got = [reader.read_region_at_mpp(cx, cy, 2.0, 32) for cx, cy in centres]
        monkeypatch.undo()
    assert len(reads) < len(centres) / 4  # strips, not one read per box
    assert len({y for y, w, _ in reads if w > 32}) == len(rows)  # on every row
    assert sum(w * h for _, w, h in reads) < 0.5 * len(centres) * 32 * 32  # fewer pixels than box reads
    with monkeypatch.context() as m:
        m.setattr(slides_mod.SlideReader, "_strips_exact", lambda self, level: False)
        with open_slide(even_pyramid, backend="openslide") as reader:
            boxes = [reader.read_region_at_mpp(cx, cy, 2.0, 32) for cx, cy in centres]
    for a, b in zip(got, boxes):
        np.testing.assert_array_equal(a, b)
