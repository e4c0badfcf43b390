"""Does dfl's slide reader scale over cores with threads, or does it need processes?

Extraction reads slides in tf.data's threads (``tf.numpy_function`` -> ``read_views``), so the
GIL could cap the reader on a many-core GPU box. This times ``read_views`` (x20, and x20 + x5) with
k threads sharing the process-wide reader pool, and with k processes (one pool each), over the
same row-ordered tile centres, plus the raw ``openslide.read_region`` loop with k threads.

Needs only numpy, Pillow, tifffile and openslide (no TensorFlow: ``dfl_tf.data.slides`` does not
import it), so it runs on the lent GPU machines too. Run by hand; results in a JSON file.

Kinds: ``threads`` and ``processes`` give each worker its own run of rows; ``interleaved`` hands
consecutive tiles to k threads in turn, as tf.data's parallel map does during extraction. Thread
rows of dfl's reader also count, in one untimed pass, backend reads per level box and pixels read
per pixel asked for (:func:`read_counts`). (Before the strip cache remembered its last box per
row, ``threads`` rows with x5 views read almost every x5 box alone: the workers' rows reset each
other's strips.)

    python benchmarks/reader_scaling.py --slide slide.tiff --json out.json [--threads 1 2 4 8 16]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_model  # noqa: E402
from gpu_reference import read_tiles  # noqa: E402


def _grid(path: str, size: int) -> list[tuple[int, int]]:
    """Row-ordered tile centres, one tile apart, with x5 fields (4x) inside the slide."""
    import openslide

    width, height = openslide.OpenSlide(path).dimensions
    step, margin = size, 2 * size
    return [(x, y) for y in range(margin, height - margin, step) for x in range(margin, width - margin, step)]


def _dfl_chunk(args: tuple[str, list[tuple[int, int]], int, bool]) -> int:
    from dfl_tf.data.slides import read_views

    path, coords, size, context = args
    for cx, cy in coords:
        read_views(path, cx, cy, 0.5, size, context)
    return len(coords)


def _raw_chunk(args: tuple[str, list[tuple[int, int]], int, bool]) -> int:
    path, coords, size, _ = args
    return read_tiles((path, [(cx - size // 2, cy - size // 2) for cx, cy in coords], size))


def _reset() -> None:
    from dfl_tf.data.slides import close_pooled_readers, drop_strips

    close_pooled_readers()
    drop_strips()


def _jobs(kind: str, path: str, coords: list, size: int, context: bool, k: int) -> list[tuple]:
    """The worker calls of ``kind``: one per tile (``interleaved``), else one run of rows per worker."""
    if kind == "interleaved":
        return [(path, [c], size, context) for c in coords]
    per = len(coords) // k
    return [(path, coords[w * per:(w + 1) * per], size, context) for w in range(k)]


def read_counts(kind: str, path: str, coords: list, size: int, context: bool, k: int) -> dict[str, float]:
    """One untimed pass of dfl's reader in k threads (``threads`` or ``interleaved``): backend reads
    per level box asked for, and level pixels read per pixel asked for (strips make both < 1)."""
    from dfl_tf.data import slide_strips, slides

    asked, done = [0, 0], [0, 0]  # boxes / pixels
    plain_box, plain_read = slide_strips.StripCache.read, slides.SlideReader._read

    def box(self, reader, backend, level, x, y, w, h):
        asked[0], asked[1] = asked[0] + 1, asked[1] + w * h
        return plain_box(self, reader, backend, level, x, y, w, h)

    def read(self, backend, level, x, y, w, h):
        done[0], done[1] = done[0] + 1, done[1] + w * h
        return plain_read(self, backend, level, x, y, w, h)

    slide_strips.StripCache.read, slides.SlideReader._read = box, read
    try:
        _reset()
        with ThreadPoolExecutor(k) as pool:
            list(pool.map(_dfl_chunk, _jobs(kind, path, coords, size, context, k)))
    finally:
        slide_strips.StripCache.read, slides.SlideReader._read = plain_box, plain_read
    return {"backend_reads_per_box": done[0] / max(asked[0], 1), "pixels_read_per_pixel_asked": done[1] / max(asked[1], 1)}


def timed(kind: str, fn, path: str, coords: list, size: int, context: bool, k: int) -> float:
    """Tiles/s reading ``coords`` in k threads or k processes: ``threads`` and ``processes`` split
    them into k consecutive runs (one per worker), ``interleaved`` hands them out one at a time."""
    jobs = _jobs(kind, path, coords, size, context, k)
    if kind == "interleaved":  # tf.data's parallel map: k threads take consecutive tiles in turn
        _reset()
        with ThreadPoolExecutor(k) as pool:
            list(pool.map(fn, jobs[:4 * k]))  # open handles
            _reset()
            start = time.perf_counter()
            total = sum(pool.map(fn, jobs))
    elif kind == "threads":
        _reset()
        with ThreadPoolExecutor(k) as pool:
            list(pool.map(fn, [(path, job[1][:4], size, context) for job in jobs]))  # open handles
            _reset()
            start = time.perf_counter()
            total = sum(pool.map(fn, jobs))
    else:
        with mp.get_context("spawn").Pool(k) as pool:
            pool.map(fn, [(path, job[1][:4], size, context) for job in jobs])  # imports, handles
            start = time.perf_counter()
            total = sum(pool.map(fn, jobs))
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", required=True, help="pyramidal slide to read")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--threads", type=int, nargs="+", help="worker counts (default 1, 2, 4, ... cores)")
    parser.add_argument("--per-worker", type=int, default=300, help="tiles each worker reads")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (median)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = args.threads or sorted({k for k in (1, 2, 4, 8, 16, cores) if k <= cores})
    rows = []
    grid = _grid(args.slide, args.size)
    for k in counts:
        # distinct tiles across workers (no worker reads what another just decoded into the cache)
        coords = grid[:k * min(args.per_worker, len(grid) // k)]
        for label, fn, context in (("dfl x20", _dfl_chunk, False), ("dfl x20 + x5", _dfl_chunk, True),
                                   ("raw x20", _raw_chunk, False)):
            for kind in ("threads", "interleaved", "processes"):
                if (kind != "threads" and k == 1) or (kind == "interleaved" and fn is _raw_chunk):
                    continue  # the raw loop opens its slide per call: one tile per call would time opening
                rate = sorted(timed(kind, fn, args.slide, coords, args.size, context, k)
                              for _ in range(args.repeats))[args.repeats // 2]
                row = {"reader": label, "workers": k, "kind": kind, "tiles_per_s": rate, "tiles_per_s_per_worker": rate / k}
                counts_note = ""
                if fn is _dfl_chunk and kind != "processes":
                    row.update(read_counts(kind, args.slide, coords, args.size, context, k))
                    counts_note = (f", {row['backend_reads_per_box']:.2f} reads per box, "
                                   f"{row['pixels_read_per_pixel_asked']:.2f} px read per px")
                rows.append(row)
                print(f"{label:13s} {kind:11s} k={k:2d}: {rate:7.0f} tiles/s ({rate / k:.0f} per worker)"
                      + counts_note, flush=True)
    out = {"machine": {"cpu": cpu_model(), "cores": cores, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "slide": os.path.basename(args.slide), "size": args.size, "tiles": len(grid), "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
