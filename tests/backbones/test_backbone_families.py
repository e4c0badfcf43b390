"""The backbone registry as a whole: every entry builds and has the dim it declares; the CLI's
choices come from the registry; a family added as one folder appears everywhere (listing,
``--backbone``, ``import-weights --arch``) with nothing else edited."""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import REPO

import dfl_tf.backbones as backbones_pkg
from dfl_tf.backbones import load_backbone, registry
from dfl_tf.backbones.registry import converter_names, family_of, list_specs
from dfl_tf.backbones.vit.presets import CONFIGS
from dfl_tf.cli import main

ROOT = REPO
#: ViTs of at least this many parameters (ViT-L, -H, -g) build with 2 blocks here: depth changes
#: neither the token width nor the pooling, so the dim they declare is still what is checked.
DEPTH_REDUCED_ABOVE = 250_000_000
SHIPPED = [spec.name for spec in list_specs() if family_of(spec.name) is not None]


def _smoke_size(name: str) -> int:
    """2 x 2 patches for a ViT, else 32 px (the smallest the Keras Applications accept)."""
    return 2 * CONFIGS[name].patch if name in CONFIGS else 32


@pytest.mark.parametrize("name", SHIPPED)
def test_every_entry_builds_with_its_declared_dim(name, monkeypatch):
    spec = registry.get_spec(name)
    if name in CONFIGS and spec.params >= DEPTH_REDUCED_ABOVE:
        monkeypatch.setitem(CONFIGS, name, dataclasses.replace(CONFIGS[name], depth=2))
    size = _smoke_size(name)
    model = spec.builder(size, None)  # random init, as weights="none" builds it
    assert tuple(model.input_shape) == (None, size, size, 3), name
    assert tuple(model.output_shape) == (None, spec.dim), name
    keras.backend.clear_session()


def test_families_are_the_folders():
    families = {family_of(spec.name) for spec in list_specs()} - {None}
    folders = {p.name for p in (ROOT / "dfl_tf" / "backbones").iterdir() if (p / "__init__.py").is_file()}
    assert families == {"vit", "resnet", "efficientnet_lite", "keras_apps"} <= folders
    # the torch-trained families carry their converter; Keras files need none
    assert all(registry.get_spec(n).converter is not None for n in SHIPPED if family_of(n) != "keras_apps")
    assert all(registry.get_spec(n).converter is None for n in SHIPPED if family_of(n) == "keras_apps")


def test_import_weights_choices_are_the_registry():
    arch = next(p for p in main.commands["import-weights"].params if p.name == "arch")
    assert list(arch.type.choices) == converter_names() and len(converter_names()) >= 28
    assert list(arch.type.documented) == converter_names(families_only=True)
    row = next(line for line in (ROOT / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `--arch`"))
    assert row.split(" | ")[1].split(" \\| ") == [f"`{n}`" for n in converter_names(families_only=True)]
    help_text = CliRunner().invoke(main, ["import-weights", "--help"]).output
    assert "dinov2_vitg14_reg" in help_text and "efficientnet_lite0" in help_text
    refused = CliRunner().invoke(main, ["import-weights", __file__, "--arch", "convnext_tiny", "--out", "x.weights.h5"])
    assert refused.exit_code == 2 and "'convnext_tiny' is not one of" in refused.output


FAMILY = textwrap.dedent('''
    """A family written for tests/backbones/test_backbone_families.py: one folder, nothing else touched."""
    import numpy as np
    import keras

    from dfl_tf.backbones.layers import PREPROCESSING, wrap
    from dfl_tf.backbones.registry import BackboneSpec, register
    from dfl_tf.runtime.files import atomic_save_weights


    def build(size, weights):
        base = keras.Sequential([keras.layers.Conv2D(4, 3, strides=2), keras.layers.GlobalAveragePooling2D()],
                                name="plugin_base")
        model = wrap(base, size, "unit", "plugin_net")
        if weights:
            model.load_weights(weights)
        return model


    def convert(checkpoint, out, input_size=None):
        """An .npz of kernel and bias -> .weights.h5."""
        arrays = np.load(checkpoint)
        model = build(input_size or 32, None)
        model.get_layer("plugin_base").set_weights([arrays["kernel"], arrays["bias"]])
        return atomic_save_weights(model, out)


    register(BackboneSpec(name="plugin_net", builder=build, input_size=32, dim=4, default_weights="none",
                          preprocessing=PREPROCESSING["unit"], description="plugin family", converter=convert))
''')


@pytest.fixture
def plugin_family(tmp_path, monkeypatch):
    """``plugin/`` in a folder appended to the package path; the registry state is restored after."""
    folder = tmp_path / "extra" / "plugin"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(FAMILY)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FAMILY", dict(registry._FAMILY))
    monkeypatch.setattr(registry, "_SCANNED", {**registry._SCANNED, "families": set(registry._SCANNED["families"])})
    monkeypatch.setattr(backbones_pkg, "__path__", [*backbones_pkg.__path__, str(folder.parent)])
    yield folder
    sys.modules.pop("dfl_tf.backbones.plugin", None)


def test_a_family_folder_is_all_it_takes(plugin_family, tmp_path, image_folder):
    runner = CliRunner()
    listing = runner.invoke(main, ["backbones", "--json"])
    assert listing.exit_code == 0, listing.output
    row = next(r for r in json.loads(listing.output) if r["name"] == "plugin_net")
    assert (row["family"], row["converter"], row["dim"]) == ("plugin", True, 4)
    assert "plugin_net" in runner.invoke(main, ["backbones"]).output
    assert "plugin_net" in runner.invoke(main, ["import-weights", "--help"]).output

    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4)).astype("float32")
    np.savez(tmp_path / "ckpt.npz", kernel=kernel, bias=np.arange(4, dtype="float32"))
    out = tmp_path / "plugin.weights.h5"
    converted = runner.invoke(main, ["import-weights", str(tmp_path / "ckpt.npz"), "--arch", "plugin_net",
                                     "--out", str(out)])
    assert converted.exit_code == 0, converted.output
    assert f"wrote {out} (use --backbone plugin_net --weights {out})" in converted.output
    built = load_backbone("plugin_net", weights=str(out))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(built.model.get_layer("plugin_base").weights[0]), kernel)

    emb = tmp_path / "emb"
    extracted = runner.invoke(main, ["extract", str(image_folder), "--out", str(emb), "--backbone", "plugin_net",
                                     "--weights", str(out), "--batch-size", "4", "--no-progress"])
    assert extracted.exit_code == 0, extracted.output
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["dim"] == 4 and manifest["num_records"] > 0
    assert manifest["backbone"]["name"] == "plugin_net" and manifest["backbone"]["fingerprint"] == built.fingerprint
