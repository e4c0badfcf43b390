"""Slide reader speed: dfl_tf's reader vs a raw OpenSlide ``read_region`` loop (one core).

Slides: a synthetic pyramidal TIFF (JPEG-compressed 256 px tiles in YCbCr 4:2:0 as scanners
write them, 0.5 um/px, levels downsampled 4x and 16x) and the real Aperio SVS
``cmu-1-small-region.svs`` (JPEG, 0.499 um/px, one level) when it is present. Coordinates: a
grid of tile centres over the slide, visited in row order (as ``tile()`` writes them).

* dfl x20: ``read_views(slide, cx, cy, mpp=0.5, size, context=False)`` per centre (pooled reader,
  bounds check, level choice, resize when the level's mpp differs from the target). OpenSlide
  paints into a numpy buffer that becomes RGB in numpy (no PIL image, no copies).
* dfl x20 + x5: ``read_views(..., context=True)`` (the x5 sibling: same centre, 4x the field).
  Neighbouring x5 boxes overlap by 3/4: the reader cuts them from one wider read per run of
  tiles along the row (a strip; bit-identical to box reads, tested), where the level's
  downsample is an integer (the synthetic slide, single-level slides; not OpenSlide levels with
  fractional downsamples such as most SVS pyramids).
* raw: one ``openslide.OpenSlide`` handle; per centre the public ``read_region`` of the same level
  box the reader reads, ``convert("RGB")``, ``np.asarray``, and the same Pillow Lanczos resize
  when the reader resizes (x20 + x5: both reads): what a per-tile OpenSlide loop costs.

Tiles/s are single-threaded (one core), median of round-robin runs; reader / raw is the median
of the per-round ratios (robust to load drifting between rounds), target >= 0.9. Cores one
accelerator needs = backbone img/s / tiles/s per core.
"""
from __future__ import annotations

import io
import math
import shutil
import tempfile
from pathlib import Path

from common import ROOT, Section, fmt, log, median, table, time_runs

TITLE = "Slide reader vs raw OpenSlide"
SVS_CANDIDATES = (ROOT / "tests" / "fixtures" / "cmu-1-small-region.svs",
                  ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs")


def write_jpeg_pyramid(path: Path, image, mpp: float, downsamples=(1, 4, 16), tile: int = 256,
                       quality: int = 80) -> Path:
    """A tiled pyramidal TIFF with JPEG (YCbCr 4:2:0) tiles encoded by Pillow, one page per level
    (SubFileType 1 for the reduced ones), X/YResolution in pixels per cm: what OpenSlide's
    generic-tiff driver reads. No imagecodecs needed: tiles are written pre-encoded."""
    import numpy as np
    import tifffile
    from PIL import Image

    def tiles(arr):
        h, w = arr.shape[:2]
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                block = np.full((tile, tile, 3), 255, np.uint8)
                part = arr[y:y + tile, x:x + tile]
                block[:part.shape[0], :part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(block).save(buf, "JPEG", quality=quality, subsampling=2)
                yield buf.getvalue()

    def pre_encoded(*args, **kwargs):  # tiles arrive encoded; tifffile only looks the codec up
        raise RuntimeError("JPEG tiles must be passed pre-encoded")

    codecs = getattr(tifffile.TIFF.COMPRESSORS, "_codecs", None)
    if isinstance(codecs, dict):  # without imagecodecs tifffile refuses compression="jpeg" otherwise
        codecs.setdefault(7, pre_encoded)
    base = Image.fromarray(image)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for k, ds in enumerate(downsamples):
            level = image if ds == 1 else np.asarray(
                base.resize((image.shape[1] // ds, image.shape[0] // ds), Image.Resampling.BOX))
            ppcm = 1e4 / (mpp * ds)
            tw.write(tiles(level), shape=level.shape, dtype=np.uint8, tile=(tile, tile), photometric="ycbcr",
                     compression="jpeg", subsampling=(2, 2), subfiletype=1 if k else 0,
                     resolution=(ppcm, ppcm), resolutionunit="CENTIMETER", metadata=None)
    return path


def centres(width: int, height: int, size0: float, n: int, margin: float) -> list[tuple[int, int]]:
    """Up to ``n`` tile centres on a grid (step ``size0`` level-0 px) at least ``margin`` px inside."""
    cols = max(1, int((width - 2 * margin) // size0))
    rows = max(1, int((height - 2 * margin) // size0))
    pts = [(int(margin + (c + 0.5) * size0), int(margin + (r + 0.5) * size0)) for r in range(rows)
           for c in range(cols)]
    return pts[:n]


def raw_reader(path: str, mpp: float, size: int, context: bool):
    """The raw OpenSlide loop over the same boxes and resizes as dfl's reader (see module doc)."""
    import numpy as np
    import openslide
    from PIL import Image

    from dfl_tf.data.slides import CONTEXT_FACTOR, open_slide

    slide = openslide.OpenSlide(path)
    with open_slide(path) as ref:  # the same level choice and geometry as the reader
        plans = []
        for m in ([mpp, mpp * CONTEXT_FACTOR] if context else [mpp]):
            level = ref.best_level(m)
            ds = ref.level_downsamples[level]
            side = size * m / ref.mpp / ds
            scale = side / size
            plans.append((level, ds, side, abs(scale - 1.0) < 1e-6,
                          int(math.ceil(3.0 * max(scale, 1.0))) + 1))

    def read(cx: float, cy: float):
        out = []
        for level, ds, side, exact, margin in plans:
            left, top = (cx - side * ds / 2) / ds, (cy - side * ds / 2) / ds
            if exact and left == int(left) and top == int(top):
                region = slide.read_region((int(left * ds), int(top * ds)), level, (size, size)).convert("RGB")
                out.append(np.asarray(region))
                continue
            bx0, by0 = int(math.floor(left)) - margin, int(math.floor(top)) - margin
            bx1, by1 = int(math.ceil(left + side)) + margin, int(math.ceil(top + side)) + margin
            region = slide.read_region((int(round(bx0 * ds)), int(round(by0 * ds))), level,
                                       (bx1 - bx0, by1 - by0)).convert("RGB")
            box = (left - bx0, top - by0, left - bx0 + side, top - by0 + side)
            out.append(np.asarray(region.resize((size, size), Image.Resampling.LANCZOS, box=box)))
        return out
    return read, slide


def bench_slide(path: str, label: str, size: int, n: int, repeats: int) -> list[dict]:
    from dfl_tf.data.slides import CONTEXT_FACTOR, close_pooled_readers, drop_strips, open_slide, read_views

    with open_slide(path) as ref:
        width, height = ref.dimensions
        size0 = size * 0.5 / ref.mpp
        level_x20, level_x5 = ref.best_level(0.5), ref.best_level(0.5 * CONTEXT_FACTOR)
    pts = centres(width, height, size0, n, margin=size0 * CONTEXT_FACTOR / 2)
    results = []
    for context in (False, True):
        raw, handle = raw_reader(path, 0.5, size, context)

        def ours():
            drop_strips()  # no strip left from the last pass: each pass reads its tiles anew
            for cx, cy in pts:
                read_views(path, cx, cy, 0.5, size, context)

        def theirs():
            for cx, cy in pts:
                raw(cx, cy)
        ours(), theirs()  # warm-up (page cache, pooled reader, OpenSlide tile cache alike)
        t_ours, t_raw = [], []
        for _ in range(repeats):
            t_ours += time_runs(ours, 1, 0)
            t_raw += time_runs(theirs, 1, 0)
        handle.close()
        close_pooled_readers()
        r_ours, r_raw = len(pts) / median(t_ours), len(pts) / median(t_raw)
        ratio = median([raw_t / ours_t for ours_t, raw_t in zip(t_ours, t_raw)])  # paired: same round
        mode = "x20 + x5" if context else "x20"
        levels = f"{level_x20}" + (f" + {level_x5}" if context else "")
        results.append({"slide": label, "mode": mode, "levels": levels, "tiles": len(pts), "size": size,
                        "dfl_tiles_per_s": r_ours, "raw_tiles_per_s": r_raw, "ratio": ratio})
        log(f"[reader] {label} {mode}: dfl {r_ours:.0f} tiles/s, raw {r_raw:.0f} tiles/s ({ratio:.0%})")
    return results


def run(cfg: dict) -> Section:
    import numpy as np  # noqa: F401

    from dfl_tf.data.synthetic import demo_slide_image

    size, n = cfg["size"], cfg["n"]
    # one round is seconds; at least 9 paired rounds keep the ratios (near 1, worst row reported) steady
    repeats = cfg["repeats"] if cfg["repeats"] <= 1 else max(cfg["repeats"], 9)
    tmp = Path(tempfile.mkdtemp(prefix="bench_reader_"))
    try:
        side = cfg["slide_side"]
        image, _ = demo_slide_image(width=side, height=side)
        synth = write_jpeg_pyramid(tmp / "synthetic.tiff", image, mpp=0.5)
        slides = [(str(synth), f"synthetic JPEG TIFF {side} px, levels 1/4/16")]
        svs = next((p for p in SVS_CANDIDATES if p.exists()), None)
        if svs is not None and cfg.get("svs", True):
            slides.append((str(svs), f"{svs.name} (Aperio JPEG)"))
        results = [r for path, label in slides for r in bench_slide(path, label, size, n, repeats)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [[r["slide"], r["mode"], r["levels"], r["tiles"], fmt(r["dfl_tiles_per_s"], 0),
             fmt(r["raw_tiles_per_s"], 0), f"{r['ratio']:.2f}"] for r in results]
    worst = min(r["ratio"] for r in results)
    x20 = results[0]["dfl_tiles_per_s"]
    both = results[1]["dfl_tiles_per_s"]
    body = (f"{__doc__.strip()}\n\n{size} px tiles at 0.5 um/px, median of {repeats} round-robin runs after a "
            f"warm-up.\n\n"
            + table(["slide", "views", "levels read", "tiles", "dfl tiles/s", "raw tiles/s", "dfl / raw"], rows)
            + f"\n\nHeadline (worst row): reader at **{worst:.2f}x** the raw OpenSlide loop. On the synthetic "
              f"slide one core reads {x20:.0f} x20 tiles/s ({both:.0f}/s with the x5 sibling), so a backbone "
              f"running at B img/s needs about B / {x20:.0f} reader cores (B / {both:.0f} with x5 views).")
    body += gpu_reference_paragraph()
    return Section(TITLE, body, headline(worst, x20, both), {"rows": results})


def headline(worst: float, x20: float, both: float) -> dict[str, float]:
    """The section's headline figures, unrounded: the README summary formats them as the body
    does, so they read the same (rounding 5,999.47 to 5,999.5 first made the summary say 6000
    beside the body's 5,999; a ratio of 0.9149 stored as 0.915 would read 0.92 beside 0.91)."""
    return {"reader_vs_openslide": worst, "reader_tiles_per_s_per_core_x20": x20,
            "reader_tiles_per_s_per_core_x20_x5": both}


def gpu_reference_paragraph(path: Path = ROOT / "benchmarks" / "gpu_reference.json") -> str:
    """The hand-run GPU-box measurement (``benchmarks/gpu_reference.py``), when its JSON is present."""
    import json

    if not path.exists():
        return ""
    ref = json.loads(path.read_text())
    m = ref["machine"]
    gpu = ", ".join(f"{r['model']} {r['precision']} {r['img_per_s']:,.0f} img/s" for r in ref["gpu"])
    procs = ", ".join(f"{r['processes']}: {r['tiles_per_s']:,.0f}" for r in ref["reader"])
    need = ", ".join(f"{k} {v:.0f}" for k, v in ref["cores_needed"].items())
    return (f"\n\n**On a GPU box** (hand-run `benchmarks/gpu_reference.py`, {m['date']}, {m['gpu']}, "
            f"{m['cores']} cores {m['cpu']}; not re-run by `make bench`): PyTorch {m.get('torch', '')} as the "
            f"backbone stand-in (no TensorFlow can be carried to that machine), batch 256, 224 px: {gpu}. Raw "
            f"OpenSlide 224 px level-0 tiles/s with k processes ({procs}) on {ref.get('slide', 'the synthetic 8192 px JPEG pyramid')}. "
            f"Raw reader cores (at one process's rate) one such GPU needs: {need}." + _scaling_sentence())


def _scaling_sentence(path: Path = ROOT / "benchmarks" / "reader_scaling_h200.json") -> str:
    """Threads vs processes for dfl's reader on the GPU box (hand-run ``benchmarks/reader_scaling.py``)."""
    import json

    if not path.exists():
        return ""
    ref = json.loads(path.read_text())
    top = max(r["workers"] for r in ref["rows"])
    rate = {(r["reader"], r["kind"]): r["tiles_per_s"] for r in ref["rows"] if r["workers"] == top}
    parts = [f"{name}: {rate[(name, 'threads')]:,.0f} with threads, {rate[(name, 'processes')]:,.0f} with "
             f"processes" for name in ("dfl x20", "dfl x20 + x5", "raw x20") if (name, "processes") in rate]
    return (f" dfl's reader on {top} workers of that box (`benchmarks/reader_scaling.py`, {ref['machine']['date']}, "
            f"tiles/s): " + "; ".join(parts) + ".")
