"""Prediction with an exported model on image folders, CSV manifests or slide coordinates.

Samples are read in Python (any format Pillow reads, slides through OpenSlide) with the same
loaders as extraction, grouped into batches of equal shape and sent through the exported
``serve_pixels`` signature, so the served graph itself computes every prediction.
"""
from __future__ import annotations

import csv
import io
import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from dfl_tf._io import atomic_write_text
from dfl_tf.data.slides import parse_magnification
from dfl_tf.data.sources import Sample, SlideRead, load_sample, load_source
from dfl_tf.errors import DflError
from dfl_tf.export import ExportedModel, load_model


def _batches(samples: list[Sample], model: ExportedModel, slide_read: SlideRead, batch_size: int,
             workers: int) -> Iterator[list[tuple[int, Sample, Any]]]:
    """Yield lists of (position, sample, (image, context) or DflError), equal shapes per batch."""
    context = model.needs_context

    def load(item):
        position, sample = item
        try:
            return position, sample, load_sample(sample, context, slide_read)
        except DflError as exc:
            return position, sample, exc

    batch: list = []
    window = max(2 * batch_size, 4)  # samples read ahead: memory stays bounded on huge slides
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        pending: deque = deque()
        items = iter(enumerate(samples))
        for item in itertools.islice(items, window):
            pending.append(pool.submit(load, item))
        while pending:
            item = pending.popleft().result()
            nxt = next(items, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            loaded = item[2]
            if batch and not isinstance(loaded, DflError):
                first = next((b[2] for b in batch if not isinstance(b[2], DflError)), None)
                if first is not None and (first[0].shape != loaded[0].shape or
                                          (context and first[1].shape != loaded[1].shape)):
                    yield batch
                    batch = []
            batch.append(item)
            if len(batch) >= batch_size:
                yield batch
                batch = []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if batch:
        yield batch


def predict(
    model: str | Path | ExportedModel,
    input: str | Path,
    out: str | Path,
    batch_size: int = 32,
    skip_bad: bool = False,
    mpp: float | str | None = None,
    patch_size: int | None = None,
    slide_mpp: float | str | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every sample of ``input`` and write a CSV: id, source, (slide, x, y,) label, then per
    task the probability of each class and the predicted class. Returns a summary."""
    exported = model if isinstance(model, ExportedModel) else load_model(model)
    samples = load_source(input)
    read_info = exported.info.get("slide_read") or {}
    if exported.needs_context and samples.kind != "slides":
        missing = next((s for s in samples.samples if not s.context), None)
        if missing is not None:
            raise DflError(f"{exported.path} needs a context (x5) image per sample, but {missing.id} in {input} has "
                           "no context_path (use a CSV with a context_path column, or slide coordinates)")
    mpp = parse_magnification(mpp) if mpp else None
    slide_read = SlideRead(mpp=mpp or read_info.get("mpp", 0.5), patch_size=patch_size or read_info.get("patch_size", 256),
                           slide_mpp=slide_mpp)
    heads = exported.info.get("heads", [])
    if not heads:
        raise DflError(f"{exported.path}: no export.json with heads; export it with dfl export")
    header = ["id", "source"] + (["slide", "x", "y"] if samples.kind == "slides" else []) + ["label"]
    for head in heads:
        header += [f"{head['task']}_p_{c}" for c in head["classes"]] + [f"{head['task']}_class"]
    rows, skipped = [], []
    bar = tqdm(total=len(samples.samples), unit="patch", desc="predict", disable=not progress, dynamic_ncols=True)
    for batch in _batches(samples.samples, exported, slide_read, batch_size, workers):
        good = []
        for position, sample, loaded in batch:
            if isinstance(loaded, DflError):
                if not skip_bad:
                    raise DflError(f"sample {position} ({sample.id}): {loaded} (pass --skip-bad to skip it)")
                skipped.append({"position": position, "id": sample.id, "source": sample.source, "error": str(loaded)})
            else:
                good.append((position, sample, loaded))
        if good:
            images = np.stack([g[2][0] for g in good])
            context = np.stack([g[2][1] for g in good]) if exported.needs_context else None
            outputs = exported.predict_pixels(images, context)
            for k, (position, sample, _) in enumerate(good):
                label = samples.classes[sample.label] if sample.label >= 0 else ""
                row = [sample.id, sample.source] + ([sample.slide, sample.x, sample.y] if samples.kind == "slides"
                                                    else []) + [label]
                for head in heads:
                    probs = outputs[f"{head['task']}_probabilities"][k]
                    row += [f"{p:.6f}" for p in probs] + [outputs[f"{head['task']}_class_name"][k].decode()]
                rows.append(row)
        bar.update(len(batch))
    bar.close()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buffer.getvalue())
    skipped_path = out.with_name(out.stem + ".skipped.csv")
    skipped_path.unlink(missing_ok=True)  # no stale list from an earlier run
    if skipped:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["position", "id", "source", "error"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(skipped)
        atomic_write_text(skipped_path, buffer.getvalue())
    return {"out": str(out), "predicted": len(rows), "skipped": skipped,
            "skipped_file": str(skipped_path) if skipped else None, "tasks": [h["task"] for h in heads]}
