"""Strips: neighbouring tiles visited along a row (``dfl tile``'s order) read overlapping level boxes
where their fields overlap (the x5 field is 4x the x20 one, so the x5 boxes of neighbours overlap by
3/4; tiles cut with ``--overlap`` overlap too). When a box overlaps the previous box read at its level
on the same rows, :class:`StripCache` reads one wider box (a strip, 4 to STRIP_TILES more steps long)
and cuts the following boxes from it: fewer pixels decoded and painted, the same pixels, so only where
the reader says a cut box equals a box read (``SlideReader._strips_exact``). Boxes that do not overlap
(x20 tiles without overlap, shuffled orders) are read one by one. The last box is remembered per row,
so threads reading different rows at once (short tissue rows, a tile list split among workers) each
keep their strips.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import DflError

#: A strip covers the box asked for plus up to STRIP_TILES - 1 more steps along the row, at most
#: STRIP_MAX_PIXELS level pixels (2 Mpx: 6 MB of RGB), kept for the STRIP_SLIDES slides read last
#: (see ``borrow_reader``).
STRIP_TILES = 16
STRIP_MAX_PIXELS = 2 << 20
#: Strips kept per row of a level (threads may be cutting from two or three at a time), and at most
#: STRIP_BYTES_PER_LEVEL bytes of strips per level, oldest dropped first: threads on different rows
#: (up to about 16 of typical x5 strips) keep theirs.
STRIPS_PER_ROW = 3
STRIP_BYTES_PER_LEVEL = 32 << 20
#: Rows whose last box is remembered (per slide, all levels together).
ROWS_TRACKED = 256


class StripCache:
    """Per level: the last box read on each row (per box height), the last strips, strips being read,
    a row where a strip read failed.

    One per slide for the pooled readers (``borrow_reader``), shared by the threads reading that
    slide: with tf.data's threads reading consecutive tiles on several handles, one thread's strip
    serves the boxes of the others (a thread whose box lies in a strip being read waits for it).
    Strips are read-only once stored, so views of them are safe to hand to any thread; the lock
    guards the bookkeeping only (reads run outside it).
    """

    def __init__(self) -> None:
        self.last_box: OrderedDict[tuple[int, int, int], tuple[int, int, int, int]] = OrderedDict()
        self.strips: dict[int, list[tuple[int, int, np.ndarray]]] = {}
        self.pending: dict[int, list[tuple[int, int, int, int, threading.Event]]] = {}
        self.no_strip_row: dict[int, int] = {}
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            self.last_box.clear()
            self.strips.clear()
            self.no_strip_row.clear()

    def read(self, reader: Any, backend: Any, level: int, x: int, y: int, w: int, h: int
             ) -> tuple[np.ndarray, bool]:
        """The level box (x, y, w, h) of ``reader``; returns (pixels, shared), ``shared`` when the
        pixels are a view into a cached strip (the caller copies before handing them out)."""
        while True:
            with self.lock:
                for sx, sy, arr in reversed(self.strips.get(level, [])):
                    if sy == y and arr.shape[0] == h and sx <= x and x + w <= sx + arr.shape[1]:
                        return arr[:, x - sx:x - sx + w], True
                waiting = next((p for p in self.pending.get(level, [])
                                if p[1] == y and p[3] == h and p[0] <= x and x + w <= p[0] + p[2]), None)
                if waiting is None:
                    entry = self._plan(reader, level, x, y, w, h)
                    break
            waiting[4].wait()  # another thread is reading the strip that holds this box
        if entry is None:
            return reader._read(backend, level, x, y, w, h), False
        width = entry[2]
        try:
            arr = reader._read(backend, level, x, y, width, h)
        except DflError:
            # A bad tile further along the row must not fail this box: no more strips on this row,
            # and the box alone on a fresh handle (an OpenSlide handle stays in error after a failure).
            with self.lock:
                self.no_strip_row[level] = y
            backend = reader._reopen()
            return reader._read(backend, level, x, y, w, h), False
        else:
            arr.flags.writeable = False  # shared from now on
            with self.lock:
                self._keep(level, x, y, arr)
            return arr[:, :w], True
        finally:
            with self.lock:
                self.pending[level].remove(entry)
            entry[4].set()

    def _keep(self, level: int, x: int, y: int, arr: np.ndarray) -> None:
        """Under the lock: store a strip, dropping its row's oldest beyond STRIPS_PER_ROW, then the
        level's oldest beyond STRIP_BYTES_PER_LEVEL (never the new one)."""
        kept = self.strips.setdefault(level, [])
        kept.append((x, y, arr))
        same_row = [i for i, (_, sy, _) in enumerate(kept) if sy == y]
        for i in reversed(same_row[:-STRIPS_PER_ROW]):
            del kept[i]
        while len(kept) > 1 and sum(a.nbytes for _, _, a in kept) > STRIP_BYTES_PER_LEVEL:
            del kept[0]

    def _plan(self, reader: Any, level: int, x: int, y: int, w: int, h: int
              ) -> tuple[int, int, int, int, threading.Event] | None:
        """Under the lock: the strip to read for this box (registered as pending), or None."""
        # Keyed by row: threads on different rows do not reset each other's runs. By height too: on a
        # single-level slide the x20 and x5 boxes of a tile alternate on level 0.
        key = (level, h, y)
        prev = self.last_box.pop(key, None)
        self.last_box[key] = (x, y, w, h)
        if len(self.last_box) > ROWS_TRACKED:
            self.last_box.popitem(last=False)
        # Worth it where neighbours share at least a quarter of the box (not for the few pixels
        # of Lanczos margin that tiles without overlap share).
        if prev is None or not 0 < x - prev[0] <= 0.75 * min(w, prev[2]) \
                or self.no_strip_row.get(level) == y or not reader._strips_exact(level):
            return None
        step = x - prev[0]
        # A run that went past its strip's end gets one twice as long, up to STRIP_TILES steps:
        # rows that stop early (tissue edges) waste little, long rows read few strips.
        row = [arr for _, sy, arr in self.strips.get(level, []) if sy == y]
        steps = min(2 * row[-1].shape[1] // step, STRIP_TILES) if row else 4
        # + 1 px per step and 2: box origins and widths vary by a pixel where the step in level pixels
        # is fractional (224.4 on a 0.499 um/px slide), and a box that overhangs by one must still fit.
        width = min(w + (step + 1) * (steps - 1) + 2, max(w, STRIP_MAX_PIXELS // max(h, 1)))
        width = max(w, min(width, reader.level_dimensions[level][0] - x))  # not past the level's right edge
        entry = (x, y, width, h, threading.Event())
        self.pending.setdefault(level, []).append(entry)
        return entry
