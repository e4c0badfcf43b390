"""Whole-slide image readers: OpenSlide first, tifffile for plain TIFFs it refuses.

Geometry conventions (shared with :mod:`dfl_tf.data.tissue`, extraction and prediction):

* Coordinates are level-0 pixels. Level-0 pixel ``k`` covers the continuous interval
  ``[k, k + 1)``. A tile "centred on (cx, cy)" of ``size`` output pixels at ``target_mpp``
  covers the level-0 square ``[cx - W/2, cx + W/2) x [cy - H/2, cy + H/2)`` with
  ``W = H = size * target_mpp / slide_mpp``; at the slide's own resolution and an even
  ``size`` this is exactly the pixels ``cx - size/2 .. cx + size/2 - 1`` (no resampling).
* The fields of a read plan (:func:`read_fields`) share the centre: a field factor f (x5: 4)
  covers f times the x20 field of view (f times the mpp), resized to the same ``size``.
* Pixels outside the slide are white (255, 255, 255); OpenSlide's transparent
  out-of-slide pixels are composited onto white.
* The pyramid level read is the lowest-resolution level whose mpp is at most the
  target mpp (1% tolerance), so a finer level is never upsampled; when the target is
  finer than level 0, level 0 is upsampled. The level region is resized with
  Pillow's antialiased Lanczos filter.
* How a box is read never changes its pixels: overlapping boxes along a row (x5 fields) are cut
  from one wider read only where that is bit-identical (:mod:`.slide_strips`), so extraction,
  ``predict`` and ``heatmap``, which all read through :func:`read_views`, see the same bytes.

Readers are not thread-safe: :func:`read_views` borrows one from a process-wide pool
(:func:`borrow_reader`) for the duration of a read, so thread pools, including tf.data's
threads, read tiles in parallel and reuse open handles.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import DflError
from .plan import CONTEXT_FACTOR as _PLAN_CONTEXT_FACTOR
from .slide_backends import _Backend, _OpenSlideBackend, _TiffFileBackend, openslide
from .slide_strips import StripCache

__all__ = [
    "SlideReader",
    "open_slide",
    "read_views",
    "read_fields",
    "borrow_reader",
    "close_pooled_readers",
    "drop_strips",
    "parse_magnification",
    "CONTEXT_FACTOR",
]

#: The x5 sibling view covers CONTEXT_FACTOR times the field of view of the x20 view (the plan's table).
CONTEXT_FACTOR = float(_PLAN_CONTEXT_FACTOR)
#: Relative tolerance when comparing a level's mpp with the target mpp.
_LEVEL_TOLERANCE = 0.01
#: Objective power -> mpp: 20x is 0.5 um/px.
_MPP_AT_1X = 10.0
#: Plausible level-0 um/px from metadata; outside it (e.g. a 600 dpi TIFF read as 42 um/px) needs --slide-mpp.
MPP_RANGE = (0.05, 20.0)
_log = logging.getLogger("dfl_tf.slides")
_upsample_warned: set[tuple[str, float]] = set()
_warn_lock = threading.Lock()


def parse_magnification(value: Any) -> float:
    """Microns per pixel from ``0.5``, ``"0.5"``, ``"0.5um"`` or an objective power ``"20x"``.

    Objective powers use the usual convention ``mpp = 10 / power`` (20x -> 0.5 um/px,
    40x -> 0.25 um/px).
    """
    if isinstance(value, bool):
        raise DflError(f"invalid magnification {value!r}: give microns per pixel (0.5) or an objective power (20x)")
    if isinstance(value, (int, float, np.integer, np.floating)):
        mpp = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace("µ", "u")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(x|um|um/px|mpp)?", text)
        if not match:
            raise DflError(f"invalid magnification {value!r}: give microns per pixel (0.5) or an objective power (20x)")
        number = float(match.group(1))
        if match.group(2) == "x":
            if not (number > 0 and math.isfinite(number)):
                raise DflError(f"invalid objective power {value!r}: must be positive")
            mpp = _MPP_AT_1X / number
        else:
            mpp = number
    else:
        raise DflError(f"invalid magnification {value!r}: give microns per pixel (0.5) or an objective power (20x)")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise DflError(f"invalid magnification {value!r}: microns per pixel must be positive and finite")
    return mpp


class SlideReader:
    """An open whole-slide image. Use :func:`open_slide` (or :func:`borrow_reader`) to get one.

    Attributes: ``path``, ``mpp`` (level-0 um/px), ``dimensions`` (level-0 width, height),
    ``level_count``, ``level_dimensions``, ``level_downsamples``, ``backend``
    (``"openslide"`` or ``"tifffile"``).
    """

    def __init__(self, path: str, backend: _Backend, mpp: float, mpp_source: str):
        self.path = path
        self._backend = backend
        self.backend = backend.name
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.level_dimensions = list(backend.level_dimensions)
        self.level_downsamples = list(backend.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.broken = False  # set by a failed read: the pool then closes this reader
        self._strips = StripCache()  # overlapping boxes along a row cut from one wider read

    def __repr__(self) -> str:
        return (f"SlideReader({self.path!r}, backend={self.backend}, mpp={self.mpp:g}, "
                f"dimensions={self.dimensions}, levels={self.level_count})")

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._backend is not None:
            try:
                self._backend.close()
            finally:
                self._backend = None  # type: ignore[assignment]

    @property
    def level_mpps(self) -> list[float]:
        return [self.mpp * ds for ds in self.level_downsamples]

    def best_level(self, target_mpp: float) -> int:
        """The lowest-resolution level whose mpp is <= target_mpp (1% tolerance), else 0."""
        best = 0
        for level, level_mpp in enumerate(self.level_mpps):
            if level_mpp <= target_mpp * (1.0 + _LEVEL_TOLERANCE) and level_mpp > self.level_mpps[best]:
                best = level
        return best

    def _check_open(self) -> _Backend:
        if self._backend is None:
            raise DflError(f"{self.path}: slide reader is closed")
        return self._backend

    def read_region_at_mpp(self, cx: float, cy: float, target_mpp: float, size: int) -> np.ndarray:
        """``size`` x ``size`` RGB uint8 pixels at ``target_mpp`` centred on level-0 (cx, cy)."""
        backend = self._check_open()
        size = int(size)
        if size < 1:
            raise DflError(f"{self.path}: tile size must be positive, got {size}")
        target_mpp = parse_magnification(target_mpp)
        if target_mpp < self.mpp * (1.0 - _LEVEL_TOLERANCE):
            self._warn_upsampling(target_mpp)
        level = self.best_level(target_mpp)
        ds = self.level_downsamples[level]
        side0 = size * target_mpp / self.mpp            # field of view in level-0 pixels
        side = side0 / ds                               # ... and in level pixels
        left = (cx - side0 / 2.0) / ds
        top = (cy - side0 / 2.0) / ds
        scale = side / size                             # level pixels per output pixel
        if abs(scale - 1.0) < 1e-6 and abs(left - round(left)) < 1e-6 and abs(top - round(top)) < 1e-6:
            tile, shared = self._read_box(backend, level, int(round(left)), int(round(top)), size, size)
            return tile.copy() if shared or not tile.flags.writeable else tile
        # Lanczos support: 3 output pixels -> 3 * max(scale, 1) level pixels each side.
        margin = int(math.ceil(3.0 * max(scale, 1.0))) + 1
        bx0 = int(math.floor(left)) - margin
        by0 = int(math.floor(top)) - margin
        bx1 = int(math.ceil(left + side)) + margin
        by1 = int(math.ceil(top + side)) + margin
        region, _ = self._read_box(backend, level, bx0, by0, bx1 - bx0, by1 - by0)  # fromarray copies
        box = (left - bx0, top - by0, left - bx0 + side, top - by0 + side)
        image = Image.fromarray(region).resize((size, size), Image.Resampling.LANCZOS, box=box)
        return np.array(image)  # a writable copy

    def _warn_upsampling(self, target_mpp: float) -> None:
        """Log once per slide and mpp that tiles are upsampled from level 0."""
        key = (self.path, round(target_mpp, 6))
        with _warn_lock:
            if key in _upsample_warned:
                return
            _upsample_warned.add(key)
        _log.warning("%s: reading at %g um/px, finer than level 0 (%g um/px): tiles are upsampled %.2fx",
                     self.path, target_mpp, self.mpp, self.mpp / target_mpp)

    def _strips_exact(self, level: int) -> bool:
        """Whether a box cut from a wider read of ``level`` equals a read of that box, bit for bit:
        always for tifffile; for OpenSlide when the level's downsample is an integer (level
        coordinates stay whole; otherwise OpenSlide interpolates at a sub-pixel phase per read)."""
        ds = self.level_downsamples[level]
        return self.backend == "tifffile" or ds == int(ds)

    def _read_box(self, backend: _Backend, level: int, x: int, y: int, w: int, h: int
                  ) -> tuple[np.ndarray, bool]:
        """Read a level box, from a strip where neighbours overlap (see :mod:`.slide_strips`);
        returns (pixels, shared), ``shared`` when the pixels are a view into the cached strip."""
        return self._strips.read(self, backend, level, x, y, w, h)

    def _reopen(self) -> _Backend:
        """Replace the backend with a freshly opened one (after a failed read)."""
        fresh = open_slide(self.path, mpp_override=self.mpp, backend=self.backend)
        old, self._backend, fresh._backend = self._backend, fresh._backend, None
        if old is not None:
            old.close()
        self.broken = False
        return self._backend

    def _read(self, backend: _Backend, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            return backend.read(level, x, y, w, h)
        except Exception as exc:  # a corrupt or truncated tile, an unreadable level, a codec error
            detail = str(exc) if isinstance(exc, DflError) else f"{type(exc).__name__}: {exc}"
            detail = " ".join(detail.replace(self.path, "").strip(": ").split())[:300]
            self.broken = True  # OpenSlide handles stay in error once a read failed: never reuse this one
            raise DflError(f"{self.path}: cannot read level {level} region ({x}, {y}) + {w} x {h} "
                           f"({detail})") from exc

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side at most ``max_side``; returns (rgb, downsample).

        ``downsample`` is level-0 pixels per thumbnail pixel along x (the y factor is
        ``dimensions[1] / thumb.shape[0]``, equal up to rounding).
        """
        backend = self._check_open()
        max_side = max(1, int(max_side))
        width, height = self.dimensions
        try:
            thumb = backend.thumbnail(max_side)
        except Exception as exc:
            raise DflError(f"{self.path}: cannot read slide thumbnail ({type(exc).__name__}: {exc})") from exc
        if thumb is None:
            thumb = self._banded_thumbnail(backend, max_side)
        thumb = np.ascontiguousarray(thumb)
        return (thumb if thumb.flags.writeable else thumb.copy()), width / thumb.shape[1]

    def _banded_thumbnail(self, backend: _Backend, max_side: int) -> np.ndarray:
        """Box-average the smallest sufficient level band by band (bounded memory)."""
        need = max(self.dimensions) / max_side
        level = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= need * (1.0 + 1e-9) and ds >= self.level_downsamples[level]:
                level = i
        lw, lh = self.level_dimensions[level]
        factor = max(1, int(math.ceil(max(lw, lh) / max_side)))
        band = factor * max(1, (1 << 24) // max(1, lw * 3 * factor))  # ~16 MB per band
        rows = []
        for y in range(0, lh, band):
            h = min(band, lh - y)
            chunk = self._read(backend, level, 0, y, lw, h)
            rows.append(np.asarray(Image.fromarray(chunk).reduce(factor)) if factor > 1 else chunk)
        return np.concatenate(rows, axis=0)


def open_slide(path: str | os.PathLike, mpp_override: float | str | None = None,
               backend: str | None = None) -> SlideReader:
    """Open a slide with OpenSlide, or with tifffile for TIFFs OpenSlide refuses.

    ``mpp_override`` (level-0 um/px) wins over the slide's metadata; without it a slide
    with no resolution metadata is an error. ``backend`` forces ``"openslide"`` or
    ``"tifffile"`` (tests, debugging).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DflError(f"slide not found: {path}")
    if not os.path.isfile(path):
        raise DflError(f"not a slide file: {path}")
    override = None
    if mpp_override is not None:
        try:
            override = parse_magnification(mpp_override)
        except DflError as exc:
            raise DflError(f"{path}: invalid slide mpp override: {exc}") from None
    if backend not in (None, "openslide", "tifffile"):
        raise DflError(f"unknown slide backend {backend!r} (openslide or tifffile)")

    impl: _Backend | None = None
    errors = []
    if backend in (None, "openslide") and openslide is not None:
        try:
            impl = _OpenSlideBackend(openslide.OpenSlide(path))
        except Exception as exc:  # unsupported format, corrupt file, ...
            errors.append(f"openslide: {exc}")
    elif backend == "openslide":
        errors.append("openslide: not installed")
    if impl is None and backend in (None, "tifffile"):
        try:
            impl = _TiffFileBackend(path)
        except Exception as exc:
            errors.append(f"tifffile: {exc}")
    if impl is None:
        raise DflError(f"cannot open slide {path}: " + "; ".join(errors or ["unsupported format"]))

    try:
        if override is not None:
            mpp, source = override, "override"
        else:
            mpp = impl.mpp()  # type: ignore[attr-defined]
            source = "metadata"
            if mpp is None:
                raise DflError(
                    f"{path}: slide has no microns-per-pixel metadata; pass --slide-mpp "
                    f"(its level-0 um/px) or a `slide_mpp` column")
            if not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
                raise DflError(
                    f"{path}: its metadata gives {mpp:g} um/px, outside {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px "
                    f"(e.g. a scanner's dpi taken for the slide's resolution); pass --slide-mpp (its level-0 "
                    f"um/px) or a `slide_mpp` column")
        return SlideReader(path, impl, mpp, source)
    except Exception:
        impl.close()
        raise


# ---------------------------------------------------------------------------------------------
# Process-wide reader pool
# ---------------------------------------------------------------------------------------------

#: Idle readers kept per slide, and slides kept open, by :func:`borrow_reader`'s pool.
MAX_IDLE_PER_SLIDE = 8
MAX_POOLED_SLIDES = 32
_pool_lock = threading.Lock()
_pool: OrderedDict = OrderedDict()  # key -> list of idle SlideReaders
_strip_caches: OrderedDict = OrderedDict()  # key -> the StripCache its pooled readers share
#: Strips are kept for the slides read last (at most 32 MB of strips per level, see slide_strips).
STRIP_SLIDES = 4


@contextlib.contextmanager
def borrow_reader(path: str | os.PathLike, mpp_override: float | str | None = None):
    """Lend an open reader for ``path`` to the calling thread until the ``with`` block ends.

    Readers are pooled process-wide, so they are reused whatever thread calls: tf.data runs
    Python functions on threads created by TensorFlow, where ``threading.local`` state does not
    survive from one call to the next. A reader is lent to one thread at a time (readers are not
    thread-safe); another thread borrowing the same slide meanwhile gets a second reader.
    """
    key = (os.path.abspath(os.fspath(path)), None if mpp_override is None else str(mpp_override))
    with _pool_lock:
        idle = _pool.get(key)
        reader = idle.pop() if idle else None
        strips = _strip_caches.setdefault(key, StripCache())  # shared by the slide's readers
    if reader is None:
        reader = open_slide(path, mpp_override=mpp_override)
    reader._strips = strips
    try:
        yield reader
    finally:
        evicted: list[SlideReader] = []
        with _pool_lock:
            idle = _pool.setdefault(key, [])
            _pool.move_to_end(key)
            if key in _strip_caches:
                _strip_caches.move_to_end(key)
            while len(_strip_caches) > STRIP_SLIDES:
                _strip_caches.popitem(last=False)[1].clear()
            if len(idle) < MAX_IDLE_PER_SLIDE and not reader.broken:  # a failed handle is closed
                idle.append(reader)
                reader = None
            while len(_pool) > MAX_POOLED_SLIDES:
                evicted += _pool.popitem(last=False)[1]
        for old in evicted + ([reader] if reader is not None else []):
            old.close()


def drop_strips() -> None:
    """Forget every cached strip (:mod:`.slide_strips`); benchmarks start each timed pass cold."""
    with _pool_lock:
        caches = list(_strip_caches.values())
        _strip_caches.clear()
    for cache in caches:
        cache.clear()


def close_pooled_readers() -> None:
    """Close every idle reader of :func:`borrow_reader`'s pool."""
    with _pool_lock:
        readers = [r for idle in _pool.values() for r in idle]
        _pool.clear()
    drop_strips()
    for reader in readers:
        reader.close()


def read_fields(path: str | os.PathLike, cx: float, cy: float, mpp: float, size: int,
                factors: Sequence[int] = (1,), mpp_override: float | str | None = None) -> dict[int, np.ndarray]:
    """One size x size tile per field factor (:mod:`dfl_tf.data.plan`), all centred on level-0
    (cx, cy): factor f is read at ``f * mpp`` (f times the field of the x20 patch), narrowest first."""
    with borrow_reader(path, mpp_override) as reader:
        width, height = reader.dimensions
        if not (0 <= cx < width and 0 <= cy < height):
            raise DflError(f"{path}: centre ({cx}, {cy}) lies outside the slide ({width} x {height} level-0 px)")
        try:
            return {int(f): reader.read_region_at_mpp(cx, cy, mpp * f, size) for f in sorted(factors)}
        except DflError as exc:  # name the tile as the source names it
            raise DflError(f"{exc} for the tile centred at ({cx}, {cy})") from exc


def read_views(path: str | os.PathLike, cx: float, cy: float, mpp: float, size: int, context: bool,
               mpp_override: float | str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The x20 tile and, when ``context``, its x5 sibling (same centre, 4x the mpp), both size x size
    (:func:`read_fields` for the x20/x5 pair)."""
    wide = int(CONTEXT_FACTOR)
    fields = read_fields(path, cx, cy, parse_magnification(mpp), size, (1, wide) if context else (1,), mpp_override)
    return fields[1], fields.get(wide)
