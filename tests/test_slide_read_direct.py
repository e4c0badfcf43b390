"""The OpenSlide backend's direct read (ARGB32 buffer -> RGB in numpy) gives the very pixels of the
Pillow route it replaces (openslide-python's read_region, composite onto white, convert): inside
the slide, across every edge, fully outside, at every level, through read_views at x20 and x5."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dfl_tf.data import slide_backends, slides as slides_mod
from dfl_tf.data.slides import open_slide, read_views
from slide_utils import make_pyramid_tiff, smooth_noise

CMU = Path(__file__).resolve().parent / "data" / "cmu-1-small-region.svs"


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
