"""Strips: neighbouring tiles visited along a row (``dfl tile``'s order) read overlapping level boxes
where their fields overlap (the x5 field is 4x the x20 one, so the x5 boxes of neighbours overlap by
3/4; tiles cut with ``--overlap`` overlap too). When a box overlaps the previous box read at its level
on the same rows, :class:`StripCache` reads one wider box (a strip, 4 to STRIP_TILES more steps long)
and cuts the following boxes from it: fewer pixels decoded and painted, the same pixels, so only where
the reader says a cut box equals a box read (``SlideReader._strips_exact``). Boxes that do not overlap
(x20 tiles without overlap, shuffled orders) are read one by one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DflError

#: A strip covers the box asked for plus up to STRIP_TILES - 1 more steps along the row, at most
#: STRIP_MAX_PIXELS level pixels (2 Mpx: 6 MB of RGB; one strip per level per reader, and only readers
#: of the slide read last keep theirs, see ``borrow_reader``).
STRIP_TILES = 16
STRIP_MAX_PIXELS = 2 << 20


class StripCache:
    """Per level of one reader: the last box read, the last strip, a row where a strip read failed."""

    def __init__(self) -> None:
        self.last_box: dict[int, tuple[int, int, int, int]] = {}
        self.strips: dict[int, tuple[int, int, np.ndarray]] = {}
        self.no_strip_row: dict[int, int] = {}

    def clear(self) -> None:
        self.last_box.clear()
        self.strips.clear()
        self.no_strip_row.clear()

    def read(self, reader: Any, backend: Any, level: int, x: int, y: int, w: int, h: int
             ) -> tuple[np.ndarray, bool]:
        """The level box (x, y, w, h) of ``reader``; returns (pixels, shared), ``shared`` when the
        pixels are a view into the cached strip (the caller copies before handing them out)."""
        strip = self.strips.get(level)
        prev = self.last_box.get(level)
        self.last_box[level] = (x, y, w, h)
        if strip is not None:
            sx, sy, arr = strip
            if sy == y and arr.shape[0] == h and sx <= x and x + w <= sx + arr.shape[1]:
                return arr[:, x - sx:x - sx + w], True
        # Worth it where neighbours share at least a quarter of the box (not for the few pixels
        # of Lanczos margin that tiles without overlap share).
        if prev is not None and prev[1] == y and prev[3] == h and 0 < x - prev[0] <= 0.75 * min(w, prev[2]) \
                and self.no_strip_row.get(level) != y and reader._strips_exact(level):
            step = x - prev[0]
            # A run that went past its strip's end gets one twice as long, up to STRIP_TILES steps:
            # rows that stop early (tissue edges) waste little, long rows read few strips.
            steps = min(2 * strip[2].shape[1] // step, STRIP_TILES) if strip is not None and strip[1] == y \
                else 4
            width = min(w + step * (steps - 1), max(w, STRIP_MAX_PIXELS // max(h, 1)))
            width = max(w, min(width, reader.level_dimensions[level][0] - x))  # not past the level's right edge
            try:
                arr = reader._read(backend, level, x, y, width, h)
            except DflError:
                # A bad tile further along the row must not fail this box: no more strips on this row,
                # and the box alone on a fresh handle (an OpenSlide handle stays in error after a failure).
                self.no_strip_row[level] = y
                backend = reader._reopen()
                return reader._read(backend, level, x, y, w, h), False
            self.strips[level] = (x, y, arr)
            return arr[:, :w], True
        return reader._read(backend, level, x, y, w, h), False
