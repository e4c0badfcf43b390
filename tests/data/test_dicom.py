"""DICOM whole-slide images (through OpenSlide 4): the CMU-1 region as a DICOM series reads the
same pixels as the SVS it was converted from, and tiles, extracts and predicts through the CLI."""
from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dfl_tf import load_embeddings
from dfl_tf.cli import main
from dfl_tf.data import slides as slides_mod
from dfl_tf.data.slides import open_slide, read_views
from tests.helpers import FIXTURES

DATA = FIXTURES
SVS = DATA / "cmu-1-small-region.svs"
DICOM_DIR = DATA / "cmu-1-small-region-dicom"
# The series: the full-resolution level and a THUMBNAIL instance; OpenSlide opens it from either file.
DICOM_SHA256 = {
    "1.2.826.0.1.3680043.8.498.11637607494092165441458001359439232185.dcm":
        "bdb0c1dc94a5b92ced387c4bc3babb03c4f3a108dbb026781991e8769901cc2c",
    "1.2.826.0.1.3680043.8.498.41090640436061678411728988624832662847.dcm":
        "6f49fb8d8f81892758f9fafc67dbf789282fe271aae52c5ffc260ee8e3e521ea",
}
TINY = ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "32",
        "--views", "x20:rgb,x5:rgb", "--no-progress"]


def _dicom() -> Path:
    return DICOM_DIR / sorted(DICOM_SHA256)[0]


def test_dicom_series_is_in_the_repository():
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in DICOM_DIR.glob("*.dcm")}
    assert found == DICOM_SHA256, "tests/fixtures/cmu-1-small-region-dicom/ differs from tests/fixtures/README.md"


@pytest.mark.parametrize("name", sorted(DICOM_SHA256))
def test_dicom_reads_the_svs_pixels(name):
    """Either file of the series opens the slide; its metadata and pixels (level 0, x20 and the
    x5 sibling as extraction reads them) equal the SVS's at the same coordinates."""
    slides_mod.close_pooled_readers()
    with open_slide(DICOM_DIR / name) as dcm, open_slide(SVS) as svs:
        assert dcm.backend == svs.backend == "openslide"
        assert dcm.dimensions == svs.dimensions == (2220, 2967)
        assert dcm.mpp == pytest.approx(svs.mpp) == pytest.approx(0.499)
        for cx, cy, mpp, size in ((1100, 1500, 0.499, 240), (900, 1800, 0.5, 96), (1500, 600, 2.0, 64),
                                  (1700, 2500, 1.0, 100)):
            a, b = dcm.read_region_at_mpp(cx, cy, mpp, size), svs.read_region_at_mpp(cx, cy, mpp, size)
            assert a.std() > 20  # real tissue, not only background
            np.testing.assert_array_equal(a, b)
    for cx, cy in ((1100, 1500), (1700, 2500), (300, 2800)):
        for a, b in zip(read_views(DICOM_DIR / name, cx, cy, 0.5, 128, context=True),
                        read_views(SVS, cx, cy, 0.5, 128, context=True)):
            np.testing.assert_array_equal(a, b)
    slides_mod.close_pooled_readers()


def _labelled(tiles_csv: Path, out: Path) -> None:
    """The tile grid with a label per tile (left or right half of the slide: any two classes do)."""
    rows = list(csv.DictReader(open(tiles_csv)))
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "label"])
        writer.writeheader()
        writer.writerows({**r, "label": "left" if float(r["x"]) < 1110 else "right"} for r in rows)


def test_dicom_tile_extract_predict_through_the_cli(tmp_path):
    """`dfl tile` on the DICOM series gives the SVS's grid; its embeddings equal the SVS's; a model
    trained on the SVS predicts the DICOM tiles as it predicts the SVS tiles."""
    runner = CliRunner()

    def dfl(*args: str) -> str:
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, f"dfl {' '.join(map(str, args))}\n{result.output}"
        return result.output

    slides = tmp_path / "slides"
    shutil.copytree(DICOM_DIR, slides / "cmu-dicom")
    shutil.copy(SVS, slides / "cmu.svs")
    dcm = slides / "cmu-dicom" / _dicom().name
    for name, slide in (("dcm", dcm), ("svs", slides / "cmu.svs")):
        assert "tiles ->" in dfl("tile", slide, "--out", tmp_path / f"{name}_tiles.csv", "--mpp", "20x",
                                 "--size", "256", "--no-thumbnails")
        _labelled(tmp_path / f"{name}_tiles.csv", tmp_path / f"{name}.csv")
        dfl("extract", tmp_path / f"{name}.csv", "--out", tmp_path / f"emb_{name}", *TINY)
    grid = {name: [(r["x"], r["y"]) for r in csv.DictReader(open(tmp_path / f"{name}_tiles.csv"))]
            for name in ("dcm", "svs")}
    assert grid["dcm"] == grid["svs"] and len(grid["dcm"]) > 10
    emb_dcm, emb_svs = load_embeddings(tmp_path / "emb_dcm"), load_embeddings(tmp_path / "emb_svs")
    assert emb_dcm.manifest["views"] == ["x20:rgb", "x5:rgb"] and emb_dcm.X.shape == emb_svs.X.shape
    np.testing.assert_array_equal(emb_dcm.X, emb_svs.X)
    dfl("train", tmp_path / "emb_svs", "--val", tmp_path / "emb_svs", "--out", tmp_path / "head", "--epochs", "3",
        "--hidden", "8", "--select", "never", "--no-probe", "--no-progress")
    dfl("export", tmp_path / "head", "--out", tmp_path / "models" / "cmu")
    for name in ("dcm", "svs"):
        assert f"{len(grid[name])} predictions" in dfl(
            "predict", tmp_path / "models" / "cmu", tmp_path / f"{name}_tiles.csv", "--out",
            tmp_path / f"preds_{name}.csv", "--no-progress")
    preds = {name: list(csv.DictReader(open(tmp_path / f"preds_{name}.csv"))) for name in ("dcm", "svs")}
    probs = {name: np.array([[float(r["head_p_left"]), float(r["head_p_right"])] for r in rows])
             for name, rows in preds.items()}
    np.testing.assert_allclose(probs["dcm"], probs["svs"], atol=1e-6)
    assert all(r["slide"].endswith(".dcm") for r in preds["dcm"])
