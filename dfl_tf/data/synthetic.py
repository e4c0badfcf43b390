"""Synthetic slides: pyramidal TIFFs with real mpp metadata and procedurally drawn tissue.

Used by ``make demo`` (``tools/make_demo_data.py``) and the tests, so that the whole pipeline
runs without downloading data. The textures are crude H&E look-alikes, not pathology.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image

DEMO_CLASSES = ("tumour", "stroma", "lymphocytes")


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX))


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
    tmp = f"{path}.tmp-{os.getpid()}"
    with tifffile.TiffWriter(tmp) as tw:
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
    os.replace(tmp, path)
    return path


def _disks(canvas: np.ndarray, rng: np.random.Generator, count: int, radius: tuple[float, float],
           colour: Sequence[float], elong: float = 1.0) -> None:
    """Stamp ``count`` filled ellipses of random radius and orientation onto a float canvas."""
    h, w = canvas.shape[:2]
    colour = np.asarray(colour, np.float32)
    for _ in range(count):
        r = rng.uniform(*radius)
        a, b = r * elong, r
        theta = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ext = int(np.ceil(max(a, b))) + 1
        x0, x1, y0, y1 = max(0, int(cx) - ext), min(w, int(cx) + ext + 1), max(0, int(cy) - ext), min(h, int(cy) + ext + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        canvas[y0:y1, x0:x1][inside] = colour


def texture(kind: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A patch of one demo tissue class at ~0.5 um/px, uint8 RGB."""
    rng = np.random.default_rng(seed)
    area = height * width
    canvas = np.empty((height, width, 3), np.float32)
    if kind == "tumour":  # crowded, large, pleomorphic purple nuclei on pale pink
        canvas[:] = (235, 180, 210)
        _disks(canvas, rng, area // 260, (6, 11), (95, 50, 140), elong=1.3)
    elif kind == "stroma":  # pink fibres with sparse elongated nuclei
        canvas[:] = (240, 170, 200)
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        waves = np.sin((ys + 8 * np.sin(xs / 37.0 + rng.uniform(0, 6))) / 3.5)
        canvas -= (waves[..., None] > 0.6) * np.array([25, 60, 35], np.float32)
        _disks(canvas, rng, area // 3000, (3, 4), (120, 60, 150), elong=3.0)
    elif kind == "lymphocytes":  # dense small round dark-blue nuclei
        canvas[:] = (230, 190, 220)
        _disks(canvas, rng, area // 70, (3, 4.5), (60, 40, 130))
    else:
        raise ValueError(f"unknown texture {kind!r}")
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def demo_slide_image(width: int = 4096, height: int = 3072, margin: int = 160, seed: int = 0
                     ) -> tuple[np.ndarray, list[dict]]:
    """A white slide with one vertical band of tissue per demo class, inside a margin.

    Returns the image and the regions ``[{class, x0, y0, x1, y1}]`` in level-0 pixels.
    """
    image = np.full((height, width, 3), 245, np.uint8)
    band = (width - 2 * margin) // len(DEMO_CLASSES)
    regions = []
    for k, name in enumerate(DEMO_CLASSES):
        x0, x1 = margin + k * band, margin + (k + 1) * band
        y0, y1 = margin, height - margin
        image[y0:y1, x0:x1] = texture(name, y1 - y0, x1 - x0, seed=seed + k)
        regions.append({"class": name, "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    return image, regions


def region_of(regions: Sequence[dict], x: float, y: float) -> dict | None:
    for region in regions:
        if region["x0"] <= x < region["x1"] and region["y0"] <= y < region["y1"]:
            return region
    return None
