"""Export: view composition + frozen backbone + N heads as one SavedModel for TF Serving.

Layout: ``saved_models/NAME/VERSION/`` (the version increments by itself) with signatures

* ``serving_default``: ``image_bytes`` (string [N], encoded JPEG/PNG/GIF/BMP/WebP) and, when
  the views include x5 from a separate context image, ``context_bytes``; decoded by
  :func:`dfl_tf.data.decode.decode_tensor`, the decoder extraction used (JPEG with the accurate
  integer IDCT); returns per task ``<task>_probabilities``, ``<task>_class_id``,
  ``<task>_class_name``.
* ``serve_pixels``: ``images`` uint8 [N, H, W, 3] (and ``context`` uint8 [N, h, w, 3]); same outputs.
* ``embed``: like ``serving_default`` but returns the concatenated ``embedding`` [N, dim];
  ``embed_pixels`` the same from uint8 pixels.

Decoding, fit, gray views, backbone preprocessing and standardisation all run in the graph.
A parity check runs before the version directory appears; ``export.json`` records it.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from dfl_tf import __version__
from dfl_tf.runtime.files import atomic_write_json
from dfl_tf.runtime.locks import locks_output
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.backbones.registry import Backbone, load_backbone
from dfl_tf.data.decode import DECODER, TF_MAGIC, decode_tensor
from dfl_tf.data.image_header import (DEFAULT_MAX_BATCH, DEFAULT_MAX_PIXELS, assert_complete,
                                      assert_pixels_within_budget, assert_within_budget)
from dfl_tf.data.plan import ReadPlan
from dfl_tf.data.views import compose_plan
from dfl_tf.errors import DflError
from dfl_tf.provenance import check_compatible, geometry_of

EXPORT_JSON = "export.json"


@dataclass
class Task:
    name: str
    head_dir: str
    model: keras.Model
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def threshold(self) -> float | None:
        return self.info.get("threshold") if len(self.classes) == 2 else None

    @property
    def positive(self) -> int:
        """Index of the positive class of a two-class head (head.json ``positive_class``; else 1)."""
        from dfl_tf.heads.evaluate import positive_index

        return positive_index(self.info)


def _task_name(head_dir: str | Path, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(head_dir).resolve().name).strip("_") or "task"
    if name[0].isdigit():
        name = f"t_{name}"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def load_tasks(heads: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Task]:
    """Load heads and check they share backbone fingerprint, views and dim."""
    from dfl_tf.heads.model import load_head

    if not heads:
        raise DflError("no head directories given")
    if names is not None and len(names) != len(heads):
        raise DflError(f"{len(names)} task names for {len(heads)} heads")
    if names is not None and len(set(names)) != len(names):
        raise DflError(f"task names must be unique (got {list(names)})")
    tasks: list[Task] = []
    for i, head_dir in enumerate(heads):
        head_json = Path(head_dir) / "head.json"
        if head_json.exists() and json.loads(head_json.read_text()).get("kind") == "slide":
            raise DflError(f"{head_dir}: a slide head (dfl train --slide-labels) cannot be exported yet; "
                           f"evaluate it with dfl evaluate --slide-labels")
        model, info = load_head(head_dir)
        name = names[i] if names else _task_name(head_dir, {t.name for t in tasks})
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DflError(f"task name '{name}' must be letters, digits and underscores")
        if tasks:  # one shared check: backbone, views, dim, input size and the whole read geometry
            check_compatible(tasks[0].info, info, f"head {tasks[0].head_dir}", f"head {head_dir}")
        tasks.append(Task(name, str(head_dir), model, info))
    return tasks


def rebuild_backbone(info: dict[str, Any], weights: str | None = None) -> Backbone:
    """Rebuild the backbone a head was trained on, and check its fingerprint."""
    spec = info["backbone"]
    if spec.get("parts"):  # a store joined by dfl fuse: one SavedModel over every backbone is issue 33, item 4
        raise DflError(f"the heads were trained on a fused store ({spec['name']}): export of fused stores: "
                       "not yet supported")
    settings = info.get("extraction", {}).get("settings", {})
    name, label = spec["name"], weights or spec["weights"]
    if name.startswith("savedmodel:"):
        path = (weights or spec["weights"]).removeprefix("savedmodel:")
        bb = load_backbone(path, input_size=spec["input_size"])
    else:
        bb = load_backbone(name, weights=label, input_size=spec["input_size"],
                           precision=settings.get("precision") or "float32")
    if bb.fingerprint != spec["fingerprint"]:
        raise DflError(f"backbone {name} with weights {label} has fingerprint {bb.fingerprint[:12]}, but the heads "
                       f"were trained on {spec['fingerprint'][:12]} (pass the right --backbone-weights)")
    return bb


class ServingGraph:
    """The in-graph pipeline shared by all signatures."""

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.max_image_pixels, self.max_batch = int(max_image_pixels), int(max_batch)  # input bounds
        info = tasks[0].info
        self.backbone, self.tasks = backbone, list(tasks)
        self.size = backbone.input_size
        self.geometry = geometry_of(info)
        # the read plan the heads' extraction recorded: fit, pads, centre-crop rule as extracted
        self.plan = ReadPlan.from_artefact(info).replace(input_size=self.size)
        self.views = self.plan.views
        self.fit, self.pad_to = self.plan.fit, self.plan.pad_to
        self.separate_context = self.plan.context == "separate"
        self.fields = self.plan.serving_fields  # what images (and context) carry
        unserved = [str(v) for v in self.views if v.factor not in self.fields]
        if self.separate_context and unserved:
            raise DflError(f"heads {tasks[0].head_dir} use views {','.join(unserved)}, but the serving signatures "
                           f"carry two fields (image_bytes: x20, context_bytes: x5): models with a third zoom "
                           f"cannot be exported yet (embed them from slides with dfl extract)")

    def compose(self, images: tf.Tensor, context: tf.Tensor | None) -> tf.Tensor:
        """The views of decoded pixels, fitted exactly as at extraction."""
        fields = dict(zip(self.fields, (images, context) if context is not None else (images,)))
        return compose_plan(fields, self.plan, self.plan.min_side())

    # -- pieces -------------------------------------------------------------------------
    def embed_views(self, stacked: tf.Tensor) -> tf.Tensor:
        n_views = len(self.views)
        flat = tf.reshape(stacked, [-1, self.size, self.size, 3])
        emb = tf.cast(self.backbone.model(flat, training=False), tf.float32)
        return tf.reshape(emb, [-1, n_views * self.backbone.dim])

    def views_from_pixels(self, images: tf.Tensor, context: tf.Tensor | None) -> tf.Tensor:
        checks = _assert_batch(tf.shape(images)[0], "images", None if context is None else tf.shape(context)[0],
                               "context")
        checks += assert_pixels_within_budget(images, "images", self.max_image_pixels, self.max_batch)
        if context is not None:
            checks += assert_pixels_within_budget(context, "context", self.max_image_pixels)
        with tf.control_dependencies(checks):
            return self.compose(images, context)

    def views_from_bytes(self, image_bytes: tf.Tensor, context_bytes: tf.Tensor | None) -> tf.Tensor:
        checks = _assert_batch(tf.size(image_bytes), "image_bytes",
                               None if context_bytes is None else tf.size(context_bytes), "context_bytes")
        with tf.control_dependencies(checks):
            checks = checks + [_assert_decodable(image_bytes, "image_bytes")]
            if context_bytes is not None:
                checks.append(_assert_decodable(context_bytes, "context_bytes"))
        with tf.control_dependencies(checks):  # sizes read from the headers: nothing decoded over the budget
            checks = checks + assert_within_budget(image_bytes, "image_bytes", self.max_image_pixels, self.max_batch)
            if context_bytes is not None:
                checks += assert_within_budget(context_bytes, "context_bytes", self.max_image_pixels)
        with tf.control_dependencies(checks):  # a PNG cut short: named here, not by the decoder
            checks = checks + assert_complete(image_bytes, "image_bytes")
            if context_bytes is not None:
                checks += assert_complete(context_bytes, "context_bytes")
        signature = tf.TensorSpec([len(self.views), self.size, self.size, 3], tf.float32)
        with tf.control_dependencies(checks):
            if context_bytes is None:
                return tf.map_fn(lambda b: self.compose(decode_tensor(b), None), image_bytes,
                                 fn_output_signature=signature)
            return tf.map_fn(lambda bc: self.compose(decode_tensor(bc[0]), decode_tensor(bc[1])),
                             (image_bytes, context_bytes), fn_output_signature=signature)

    def heads(self, embedding: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = {}
        for task in self.tasks:
            probs = tf.cast(task.model(embedding, training=False), tf.float32)
            if task.threshold is not None:  # positive class if its probability reaches the threshold
                pos = task.positive
                class_id = tf.where(probs[:, pos] >= task.threshold, tf.constant(pos, tf.int64),
                                    tf.constant(1 - pos, tf.int64))
            else:
                class_id = tf.argmax(probs, axis=-1)
            outputs[f"{task.name}_probabilities"] = probs
            outputs[f"{task.name}_class_id"] = class_id
            outputs[f"{task.name}_class_name"] = tf.gather(tf.constant(task.classes), class_id)
        return outputs

    # -- signatures -------------------------------------------------------------------------
    def archive(self) -> keras.export.ExportArchive:
        archive = keras.export.ExportArchive()
        archive.track(self.backbone.model)
        for task in self.tasks:
            archive.track(task.model)
        bytes_spec = [tf.TensorSpec([None], tf.string, name="image_bytes")]
        pixel_spec = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
        if self.separate_context:
            bytes_spec.append(tf.TensorSpec([None], tf.string, name="context_bytes"))
            pixel_spec.append(tf.TensorSpec([None, None, None, 3], tf.uint8, name="context"))

            def serve_bytes(image_bytes, context_bytes):
                return self.heads(self.embed_views(self.views_from_bytes(image_bytes, context_bytes)))

            def serve_pixels(images, context):
                return self.heads(self.embed_views(self.views_from_pixels(images, context)))

            def embed(image_bytes, context_bytes):
                return {"embedding": self.embed_views(self.views_from_bytes(image_bytes, context_bytes))}

            def embed_pixels(images, context):
                return {"embedding": self.embed_views(self.views_from_pixels(images, context))}
        else:
            def serve_bytes(image_bytes):
                return self.heads(self.embed_views(self.views_from_bytes(image_bytes, None)))

            def serve_pixels(images):
                return self.heads(self.embed_views(self.views_from_pixels(images, None)))

            def embed(image_bytes):
                return {"embedding": self.embed_views(self.views_from_bytes(image_bytes, None))}

            def embed_pixels(images):
                return {"embedding": self.embed_views(self.views_from_pixels(images, None))}

        archive.add_endpoint("serving_default", serve_bytes, input_signature=bytes_spec)
        archive.add_endpoint("serve_pixels", serve_pixels, input_signature=pixel_spec)
        archive.add_endpoint("embed", embed, input_signature=bytes_spec)
        archive.add_endpoint("embed_pixels", embed_pixels, input_signature=pixel_spec)
        return archive


def _assert_batch(n: tf.Tensor, name: str, n_context: tf.Tensor | None, context_name: str) -> list:
    """Graph assertions: a batch holds at least one image, and as many context images as images."""
    checks = [tf.debugging.Assert(n > 0, [f"{name}: empty batch (send at least one image)"])]
    if n_context is not None:
        checks.append(tf.debugging.Assert(tf.equal(n, n_context), [
            f"{name} and {context_name} must be batches of the same length; got", n, "and", n_context]))
    return checks


def _assert_decodable(data: tf.Tensor, name: str) -> tf.Operation:
    """Fails with the positions of inputs whose header is no format decode_image reads."""
    padded = tf.strings.join([data, tf.constant(b"\0" * 12)])  # substr fails past the end
    head = tf.strings.substr(padded, 0, 4)
    ok = tf.zeros_like(data, dtype=tf.bool)
    for magic in TF_MAGIC:
        ok = ok | tf.equal(tf.strings.substr(head, 0, len(magic)), magic)
    ok = ok | (tf.equal(head, b"RIFF") & tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP"))
    bad = tf.reshape(tf.where(tf.logical_not(ok)), [-1])
    return tf.debugging.Assert(tf.equal(tf.size(bad), 0),
                               [f"{name}: not a JPEG/PNG/GIF/BMP/WebP image at batch positions", bad], summarize=20)


def _next_version(root: Path) -> int:
    versions = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()] if root.exists() else []
    return max(versions, default=0) + 1


@locks_output("export", prepare=lambda a: prepare_out(
    a["out"], "export", (*a["heads"], a["parity_data"], a["backbone_weights"])))
def export_model(
    heads: Sequence[str | Path],
    out: str | Path,
    version: int | None = None,
    names: Sequence[str] | None = None,
    backbone_weights: str | None = None,
    parity_data: str | Path | None = None,
    parity_samples: int = 4,
    tolerance: float | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, Any]:
    """Export heads and their backbone as ``out/VERSION`` and return export.json's content.

    Args:
        heads: head directories (``dfl train`` outputs) sharing backbone and views.
        out: model directory, e.g. ``saved_models/lymph``; versions are subfolders.
        version: explicit version number (refused if it exists); default: the next one.
        names: task names (default: the head directory names).
        backbone_weights: where to find the backbone weights if the recorded source moved.
        parity_data: embedding directory to check parity on (default: the first head's training set).
        parity_samples: samples in the parity check (0 skips it, recorded as skipped).
        tolerance: max abs difference allowed on probabilities (default by the backbone's
            precision: 1e-4 float32, 2e-3 mixed_float16, 2e-2 bfloat16; see
            :data:`dfl_tf.serve.parity.PRECISION_TOLERANCE`).
        max_image_pixels: the serving signatures refuse images whose header declares more pixels
            (width x height), before decoding (default 4096 x 4096).
        max_batch: the serving signatures refuse larger batches (default 64, as batching.config).
    """
    from dfl_tf.serve.parity import parity_check

    for label, value in (("--max-image-pixels", max_image_pixels), ("--max-batch", max_batch)):
        if int(value) < 1:
            raise DflError(f"{label} must be at least 1 (got {value})")
    t0 = time.time()
    tasks = load_tasks(heads, names)
    backbone = rebuild_backbone(tasks[0].info, backbone_weights)
    graph = ServingGraph(backbone, tasks, max_image_pixels, max_batch)
    root = Path(out)
    version = int(version) if version is not None else _next_version(root)
    final = root / str(version)
    if final.exists():
        raise DflError(f"{final} already exists (versions are never overwritten; omit --version for the next one)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{version}-{int(time.time() * 1000)}"
    try:
        graph.archive().write_out(str(tmp), verbose=False)
        parity = parity_check(tmp, graph, tasks, parity_data, parity_samples, tolerance)
        info = _export_info(root.name, version, graph, tasks, tmp, parity, t0)
        atomic_write_json(tmp / EXPORT_JSON, info)
        if not parity["passed"]:
            raise DflError(f"parity check failed: {parity['reason']} (no version written)")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["path"] = str(final)
    return info


def _export_info(name: str, version: int, graph: "ServingGraph", tasks: Sequence[Task], tmp: Path,
                 parity: dict[str, Any], t0: float) -> dict[str, Any]:
    """export.json's content: heads, classes, views and the read geometry, bounds, signatures, parity."""
    return {
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": graph.backbone.describe(),
        "views": [str(v) for v in graph.views],
        "fit": graph.fit,
        "pad_to": graph.pad_to,
        "context": "separate" if graph.separate_context else
                   tasks[0].info.get("extraction", {}).get("settings", {}).get("context", "none"),
        "slide_read": tasks[0].info.get("extraction", {}).get("settings", {}).get("slide_read"),
        # the read geometry of the heads' extraction: predict and heatmap default to it
        "geometry": graph.geometry or None,
        "mpp": (graph.geometry or {}).get("mpp"),
        "patch_size": (graph.geometry or {}).get("patch_size"),
        "decoder": DECODER,
        "max_image_pixels": graph.max_image_pixels,
        "max_batch": graph.max_batch,
        "dim": graph.backbone.dim * len(graph.views),
        "heads": [{"task": t.name, "head_dir": str(Path(t.head_dir).resolve()), "classes": t.classes,
                   "threshold": t.threshold, "best_epoch": t.info.get("best_epoch"),
                   "positive_class": t.classes[t.positive] if len(t.classes) == 2 else None} for t in tasks],
        "signatures": _describe_signatures(tmp),
        "parity": parity,
        "seconds": round(time.time() - t0, 2),
        "dfl_tf_version": __version__,
    }


def _describe_signatures(path: Path) -> dict[str, Any]:
    loaded = tf.saved_model.load(str(path))
    out = {}
    for key, fn in loaded.signatures.items():
        inputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_input_signature[1].items()}
        outputs = {k: f"{v.dtype.name} {v.shape}" for k, v in fn.structured_outputs.items()}
        out[key] = {"inputs": inputs, "outputs": outputs}
    return out


def resolve_version_dir(path: str | Path) -> Path:
    """``saved_models/NAME`` -> its highest version; a version directory is returned as it is."""
    path = Path(path)
    if (path / "saved_model.pb").exists():
        return path
    if path.is_dir():
        versions = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()))
        if versions:
            return path / str(versions[-1])
    raise DflError(f"{path}: not an exported model (no saved_model.pb and no version folders)")


class ExportedModel:
    """A loaded export: ``model(image_bytes)`` -> dict of numpy arrays per task output."""

    def __init__(self, path: str | Path):
        from dfl_tf.backbones.savedmodel import check_savedmodel_files

        self.path = check_savedmodel_files(resolve_version_dir(path), "model")
        try:
            self.module = tf.saved_model.load(str(self.path))
        except Exception as exc:  # noqa: BLE001 - corrupt files: one line naming the model
            detail = " ".join(str(getattr(exc, "message", exc)).split())[:200]
            raise DflError(f"model {self.path}: cannot load the SavedModel ({type(exc).__name__}: {detail})") from None
        info_path = self.path / EXPORT_JSON
        self.info = json.loads(info_path.read_text()) if info_path.exists() else {}
        self.tasks = [h["task"] for h in self.info.get("heads", [])]
        self.needs_context = self.info.get("context") == "separate"
        # the read plan of the heads' extraction (export.json's geometry; older exports: its fit/pad_to/context)
        self.plan = ReadPlan.from_record(self.info.get("geometry"), self.info.get("views") or ["x20:rgb"], self.info)
        self.geometry: dict[str, Any] = self.info.get("geometry") or {}
        if not self.geometry and self.info.get("slide_read"):  # exported before the geometry record
            read = self.info["slide_read"]
            self.geometry = {"source_kind": "slides", "mpp": read.get("mpp"), "patch_size": read.get("patch_size")}

    def _call(self, signature: str, **inputs) -> dict[str, np.ndarray]:
        fn = self.module.signatures[signature]
        return {k: v.numpy() for k, v in fn(**inputs).items()}

    def __call__(self, image_bytes: Sequence[bytes], context_bytes: Sequence[bytes] | None = None
                 ) -> dict[str, np.ndarray]:
        inputs = {"image_bytes": tf.constant(list(image_bytes), tf.string)}
        if self.needs_context:
            if context_bytes is None:
                raise DflError("this model needs context_bytes (its views include a separate x5 context)")
            inputs["context_bytes"] = tf.constant(list(context_bytes), tf.string)
        return self._call("serving_default", **inputs)

    def predict_pixels(self, images: np.ndarray, context: np.ndarray | None = None) -> dict[str, np.ndarray]:
        inputs = {"images": tf.constant(np.asarray(images, np.uint8))}
        if self.needs_context:
            if context is None:
                raise DflError("this model needs context pixels (its views include a separate x5 context)")
            inputs["context"] = tf.constant(np.asarray(context, np.uint8))
        return self._call("serve_pixels", **inputs)

    def embed(self, image_bytes: Sequence[bytes], context_bytes: Sequence[bytes] | None = None) -> np.ndarray:
        inputs = {"image_bytes": tf.constant(list(image_bytes), tf.string)}
        if self.needs_context:
            if context_bytes is None:
                raise DflError("this model needs context_bytes (its views include a separate x5 context)")
            inputs["context_bytes"] = tf.constant(list(context_bytes), tf.string)
        return self._call("embed", **inputs)["embedding"]


def load_model(path: str | Path) -> ExportedModel:
    """Load an export (``saved_models/NAME`` or ``saved_models/NAME/VERSION``) as a callable."""
    return ExportedModel(path)
