"""Shared fixtures: tiny generated image sets; TensorFlow kept quiet and on few threads."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_images(root: Path, classes=("a", "b"), per_class=6, size=(40, 48), seed=0, ext="png") -> Path:
    """A class-per-folder image set of random RGB images; class b is brighter."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 200, (*size, 3), dtype=np.uint8) + np.uint8(50 * c)
            Image.fromarray(img).save(root / name / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("imgs") / "folder")


TINY = dict(backbone="resnet50", weights="none", input_size=32, batch_size=4, progress=False)


def _register_tiny_backbone() -> None:
    """A 2-conv backbone ("tiny_test", dim 16) for tests of the stages after extraction:
    export tracing then takes a second instead of tracing ResNet-50 per signature."""
    from dfl_tf.backbones.toy import register_toy

    register_toy("tiny_test")


_register_tiny_backbone()
TINY_FAST = dict(backbone="tiny_test", weights="none", input_size=32, batch_size=4, progress=False)
