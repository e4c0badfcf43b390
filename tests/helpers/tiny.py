"""Tiny inputs for fast tests: a generated class-per-folder image set and the extraction settings
of the small backbones (``TINY``: ResNet-50 at 32 px; ``TINY_FAST``: the 2-conv ``tiny_test``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(root: Path, classes=("a", "b"), per_class=6, size=(40, 48), seed=0, ext="png") -> Path:
    """A class-per-folder image set of random RGB images; class b is brighter."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 200, (*size, 3), dtype=np.uint8) + np.uint8(50 * c)
            Image.fromarray(img).save(root / name / f"{i:03d}.{ext}")
    return root


TINY = dict(backbone="resnet50", weights="none", input_size=32, batch_size=4, progress=False)


def _register_tiny_backbone() -> None:
    """A 2-conv backbone ("tiny_test", dim 16) for tests of the stages after extraction:
    export tracing then takes a second instead of tracing ResNet-50 per signature."""
    from dfl_tf.backbones.toy import register_toy

    register_toy("tiny_test")


_register_tiny_backbone()
TINY_FAST = dict(backbone="tiny_test", weights="none", input_size=32, batch_size=4, progress=False)
