"""Tissue detection on slide thumbnails and the regular tiling grid built on it.

``tissue_mask`` works on a thumbnail (a few thousand pixels a side): Otsu threshold on HSV
saturation (clamped to a sane range so blank slides give nothing and all-tissue crops keep
their pale tissue), a light optical-density check, cheap pen-mark rejection (green/blue ink
hues, near-black), small-object removal and filling of small holes (scipy.ndimage).

``tile_slide`` lays a regular grid of ``size``-pixel tiles at ``mpp`` over the slide, centred
so that the margins left and right (top and bottom) are equal, and keeps the tiles whose
tissue fraction in the mask is at least ``min_tissue``. ``tile`` does that for several slides
and writes a coordinates CSV (``slide,x,y,mpp,tissue``; x, y are level-0 tile centres) that
extraction reads as a slide coordinates source, plus a thumbnail PNG per slide.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import DflError
from ..runtime.files import atomic_write_bytes, atomic_write_text
from ..runtime.outputs import prepare_out
from .slides import open_slide, parse_magnification

__all__ = ["tissue_mask", "otsu_threshold", "tile_slide", "tile", "grid_centres"]

#: Saturation threshold limits: below the floor is background whatever Otsu says (blank
#: slides), above the ceiling would drop pale eosin on crops that are almost all tissue.
_SAT_FLOOR = 0.07
_SAT_CEIL = 0.15
#: Minimum optical density (max over channels) of a tissue pixel (drops bright colour casts).
_OD_MIN = 0.05
#: Pixels darker than this (HSV value) are treated as black ink / debris.
_BLACK_VALUE = 0.15


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values``; returns the range's low end on a constant input."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return float(value_range[0])
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    between[(weight0 == 0) | (weight1 == 0)] = -1.0
    if between.max() <= 0:
        return float(value_range[0])
    return float(edges[int(np.argmax(between)) + 1])


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    if max_area <= 0 or not mask.any():
        return mask
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, count = ndimage.label(holes)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())
    fill = areas <= max_area
    fill[0] = False
    return mask | fill[labels]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1]."""
    rgb = rgb.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    safe = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0,
                   np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    hue = np.where(delta > 0, hue, 0.0)
    return hue, sat, mx


def tissue_mask(thumbnail_rgb: np.ndarray, min_area: int | None = None, max_hole: int | None = None,
                reject_pen: bool = True) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (h, w, 3 uint8), same h, w.

    ``min_area``: connected tissue pieces smaller than this many thumbnail pixels are dropped
    (default 0.02% of the thumbnail, at least 9). ``max_hole``: background holes inside tissue
    up to this area are filled (default 10 x ``min_area``). ``reject_pen``: drop green / blue
    ink (hue 75-240 degrees with saturation > 0.25, connected areas of at least ``min_area``,
    grown by 2 px) and near-black pixels.
    """
    rgb = np.asarray(thumbnail_rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DflError(f"tissue_mask expects an RGB image, got shape {rgb.shape}")
    rgb = rgb[:, :, :3]
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        return np.zeros((height, width), bool)
    if min_area is None:
        min_area = max(9, int(round(2e-4 * height * width)))
    if max_hole is None:
        max_hole = 10 * min_area

    hue, sat, value = _hsv(rgb)
    od = -np.log10(np.maximum(rgb.min(axis=-1).astype(np.float32), 1.0) / 255.0)
    # Otsu on the pixels that are not near-black (ink, slide edges); clamped so that a blank
    # slide (Otsu splits noise) finds nothing and an all-tissue crop keeps its pale tissue.
    candidates = sat[value > _BLACK_VALUE]
    threshold = otsu_threshold(candidates) if candidates.size else 1.0
    threshold = min(max(threshold, _SAT_FLOOR), _SAT_CEIL)
    mask = (sat >= threshold) & (od >= _OD_MIN) & (value > _BLACK_VALUE)

    pen = np.zeros_like(mask)
    if reject_pen:
        pen = (hue >= 75.0) & (hue < 240.0) & (sat > 0.25)
        pen = _remove_small(pen, min_area)
        pen |= _remove_small(value <= _BLACK_VALUE, min_area)
        if pen.any():
            pen = ndimage.binary_dilation(pen, iterations=2)
        mask &= ~pen
    mask = _remove_small(mask, min_area)
    mask = _fill_small_holes(mask, max_hole) & ~pen
    return mask


def grid_centres(length: float, tile: float, stride: float) -> np.ndarray:
    """Centres of whole tiles of ``tile`` px every ``stride`` px, the grid centred on [0, length)."""
    if tile > length:
        return np.zeros(0)
    count = int(math.floor((length - tile) / stride + 1e-9)) + 1
    span = (count - 1) * stride + tile
    start = (length - span) / 2.0 + tile / 2.0
    return start + stride * np.arange(count)


def _tissue_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, tile0: float,
                      scale_x: float, scale_y: float) -> np.ndarray:
    """Mean of ``mask`` over each tile (level-0 centres xs x ys, side tile0) -> (len(ys), len(xs))."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(centres: np.ndarray, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round((centres - tile0 / 2.0) / scale), 0, limit).astype(int)
        hi = np.clip(np.round((centres + tile0 / 2.0) / scale), 0, limit).astype(int)
        hi = np.maximum(hi, np.minimum(lo + 1, limit))
        lo = np.minimum(lo, hi - 1)
        return lo, hi

    x0, x1 = bounds(xs, scale_x, mask.shape[1])
    y0, y1 = bounds(ys, scale_y, mask.shape[0])
    total = (integral[y1[:, None], x1[None, :]] - integral[y0[:, None], x1[None, :]]
             - integral[y1[:, None], x0[None, :]] + integral[y0[:, None], x0[None, :]])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / np.maximum(area, 1)


def _check_grid_args(size: int, min_tissue: float, overlap: float) -> None:
    if int(size) < 1:
        raise DflError(f"tile size must be a positive number of pixels, got {size}")
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise DflError(f"min_tissue must be between 0 and 1, got {min_tissue}")
    if not 0.0 <= float(overlap) < 1.0:
        raise DflError(f"overlap must be in [0, 1), got {overlap}")


def _tile_one(path: str | os.PathLike, mpp: float, size: int, min_tissue: float, overlap: float,
              mpp_override: Any, thumbnail_side: int) -> dict[str, Any]:
    with open_slide(path, mpp_override=mpp_override) as reader:
        thumb, _ = reader.thumbnail(thumbnail_side)
        width, height = reader.dimensions
        slide_mpp = reader.mpp
    mask = tissue_mask(thumb)
    tile0 = size * mpp / slide_mpp
    stride0 = tile0 * (1.0 - overlap)
    xs = grid_centres(width, tile0, stride0)
    ys = grid_centres(height, tile0, stride0)
    scale_x = width / thumb.shape[1]
    scale_y = height / thumb.shape[0]
    tiles = []
    if xs.size and ys.size:
        fractions = _tissue_fractions(mask, xs, ys, tile0, scale_x, scale_y)
        for j, i in zip(*np.nonzero(fractions >= min_tissue - 1e-12)):
            tiles.append({"slide": os.fspath(path), "x": int(round(xs[i])), "y": int(round(ys[j])),
                          "mpp": float(mpp), "tissue": round(float(fractions[j, i]), 4)})
    return {"tiles": tiles, "thumb": thumb, "mask": mask, "tile0": tile0, "scale": (scale_x, scale_y),
            "slide_mpp": slide_mpp, "dimensions": (width, height)}


def tile_slide(path: str | os.PathLike, mpp: float | str = 0.5, size: int = 256, min_tissue: float = 0.5,
               overlap: float = 0.0, mpp_override: float | str | None = None,
               thumbnail_side: int = 2048) -> list[dict[str, Any]]:
    """Tiles of ``size`` px at ``mpp`` with at least ``min_tissue`` tissue, row by row.

    Each tile is ``{"slide", "x", "y", "mpp", "tissue"}``: x, y are the level-0 pixel
    coordinates of the tile centre (rounded to integers), mpp the target mpp, tissue the
    fraction of the tile covered by the thumbnail tissue mask. The stride is
    ``size * (1 - overlap)``; only whole tiles inside the slide are laid, the grid centred.
    """
    mpp = parse_magnification(mpp)
    _check_grid_args(size, min_tissue, overlap)
    return _tile_one(path, mpp, int(size), float(min_tissue), float(overlap), mpp_override,
                     int(thumbnail_side))["tiles"]


def _overlay(info: dict[str, Any]) -> Image.Image:
    """Thumbnail with the tissue mask tinted green and the kept tiles outlined in blue."""
    thumb = info["thumb"].astype(np.float32)
    mask = info["mask"][:, :, None]
    tint = np.array([0, 200, 0], np.float32)
    shaded = np.where(mask, 0.7 * thumb + 0.3 * tint, thumb)
    image = Image.fromarray(np.clip(shaded, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    scale_x, scale_y = info["scale"]
    half = info["tile0"] / 2.0
    for t in info["tiles"]:
        box = ((t["x"] - half) / scale_x, (t["y"] - half) / scale_y,
               (t["x"] + half) / scale_x - 1, (t["y"] + half) / scale_y - 1)
        draw.rectangle(box, outline=(0, 60, 255), width=1)
    return image


def _csv_path_for(slide: str, csv_dir: Path) -> str:
    """The slide path relative to the CSV's folder (POSIX separators), absolute if impossible."""
    absolute = os.path.abspath(slide)
    try:
        rel = os.path.relpath(absolute, csv_dir)
    except ValueError:  # another drive on Windows
        return absolute
    return Path(rel).as_posix()


def tile(slides: Iterable[str | os.PathLike], out_csv: str | os.PathLike, mpp: float | str = 0.5,
         size: int = 256, min_tissue: float = 0.5, overlap: float = 0.0,
         slide_mpp: float | str | None = None, thumbnails: bool = True,
         thumbnail_side: int = 2048, overwrite: bool = False) -> dict[str, Any]:
    """Tile ``slides`` and write ``out_csv`` (``slide,x,y,mpp,tissue``) atomically.

    Slide paths in the CSV are relative to the CSV's folder (so the CSV and slides can move
    together), absolute when no relative path exists. ``slide_mpp`` overrides the level-0
    um/px of every slide; when given it is also written as a ``slide_mpp`` column. With
    ``thumbnails``, ``<csvstem>_<slidestem>_tiles.png`` is written next to the CSV for each
    slide. Any slide that cannot be read stops the run (nothing is written). An existing
    ``out_csv`` is replaced only with ``overwrite``, and only when it is a tile CSV (see
    :func:`dfl_tf.runtime.outputs.prepare_out`).
    Returns a summary: ``{"csv", "tiles", "mpp", "size", "slides": [...]}``.
    """
    slides = [os.fspath(s) for s in slides]
    if not slides:
        raise DflError("tile: no slides given")
    mpp = parse_magnification(mpp)
    _check_grid_args(size, min_tissue, overlap)
    if slide_mpp is not None:
        slide_mpp = parse_magnification(slide_mpp)
    out_csv = Path(out_csv)
    prepare_out(out_csv, "tiles", slides, overwrite)
    if not out_csv.parent.is_dir():
        raise DflError(f"output folder does not exist: {out_csv.parent}")
    csv_dir = Path(os.path.abspath(out_csv.parent))

    results = []
    for slide in slides:
        info = _tile_one(slide, mpp, int(size), float(min_tissue), float(overlap), slide_mpp,
                         int(thumbnail_side))
        results.append((slide, info))

    header = ["slide", "x", "y", "mpp", "size", "tissue"] + (["slide_mpp"] if slide_mpp is not None else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    summary_slides = []
    used_names: set[str] = set()
    for slide, info in results:
        name = _csv_path_for(slide, csv_dir)
        for t in info["tiles"]:
            row = [name, t["x"], t["y"], f"{t['mpp']:g}", int(size), f"{t['tissue']:.4f}"]
            if slide_mpp is not None:
                row.append(f"{slide_mpp:g}")
            writer.writerow(row)
        thumb_path = None
        if thumbnails:
            stem = Path(slide).stem
            candidate, k = stem, 1
            while candidate in used_names:
                k += 1
                candidate = f"{stem}-{k}"
            used_names.add(candidate)
            thumb_path = out_csv.with_name(f"{out_csv.stem}_{candidate}_tiles.png")
            png = io.BytesIO()
            _overlay(info).save(png, format="PNG")
            atomic_write_bytes(thumb_path, png.getvalue())
        summary_slides.append({
            "slide": name, "tiles": len(info["tiles"]), "slide_mpp": info["slide_mpp"],
            "dimensions": list(info["dimensions"]),
            "tissue_fraction": round(float(info["mask"].mean()), 4),
            "thumbnail": os.fspath(thumb_path) if thumb_path else None,
        })
    atomic_write_text(out_csv, buffer.getvalue())
    return {"csv": os.fspath(out_csv), "tiles": sum(s["tiles"] for s in summary_slides), "mpp": mpp,
            "size": int(size), "min_tissue": float(min_tissue), "overlap": float(overlap),
            "slides": summary_slides}
