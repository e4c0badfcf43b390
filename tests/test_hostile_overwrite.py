"""Hostile --out values through the CLI, for every command that writes one (issue 29, items 1, 2, 8).

The rule (dfl_tf/runtime/outputs.py): --out is never an input, a folder holding an input, or inside an input
folder; a file where a folder is written (and a folder where a file is written) is refused; an existing
output of the command's own kind needs --overwrite (extract resumes, export adds a version); any other
non-empty folder or file is refused, --overwrite or not. Each refusal: exit 2, one line naming --out,
and no file anywhere in the tree changed (sha256 of every file before and after).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.tiny import TINY_FAST, write_images
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl, snapshot
from tests.helpers.slide_utils import tissue_like

EXTRACT = ["--backbone", "tiny_test", "--weights", "none", "--input-size", "32", "--batch-size", "4",
           "--no-progress"]
TRAIN = ["--epochs", "1", "--hidden", "4", "--batch-size", "8", "--no-probe", "--select", "never", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Real inputs and outputs of every command, built once: images, a store, a head, a report, an
    export, predictions, a slide and its tile CSV; plus a foreign folder and a foreign file."""
    from dfl_tf import export_model, extract, predict, train_head
    from dfl_tf.data.synthetic import make_pyramid_tiff
    from dfl_tf.data.tissue import tile
    from dfl_tf.heads.evaluate import evaluate

    root = tmp_path_factory.mktemp("overwrite")
    w = {"root": root, "imgs": write_images(root / "imgs", per_class=3, size=(32, 32))}
    w["emb"] = root / "emb"
    extract(w["imgs"], w["emb"], **TINY_FAST)
    w["head"] = root / "head"
    train_head(w["emb"], w["head"], val=w["emb"], hidden=4, epochs=1, batch_size=8, probe=False, select="never",
               progress=False)
    w["report"] = root / "report"
    evaluate(w["head"], w["emb"], w["report"])
    w["model"] = root / "models" / "m"
    export_model([w["head"]], w["model"], parity_samples=0)
    w["preds"] = root / "preds.csv"
    predict(w["model"], w["imgs"], w["preds"], progress=False)
    w["slide"] = Path(make_pyramid_tiff(root / "slide.tif", tissue_like(256, 256, [(128, 128, 90)]), mpp=0.5,
                                        levels=1))
    w["tiles"] = root / "tiles.csv"
    tile([w["slide"]], w["tiles"], mpp=0.5, size=64, thumbnails=False)
    # earlier outputs of the commands not run here (slow, or needing a slide-trained model): what they write
    w["heatmap"] = root / "heatmap"
    w["heatmap"].mkdir()
    (w["heatmap"] / "heatmap.json").write_text("{}\n")
    (w["heatmap"] / "tiles.csv").write_text("slide,x,y,mpp,size,tissue\n")
    w["select"] = root / "select"
    (w["select"] / "cache").mkdir(parents=True)
    for name in ("results.json", "table.md"):
        (w["select"] / name).write_text("{}\n")
    w["finetune"] = root / "finetune"
    w["finetune"].mkdir()
    for name in ("finetune.json", "metrics.json"):
        (w["finetune"] / name).write_text("{}\n")
    w["foreign"] = root / "foreign"
    w["foreign"].mkdir()
    (w["foreign"] / "notes.txt").write_text("mine\n")
    w["file"] = root / "notes.txt"
    w["file"].write_text("mine too\n")
    return w


#: command -> (args before --out, args after, kind of output: "dir" or "file", the input --out may not lie inside)
COMMANDS = {
    "extract": (lambda w: ["extract", w["imgs"]], EXTRACT, "dir", "imgs"),
    "train": (lambda w: ["train", w["emb"], "--val", w["emb"]], TRAIN, "dir", "emb"),
    "evaluate": (lambda w: ["evaluate", w["head"], w["emb"]], [], "dir", "head"),
    "export": (lambda w: ["export", w["head"]], ["--parity-samples", "0"], "dir", "head"),
    "predict": (lambda w: ["predict", w["model"], w["imgs"]], ["--no-progress"], "file", "imgs"),
    "tile": (lambda w: ["tile", w["slide"]], ["--mpp", "0.5", "--size", "64", "--no-thumbnails"], "file", None),
    "heatmap": (lambda w: ["heatmap", w["model"], w["slide"]], ["--no-progress"], "dir", "model"),
    "select": (lambda w: ["select", w["imgs"], "--backbones", "tiny_test"],
               ["--weights", "none", "--input-size", "32", "--seeds", "1", "--epochs", "1", "--no-progress"],
               "dir", "imgs"),
    "finetune": (lambda w: ["finetune", w["imgs"]], ["--backbone", "tiny_test", "--weights", "none",
                                                      "--input-size", "32", "--epochs", "1", "--no-progress"],
                 "dir", "imgs"),
}
#: the earlier output of each command in ``world`` (extract resumes and export adds a version: no refusal)
PREVIOUS = {"train": "head", "evaluate": "report", "predict": "preds", "tile": "tiles", "heatmap": "heatmap",
            "select": "select", "finetune": "finetune"}
#: the input each command must not write over
FIRST_INPUT = {"extract": "imgs", "train": "emb", "evaluate": "head", "export": "head", "predict": "imgs",
               "tile": "slide", "heatmap": "slide", "select": "imgs", "finetune": "imgs"}
HAS_FLAG = {"extract", "train", "evaluate", "predict", "tile", "heatmap", "select", "finetune"}


def _args(command: str, w: dict[str, Path], out: Path, overwrite: bool = False) -> list:
    before, after, _, _ = COMMANDS[command]
    return [*before(w), "--out", out, *after] + (["--overwrite"] if overwrite else [])


def _refused(command: str, w: dict[str, Path], out: Path, *culprits: str, overwrite: bool = False) -> str:
    """Run ``command`` into ``out``: exit 2, one line naming ``out`` and ``culprits``, nothing changed."""
    before = snapshot(w["root"])
    result = run_dfl(_args(command, w, out, overwrite))
    line = assert_one_line_error(result, f"--out {out}", *culprits)
    assert snapshot(w["root"]) == before, f"{command} changed files while refusing --out {out}"
    return line


CASES = [(c, o) for c in COMMANDS for o in ([False, True] if c in HAS_FLAG else [False])]


@pytest.mark.parametrize("command,overwrite", CASES)
def test_out_is_an_input(world, command, overwrite):
    line = _refused(command, world, world[FIRST_INPUT[command]], overwrite=overwrite)
    assert "is the command's input" in line


@pytest.mark.parametrize("command,overwrite", CASES)
def test_out_holds_the_inputs(world, command, overwrite):
    line = _refused(command, world, world["root"], overwrite=overwrite)
    assert "holds the command's input" in line


@pytest.mark.parametrize("command", [c for c in COMMANDS if COMMANDS[c][3]])
def test_out_inside_an_input_folder(world, command):
    inside = world[COMMANDS[command][3]] / ("sub.csv" if COMMANDS[command][2] == "file" else "sub")
    line = _refused(command, world, inside, str(world[COMMANDS[command][3]]), overwrite=command in HAS_FLAG)
    assert "is inside the command's input" in line and not inside.exists()


@pytest.mark.parametrize("command,overwrite", CASES)
def test_foreign_folder_or_file_refused_even_with_overwrite(world, command, overwrite):
    if COMMANDS[command][2] == "dir":
        line = _refused(command, world, world["foreign"], "notes.txt", overwrite=overwrite)
        assert "non-empty folder that is not" in line
    else:  # a CSV is written: an existing file that dfl did not write is never replaced
        line = _refused(command, world, world["file"], overwrite=overwrite)
        assert "is not a" in line and "dfl wrote" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_file_where_a_folder_is_written_and_back(world, command):
    if COMMANDS[command][2] == "dir":
        line = _refused(command, world, world["file"])
        assert "is a file, not a folder" in line
    else:
        line = _refused(command, world, world["foreign"])
        assert "is a folder" in line
    line = _refused(command, world, world["file"] / "out", str(world["file"]))  # a file among the parents
    assert "is a file, not a folder" in line


@pytest.mark.parametrize("command", PREVIOUS)
def test_existing_output_needs_overwrite(world, command):
    line = _refused(command, world, world[PREVIOUS[command]])
    assert "already holds" in line and "--overwrite" in line


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_whole_replaced_output_holding_other_files_refused(world, command):
    """train / finetune replace their folder whole: with a file dfl did not write in it, --overwrite refuses."""
    out = world[PREVIOUS[command]]
    extra = out / "my_notes.txt"
    extra.write_text("keep me\n")
    try:
        line = _refused(command, world, out, "my_notes.txt", overwrite=True)
        assert "which dfl did not write" in line
    finally:
        extra.unlink()


def test_evaluate_into_the_head_refused_even_with_overwrite(world):
    """Issue 29 item 2: evaluate --out HEAD replaced the head's validation metrics.json."""
    metrics = (world["head"] / "metrics.json").read_bytes()
    _refused("evaluate", world, world["head"], overwrite=True)
    assert (world["head"] / "metrics.json").read_bytes() == metrics


# -- what --overwrite may still do: replace dfl's own earlier output, and nothing beside it ------------------

def _rerun(w: dict[str, Path], args: list, out: Path) -> None:
    before = snapshot(w["root"], exclude=[out])
    result = run_dfl(args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert snapshot(w["root"], exclude=[out]) == before


def test_train_twice_into_one_head_directory(world):
    out = world["root"] / "head2"
    _rerun(world, _args("train", world, out), out)
    first = json.loads((out / "head.json").read_text())
    _rerun(world, _args("train", world, out, overwrite=True) + ["--dropout", "0.25"], out)
    second = json.loads((out / "head.json").read_text())
    assert first["settings"]["dropout"] == 0.0 and second["settings"]["dropout"] == 0.25
    assert not list(world["root"].glob(".head2*"))  # no temporary or old folder left beside it


def test_extract_overwrite_restarts_and_rerun_resumes(world):
    out = world["root"] / "emb2"
    _rerun(world, _args("extract", world, out), out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "user_notes.txt").write_text("kept\n")  # a store only loses dfl's own files
    _rerun(world, _args("extract", world, out), out)  # same command again: resumes, nothing to redo
    _rerun(world, _args("extract", world, out, overwrite=True), out)
    again = json.loads((out / "manifest.json").read_text())
    assert again["shards"] == manifest["shards"] and (out / "user_notes.txt").read_text() == "kept\n"


def test_export_adds_a_version_to_its_model_directory(world):
    _rerun(world, _args("export", world, world["model"]), world["model"])
    assert sorted(p.name for p in world["model"].iterdir() if not p.name.startswith(".")) == ["1", "2"]


def test_evaluate_predict_tile_overwrite_their_own_outputs(world):
    (world["report"] / "metrics.json").write_text("{}\n")
    (world["report"] / "my_notes.md").write_text("kept\n")  # a file dfl did not write stays
    _rerun(world, _args("evaluate", world, world["report"], overwrite=True), world["report"])
    assert json.loads((world["report"] / "metrics.json").read_text())["num_records"] == 6
    assert (world["report"] / "my_notes.md").read_text() == "kept\n"
    world["preds"].write_text(world["preds"].read_text().splitlines()[0] + "\n")  # header only
    _rerun(world, _args("predict", world, world["preds"], overwrite=True), world["preds"])
    assert len(world["preds"].read_text().splitlines()) == 7
    tiles = world["tiles"].read_text()
    world["tiles"].write_text(tiles.splitlines()[0] + "\n")
    _rerun(world, _args("tile", world, world["tiles"], overwrite=True), world["tiles"])
    assert world["tiles"].read_text() == tiles


def test_folder_with_a_cache_and_other_files_is_not_a_selection(world):
    """A project folder that happens to hold cache/ is not an unfinished selection to resume into."""
    out = world["root"] / "project"
    (out / "cache").mkdir(parents=True)
    (out / "data.csv").write_text("path,label\n")
    try:
        line = _refused("select", world, out, "data.csv")
        assert "not a backbone selection folder" in line
    finally:
        (out / "data.csv").unlink()
        (out / "cache").rmdir()
        out.rmdir()


def test_overwrite_clears_only_the_earlier_runs_files(tmp_path):
    """An --overwrite of a heatmap / selection folder first removes what the earlier run wrote (the
    files heatmap.json lists, the fixed names; not select's cache), nothing else."""
    from dfl_tf.runtime.outputs import clear_out, prepare_out

    hm = tmp_path / "hm"
    hm.mkdir()
    for name in ("tiles.csv", "predictions.csv", "heatmap_old_a.png", "old.geojson", "mine.geojson", "notes.txt"):
        (hm / name).write_text("x\n")
    (hm / "heatmap.json").write_text(json.dumps({"outputs": [str(hm / "heatmap_old_a.png"), "old.geojson"]}))
    assert prepare_out(hm, "heatmap", overwrite=True) == "replace"
    assert sorted(clear_out(hm, "heatmap")) == ["heatmap.json", "heatmap_old_a.png", "old.geojson",
                                                "predictions.csv", "tiles.csv"]
    assert sorted(p.name for p in hm.iterdir()) == ["mine.geojson", "notes.txt"]
    sel = tmp_path / "sel"
    (sel / "cache" / "x").mkdir(parents=True)
    (sel / "projector").mkdir()
    for name in ("results.json", "table.md", "maps.png"):
        (sel / name).write_text("x\n")
    assert prepare_out(sel, "select", overwrite=True) == "replace"
    clear_out(sel, "select")
    assert sorted(p.name for p in sel.iterdir()) == ["cache"] and (sel / "cache" / "x").is_dir()
