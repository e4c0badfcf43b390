"""Synthetic whole-slide images for tests: pyramidal tiled TIFFs that OpenSlide opens as
``generic-tiff`` (with ``openslide.mpp-x`` from the centimetre resolution tags), plus
patterns whose geometry is known."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average by an integer factor (edges: partial boxes)."""
    return np.asarray(Image.fromarray(image).reduce(factor)) if factor > 1 else image


def make_pyramid_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float | None, levels: int = 3,
                      tile: int = 256, level_images: Sequence[np.ndarray] | None = None,
                      compression: str | None = "zlib", description: str | None = None) -> str:
    """Write ``image`` (h, w, 3 uint8) as a tiled pyramid of ``levels`` levels, each half the last.

    Levels are successive top-level pages (SubFileType 1 for reduced ones), the layout
    OpenSlide's generic-tiff driver reads. With ``mpp`` the X/YResolution tags are written in
    pixels per centimetre (OpenSlide 4 turns them into ``openslide.mpp-x``); with ``None``
    no resolution unit is written and the slide has no mpp. ``level_images`` replaces the
    computed reduced levels (to tell levels apart in tests).
    """
    path = os.fspath(path)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    pyramid = [image]
    if level_images is not None:
        pyramid += [np.ascontiguousarray(a, dtype=np.uint8) for a in level_images]
    else:
        for _ in range(1, levels):
            pyramid.append(downscale(pyramid[-1], 2))
    with tifffile.TiffWriter(path) as tw:
        for level, arr in enumerate(pyramid):
            kwargs = {}
            if mpp is not None:
                ds = image.shape[1] / arr.shape[1]
                ppcm = 1e4 / (mpp * ds)
                kwargs.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            else:
                kwargs.update(resolutionunit="NONE")
            tw.write(arr, tile=(tile, tile), photometric="rgb", compression=compression,
                     subfiletype=1 if level else 0,
                     description=description if (description and level == 0) else None,
                     metadata=None, **kwargs)
    return path


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
