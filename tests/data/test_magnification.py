"""Magnifications are um/px (0.5) or an objective power (20x) everywhere: CSV columns, options, flags."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from dfl_tf.cli import main
from dfl_tf.data.sources import SlideRead, load_sample, load_source
from dfl_tf.errors import DflError
from tests.helpers.slide_utils import smooth_noise


@pytest.fixture(scope="module")
def plain_slide(tmp_path_factory):
    """A plain TIFF without resolution metadata (needs a slide mpp from the user)."""
    import tifffile

    path = tmp_path_factory.mktemp("mag") / "plain.tif"
    tifffile.imwrite(path, smooth_noise(256, 192, cell=16, seed=1), photometric="rgb", metadata=None)
    return path


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "x", "y", "mpp", "size", "slide_mpp"])
        writer.writerows(rows)
    return path


def test_csv_columns_take_objective_powers(tmp_path, plain_slide):
    src = _write_csv(tmp_path / "coords.csv", [[str(plain_slide), 128, 96, "20x", 32, "40x"],
                                               [str(plain_slide), 128, 96, "0.5", 32, "0.25"]])
    power, microns = load_source(src).samples
    assert power.mpp == microns.mpp == pytest.approx(0.5)
    assert power.slide_mpp == microns.slide_mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(load_sample(power, context=False)[0], load_sample(microns, context=False)[0])


def test_bad_magnification_in_csv_names_file_and_line(tmp_path, plain_slide):
    src = _write_csv(tmp_path / "bad.csv", [[str(plain_slide), 1, 1, "0.5", 32, ""],
                                            [str(plain_slide), 1, 1, "0.5", 32, "fast"]])
    with pytest.raises(DflError, match=r"bad\.csv:3: mpp / slide_mpp: invalid magnification 'fast'"):
        load_source(src)


def test_slide_read_and_extract_options_parse_powers():
    read = SlideRead(mpp="20x", patch_size=64, slide_mpp="40x")
    assert (read.mpp, read.slide_mpp) == (pytest.approx(0.5), pytest.approx(0.25))
    from dfl_tf.options import ExtractOptions

    opts = ExtractOptions(mpp="10x", slide_mpp="20x")
    assert (opts.mpp, opts.slide_mpp) == (pytest.approx(1.0), pytest.approx(0.5))
    with pytest.raises(DflError, match="slide_mpp"):
        ExtractOptions(slide_mpp="-1x")


def test_slide_mpp_flag_takes_an_objective_power(tmp_path, plain_slide):
    out = tmp_path / "tiles.csv"
    result = CliRunner().invoke(main, ["tile", str(plain_slide), "--out", str(out), "--mpp", "10x", "--size", "32",
                                       "--slide-mpp", "20x", "--min-tissue", "0", "--no-thumbnails"])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["slide_mpp"] for r in rows} == {"0.5"} and {r["mpp"] for r in rows} == {"1"}
    for command in ("extract", "select", "predict", "heatmap", "tile"):
        params = {p.name: p for p in main.commands[command].params}
        assert params["slide_mpp"].type.name == "text", command  # not FLOAT: "20x" must get through


def test_extract_cli_slide_mpp_power_equals_microns(tmp_path, plain_slide):
    from dfl_tf.store.shards import load_embeddings

    src = tmp_path / "coords.csv"
    src.write_text(f"slide,x,y\n{plain_slide},64,64\n{plain_slide},160,100\n")
    common = ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--patch-size", "32",
              "--no-progress"]
    for name, value in (("power", "20x"), ("microns", "0.5")):
        result = CliRunner().invoke(main, ["extract", str(src), "--out", str(tmp_path / name), "--mpp", "1",
                                           "--slide-mpp", value, *common])
        assert result.exit_code == 0, result.output
    power, microns = load_embeddings(tmp_path / "power"), load_embeddings(tmp_path / "microns")
    assert power.X.shape == (2, 16)
    np.testing.assert_array_equal(power.X, microns.X)
