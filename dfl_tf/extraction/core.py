"""What the local and the Beam extraction share: the output directory, its shards and manifest,
and the runner that embeds one shard's samples.

Samples are cut into fixed shards of ``shard_size``; a shard is written under a temporary name
and renamed when complete, and a sidecar in ``.parts/`` records it. A rerun skips completed
shards, so a killed run resumes and ends with the same records as an uninterrupted one.
:mod:`dfl_tf.extraction.local` (local) and :mod:`dfl_tf.extraction.beam` both build on this module, which
imports neither of them.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from dfl_tf import __version__
from dfl_tf.runtime.files import atomic_write_json
from dfl_tf.backbones.registry import Backbone, load_backbone
from dfl_tf.data.pipeline import fixed_prefetch
from dfl_tf.data.plan import ReadPlan
from dfl_tf.data.sources import SampleSet, load_fields
from dfl_tf.data.views import check_x5_field, compose_plan, stain_fields
from dfl_tf.runtime.devices import distributed_infer
from dfl_tf.errors import DflError
from dfl_tf.options import ExtractOptions
from dfl_tf.store.integrity import shard_done
from dfl_tf.store.manifest import FORMAT_VERSION, MANIFEST, load_manifest
from dfl_tf.store.shards import DTYPES, count_by_class, make_example, write_shard

PARTS = ".parts"


def build_backbone(options: ExtractOptions) -> Backbone:
    """The frozen backbone ``options`` names (call inside the strategy scope when mirroring)."""
    return load_backbone(options.backbone, weights=options.weights, input_size=options.input_size,
                         precision=options.precision)


def part_path(out: Path, index: int) -> Path:
    """The ``.parts/`` sidecar that marks shard ``index`` as complete."""
    return out / PARTS / f"shard-{index:05d}.json"


def write_part(out: Path, index: int, name: str, records: list[bytes], labels: list[int],
               skipped: list[dict], passed: list[str] | None = None) -> None:
    """Write shard ``index`` (temporary name, then rename) and then its sidecar (``passed``: ids of
    the samples stain normalisation passed through)."""
    count, digest = write_shard(out / name, records)
    atomic_write_json(part_path(out, index), {"file": name, "records": count, "sha256": digest,
                                              "labels": labels, "skipped": skipped,
                                              "stain_passed": list(passed or [])})


@dataclass
class Run:
    """One extraction into ``out``: its settings, shard names and the shards still to write."""

    out: Path
    options: ExtractOptions
    samples: SampleSet
    plan: ReadPlan
    settings: dict[str, Any]
    record: dict[str, Any]
    names: list[str]
    pending: list[int]

    @property
    def num_samples(self) -> int:
        return len(self.samples.samples)

    def shard_range(self, index: int) -> range:
        size = self.options.shard_size
        return range(index * size, min(self.num_samples, (index + 1) * size))

    def write(self, index: int, records: list[bytes], labels: list[int], skipped: list[dict],
              passed: list[str] | None = None) -> None:
        write_part(self.out, index, self.names[index], records, labels, skipped, passed)

    def finish(self) -> dict[str, Any]:
        """Write ``manifest.json`` from the sidecars and return it."""
        missing = [self.names[i] for i in range(len(self.names)) if not part_path(self.out, i).exists()]
        if missing:
            raise DflError(f"{len(missing)} shard(s) of {self.out} were not written, e.g. {missing[0]}")
        manifest = _manifest(self.out, len(self.names), self.record, self.settings, self.samples)
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest


def open_run(out: str | Path, options: ExtractOptions, bb: Backbone, samples: SampleSet, split: str | None,
             overwrite: bool) -> Run:
    """Create, check (same backbone, views, settings, source) or clear ``out``; list pending shards."""
    out = Path(out)
    plan = read_plan(bb, options, samples)
    settings = _settings(bb, options, plan, samples, split)
    record = _prepare_out(out, settings, overwrite)
    n = len(samples.samples)
    n_shards = math.ceil(n / options.shard_size)
    names = [f"shard-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
    pending = [i for i in range(n_shards) if not shard_done(part_path(out, i), out / names[i])]  # sha256 checked
    return Run(out, options, samples, plan, settings, record, names, pending)


def read_plan(bb: Backbone, options: ExtractOptions, samples: SampleSet) -> ReadPlan:
    """The read plan of this extraction, bound to its source (built once per run; recorded in the
    manifest as ``geometry``, see :mod:`dfl_tf.data.plan`)."""
    return options.plan(bb.input_size, bb.precision).bind(samples)


def _settings(bb: Backbone, options: ExtractOptions, plan: ReadPlan, samples: SampleSet,
              split: str | None) -> dict[str, Any]:
    settings = {
        "backbone": bb.describe(),
        "views": [str(v) for v in plan.views],
        "dim": bb.dim * len(plan.views),
        "dtype": options.dtype,
        "fit": plan.fit,
        "pad_to": plan.pad_to,
        "shard_size": options.shard_size,
        "precision": plan.precision,
        "context": plan.context,
        "geometry": plan.to_record(),
        "source": {"path": samples.root, "kind": samples.kind, "split": split,
                   "num_samples": len(samples.samples), "fingerprint": samples.fingerprint()},
        "classes": samples.classes,
    }
    if samples.kind == "slides":
        settings["slide_read"] = plan.slide_read_record()
    return settings


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
    for key in ("dtype", "fit", "pad_to", "shard_size", "precision", "source", "slide_read", "classes", "geometry"):
        if key in ("source",):
            differs = old.get("source", {}).get("fingerprint") != new["source"]["fingerprint"]
        else:
            differs = old.get(key) != new.get(key)
        if differs:
            raise DflError(f"{out} holds an extraction with a different {key}; {hint}")


def _manifest(out: Path, n_shards: int, run: dict[str, Any], settings: dict[str, Any],
              samples: SampleSet) -> dict[str, Any]:
    parts = [json.loads(part_path(out, i).read_text()) for i in range(n_shards)]
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
        "geometry": settings["geometry"],
        "settings": {k: settings[k] for k in ("fit", "pad_to", "shard_size", "precision", "context", "slide_read")
                     if k in settings},
        "created": run["created"],
        "dfl_tf_version": __version__,
        **_stain_summary(settings["geometry"], parts),
    }


def _stain_summary(geometry: dict[str, Any], parts: list[dict]) -> dict[str, Any]:
    """The manifest's ``stain`` entry under --stain-norm: method and the samples passed through
    (counted here, not in the geometry, which must match between stores)."""
    norm = (geometry.get("stain") or {}).get("normalize")
    if not norm:
        return {}
    ids = [i for p in parts for i in p.get("stain_passed", [])]
    return {"stain": {"method": norm["method"], "passed_through": len(ids), "passed_through_ids": ids[:20]}}


class ShardRunner:
    """Builds the tf.data pipeline for a range of samples and runs the backbone on it."""

    def __init__(self, bb: Backbone, options: ExtractOptions, samples: SampleSet,
                 strategy: tf.distribute.Strategy | None = None, plan: ReadPlan | None = None):
        self.bb, self.options, self.samples = bb, options, samples.samples
        self.plan = plan or read_plan(bb, options, samples)
        self.views = self.plan.views
        self.workers = options.workers or tf.data.AUTOTUNE
        self.errors: dict[int, str] = {}
        if strategy is not None:  # batch split across replicas, rows kept in order (jit not applied)
            self.infer = distributed_infer(strategy, bb.model, bb.input_size)
        else:
            self.infer = bb.compiled(options.jit)

    def _load(self, index):
        index = int(index)
        keys = self.plan.loaded_fields
        try:
            fields = load_fields(self.samples[index], self.plan)
            # the centre-crop size rule, checked here (naming the file) rather than in the graph
            check_x5_field(fields[keys[0]].shape, self.plan, self.samples[index].source)
            return (True, *(fields[k] for k in keys))
        except Exception as exc:  # recorded, then raised or skipped by the consumer
            self.errors[index] = str(exc) if isinstance(exc, DflError) else f"{type(exc).__name__}: {exc}"
            return (False, *(np.zeros((1, 1, 3), np.uint8) for _ in keys))

    def _dataset(self, indices: range) -> tf.data.Dataset:
        plan, keys = self.plan, self.plan.loaded_fields

        def load_and_compose(index):
            ok, *pixels = tf.numpy_function(self._load, [index], [tf.bool] + [tf.uint8] * len(keys), stateful=False)
            for p in pixels:
                p.set_shape([None, None, 3])
            fields, passed = stain_fields(dict(zip(keys, pixels)), plan)  # the exported graph's op
            return index, ok, passed, compose_plan(fields, plan, stain=False)

        ds = tf.data.Dataset.range(indices.start, indices.stop)
        ds = ds.map(load_and_compose, num_parallel_calls=self.workers, deterministic=True)
        return fixed_prefetch(ds.batch(self.options.batch_size))

    def run(self, indices: range, bar: Any) -> tuple[list[bytes], list[int], list[dict], list[str]]:
        """Embed samples ``indices``; returns (serialized records, labels, skipped entries, ids of the
        samples stain normalisation passed through)."""
        np_dtype = DTYPES[self.options.dtype]
        n_views, size = len(self.views), self.bb.input_size
        records, labels, skipped, passed = [], [], [], []
        for index_b, ok_b, passed_b, views_b in self._dataset(indices):
            flat = tf.reshape(views_b, [-1, size, size, 3])
            emb = self.infer(flat).numpy().reshape(len(index_b), n_views * self.bb.dim)
            for index, ok, was_passed, vector in zip(index_b.numpy(), ok_b.numpy(), passed_b.numpy(), emb):
                sample = self.samples[int(index)]
                if not ok:
                    error = self.errors.pop(int(index), "unknown error")
                    if not self.options.skip_bad:
                        raise DflError(f"{error} (pass --skip-bad to skip unreadable samples)")
                    skipped.append({"id": sample.id, "source": sample.source, "error": error})
                    continue
                vector = vector.astype(np_dtype)
                if not np.isfinite(vector).all():  # NaN/inf from the backbone, or beyond float16's range
                    bad = int((~np.isfinite(vector)).sum())
                    raise DflError(f"sample {sample.id} ({sample.source}): non-finite embedding ({bad} of "
                                   f"{vector.size} values are NaN/inf in {self.options.dtype}); nothing written")
                records.append(make_example(vector, sample.label, sample.id, sample.source,
                                            sample.group, sample.slide, sample.x, sample.y))
                labels.append(sample.label)
                if was_passed:
                    passed.append(sample.id)
            bar.update(len(index_b))
        return records, labels, skipped, passed
