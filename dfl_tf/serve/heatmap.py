"""Slide heatmaps: tile a slide, predict every tile with an exported model, draw and export.

Writes into ``OUT``: ``tiles.csv`` (+ the tiling thumbnail), ``predictions.csv``,
``heatmap_<task>_<class>.png`` (probability over the slide thumbnail) and
``<task>.geojson`` (QuPath detections in level-0 pixels: for a two-class head the tiles whose
positive-class probability is at least ``threshold``, else the tiles whose top class is not the
first one and has at least that probability).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from dfl_tf.runtime.files import atomic_write_bytes, atomic_write_json
from dfl_tf.provenance import trained_read
from dfl_tf.data.slides import open_slide, parse_magnification
from dfl_tf.errors import DflError, whole_number
from dfl_tf.runtime.outputs import clear_out, prepare_out
from dfl_tf.data.tissue import tile
from dfl_tf.serve.export import load_model
from dfl_tf.serve.predict import predict

_COLOURS = [(220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152)]


def heatmap(
    model: str | Path,
    slide: str | Path,
    out: str | Path,
    mpp: float | str | None = None,
    size: int | None = None,
    min_tissue: float = 0.5,
    overlap: float = 0.0,
    slide_mpp: float | str | None = None,
    threshold: float = 0.5,
    batch_size: int = 32,
    thumbnail_side: int = 2048,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tile ``slide`` at the mpp and patch size the model's heads were trained at (the geometry
    recorded at extraction; ``mpp``/``size`` must be among those values), predict, draw heatmaps.
    An earlier heatmap folder at ``out`` is replaced only with ``overwrite`` (see
    :func:`dfl_tf.runtime.outputs.prepare_out`)."""
    batch_size = whole_number("--batch-size", batch_size)
    replace = prepare_out(out, "heatmap", (model, slide), overwrite) == "replace"
    exported = load_model(model)
    mpp, size = trained_read(exported.geometry, parse_magnification(mpp) if mpp else None, size,
                             f"model {exported.path}")
    if mpp is None or size is None:
        raise DflError(f"model {exported.path} was trained on images (no recorded mpp and patch size): pass "
                       f"--mpp and --size")
    out = Path(out)
    if replace:  # no heatmap of the earlier run stays beside the new ones
        clear_out(out, "heatmap")
    out.mkdir(parents=True, exist_ok=True)
    tiles = tile([str(slide)], out / "tiles.csv", mpp=mpp, size=size, min_tissue=min_tissue, overlap=overlap,
                 slide_mpp=slide_mpp, thumbnail_side=thumbnail_side, overwrite=True)  # out checked above
    summary: dict[str, Any] = {"slide": str(slide), "tiles": tiles["tiles"], "mpp": mpp, "size": size,
                               "trained_geometry": {k: exported.geometry.get(k) for k in ("mpp", "patch_size",
                                                    "input_size", "fit", "context")},
                               "outputs": [str(out / "tiles.csv")]}
    if tiles["tiles"] == 0:
        summary["note"] = "no tissue tiles found; nothing predicted"
        atomic_write_json(out / "heatmap.json", summary)
        return summary
    pred = predict(exported, out / "tiles.csv", out / "predictions.csv", overwrite=True, batch_size=batch_size,
                   slide_mpp=slide_mpp, mpp=mpp, patch_size=size, progress=progress)
    with open(pred["out"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open_slide(slide, mpp_override=slide_mpp) as reader:
        thumb, down = reader.thumbnail(thumbnail_side)
        field = size * mpp / reader.mpp  # tile side in level-0 px
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    summary["outputs"].append(pred["out"])
    for head in exported.info["heads"]:
        task, classes = head["task"], head["classes"]
        probs = np.array([[float(r[f"{task}_p_{c}"]) for c in classes] for r in rows])
        for k, cls in enumerate(classes):
            png = out / f"heatmap_{task}_{_safe(cls)}.png"
            atomic_write_bytes(png, _draw(thumb, xy / down, field / down, probs[:, k], f"{task}: P({cls})"))
            summary["outputs"].append(str(png))
        geo = out / f"{task}.geojson"
        atomic_write_json(geo, _geojson(xy, field, probs, classes, threshold, task, head.get("positive_class")))
        summary["outputs"].append(str(geo))
    atomic_write_json(out / "heatmap.json", summary)
    return summary


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _draw(thumb: np.ndarray, centres: np.ndarray, side: float, values: np.ndarray, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = thumb.shape[:2]
    grid = np.full((h, w), np.nan, np.float32)
    half = side / 2
    for (cx, cy), v in zip(centres, values):
        x0, x1 = int(max(0, round(cx - half))), int(min(w, round(cx + half)))
        y0, y1 = int(max(0, round(cy - half))), int(min(h, round(cy + half)))
        grid[y0:y1, x0:x1] = v
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.5), dpi=100)
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title)
    ax.axis("off")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _geojson(xy: np.ndarray, field: float, probs: np.ndarray, classes: list[str], threshold: float,
             task: str, positive_class: str | None = None) -> dict[str, Any]:
    """Detections: two-class heads: tiles whose positive-class probability is >= ``threshold``
    (``positive_class`` from export.json; default the second class); more classes: tiles whose
    top class is not the first one and has probability >= ``threshold``."""
    features = []
    half = field / 2
    positive = classes.index(positive_class) if len(classes) == 2 and positive_class in classes else None
    for (cx, cy), p in zip(xy, probs):
        if len(classes) == 2:
            k = positive if positive is not None else 1
            if p[k] < threshold:
                continue
        else:
            k = int(np.argmax(p))
            if k == 0 or p[k] < threshold:
                continue
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": classes[k], "color": list(_COLOURS[k % len(_COLOURS)])},
                "measurements": {f"{task} P({c})": float(v) for c, v in zip(classes, p)},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def load_geojson(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
