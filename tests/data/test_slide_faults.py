"""Corrupt and truncated slides: one line naming slide and position; --skip-bad records the tile
in the manifest and goes on; one bad tile never poisons the reads after it (issue 16, item 6)."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers.tiny import TINY_FAST
from dfl_tf import extract
from dfl_tf.data.slides import close_pooled_readers, open_slide, read_views
from dfl_tf.data.synthetic import make_pyramid_tiff
from dfl_tf.errors import DflError
from tests.helpers import FIXTURES

SVS = FIXTURES / "cmu-1-small-region.svs"
TILE = 240  # the SVS's JPEG tile side
BAD_TILE = 5  # row 0, column 5: level-0 pixels x 1200..1439, y 0..239


def _corrupt_tile(path: Path, page: int, index: int, keep: int = 2) -> None:
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[page].dataoffsets[index], tif.pages[page].databytecounts[index]
    with open(path, "r+b") as fh:
        fh.seek(offset + keep)
        fh.write(np.random.default_rng(index).integers(0, 256, count - keep, dtype=np.uint8).tobytes())


@pytest.fixture
def bad_svs(tmp_path) -> Path:
    path = tmp_path / "bad.svs"
    shutil.copyfile(SVS, path)
    _corrupt_tile(path, 0, BAD_TILE)
    yield path
    close_pooled_readers()


def test_corrupt_jpeg_tile_names_slide_and_position(bad_svs):
    centre = (BAD_TILE * TILE + 120, 120)
    with pytest.raises(DflError) as err:
        read_views(bad_svs, *centre, 0.5, 64, False)
    message = str(err.value)
    assert "\n" not in message and str(bad_svs) in message and "centred at (1320, 120)" in message
    assert "JPEG" in message and "cannot read level 0 region" in message
    for _ in range(2):  # the failed handle is dropped: other tiles still read
        tile, _ = read_views(bad_svs, 600, 900, 0.5, 64, False)
        assert tile.shape == (64, 64, 3) and tile.std() > 0


def _slide_csv(path: Path, slide: Path, points) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "x", "y", "label"])
        for k, (x, y) in enumerate(points):
            writer.writerow([slide.name, x, y, "ab"[k % 2]])
    return path


def test_extract_stops_on_bad_tile_or_skips_it(bad_svs, tmp_path):
    source = _slide_csv(tmp_path / "tiles.csv", bad_svs, [(600, 900), (1320, 120), (1000, 2000)])
    kw = dict(TINY_FAST, patch_size=64, shard_size=8)
    with pytest.raises(DflError, match=r"bad.svs: cannot read level 0 region .* centred at \(1320, 120\)"):
        extract(source, tmp_path / "stop", **kw)
    assert not list((tmp_path / "stop").glob("shard-*"))
    manifest = extract(source, tmp_path / "skip", skip_bad=True, **kw)
    assert manifest["num_records"] == 2 and len(manifest["skipped"]) == 1
    skipped = manifest["skipped"][0]
    assert skipped["id"] == "bad.svs@1320,120" and "centred at (1320, 120)" in skipped["error"]


def test_truncated_slide_one_line_error(tmp_path):
    path = tmp_path / "short.svs"
    data = SVS.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    try:
        with pytest.raises(DflError) as err:
            read_views(path, 1100, 2900, 0.5, 64, False)  # the last tiles lie past the cut
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert "centred at (1100, 2900)" in str(err.value) or "cannot open slide" in str(err.value)
    finally:
        close_pooled_readers()
    (tmp_path / "junk.svs").write_bytes(b"II*\x00" + os.urandom(200))
    with pytest.raises(DflError, match=r"cannot open slide .*junk.svs"):
        open_slide(tmp_path / "junk.svs")


@pytest.mark.parametrize("backend", ["openslide", "tifffile"])
def test_unreadable_pyramid_level(tmp_path, backend):
    image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = Path(make_pyramid_tiff(tmp_path / "pyr.tif", image, mpp=0.5, levels=2, tile=128))
    for index in range(4):  # every tile of level 1 (256 x 256 px, 2 x 2 tiles)
        _corrupt_tile(path, 1, index, keep=0)
    with open_slide(path, backend=backend) as reader:
        assert reader.level_count == 2
        assert reader.read_region_at_mpp(200, 200, 0.5, 32).shape == (32, 32, 3)  # level 0 is fine
        with pytest.raises(DflError) as err:
            reader.read_region_at_mpp(200, 200, 1.0, 32)  # 1.0 um/px reads level 1
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "cannot read level 1 region" in message
