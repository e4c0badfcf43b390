"""Export parity: the exported graph (pixel and bytes signatures) against the stored embeddings
and the Python pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from dfl_tf.provenance import check_compatible
from dfl_tf.data.decode import tf_decodable
from dfl_tf.data.sources import load_fields, load_source
from dfl_tf.errors import DflError
from dfl_tf.store.manifest import load_manifest
from dfl_tf.store.shards import record_dataset

# Stored embeddings are rounded to their storage dtype: relative-to-max tolerance per dtype.
EMBEDDING_RTOL = {"float16": 2e-3, "float32": 1e-4}
# A reduced-precision backbone rounds every activation (bfloat16: 8 mantissa bits, eps 7.8e-3), so
# the same pixels through another graph (the SavedModel vs eager Python) differ by about that much:
# (probabilities, embeddings relative) per backbone precision. Measured here with bfloat16: 1.7e-4
# / 4.2e-3 (tiny test backbone), 8.1e-4 / 7.6e-3 (ResNet-50). A decoder that differs from training
# (fast vs accurate JPEG DCT) moves probabilities by ~1e-1, still far above these.
PRECISION_TOLERANCE = {"float32": (1e-4, 0.0), "mixed_float16": (2e-3, 5e-3), "bfloat16": (2e-2, 2e-2)}


def tolerances(precision: str, storage_dtype: str, tolerance: float | None = None) -> tuple[float, float]:
    """(probability abs tolerance, embedding relative tolerance) for a backbone precision and the
    embeddings' storage dtype; ``tolerance`` overrides the probability one."""
    prob, emb = PRECISION_TOLERANCE.get(precision, PRECISION_TOLERANCE["float32"])
    return (prob if tolerance is None else float(tolerance)), max(EMBEDDING_RTOL[storage_dtype], emb)


def _samples_by_id(manifest: dict[str, Any]) -> dict[str, Any]:
    source = manifest.get("source", {})
    if not source.get("path") or not Path(source["path"]).exists():
        raise DflError(f"parity check: the extraction source {source.get('path')} is gone; pass --parity-data "
                       f"with an embedding directory whose source exists, or --parity-samples 0 to skip")
    samples = load_source(source["path"], split=source.get("split"), classes=manifest["classes"])
    return {s.id: s for s in samples.samples}


def _read_plan(manifest: dict[str, Any], graph: Any) -> Any:
    """The graph's read plan with the slide read of the extraction (its run-wide mpp, patch size)."""
    read = manifest.get("settings", {}).get("slide_read") or {}
    return graph.plan.replace(mpp=float(read.get("mpp", 0.5)), patch_size=int(read.get("patch_size", 256)),
                              slide_mpp=read.get("slide_mpp"))


def _file_bytes(sample: Any, context: bool, pixels: tuple[np.ndarray, np.ndarray | None]
                ) -> tuple[bytes, bytes | None] | None:
    """The encoded file (and context file) of an image sample when the bytes signatures read its
    format (None for formats only Pillow reads, e.g. TIFF); slide samples: their tiles as PNG
    (lossless), as a client sending tiles would."""
    if sample.slide is not None:
        image, ctx_pixels = pixels
        png = [tf.io.encode_png(tf.constant(a)).numpy() if a is not None else None for a in (image, ctx_pixels)]
        return png[0], png[1] if context else None
    data = Path(sample.source).read_bytes()
    ctx = Path(sample.context).read_bytes() if context else None
    if not tf_decodable(data) or (ctx is not None and not tf_decodable(ctx)):
        return None
    return data, ctx


def parity_check(path: str | Path, graph, tasks: Sequence, parity_data: str | Path | None, n: int,
                 tolerance: float | None = None) -> dict[str, Any]:
    """Run ``n`` stored samples through the exported signatures and compare.

    For each sample, (1) the pixel signatures (``serve_pixels``, ``embed_pixels``) on the pixels
    extraction decoded and (2) the bytes signatures (``serving_default``, ``embed``) on the sample's
    own file (image sources in a format they read; slide tiles encoded as PNG): their embeddings against the stored ones
    (within storage rounding), their probabilities against the Python backbone + heads on the same
    pixels (max abs diff <= ``tolerance``; default by the backbone's precision, see
    :data:`PRECISION_TOLERANCE`).
    """
    if n <= 0:
        return {"passed": True, "skipped": True, "reason": "parity_samples=0"}
    emb_dir = parity_data or tasks[0].info.get("train", {}).get("path")
    if not emb_dir:
        raise DflError("parity check: no embedding directory known; pass --parity-data")
    manifest = load_manifest(emb_dir)
    check_compatible(tasks[0].info, manifest, f"head {tasks[0].head_dir}", f"embeddings {emb_dir}")
    batch = next(iter(record_dataset(emb_dir, batch_size=n, with_meta=True, manifest=manifest)))
    ids = [i.decode() for i in batch["id"].numpy()]
    stored = batch["embedding"].numpy()
    by_id = _samples_by_id(manifest)
    plan = _read_plan(manifest, graph)
    samples = []
    for sample_id in ids:
        if sample_id not in by_id:
            raise DflError(f"parity check: sample {sample_id} of {emb_dir} is no longer in its source")
        samples.append(by_id[sample_id])
    runs = _run_signatures(tf.saved_model.load(str(path)).signatures, graph, tasks, plan, samples)
    pixel_emb, python_emb, pixel_probs, python_probs, bytes_rows, bytes_emb, bytes_probs = runs
    scale = float(np.abs(stored).max()) or 1.0
    python_probs = np.stack(python_probs)
    precision = getattr(graph.backbone, "precision", "float32")
    tolerance, emb_rtol = tolerances(precision, manifest["dtype"], tolerance)
    result: dict[str, Any] = {
        "samples": len(ids),
        "data": str(emb_dir),
        "max_abs_diff_probabilities": float(np.abs(np.stack(pixel_probs) - python_probs).max()),
        "probability_tolerance": tolerance,
        "precision": precision,
        "max_rel_diff_embedding_vs_stored": float(np.abs(np.stack(pixel_emb) - stored).max() / scale),
        "max_rel_diff_embedding_vs_python": float(np.abs(np.stack(pixel_emb) - np.stack(python_emb)).max() / scale),
        "embedding_tolerance": emb_rtol,
        "stored_dtype": manifest["dtype"],
        "bytes_samples": len(bytes_rows),
    }
    if bytes_rows:
        result["bytes_max_rel_diff_embedding_vs_stored"] = float(
            np.abs(np.stack(bytes_emb) - stored[bytes_rows]).max() / scale)
        result["bytes_max_abs_diff_probabilities"] = float(
            np.abs(np.stack(bytes_probs) - python_probs[bytes_rows]).max())
        if manifest.get("source", {}).get("kind") == "slides":
            result["bytes_note"] = "slide samples: their tiles sent as PNG"
    else:
        result["bytes_note"] = "no sample in a format the bytes signatures read"
    return _verdict(result, tolerance, emb_rtol)


def _verdict(result: dict[str, Any], tolerance: float, emb_rtol: float) -> dict[str, Any]:
    """``result`` with ``passed`` and, when a difference exceeds its tolerance, the first ``reason``."""
    checks = [
        ("probabilities (serve_pixels vs Python)", result["max_abs_diff_probabilities"], tolerance),
        ("probabilities (serving_default on the files vs Python)", result.get("bytes_max_abs_diff_probabilities"),
         tolerance),
        ("embeddings (embed_pixels vs stored, relative)", result["max_rel_diff_embedding_vs_stored"], emb_rtol),
        ("embeddings (embed on the files vs stored, relative)", result.get("bytes_max_rel_diff_embedding_vs_stored"),
         emb_rtol),
    ]
    failed = next(((what, v, tol) for what, v, tol in checks if v is not None and not v <= tol), None)
    if failed is None:
        result.update(passed=True)
    else:
        what, value, tol = failed
        result.update(passed=False, reason=f"{what} differ by {value:.2e} > {tol:g}")
    return result


def _run_signatures(sigs: Any, graph: Any, tasks: Sequence, plan: Any, samples: Sequence) -> tuple[list, ...]:
    """Each sample's fields through the pixel signatures, the Python graph and (where its file is
    in a format they read) the bytes signatures: (pixel embeddings, Python embeddings, pixel
    probabilities, Python probabilities, rows with bytes, bytes embeddings, bytes probabilities)."""
    pixel_emb, python_emb, pixel_probs, python_probs = [], [], [], []
    bytes_rows, bytes_emb, bytes_probs = [], [], []
    for row, sample in enumerate(samples):
        fields = load_fields(sample, plan, graph.fields)
        image = fields[graph.fields[0]]
        context = fields[graph.fields[1]] if graph.separate_context else None
        inputs = {"images": tf.constant(image[None])}
        if context is not None:
            inputs["context"] = tf.constant(context[None])
        out = sigs["serve_pixels"](**inputs)
        pixel_emb.append(sigs["embed_pixels"](**inputs)["embedding"].numpy()[0])
        pixel_probs.append(_probs(out, tasks))
        emb = graph.embed_views(graph.compose(tf.constant(image[None]),
                                              None if context is None else tf.constant(context[None]))).numpy()
        python_emb.append(emb[0])
        python_probs.append(np.concatenate([t.model(emb, training=False).numpy()[0] for t in tasks]))
        encoded = _file_bytes(sample, graph.separate_context, (image, context))
        if encoded is not None:
            inputs = {"image_bytes": tf.constant([encoded[0]])}
            if graph.separate_context:
                inputs["context_bytes"] = tf.constant([encoded[1]])
            bytes_rows.append(row)
            bytes_emb.append(sigs["embed"](**inputs)["embedding"].numpy()[0])
            bytes_probs.append(_probs(sigs["serving_default"](**inputs), tasks))
    return pixel_emb, python_emb, pixel_probs, python_probs, bytes_rows, bytes_emb, bytes_probs


def _probs(outputs: dict[str, Any], tasks: Sequence) -> np.ndarray:
    return np.concatenate([outputs[f"{t.name}_probabilities"].numpy()[0] for t in tasks])
