"""``extract --runner beam`` (Apache Beam, DirectRunner): same records, shards and manifest as a local run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

pytest.importorskip("apache_beam", reason="apache-beam not installed (pip install 'dfl_tf[beam]')")

from tests.helpers.tiny import TINY, write_images  # noqa: E402
from dfl_tf import extract  # noqa: E402
from dfl_tf.extraction.beam import parse_beam_options  # noqa: E402
from dfl_tf.cli import main  # noqa: E402
from dfl_tf.errors import DflError  # noqa: E402
from dfl_tf.store.shards import verify_shards  # noqa: E402

THREADS = ["direct_num_workers=2", "direct_running_mode=multi_threading"]


def _records(emb_dir: Path, manifest: dict) -> list[bytes]:
    return [r.numpy() for s in manifest["shards"] for r in tf.data.TFRecordDataset(str(emb_dir / s["file"]))]


def _assert_same(local_dir: Path, beam_dir: Path, local: dict, beam: dict) -> None:
    assert {k: v for k, v in beam.items() if k != "created"} == {k: v for k, v in local.items() if k != "created"}
    on_disk = json.loads((beam_dir / "manifest.json").read_text())
    assert {k: v for k, v in on_disk.items() if k != "created"} == {k: v for k, v in beam.items() if k != "created"}
    assert verify_shards(beam_dir) == []
    a, b = _records(local_dir, local), _records(beam_dir, beam)
    assert len(a) == local["num_records"] and a == b  # ids, labels and embedding bytes, in order


X5 = dict(views="x20:rgb,x5:gray", x5_from_image=True)  # 40x48 images: x5 from the image itself, asked for


def test_beam_equals_local_and_resumes(image_folder, tmp_path):
    local = extract(image_folder, tmp_path / "local", **X5, shard_size=5, **TINY)
    beam = extract(image_folder, tmp_path / "beam", **X5, shard_size=5, runner="beam",
                   beam_options=THREADS, **TINY)
    assert [s["records"] for s in beam["shards"]] == [5, 5, 2]
    _assert_same(tmp_path / "local", tmp_path / "beam", local, beam)

    # resume: only the missing shard is recomputed, the others are left alone
    out = tmp_path / "beam"
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tfrecord")}
    lost = beam["shards"][1]["file"]
    (out / lost).unlink()
    (out / ".parts" / "shard-00001.json").unlink()
    (out / "manifest.json").unlink()
    again = extract(image_folder, out, **X5, shard_size=5, runner="beam", **TINY)
    assert again == beam  # same manifest, "created" included (kept from the first run)
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tfrecord")}
    assert all(now[name] == kept[name] for name in kept if name != lost) and now[lost] != kept[lost]
    _assert_same(tmp_path / "local", out, local, again)
    # a local run resumes a Beam directory (and the reverse) without recomputing anything
    assert extract(image_folder, out, **X5, shard_size=5, **TINY) == beam


def test_beam_slides_equal_local(tmp_path):
    from tests.helpers.slide_utils import make_pyramid_tiff

    image = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    make_pyramid_tiff(tmp_path / "s.tiff", image, mpp=0.5, levels=3, tile=128)
    csv_path = tmp_path / "coords.csv"
    csv_path.write_text("slide,x,y,label\ns.tiff,100,120,a\ns.tiff,400,300,b\ns.tiff,790,590,a\n")
    kw = dict(views="x20:rgb,x5:rgb", patch_size=64, shard_size=2, **TINY)
    local = extract(csv_path, tmp_path / "local", **kw)
    beam = extract(csv_path, tmp_path / "beam", runner="beam", **kw)
    assert beam["num_records"] == 3 and beam["settings"]["context"] == "separate"
    _assert_same(tmp_path / "local", tmp_path / "beam", local, beam)


def test_beam_bad_input(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=2)
    (root / "a" / "001.png").write_bytes(b"not an image at all")
    with pytest.raises(DflError, match=r"a/001\.png.*--skip-bad") as info:
        extract(root, tmp_path / "stop", shard_size=2, runner="beam", **TINY)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "stop" / "manifest.json").exists()
    assert not list((tmp_path / "stop").glob("shard-00000-*"))  # the failing shard was never written
    local = extract(root, tmp_path / "local", shard_size=2, skip_bad=True, **TINY)
    beam = extract(root, tmp_path / "beam", shard_size=2, skip_bad=True, runner="beam", **TINY)
    assert [s["id"] for s in beam["skipped"]] == ["a/001.png"] and beam["num_records"] == 3
    _assert_same(tmp_path / "local", tmp_path / "beam", local, beam)


@pytest.mark.parametrize("options, message", [
    (["runner"], r"--beam-option 'runner': expected KEY=VALUE"),
    (["=DirectRunner"], r"'' is not an option name"),
    (["direct-num-workers=2"], r"'direct-num-workers' is not an option name"),
    (["direct_num_workers=two"], r"--beam-option: argument --direct_num_workers: invalid int value: 'two'"),
    (["temp_locaton=gs://b/tmp"], r"unknown Beam pipeline option 'temp_locaton' \(did you mean temp_location"),
    (["direct_running_mode=threads"], r"invalid choice: 'threads'"),
])
def test_beam_option_errors(options, message, tmp_path):
    with pytest.raises(DflError, match=message) as info:
        extract(tmp_path / "src", tmp_path / "emb", runner="beam", beam_options=options, **TINY)
    assert "\n" not in str(info.value)


def test_beam_option_parsing_and_other_errors(image_folder, tmp_path):
    assert parse_beam_options(["runner=DirectRunner", "--direct_num_workers=2", "project=p=q"]) == [
        "--runner=DirectRunner", "--direct_num_workers=2", "--project=p=q"]
    assert parse_beam_options({"runner": "FlinkRunner", "flink_master": "host:8081",
                               "environment_type": "LOOPBACK"}) == [
        "--runner=FlinkRunner", "--flink_master=host:8081", "--environment_type=LOOPBACK"]
    assert parse_beam_options(None) == []
    assert parse_beam_options(["save_main_session=true", "streaming=false"]) == ["--save_main_session"]
    with pytest.raises(DflError, match="on/off flag takes true or false"):
        parse_beam_options(["save_main_session=maybe"])
    with pytest.raises(DflError, match="without runner='beam'"):
        extract(image_folder, tmp_path / "e", beam_options=["runner=DirectRunner"], **TINY)
    with pytest.raises(DflError, match="unknown runner 'spark'"):
        extract(image_folder, tmp_path / "e", runner="spark", **TINY)
    with pytest.raises(DflError, match="gs://bucket/emb is not supported"):
        extract(image_folder, "gs://bucket/emb", runner="beam", **TINY)
    with pytest.raises(DflError, match="instead of a built model"):
        extract(image_folder, tmp_path / "e", runner="beam", model=object(), **TINY)


def test_cli_runner_beam(image_folder, tmp_path):
    args = ["extract", str(image_folder), "--weights", "none", "--input-size", "32", "--batch-size", "4",
            "--shard-size", "8", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "beam"), "--runner", "beam",
                                       "--beam-option", "runner=DirectRunner", "--beam-option", "direct_num_workers=1"])
    assert result.exit_code == 0, result.output
    assert "12 records, dim 2048, 2 shards, 0 skipped" in result.output
    local = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    _assert_same(tmp_path / "local", tmp_path / "beam", json.loads((tmp_path / "local" / "manifest.json").read_text()),
                 json.loads((tmp_path / "beam" / "manifest.json").read_text()))
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--runner", "beam",
                                    "--beam-option", "num_wokers=4"])
    lines = bad.output.strip().splitlines()
    assert bad.exit_code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --beam-option: unknown Beam pipeline option 'num_wokers' "
                               "(did you mean num_workers")
    mixed = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--beam-option", "runner=DirectRunner"])
    assert mixed.exit_code == 2 and "--runner beam" in mixed.output
