"""ExtractOptions: one validated dataclass behind extract, extract_beam, select_backbones, finetune,
the CLI flags and the YAML configs."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from tests.helpers.tiny import TINY_FAST
from dfl_tf.errors import DflError
from dfl_tf.options import FIELDS, FINETUNE_FIELDS, SELECT_FIELDS, ExtractOptions


def test_validated_and_normalised_once():
    opts = ExtractOptions(views="x20:rgb, x5:gray", mpp="20x", slide_mpp="40x", batch_size=8.0)
    assert opts.views == ("x20:rgb", "x5:gray") and opts.mpp == pytest.approx(0.5)
    assert opts.slide_mpp == pytest.approx(0.25) and opts.batch_size == 8 and isinstance(opts.batch_size, int)
    assert ExtractOptions(views=["x5:rgb"]) == ExtractOptions(views="x5:rgb")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.fit = "pad"  # type: ignore[misc]
    for bad, message in ((dict(views="x10:rgb"), "unknown view 'x10:rgb'"), (dict(fit="crop"), "unknown fit 'crop'"),
                         (dict(dtype="int8"), "unknown dtype 'int8'"), (dict(precision="half"), "unknown precision"),
                         (dict(batch_size=0), "batch size must be a whole number of at least 1"),
                         (dict(shard_size=2.5), "shard size must be a whole number"),
                         (dict(mpp="fast"), "invalid magnification 'fast'")):
        with pytest.raises(DflError, match=message):
            ExtractOptions(**bad)
    assert opts.replace(fit="pad").fit == "pad" and opts.fit == "scale"
    with pytest.raises(DflError, match="unknown fit"):
        opts.replace(fit="crop")
    records = opts.records_settings()  # what changes the embeddings (selection's cache key): not run settings
    assert {"backbone", "weights", "views", "input_size", "fit", "pad_to", "precision", "dtype", "mpp",
            "patch_size", "slide_mpp"} <= set(records)
    assert not {"batch_size", "shard_size", "workers", "jit", "skip_bad", "devices"} & set(records)
    assert records["views"] == ["x20:rgb", "x5:gray"]  # JSON-ready


def test_public_functions_take_options_or_keywords(tmp_path, image_folder):
    from dfl_tf import extract, finetune, select_backbones
    from dfl_tf.extraction.beam import extract_beam

    for func in (extract, extract_beam, select_backbones, finetune):
        assert set(func.option_fields) <= set(FIELDS)
    assert set(extract.option_fields) == set(extract_beam.option_fields) == set(FIELDS)
    assert set(select_backbones.option_fields) == set(SELECT_FIELDS)
    assert set(finetune.option_fields) == set(FINETUNE_FIELDS)
    shown = inspect.signature(finetune).parameters  # help() shows the accepted fields with their defaults
    assert shown["views"].default == ("x20:rgb",) and "dtype" not in shown and "options" in shown

    kw = {k: v for k, v in TINY_FAST.items() if k != "progress"}
    by_keywords = extract(image_folder, tmp_path / "a", progress=False, **kw)
    by_options = extract(image_folder, tmp_path / "b", progress=False, options=ExtractOptions(**kw))
    # options plus a keyword: the keyword wins (here the stored dtype)
    mixed = extract(image_folder, tmp_path / "c", progress=False, options=ExtractOptions(**kw), dtype="float32")
    assert [s["sha256"] for s in by_keywords["shards"]] == [s["sha256"] for s in by_options["shards"]]
    assert by_options["dtype"] == "float16" and mixed["dtype"] == "float32"

    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        extract(image_folder, tmp_path / "d", colour="rgb")
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtype'"):  # finetune stores nothing
        finetune(image_folder, tmp_path / "e", dtype="float32")
    with pytest.raises(TypeError, match="options must be an ExtractOptions"):
        extract(image_folder, tmp_path / "f", options={"views": "x20:rgb"})
    with pytest.raises(DflError, match="unknown view"):
        select_backbones(image_folder, "resnet50", tmp_path / "g", views="x9:rgb")


def test_yaml_and_cli_flags_follow_the_fields(tmp_path):
    from click.testing import CliRunner

    from dfl_tf import extract, finetune
    from dfl_tf.cli import main
    from dfl_tf.config import known_fields, merge

    config = tmp_path / "c.yaml"
    config.write_text("extract:\n  views: [x20:rgb, x5:rgb]\n  mpp: 20x\n  jit: true\nfinetune:\n  dtype: float32\n")
    assert merge(extract, config, "extract", {"jit": False}) == {"views": ["x20:rgb", "x5:rgb"], "mpp": "20x",
                                                                  "jit": False}
    with pytest.raises(DflError, match=r"c\.yaml: unknown field 'dtype' for 'finetune'"):
        merge(finetune, config, "finetune", {})
    assert {"source", "out", "overwrite", *FIELDS} <= set(known_fields(extract))

    for command, fields in (("extract", FIELDS), ("select", SELECT_FIELDS), ("finetune", FINETUNE_FIELDS)):
        params = {p.name for p in main.commands[command].params}
        assert set(fields) <= params, command
    # a bad value from the command line gets the dataclass's one-line error
    result = CliRunner().invoke(main, ["extract", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert result.exit_code == 2 and "error: batch size must be a whole number of at least 1" in result.output
