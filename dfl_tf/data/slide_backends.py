"""Slide reading backends behind :class:`dfl_tf.data.slides.SlideReader`: OpenSlide, and a
tifffile reader for plain TIFFs OpenSlide refuses (tiled or stripped, pyramid pages when
flagged as reduced). Boxes are in level space and may run off the level (padded white)."""
from __future__ import annotations

import ctypes
import math
import re
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DflError

try:  # pragma: no cover - import guard
    import openslide
except Exception:  # pragma: no cover - openslide missing or its library fails to load
    openslide = None  # type: ignore[assignment]
try:  # pragma: no cover - import guard
    # The C entry point behind OpenSlide.read_region: lets a read land in a numpy buffer (see
    # _OpenSlideBackend.read); without it (another openslide-python layout) the public call is used.
    from openslide.lowlevel import _read_region as _os_read_region
except Exception:  # pragma: no cover
    _os_read_region = None

import tifffile

#: Resolution metadata outside this range (um/px) is not a microscope resolution
#: (e.g. the 72/96/300 dpi that image editors write) and is ignored.
_MPP_RANGE = (0.01, 50.0)


def _valid_mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    if math.isfinite(mpp) and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
        return mpp
    return None


def _mpp_from_resolution(resolution: Any, unit: Any) -> float | None:
    """um/px from a TIFF X resolution (pixels per unit) and its unit (2 inch, 3 cm)."""
    try:
        if isinstance(resolution, (tuple, list)):
            resolution = resolution[0] / resolution[1]
        resolution = float(resolution)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    if not resolution > 0:
        return None
    unit_name = str(getattr(unit, "name", unit)).strip().lower()
    if unit_name in ("3", "centimeter", "centimetre"):
        return _valid_mpp(1e4 / resolution)
    if unit_name in ("2", "inch"):
        return _valid_mpp(25400.0 / resolution)
    return None


def _mpp_from_description(description: str) -> float | None:
    """Aperio-style ``MPP = 0.4990`` in an ImageDescription."""
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+)", description or "")
    return _valid_mpp(match.group(1)) if match else None


def _to_rgb_uint8(arr: np.ndarray, name: str = "slide region") -> np.ndarray:
    """(h, w[, c]) of any common dtype -> (h, w, 3) uint8 (the decoder's rule,
    :func:`dfl_tf.data.decode.to_uint8`); alpha composited onto white."""
    from dfl_tf.data.decode import to_uint8

    arr = to_uint8(arr, name)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 2:  # gray + alpha
        gray = _composite_white(arr[:, :, :1], arr[:, :, 1])
        return np.repeat(gray, 3, axis=2)
    if channels >= 4:
        return _composite_white(arr[:, :, :3], arr[:, :, 3])
    return np.ascontiguousarray(arr[:, :, :3])


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    if alpha.min(initial=255) == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[:, :, None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class _Backend:
    """Reads level-space boxes; boxes may run off the level (padded white)."""

    name = "?"
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> np.ndarray | None:
        return None

    def close(self) -> None:  # pragma: no cover
        pass


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, slide: Any):
        self.slide = slide
        self.level_dimensions = [tuple(int(v) for v in d) for d in slide.level_dimensions]
        self.level_downsamples = [float(d) for d in slide.level_downsamples]
        self.properties = dict(slide.properties)

    def mpp(self) -> float | None:
        props = self.properties
        mx = _valid_mpp(props.get("openslide.mpp-x"))
        my = _valid_mpp(props.get("openslide.mpp-y"))
        if mx and my:
            return (mx + my) / 2.0 if abs(mx - my) > 1e-9 else mx
        if mx or my:
            return mx or my
        for key in ("aperio.MPP",):
            value = _valid_mpp(props.get(key))
            if value:
                return value
        return _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # OpenSlide wants the top-left corner in level-0 coordinates.
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        if x >= lw or y >= lh or x + w <= 0 or y + h <= 0:
            return np.full((h, w, 3), 255, np.uint8)
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        fast = self._read_direct(level, x0, y0, w, h)
        if fast is not None:
            return fast
        # OpenSlide returns transparent pixels outside the slide (and in empty scan areas):
        # composite the straight-alpha RGBA onto white, in Pillow (C), then drop alpha.
        region = self.slide.read_region((x0, y0), level, (w, h))
        if region.mode == "RGBA":
            if region.getchannel("A").getextrema()[0] < 255:  # alpha only: 1/4 of getextrema()'s cost
                white = Image.new("RGBA", region.size, (255, 255, 255, 255))
                white.alpha_composite(region)
                region = white
            region = region.convert("RGB")
        return _to_rgb_uint8(np.asarray(region))

    def _read_direct(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray | None:
        """The region as RGB straight from OpenSlide's premultiplied ARGB32 (BGRA bytes), or None.

        Skips openslide-python's un-premultiply, the PIL image and its copies (about 0.3 ms of a
        2 ms 224 px read). Exact where alpha is 255 (inside the slide: premultiplied = straight)
        or 0 (outside: premultiplied RGB is 0, so c + 255 - a is white). Any other alpha (a
        fractional slide edge) returns None: the caller then takes the Pillow route, so the
        pixels are the same as that route's everywhere.
        """
        osr = getattr(self.slide, "_osr", None)
        if _os_read_region is None or osr is None or w * h == 0:
            return None
        buf = np.empty((h, w), np.uint32)
        _os_read_region(osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x0, y0, level, w, h)
        bgra = buf.view(np.uint8).reshape(h, w, 4)
        out = np.empty((h, w, 3), np.uint8)
        alpha = bgra[:, :, 3]
        if alpha.min() == 255:
            out[:, :, 0], out[:, :, 1], out[:, :, 2] = bgra[:, :, 2], bgra[:, :, 1], bgra[:, :, 0]
            return out
        if np.count_nonzero((alpha != 0) & (alpha != 255)):
            return None
        white = 255 - alpha  # 0 inside, 255 outside; premultiplied colour + it never overflows
        out[:, :, 0], out[:, :, 1], out[:, :, 2] = bgra[:, :, 2] + white, bgra[:, :, 1] + white, bgra[:, :, 0] + white
        return out

    def thumbnail(self, max_side: int) -> np.ndarray | None:
        image = self.slide.get_thumbnail((max_side, max_side))
        if image.mode != "RGB":
            image = image.convert("RGBA")
            return _to_rgb_uint8(np.asarray(image))
        return np.asarray(image)

    def close(self) -> None:
        self.slide.close()


class _TiffLevel:
    def __init__(self, page: Any, byteorder: str):
        self.page = page
        shape = page.shape
        self.planar_separate = page.planarconfig == 2 and len(shape) == 3
        if self.planar_separate:
            _, self.height, self.width = shape
        else:
            self.height, self.width = int(shape[0]), int(shape[1])
        self.byteorder = byteorder
        self._memmap: np.ndarray | None = None
        self._full: np.ndarray | None = None


def _check_codec(page: Any) -> None:
    """Raise when tifffile cannot decode this page's compression here (JPEG, LZW, JPEG 2000 need
    the optional imagecodecs package)."""
    if page.compression != 1:
        try:
            tifffile.TIFF.DECOMPRESSORS[page.compression]
        except KeyError:
            name = getattr(page.compression, "name", page.compression)
            raise ValueError(f"its {name}-compressed image data needs the imagecodecs package") from None


class _TiffFileBackend(_Backend):
    """Plain TIFFs (tiled or stripped, uncompressed or with codecs tifffile has).

    Windows are read without loading the whole level when the level is uncompressed
    and contiguous (memory map) or stored as chunky tiles/strips (only the tiles or
    strips that overlap the window are decoded). Other layouts (planar-separate
    compressed data) are decoded whole once per reader and kept in memory.
    """

    name = "tifffile"

    def __init__(self, path: str):
        self.path = path
        self.tif = tifffile.TiffFile(path)
        try:
            if not self.tif.series:
                raise ValueError("no readable image in the file")
            series = self.tif.series[0]
            levels = [level.keyframe for level in series.levels]
            base = levels[0]
            if len(levels) == 1:
                # Reduced-resolution pages that tifffile did not group into levels.
                seen = {id(base)}
                for page in self.tif.pages:
                    if id(page) in seen or not hasattr(page, "shape") or len(page.shape) < 2:
                        continue
                    if self._is_reduced(base, page):
                        levels.append(page)
            self.levels = [_TiffLevel(page, self.tif.byteorder) for page in levels]
            self.levels.sort(key=lambda lvl: -lvl.width)
            for lvl in self.levels:  # refused here, not at the first read: open_slide then also says why
                _check_codec(lvl.page)  # OpenSlide refused the file (corrupt, truncated, ...)
        except Exception:
            self.tif.close()
            raise
        base = self.levels[0]
        self.level_dimensions = [(lvl.width, lvl.height) for lvl in self.levels]
        self.level_downsamples = [
            (base.width / lvl.width + base.height / lvl.height) / 2.0 for lvl in self.levels
        ]

    @staticmethod
    def _dims(page: Any) -> tuple[int, int]:
        shape = page.shape
        if page.planarconfig == 2 and len(shape) == 3:
            return int(shape[2]), int(shape[1])
        return int(shape[1]), int(shape[0])

    def _is_reduced(self, base: Any, page: Any) -> bool:
        bw, bh = self._dims(base)
        pw, ph = self._dims(page)
        if not getattr(page, "is_reduced", False):  # NewSubfileType bit 0: reduced image
            return False
        if pw >= bw or ph >= bh or pw < 1 or ph < 1:
            return False
        if page.dtype != base.dtype or page.samplesperpixel != base.samplesperpixel:
            return False
        return abs((bw / pw) - (bh / ph)) / (bw / pw) < 0.02

    def mpp(self) -> float | None:
        page = self.tif.pages[0]
        tags = page.tags
        res = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        if res is not None and unit is not None:
            value = _mpp_from_resolution(res.value, unit.value)
            if value:
                return value
        return _mpp_from_description(getattr(page, "description", "") or "")

    def _level_array(self, lvl: _TiffLevel) -> np.ndarray | None:
        """A memory map of the level when it is uncompressed and contiguous."""
        if lvl._memmap is None and not lvl.planar_separate:
            page = lvl.page
            try:
                if page.is_memmappable and page.dataoffsets:
                    dtype = np.dtype(page.dtype).newbyteorder(lvl.byteorder)
                    shape = (lvl.height, lvl.width, page.samplesperpixel) if page.samplesperpixel > 1 \
                        else (lvl.height, lvl.width)
                    lvl._memmap = np.memmap(self.path, dtype=dtype, mode="r",
                                            offset=page.dataoffsets[0], shape=shape)
            except Exception:
                lvl._memmap = None
        return lvl._memmap

    def _read_chunked(self, lvl: _TiffLevel, x0: int, y0: int, x1: int, y1: int) -> np.ndarray | None:
        """Decode only the tiles/strips overlapping [x0, x1) x [y0, y1); None if not applicable."""
        page = lvl.page
        if lvl.planar_separate or getattr(page, "imagedepth", 1) > 1:
            return None
        if page.is_tiled:
            cw, ch = int(page.tilewidth), int(page.tilelength)
        else:
            cw, ch = lvl.width, int(page.rowsperstrip or lvl.height)
        ncols = -(-lvl.width // cw)
        nrows = -(-lvl.height // ch)
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) != ncols * nrows:
            return None
        spp = page.samplesperpixel
        out = np.zeros((y1 - y0, x1 - x0, spp), dtype=page.dtype)
        fh = self.tif.filehandle
        for row in range(y0 // ch, (y1 - 1) // ch + 1):
            for col in range(x0 // cw, (x1 - 1) // cw + 1):
                index = row * ncols + col
                if counts[index] == 0:
                    continue  # sparse chunk: leave zeros (unusual in slides)
                with fh.lock:
                    fh.seek(offsets[index])
                    data = fh.read(counts[index])
                if len(data) != counts[index]:
                    raise DflError(f"{self.path}: truncated TIFF data (chunk {index})")
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                segment = np.asarray(segment).reshape(-1, segment.shape[-3], segment.shape[-2], segment.shape[-1])[0]
                ty, tx = row * ch, col * cw
                sy0, sy1 = max(y0, ty), min(y1, ty + ch, lvl.height)
                sx0, sx1 = max(x0, tx), min(x1, tx + cw, lvl.width)
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = segment[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]
        return out

    def _read_window(self, lvl: _TiffLevel, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        arr = self._level_array(lvl)
        if arr is not None:
            return np.asarray(arr[y0:y1, x0:x1])
        window = self._read_chunked(lvl, x0, y0, x1, y1)
        if window is not None:
            return window
        if lvl._full is None:
            full = lvl.page.asarray()
            if lvl.planar_separate:
                full = np.moveaxis(full, 0, -1)
            lvl._full = full
        return lvl._full[y0:y1, x0:x1]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lvl = self.levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lvl.width), min(y + h, lvl.height)
        if x1 <= x0 or y1 <= y0:
            return out
        out[y0 - y:y1 - y, x0 - x:x1 - x] = _to_rgb_uint8(self._read_window(lvl, x0, y0, x1, y1),
                                                          f"slide {self.path}")
        return out

    def close(self) -> None:
        for lvl in self.levels:
            lvl._memmap = None
            lvl._full = None
        self.tif.close()
