"""Evaluate a slide head on the bags of a store: slide-level metrics, one prediction per slide and
the attention of every record."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import keras

from dfl_tf.errors import DflError
from dfl_tf.heads.metrics import compute_metrics
from dfl_tf.heads.model import HEAD_FILE, HEAD_JSON
from dfl_tf.heads.probe import load_probe
from dfl_tf.heads.slide.bags import load_bags, read_slide_labels
from dfl_tf.heads.slide.model import MILPooling  # noqa: F401  (registers the layer for loading)
from dfl_tf.heads.slide.train import predict_bags
from dfl_tf.provenance import check_compatible
from dfl_tf.runtime.files import atomic_write_json, atomic_write_text
from dfl_tf.runtime.outputs import clear_out
from dfl_tf.store.manifest import load_manifest


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def evaluate_slide_head(head: str | Path, emb: str | Path, info: dict[str, Any], slide_labels: str | Path,
                        out: str | Path | None = None, replace: bool = False) -> dict[str, Any]:
    """Slide-level metrics of the slide head ``head`` (its ``head.json`` is ``info``) on the bags of
    ``emb`` labeled by ``slide_labels`` (plus the head's mean-pool linear probe under
    ``linear_probe``); with ``out``: ``metrics.json``, ``predictions.csv`` (one row per slide) and
    ``attention.csv`` (``slide,id,x,y,attention``, one row per record)."""
    check_compatible(info, load_manifest(emb), f"head {head}", f"embeddings {emb}")
    classes = list(info["classes"])
    labels = read_slide_labels(slide_labels)
    unknown = sorted(set(labels.classes) - set(classes))
    if unknown:
        raise DflError(f"{slide_labels}: labels {unknown} are not classes of head {head} (classes: {classes})")
    bags = load_bags(emb, labels, classes, "evaluation")
    model = keras.saving.load_model(Path(head) / HEAD_FILE, compile=False)
    probs, attention = predict_bags(model, bags)
    metrics = {"level": "slide", **compute_metrics(bags.y, probs, classes)}
    probe = load_probe(head)
    if probe is not None:
        metrics["linear_probe"] = {**compute_metrics(bags.y, probe.predict_proba(bags.mean_pooled()), classes),
                                   "C": (info.get("linear_probe") or {}).get("C")}
    metrics.update({"left_out": bags.left_out, "head": str(head), "embeddings": str(emb)})
    if out is not None:
        out = Path(out)
        if replace:
            clear_out(out, "report")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
        pred = probs.argmax(axis=1)
        atomic_write_text(out / "predictions.csv", _csv(
            ["slide", "label", "predicted", "instances"] + [f"p_{c}" for c in classes],
            [[bags.names[i], classes[bags.y[i]], classes[pred[i]], len(bags.rows[i])]
             + [f"{p:.6g}" for p in probs[i]] for i in range(len(bags))]))
        rows = []
        for i in range(len(bags)):
            for r, a in zip(bags.rows[i], attention[i]):
                rows.append([bags.names[i], bags.ids[r], int(bags.xy[r, 0]), int(bags.xy[r, 1]), f"{a:.6g}"])
        atomic_write_text(out / "attention.csv", _csv(["slide", "id", "x", "y", "attention"], rows))
    return metrics


def is_slide_head(head: str | Path) -> bool:
    """Whether ``head``'s head.json says ``kind: slide``."""
    import json

    path = Path(head) / HEAD_JSON
    return path.exists() and json.loads(path.read_text()).get("kind") == "slide"

