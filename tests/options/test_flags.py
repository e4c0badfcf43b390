"""Each command's options dataclass is the one place for its flags: the click options of
``dfl train``, ``select``, ``extract`` and ``finetune`` equal the dataclass fields (names, defaults,
choices, switches), the public functions show the same defaults, and values are checked once."""
from __future__ import annotations

import dataclasses
import inspect

import click
import pytest

from dfl_tf.errors import DflError
from dfl_tf.options import (FIELDS, FINETUNE_FIELDS, SELECT_FIELDS, ExtractOptions, FinetuneOptions, SelectOptions,
                            TrainOptions, cli_fields)

# command -> [(options class, the fields that have a flag there: None for all)]
COMMANDS = {
    "train": [(TrainOptions, None)],
    "select": [(SelectOptions, None), (ExtractOptions, SELECT_FIELDS)],
    "extract": [(ExtractOptions, FIELDS)],
    "finetune": [(FinetuneOptions, None), (ExtractOptions, FINETUNE_FIELDS)],
}
#: flags that are no option field: inputs, outputs and run settings
OTHER_FLAGS = {"val", "out", "logdir", "overwrite", "progress", "config", "backbones", "cache_dir", "split",
               "runner", "beam_options"}


def _shown(field: dataclasses.Field):
    value = field.default if field.metadata["shown"] is None else field.metadata["shown"]
    return ",".join(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_click_flags_equal_the_dataclass_fields(command):
    from dfl_tf.cli import main

    params = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    ctx = click.Context(main.commands[command])
    covered = set()
    for cls, names in COMMANDS[command]:
        fields = cli_fields(cls, names)
        assert fields, command
        covered |= {f.name for f in fields}
        for f in fields:
            p = params.get(f.name)
            assert p is not None, f"{command}: no flag for {f.name}"
            assert p.opts[0] == "--" + f.name.replace("_", "-")
            if f.metadata["flag"]:
                assert p.is_flag and bool(p.get_default(ctx, call=False)) == f.default
                assert bool(p.secondary_opts) == f.metadata["negatable"], f.name
                continue
            assert p.get_default(ctx, call=False) == _shown(f), (command, f.name)
            choices = f.metadata["choices"]
            assert (list(p.type.choices) if isinstance(p.type, click.Choice) else None) == (
                list(choices) if choices else None), (command, f.name)
        no_flag = {f.name for f in dataclasses.fields(cls) if not f.metadata["cli"]}
        assert not no_flag & set(params), command  # Python/config-only fields get no flag
    assert set(params) - covered <= OTHER_FLAGS, command  # no option typed by hand beside the dataclasses


def test_functions_show_the_dataclass_defaults():
    import dfl_tf
    from dfl_tf import select_backbones, train_head

    assert dfl_tf.TrainOptions is TrainOptions and dfl_tf.SelectOptions is SelectOptions  # the public API
    from dfl_tf import finetune

    # finetune still types its keywords (its code is being split elsewhere): held equal here
    for func, cls in ((train_head, TrainOptions), (select_backbones, SelectOptions), (finetune, FinetuneOptions)):
        shown = inspect.signature(func).parameters
        for f in dataclasses.fields(cls):
            assert shown[f.name].default == f.default, (func.__name__, f.name)


def test_train_and_select_options_are_checked_once():
    opts = TrainOptions(loss="ce", hidden=0)
    assert opts.loss == "crossentropy" and opts.hidden == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.epochs = 3  # type: ignore[misc]
    for bad, message in ((dict(epochs=0), r"epochs must be >= 1 \(--epochs\), got 0"),
                         (dict(dropout=1.0), r"dropout must be in \[0, 1\) \(--dropout\)"),
                         (dict(noise=2), r"noise std must be in \[0, 1\] \(--noise\)"),
                         (dict(lr="fast"), r"lr must be a number \(--lr\)"),
                         (dict(monitor="auc"), "monitor must be one of"), (dict(select="maybe"), "select must be")):
        with pytest.raises(DflError, match=message):
            TrainOptions(**bad)
    for bad, message in ((dict(seeds=-1), "seeds must be >= 0"), (dict(knn_k=0), "knn_k must be >= 1"),
                         (dict(loss="hinge"), "loss must be focal or crossentropy")):
        with pytest.raises(DflError, match=message):
            SelectOptions(**bad)


def test_train_head_takes_options_or_keywords(tmp_path):
    from dfl_tf import train_head

    with pytest.raises(DflError, match=r"epochs must be >= 1 \(--epochs\)"):
        train_head(tmp_path / "emb", tmp_path / "head", epochs=0)
    with pytest.raises(DflError, match=r"batch_size must be >= 1"):  # a keyword wins over options=
        train_head(tmp_path / "emb", tmp_path / "head", options=TrainOptions(epochs=2), batch_size=0)
    with pytest.raises(TypeError, match="options must be a TrainOptions"):
        train_head(tmp_path / "emb", tmp_path / "head", options={"epochs": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        train_head(tmp_path / "emb", tmp_path / "head", epoch=2)
    assert not (tmp_path / "head").exists()


def test_configs_are_checked_against_the_dataclass_types(tmp_path):
    from dfl_tf import select_backbones, train_head
    from dfl_tf.config import merge

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 3\n  cv_grid: {hidden: [0]}\n  augment: [noise]\nselect:\n  seeds: 2\n"
                      "  control: resnet50\n  views: x20:rgb\n")
    assert merge(train_head, config, "train", {"lr": 0.01}) == {"epochs": 3, "cv_grid": {"hidden": [0]},
                                                                 "augment": ["noise"], "lr": 0.01}
    assert merge(select_backbones, config, "select", {})["control"] == "resnet50"
    config.write_text("train:\n  epochs: 2.5\n")
    with pytest.raises(DflError, match=r"c\.yaml: 'epochs' must be a whole number"):
        merge(train_head, config, "train", {})
    config.write_text("select:\n  max_points: many\n")
    with pytest.raises(DflError, match=r"c\.yaml: 'max_points' must be a whole number"):
        merge(select_backbones, config, "select", {})
