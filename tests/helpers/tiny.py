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


_HAEMATOXYLIN, _EOSIN = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])


def he_image(rng: np.random.Generator, size=(40, 40), strength: float = 1.0) -> np.ndarray:
    """A synthetic H&E-like tile (Beer-Lambert mix of haematoxylin and eosin at random
    concentrations), uint8 [h, w, 3]: enough stained tissue for Macenko and Reinhard to fit on."""
    conc = rng.uniform(0.0, 1.5, (*size, 2)) * strength
    od = conc[..., :1] * _HAEMATOXYLIN + conc[..., 1:] * _EOSIN
    return np.clip(240.0 * np.exp(-od), 0, 255).astype(np.uint8)


def write_he_images(root: Path, classes=("a", "b"), per_class=3, size=(40, 40), seed=0, white=True) -> Path:
    """A class-per-folder set of synthetic H&E tiles (class b stained twice as strongly), plus one
    white background tile ``a/white.png`` when ``white``."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(he_image(rng, size, 1.0 + c)).save(root / name / f"{i:03d}.png")
    if white:
        Image.fromarray(np.full((*size, 3), 250, np.uint8)).save(root / classes[0] / "white.png")
    return root
