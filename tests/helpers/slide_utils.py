"""Synthetic whole-slide images for tests: pyramidal tiled TIFFs that OpenSlide opens as
``generic-tiff`` (with ``openslide.mpp-x`` from the centimetre resolution tags), plus
patterns whose geometry is known."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dfl_tf.data.synthetic import downscale, make_pyramid_tiff  # noqa: F401
import tifffile
from PIL import Image


def rings(width: int, height: int, cx: float, cy: float, period: float = 24.0) -> np.ndarray:
    """Concentric colour rings around the level-0 point (cx, cy) (a pixel corner for integers).

    Pixel (i, j) is sampled at its centre (i + 0.5, j + 0.5), so a tile centred on (cx, cy)
    is mirror-symmetric when its geometry is right.
    """
    xs = np.arange(width) + 0.5 - cx
    ys = np.arange(height) + 0.5 - cy
    r = np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2)
    phase = 2 * np.pi * r / period
    red = 127.5 + 100 * np.cos(phase)
    green = 127.5 + 100 * np.cos(phase / 3.0)
    blue = 127.5 + 100 * np.cos(phase / 9.0)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def smooth_noise(width: int, height: int, cell: int = 32, seed: int = 0) -> np.ndarray:
    """Random colours on a coarse grid, bilinearly upsampled: structure at every scale used."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize(((width // cell + 2) * cell, (height // cell + 2) * cell),
                                         Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(big)[:height, :width])


def tissue_like(width: int, height: int, blobs: Sequence[tuple[float, float, float]], seed: int = 0) -> np.ndarray:
    """White background with pink/purple H&E-like discs (cx, cy, radius), lightly textured."""
    rng = np.random.default_rng(seed)
    out = np.full((height, width, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for cx, cy, radius in blobs:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        noise = rng.integers(-20, 20, size=(int(inside.sum()), 1))
        colour = np.array([200, 110, 170]) + noise
        out[inside] = np.clip(colour, 0, 255).astype(np.uint8)
    return out


def truncate(path: str | os.PathLike, keep: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
