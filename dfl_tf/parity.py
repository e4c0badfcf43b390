"""Export parity: the exported graph against the stored embeddings and the Python pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from dfl_tf.data.sources import SlideRead, load_sample, load_source
from dfl_tf.data.views import compose_views
from dfl_tf.errors import DflError
from dfl_tf.store.manifest import check_compatible, load_manifest
from dfl_tf.store.shards import record_dataset

# Stored embeddings are rounded to their storage dtype: relative-to-max tolerance per dtype.
EMBEDDING_RTOL = {"float16": 2e-3, "float32": 1e-4}


def _samples_by_id(manifest: dict[str, Any]) -> dict[str, Any]:
    source = manifest.get("source", {})
    if not source.get("path") or not Path(source["path"]).exists():
        raise DflError(f"parity check: the extraction source {source.get('path')} is gone; pass --parity-data "
                       f"with an embedding directory whose source exists, or --parity-samples 0 to skip")
    samples = load_source(source["path"], split=source.get("split"), classes=manifest["classes"])
    return {s.id: s for s in samples.samples}


def parity_check(path: str | Path, graph, tasks: Sequence, parity_data: str | Path | None, n: int,
                 tolerance: float) -> dict[str, Any]:
    """Run ``n`` stored samples through the exported ``serve_pixels`` and compare.

    Checks (1) exported embedding vs stored embedding (within storage rounding) and (2) exported
    probabilities vs the Python backbone + head on the same pixels (max abs diff <= tolerance).
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
    read = manifest.get("settings", {}).get("slide_read") or {}
    slide_read = SlideRead(mpp=read.get("mpp", 0.5), patch_size=read.get("patch_size", 256),
                           slide_mpp=read.get("slide_mpp"))
    loaded = tf.saved_model.load(str(path))
    serve, embed = loaded.signatures["serve_pixels"], loaded.signatures["embed_pixels"]
    exported_emb, python_emb, exported_probs, python_probs = [], [], [], []
    for sample_id in ids:
        if sample_id not in by_id:
            raise DflError(f"parity check: sample {sample_id} of {emb_dir} is no longer in its source")
        sample = by_id[sample_id]
        image, context = load_sample(sample, graph.separate_context, slide_read)
        context = context if graph.separate_context else None
        inputs = {"images": tf.constant(image[None])}
        if context is not None:
            inputs["context"] = tf.constant(context[None])
        out = serve(**inputs)
        exported_emb.append(embed(**inputs)["embedding"].numpy()[0])
        views = compose_views(tf.constant(image[None]), None if context is None else tf.constant(context[None]),
                              graph.views, graph.size, graph.fit, graph.pad_to)
        emb = graph.embed_views(views).numpy()
        python_emb.append(emb[0])
        exported_probs.append(np.concatenate([out[f"{t.name}_probabilities"].numpy()[0] for t in tasks]))
        python_probs.append(np.concatenate([t.model(emb, training=False).numpy()[0] for t in tasks]))
    exported_emb, python_emb = np.stack(exported_emb), np.stack(python_emb)
    scale = float(np.abs(stored).max()) or 1.0
    emb_rel = float(np.abs(exported_emb - stored).max() / scale)
    emb_py = float(np.abs(exported_emb - python_emb).max() / scale)
    prob_diff = float(np.abs(np.stack(exported_probs) - np.stack(python_probs)).max())
    emb_rtol = EMBEDDING_RTOL[manifest["dtype"]]
    result = {
        "samples": len(ids),
        "data": str(emb_dir),
        "max_abs_diff_probabilities": prob_diff,
        "probability_tolerance": tolerance,
        "max_rel_diff_embedding_vs_stored": emb_rel,
        "max_rel_diff_embedding_vs_python": emb_py,
        "embedding_tolerance": emb_rtol,
        "stored_dtype": manifest["dtype"],
    }
    if prob_diff > tolerance:
        result.update(passed=False, reason=f"probabilities differ by {prob_diff:.2e} > {tolerance:g}")
    elif emb_rel > emb_rtol:
        result.update(passed=False, reason=f"embeddings differ from the stored ones by {emb_rel:.2e} (relative) "
                                           f"> {emb_rtol:g}")
    else:
        result.update(passed=True)
    return result
