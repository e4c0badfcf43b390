"""Prediction with an exported model on image folders, CSV manifests or slide coordinates.

Samples are read in Python with the loaders and the decoder extraction used
(:mod:`dfl_tf.data.decode`; slides through OpenSlide at the mpp and patch size recorded at
extraction, which :func:`check_source` enforces), grouped into batches of equal shape and sent
through the exported ``serve_pixels`` signature, so the served graph itself computes every
prediction.
"""
from __future__ import annotations

import csv
import io
import itertools
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from dfl_tf.runtime.files import atomic_write_text
from dfl_tf.data.image_header import pixel_budget
from dfl_tf.data.slides import parse_magnification
from dfl_tf.provenance import trained_read
from dfl_tf.data.plan import ReadPlan
from dfl_tf.data.sources import Sample, SampleSet, load_fields, load_source
from dfl_tf.data.views import check_x5_field
from dfl_tf.errors import DflError, whole_number
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.serve.export import ExportedModel, load_model


def _batches(samples: list[Sample], plan: ReadPlan, batch_size: int, workers: int
             ) -> Iterator[list[tuple[int, Sample, Any]]]:
    """Yield lists of (position, sample, fields or DflError), equal shapes per batch; fields: the
    pixels of the plan's serving fields (images, then context), read as at extraction."""
    keys = plan.serving_fields

    def load(item):
        position, sample = item
        try:
            fields = load_fields(sample, plan, keys)
            check_x5_field(fields[keys[0]].shape, plan, sample.source)  # the centre-crop size rule
            return position, sample, tuple(fields[k] for k in keys)
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
                if first is not None and any(f.shape != g.shape for f, g in zip(first, loaded)):
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


def check_source(exported: ExportedModel, samples: SampleSet, input: str | Path, mpp: float | None,
                 patch_size: int | None, slide_mpp: float | str | None) -> ReadPlan:
    """Model vs source: refuse a source the heads were not trained for (x5 rule, mpp, patch size);
    returns the model's read plan with how to read slides (defaults: the geometry recorded at extraction)."""
    geo, what = exported.geometry, f"model {exported.path}"
    if exported.needs_context and samples.kind != "slides":
        missing = next((s for s in samples.samples if not s.context), None)
        if missing is not None:
            raise DflError(f"{exported.path} needs a context (x5) image per sample, but {missing.id} in {input} has "
                           "no context_path (use a CSV with a context_path column, or slide coordinates)")
    if geo.get("x5_source") == "image" and samples.kind == "slides":
        raise DflError(f"{what} takes its x5 view from the image itself (trained on images without context), "
                       f"but {input} is a slide source: its x5 view would not match; predict on image patches")
    if geo.get("x5_source") == "image" and any(s.context for s in samples.samples):
        raise DflError(f"{what} takes its x5 view from the image itself, but {input} has a context_path column "
                       f"(the context images would be ignored); drop the column or use a model trained with it")
    if samples.kind != "slides":
        return exported.plan
    mpp, patch_size = trained_read(geo, mpp, patch_size, what)
    if geo.get("source_kind") not in (None, "slides") and (mpp is None or patch_size is None):
        missing = next((s for s in samples.samples if (s.mpp is None and mpp is None)
                        or (s.patch_size is None and patch_size is None)), None)
        if missing is not None:
            raise DflError(f"{what} was trained on images (no recorded mpp and patch size); pass --mpp and "
                           f"--patch-size for {input}")
    plan = exported.plan.replace(mpp=mpp or 0.5, patch_size=int(patch_size or 256),
                                 slide_mpp=None if slide_mpp is None else parse_magnification(slide_mpp))
    for sample in samples.samples:  # per-row mpp/size columns must be ones the model was trained at
        if sample.mpp is not None or sample.patch_size is not None:
            trained_read(geo, sample.mpp or plan.mpp, sample.patch_size or plan.patch_size,
                         f"{what} (row {sample.id} of {input})")
    return plan


def _within(budget: int | None, batches: Iterator) -> Iterator:
    """``batches``, decoded under the pixel budget ``budget`` (see :mod:`dfl_tf.data.image_header`)."""
    with pixel_budget(budget):
        yield from batches


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict every sample of ``input`` and write a CSV: id, source, (slide, x, y,) label, then per
    task the probability of each class and the predicted class. An existing predictions CSV at
    ``out`` is replaced only with ``overwrite`` (see :func:`dfl_tf.runtime.outputs.prepare_out`). Returns a
    summary.

    ``batch_size`` above the export's ``--max-batch`` (which its signatures refuse) is lowered to
    it, with a note on stderr."""
    batch_size, workers = whole_number("--batch-size", batch_size), whole_number("workers", workers)
    prepare_out(out, "predictions", (None if isinstance(model, ExportedModel) else model, input), overwrite)
    exported = model if isinstance(model, ExportedModel) else load_model(model)
    bound = exported.info.get("max_batch")
    if bound is not None and batch_size > int(bound):
        print(f"note: --batch-size {batch_size} is over the model's --max-batch {bound} (its signatures refuse "
              f"larger batches); using {bound}", file=sys.stderr)
        batch_size = int(bound)
    samples = load_source(input)
    plan = check_source(exported, samples, input, parse_magnification(mpp) if mpp else None, patch_size,
                        slide_mpp)
    heads = exported.info.get("heads", [])
    if not heads:
        raise DflError(f"{exported.path}: no export.json with heads; export it with dfl export")
    header = ["id", "source"] + (["slide", "x", "y"] if samples.kind == "slides" else []) + ["label"]
    for head in heads:
        header += [f"{head['task']}_p_{c}" for c in head["classes"]] + [f"{head['task']}_class"]
    rows, skipped = [], []
    bar = tqdm(total=len(samples.samples), unit="patch", desc="predict", disable=not progress, dynamic_ncols=True)
    budget = exported.info.get("max_image_pixels")  # the export's pixel bound, in Python too
    for batch in _within(budget, _batches(samples.samples, plan, batch_size, workers)):
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
