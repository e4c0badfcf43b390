"""The CLI as a user meets it: every command documented, backbones listed, one-line errors."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner

from dfl_tf.cli import main
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def test_every_command_is_in_the_readme():
    commands = sorted(main.commands)
    assert {"backbones", "extract", "train", "evaluate", "export", "predict", "tile", "heatmap", "select",
            "finetune", "import-weights"} <= set(commands)
    for name in commands:
        assert re.search(rf"\bdfl {re.escape(name)}\b", README), f"`dfl {name}` is not documented in README.md"
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_readme_starts_with_the_two_commands():
    block = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]


def test_backbones_listing_reports_offline_state():
    result = CliRunner().invoke(main, ["backbones", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert {"resnet50", "convnext_tiny", "efficientnet_b0", "densenet121", "resnet50_tv", "dino_resnet50",
            "swav_resnet50", "efficientnet_lite0"} <= set(rows)
    assert rows["efficientnet_lite0"]["offline"]["imagenet"] is True  # shipped on PyPI
    assert rows["resnet50"]["offline"]["none"] is True and rows["resnet50"]["dim"] == 2048
    assert "CC-BY-NC" in rows["swav_resnet50"]["licences"]["swav"]
    table = CliRunner().invoke(main, ["backbones"])
    assert table.exit_code == 0 and "efficientnet_lite0" in table.output


def test_missing_input_is_one_line_error(tmp_path):
    for args in (["extract", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                 ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "h")],
                 ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                 ["tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "t.csv")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "nope" in result.output


def test_quiet_stderr_unless_verbose(tmp_path):
    """TensorFlow's start-up lines (absl, oneDNN) and run-time notes reach stderr only with
    `dfl --verbose`; stderr otherwise holds dfl's own messages."""
    import os
    import subprocess
    import sys

    import numpy as np
    from tests.helpers.emb_utils import make_embedding_dir

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    script = "import sys; from dfl_tf.cli import main; sys.exit(main())"

    def dfl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)

    quiet = dfl("backbones")
    assert quiet.returncode == 0 and "resnet50" in quiet.stdout
    assert quiet.stderr == ""
    loud = dfl("--verbose", "backbones", "--json")
    assert loud.returncode == 0 and json.loads(loud.stdout)
    assert re.search(r"absl|oneDNN|tensorflow", loud.stderr, re.I), loud.stderr
    # a command that runs TensorFlow ops (float16 records): only dfl's own note on stderr
    rng = np.random.default_rng(0)
    make_embedding_dir(tmp_path / "emb", rng.normal(size=(16, 8)), np.arange(16) % 2, ["a", "b"])
    train = dfl("train", str(tmp_path / "emb"), "--out", str(tmp_path / "head"), "--epochs", "1", "--hidden", "0",
                "--no-progress")
    assert train.returncode == 0, train.stderr
    assert [line for line in train.stderr.splitlines() if not line.startswith("note: ")] == []
