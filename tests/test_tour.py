"""The README's tour ("## A tour"), run line by line through the CLI on generated data.

The tour assumes `slides/` and two labelled slide coordinates CSVs, `data/tumour.csv` and
`data/necrosis.csv` (`slide,x,y,label,split`); :func:`_tour_data` makes them: a synthetic
pyramidal TIFF with one tissue band per class (labels from the bands) and, as the new slide the
tour tiles, predicts and maps, a copy of the real `tests/data/cmu-1-small-region.svs`. Every other
input of a line must be made by an earlier line, so a README edit that breaks the sequence fails here.

Each line runs as written (`shlex.split`, in-process through click's CliRunner, in a temporary
directory holding a copy of `configs/`), with only these flags appended to keep it fast (a later
flag wins over the README's): :data:`FAST` (the `tiny_test` backbone of tests/conftest.py with
random weights at 32 px instead of efficientnet_lite0 at 224 px, a few epochs) and `--no-progress`.
"""
from __future__ import annotations

import csv
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from dfl_tf.cli import main
from dfl_tf.data.synthetic import demo_slide_image, make_pyramid_tiff, region_of

ROOT = Path(__file__).resolve().parents[1]
#: Flags appended per command (tiny backbone, small input, few epochs).
FAST = {
    "extract": ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "32"],
    "train": ["--epochs", "4", "--patience", "0", "--cv-folds", "2"],
}
PROGRESS = {"extract", "train", "predict", "heatmap"}  # commands with --progress/--no-progress


def tour_lines(readme: str) -> list[str]:
    """The `dfl` lines of the README tour's code block, comments dropped."""
    section = readme.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [" ".join(shlex.split(line, comments=True)) for line in block.splitlines()]
    return [line for line in lines if line]


def _tour_data(root: Path) -> None:
    """slides/train.tiff (3 bands: tumour, stroma, lymphocytes), slides/new.svs (the real CMU-1
    region), and data/{tumour,necrosis}.csv over the bands' tiles, split by position in the band."""
    (root / "slides").mkdir()
    (root / "data").mkdir()
    image, regions = demo_slide_image(2048, 2048, margin=128, seed=0)
    make_pyramid_tiff(root / "slides" / "train.tiff", image, mpp=0.5, levels=4)
    shutil.copy(ROOT / "tests" / "data" / "cmu-1-small-region.svs", root / "slides" / "new.svs")
    shutil.copytree(ROOT / "configs", root / "configs")
    rows = []
    for y in range(256, 2048 - 256 + 1, 128):
        for x in range(256, 2048 - 256 + 1, 128):
            region = region_of(regions, x, y)
            if region is None:
                continue
            where = (y - region["y0"]) / (region["y1"] - region["y0"])
            split = "train" if where < 0.5 else "val" if where < 0.75 else "test"
            rows.append((x, y, region["class"], split))
    tasks = {"tumour": lambda c: "tumour" if c == "tumour" else "normal",
             "necrosis": lambda c: "necrosis" if c == "lymphocytes" else "viable"}
    for task, label in tasks.items():
        with open(root / "data" / f"{task}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slide", "x", "y", "label", "split"])
            writer.writerows([("../slides/train.tiff", x, y, label(c), split) for x, y, c, split in rows])


def test_readme_tour_runs_as_written(tmp_path, monkeypatch):
    lines = tour_lines((ROOT / "README.md").read_text())
    assert len(lines) >= 10 and all(line.startswith("dfl ") for line in lines), lines
    _tour_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line in lines:
        argv = shlex.split(line)[1:]
        command = argv[0]
        argv += FAST.get(command, []) + (["--no-progress"] if command in PROGRESS else [])
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, f"README tour line failed: {line}\n{result.output}"
    commands = [shlex.split(line)[1] for line in lines]
    assert {"backbones", "extract", "train", "evaluate", "export", "tile", "predict", "heatmap"} <= set(commands)
    # What the tour's lines promise: a two-task model, predictions for every tile, a heatmap.
    export = json.loads(next((tmp_path / "saved_models").glob("*/1/export.json")).read_text())
    assert [h["task"] for h in export["heads"]] == ["tumour", "necrosis"]
    assert export["views"] == ["x20:rgb", "x5:rgb"] and export["parity"]["passed"]
    predicted = next(tmp_path.glob("*preds*.csv"))
    tiles = [line for line in lines if line.startswith("dfl tile")]
    tiled = list(csv.DictReader(open(shlex.split(tiles[-1])[shlex.split(tiles[-1]).index("--out") + 1])))
    rows = list(csv.DictReader(open(predicted)))
    assert len(rows) == len(tiled) > 5
    probs = np.array([[float(r["tumour_p_normal"]), float(r["tumour_p_tumour"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    maps = next(tmp_path.glob("heatmaps/*"))
    assert (maps / "predictions.csv").exists() and (maps / "necrosis.geojson").exists()
    assert json.loads((maps / "heatmap.json").read_text())["size"] == 256
    assert (next(tmp_path.glob("reports/*")) / "metrics.json").exists()
