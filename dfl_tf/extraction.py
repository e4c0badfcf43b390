"""Embedding extraction: samples -> views -> frozen backbone -> TFRecord shards + manifest.

The pipeline streams (tf.data: parallel decode and view composition, batched backbone calls,
prefetch), so memory stays flat in the number of samples. Samples are cut into fixed shards
of ``shard_size``; a shard is written under a temporary name and renamed when complete, and
a sidecar in ``.parts/`` records it. A rerun skips completed shards, so a killed run resumes
and ends with the same records as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dfl_tf import __version__
from dfl_tf._io import atomic_write_json
from dfl_tf.backbones.registry import Backbone, load_backbone
from dfl_tf.data.slides import parse_magnification
from dfl_tf.data.sources import SampleSet, SlideRead, load_sample, load_source
from dfl_tf.data.views import View, check_fit, compose_views, needs_context, parse_views, views_to_strings
from dfl_tf.distribute import distributed_infer, resolve_strategy
from dfl_tf.distribute import scope as strategy_scope
from dfl_tf.errors import DflError
from dfl_tf.store.manifest import FORMAT_VERSION, MANIFEST, load_manifest
from dfl_tf.store.shards import DTYPES, count_by_class, make_example, write_shard

PARTS = ".parts"


def extract(
    source: str | Path,
    out: str | Path,
    backbone: str = "resnet50",
    weights: str | None = "default",
    views: str | Sequence[str] = "x20:rgb",
    input_size: int | None = None,
    fit: str = "scale",
    pad_to: int | None = None,
    batch_size: int = 32,
    precision: str = "float32",
    dtype: str = "float16",
    shard_size: int = 1024,
    skip_bad: bool = False,
    overwrite: bool = False,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    mpp: float | str = 0.5,
    patch_size: int = 256,
    slide_mpp: float | None = None,
    workers: int | None = None,
    jit: bool = False,
    progress: bool = True,
    model: Backbone | None = None,
    devices: str | Sequence[str] | None = None,
    runner: str = "local",
    beam_options: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Embed every sample of ``source`` into ``out`` and return the manifest.

    ``source`` is an image folder, an image CSV manifest or a slide coordinates CSV (see
    :mod:`dfl_tf.data.sources`). ``model`` passes an already built backbone (then
    ``backbone``, ``weights``, ``input_size`` and ``precision`` are ignored). ``devices``:
    mirror the backbone over several devices (see :mod:`dfl_tf.distribute`; default: the
    ``DFL_TF_DEVICES`` variable, else all GPUs when more than one is visible). ``runner="beam"``
    runs the same extraction as an Apache Beam pipeline with ``beam_options`` (``KEY=VALUE``;
    see :mod:`dfl_tf.beam_runner`): same shards, same manifest.
    """
    if runner == "beam":
        params = {k: v for k, v in locals().items() if k != "runner"}
        from dfl_tf.beam_runner import extract_beam

        return extract_beam(**params)
    if runner != "local":
        raise DflError(f"unknown runner '{runner}' (local or beam)")
    if beam_options:
        raise DflError("beam options given without runner='beam' (--runner beam)")
    view_list = check_options(views, fit, dtype, batch_size, shard_size)
    samples = load_source(source, split=split, classes=classes)
    mpp = parse_magnification(mpp)
    strategy = resolve_strategy(devices)
    with strategy_scope(strategy):
        bb = model or load_backbone(backbone, weights=weights, input_size=input_size, precision=precision)
    slide_read = SlideRead(mpp=float(mpp), patch_size=int(patch_size), slide_mpp=slide_mpp)

    out = Path(out)
    settings = _settings(bb, view_list, dtype, fit, pad_to, shard_size, samples, split, slide_read)
    run = _prepare_out(out, settings, overwrite)

    n = len(samples.samples)
    n_shards = math.ceil(n / shard_size)
    names = [f"shard-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
    done = [i for i in range(n_shards) if _part_path(out, i).exists() and (out / names[i]).exists()]
    runner = _ShardRunner(bb, view_list, samples, fit, pad_to, batch_size, slide_read, workers, jit, skip_bad,
                          strategy)
    bar = tqdm(total=n, unit="patch", desc="extract", disable=not progress, dynamic_ncols=True,
               initial=sum(min(shard_size, n - i * shard_size) for i in done))
    for i in range(n_shards):
        if i in done:
            continue
        start, stop = i * shard_size, min(n, (i + 1) * shard_size)
        records, labels, skipped = runner.run(range(start, stop), dtype, bar)
        count, digest = write_shard(out / names[i], records)
        atomic_write_json(_part_path(out, i), {"file": names[i], "records": count, "sha256": digest,
                                               "labels": labels, "skipped": skipped})
    bar.close()
    manifest = _manifest(out, n_shards, run, settings, samples)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def check_options(views: str | Sequence[str], fit: str, dtype: str, batch_size: int, shard_size: int
                  ) -> tuple[View, ...]:
    """Validate the extraction options that need no data; returns the parsed views."""
    view_list = parse_views(views)
    check_fit(fit)
    if dtype not in DTYPES:
        raise DflError(f"unknown dtype '{dtype}' (float16 or float32)")
    for name, value in (("batch size", batch_size), ("shard size", shard_size)):
        if value < 1:
            raise DflError(f"{name} must be at least 1 (got {value})")
    return view_list


def _settings(bb: Backbone, views: Sequence[View], dtype: str, fit: str, pad_to: int | None,
              shard_size: int, samples: SampleSet, split: str | None, slide_read: SlideRead) -> dict[str, Any]:
    settings = {
        "backbone": bb.describe(),
        "views": views_to_strings(views),
        "dim": bb.dim * len(views),
        "dtype": dtype,
        "fit": fit,
        "pad_to": pad_to,
        "shard_size": shard_size,
        "precision": bb.precision,
        "context": _context_mode(views, samples),
        "source": {"path": samples.root, "kind": samples.kind, "split": split,
                   "num_samples": len(samples.samples), "fingerprint": samples.fingerprint()},
        "classes": samples.classes,
    }
    if samples.kind == "slides":
        settings["slide_read"] = {"mpp": slide_read.mpp, "patch_size": slide_read.patch_size,
                                  "slide_mpp": slide_read.slide_mpp}
    return settings


def _context_mode(views: Sequence[View], samples: SampleSet) -> str:
    """How the x5 field was obtained: ``none`` (no x5 view), ``separate`` (a context image or a
    slide read per sample) or ``centre-crop`` (the image is the x5 field, x20 its centre)."""
    if not needs_context(views):
        return "none"
    if samples.kind == "slides":
        return "separate"
    with_context = sum(1 for s in samples.samples if s.context)
    if 0 < with_context < len(samples.samples):
        first = next(s for s in samples.samples if not s.context)
        raise DflError(f"{samples.root}: {with_context} of {len(samples.samples)} rows have a context_path, "
                       f"{first.id} has none: give every row a context image or none (x5 from the centre crop)")
    return "separate" if with_context else "centre-crop"


def _part_path(out: Path, index: int) -> Path:
    return out / PARTS / f"shard-{index:05d}.json"


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Create, check or clear the output directory; returns the run record."""
    run_file = out / PARTS / "run.json"
    if overwrite and out.exists():
        for path in out.glob("shard-*.tfrecord"):
            path.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS, ignore_errors=True)
    existing = None
    if run_file.exists():
        existing = json.loads(run_file.read_text())["settings"]
    elif (out / MANIFEST).exists():  # e.g. a copied directory without .parts/
        manifest = load_manifest(out)
        existing = {**manifest, **manifest.get("settings", {})}
    if existing is not None:
        _check_same(out, existing, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    for stale in list(out.glob(".shard-*.tmp-*")) + list((out / PARTS).glob(".*.tmp-*")):
        stale.unlink()
    if run_file.exists():
        return json.loads(run_file.read_text())
    run = {"settings": settings, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(run_file, run)
    return run


def _check_same(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    hint = "choose another --out or pass --overwrite"
    if (old["backbone"]["fingerprint"] != new["backbone"]["fingerprint"] or list(old["views"]) != new["views"]
            or old["backbone"].get("input_size") != new["backbone"].get("input_size")):
        raise DflError(
            f"{out} already holds embeddings of backbone {old['backbone']['name']} "
            f"({old['backbone']['fingerprint'][:12]}, {old['backbone'].get('input_size')} px) with views "
            f"{','.join(old['views'])}, not {new['backbone']['name']} ({new['backbone']['fingerprint'][:12]}, "
            f"{new['backbone'].get('input_size')} px) with views {','.join(new['views'])}; {hint}")
    for key in ("dtype", "fit", "pad_to", "shard_size", "precision", "source", "slide_read", "classes"):
        if key in ("source",):
            differs = old.get("source", {}).get("fingerprint") != new["source"]["fingerprint"]
        else:
            differs = old.get(key) != new.get(key)
        if differs:
            raise DflError(f"{out} holds an extraction with a different {key}; {hint}")


def _manifest(out: Path, n_shards: int, run: dict[str, Any], settings: dict[str, Any],
              samples: SampleSet) -> dict[str, Any]:
    parts = [json.loads(_part_path(out, i).read_text()) for i in range(n_shards)]
    labels = [label for part in parts for label in part["labels"]]
    return {
        "format_version": FORMAT_VERSION,
        "backbone": settings["backbone"],
        "views": settings["views"],
        "dim": settings["dim"],
        "dtype": settings["dtype"],
        "classes": samples.classes,
        "counts": count_by_class(labels, samples.classes),
        "num_records": sum(p["records"] for p in parts),
        "shards": [{"file": p["file"], "records": p["records"], "sha256": p["sha256"]} for p in parts],
        "skipped": [s for p in parts for s in p["skipped"]],
        "source": settings["source"],
        "settings": {k: settings[k] for k in ("fit", "pad_to", "shard_size", "precision", "context", "slide_read")
                     if k in settings},
        "created": run["created"],
        "dfl_tf_version": __version__,
    }


class _ShardRunner:
    """Builds the tf.data pipeline for a range of samples and runs the backbone on it."""

    def __init__(self, bb: Backbone, views: Sequence[View], samples: SampleSet, fit: str,
                 pad_to: int | None, batch_size: int, slide_read: SlideRead, workers: int | None,
                 jit: bool, skip_bad: bool, strategy: tf.distribute.Strategy | None = None):
        self.bb, self.views, self.samples = bb, tuple(views), samples.samples
        self.fit, self.pad_to, self.batch_size = fit, pad_to, batch_size
        self.slide_read, self.skip_bad = slide_read, skip_bad
        self.workers = workers or tf.data.AUTOTUNE
        self.context = needs_context(views)
        self.errors: dict[int, str] = {}
        if strategy is not None:  # batch split across replicas, rows kept in order (jit not applied)
            self.infer = distributed_infer(strategy, bb.model, bb.input_size)
        else:
            self.infer = bb.compiled(jit)

    def _load(self, index):
        index = int(index)
        try:
            image, ctx = load_sample(self.samples[index], self.context, self.slide_read)
            if ctx is None:
                return True, image, np.zeros((1, 1, 3), np.uint8), False
            return True, image, ctx, True
        except Exception as exc:  # recorded, then raised or skipped by the consumer
            self.errors[index] = str(exc) if isinstance(exc, DflError) else f"{type(exc).__name__}: {exc}"
            dummy = np.zeros((1, 1, 3), np.uint8)
            return False, dummy, dummy, False

    def _dataset(self, indices: range) -> tf.data.Dataset:
        size, views, fit, pad_to = self.bb.input_size, self.views, self.fit, self.pad_to

        def load_and_compose(index):
            ok, image, ctx, has_ctx = tf.numpy_function(self._load, [index], [tf.bool, tf.uint8, tf.uint8, tf.bool],
                                                        stateful=False)
            image.set_shape([None, None, 3])
            ctx.set_shape([None, None, 3])
            stacked = tf.cond(has_ctx, lambda: compose_views(image, ctx, views, size, fit, pad_to),
                              lambda: compose_views(image, None, views, size, fit, pad_to))
            return index, ok, stacked

        ds = tf.data.Dataset.range(indices.start, indices.stop)
        ds = ds.map(load_and_compose, num_parallel_calls=self.workers, deterministic=True)
        return ds.batch(self.batch_size).prefetch(2)

    def run(self, indices: range, dtype: str, bar: tqdm) -> tuple[list[bytes], list[int], list[dict]]:
        np_dtype = DTYPES[dtype]
        n_views, size = len(self.views), self.bb.input_size
        records, labels, skipped = [], [], []
        for index_b, ok_b, views_b in self._dataset(indices):
            flat = tf.reshape(views_b, [-1, size, size, 3])
            emb = self.infer(flat).numpy().reshape(len(index_b), n_views * self.bb.dim)
            for index, ok, vector in zip(index_b.numpy(), ok_b.numpy(), emb):
                sample = self.samples[int(index)]
                if not ok:
                    error = self.errors.pop(int(index), "unknown error")
                    if not self.skip_bad:
                        raise DflError(f"{error} (pass --skip-bad to skip unreadable samples)")
                    skipped.append({"id": sample.id, "source": sample.source, "error": error})
                    continue
                records.append(make_example(vector.astype(np_dtype), sample.label, sample.id, sample.source,
                                            sample.group, sample.slide, sample.x, sample.y))
                labels.append(sample.label)
            bar.update(len(index_b))
        return records, labels, skipped
