"""`dfl backbones` prints, for every entry, its parameter count and its preprocessing, and the
declared parameter counts are what the builders really make."""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from dfl_tf.backbones.registry import get_spec, list_specs
from dfl_tf.cli import main

# Entries whose count is declared by hand (the ViT entries compute theirs from their configuration).
DECLARED = ("resnet50", "convnext_tiny", "efficientnet_b0", "densenet121", "resnet50_tv", "dino_resnet50",
            "swav_resnet50", "efficientnet_lite0", "convnext_base", "lunit_resnet50_bt", "tiny_test")


def test_every_entry_prints_params_and_preprocessing():
    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # the shipped entries (other test modules in this process may register their own, without a count)
    names = [spec.name for spec in list_specs() if spec.builder.__module__.startswith("dfl_tf.")]
    for name in names:
        row = next(i for i, line in enumerate(lines) if line.split(" ", 1)[0] == name)
        params = lines[row].split()[3]
        assert re.fullmatch(r"\d+\.\dM|\d+\.\dk", params), (name, lines[row])
        detail = lines[row + 1]
        match = re.search(r"preprocessing: ([^;]+)", detail)
        assert match and match.group(1).strip() not in ("", "-"), (name, detail)
        assert match.group(1).strip() == get_spec(name).preprocessing
    assert "resnet50 " in result.output and "23.5M" in lines[[l.split(" ", 1)[0] for l in lines].index("resnet50")]


@pytest.mark.parametrize("name", DECLARED)
def test_declared_params_match_the_built_model(name):
    """Trainable parameters of the model built at the entry's own input size with random init
    (batch-norm statistics and fixed normalisation constants are not parameters)."""
    spec = get_spec(name)
    model = spec.builder(spec.input_size, None)
    count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert spec.params == count, f"{name}: declared {spec.params}, built {count}"
    assert int(model.output_shape[-1]) == spec.dim
