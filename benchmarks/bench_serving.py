"""Serving latency: exported model (``serve_pixels``) vs backbone + head called from Python.

A head (and a second one) is trained quickly on embeddings of a few random images and exported
with ``export_model`` (parity check skipped). Timed on the same uint8 batch: the SavedModel's
``serve_pixels`` signature (view composition, backbone, heads in one graph) with one head and
with two heads, against the backbone (tf.function) plus the head (Keras call) from Python.
Overhead = exported latency / Python latency - 1. Median of runs after a warm-up.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common import Section, ensure_backbone, log, median, table, time_runs, write_images

TITLE = "Serving latency: exported model vs Python"


def run(cfg: dict) -> Section:
    import numpy as np
    import tensorflow as tf

    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.serve.export import export_model
    from dfl_tf.extraction.local import extract
    from dfl_tf.heads.model import load_head
    from dfl_tf.heads.train import train_head

    name, size, repeats = cfg["backbone"], cfg["size"], cfg["repeats"]
    ensure_backbone(name)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    rows = []
    try:
        src = write_images(tmp / "imgs", 16, size)
        bb = load_backbone(name, weights="none", input_size=size)
        extract(src, tmp / "emb", model=bb, batch_size=16, progress=False)
        for k in (1, 2):
            train_head(tmp / "emb", tmp / f"head{k}", epochs=1, patience=0, seed=k, progress=False)
        one = export_model([tmp / "head1"], tmp / "m1", parity_samples=0)["path"]
        two = export_model([tmp / "head1", tmp / "head2"], tmp / "m2", parity_samples=0)["path"]
        serve1 = tf.saved_model.load(one).signatures["serve_pixels"]
        serve2 = tf.saved_model.load(two).signatures["serve_pixels"]
        head, _ = load_head(tmp / "head1")
        f = tf.function(lambda t: bb.model(t, training=False), reduce_retracing=True,
                        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

        def python_path(x):
            emb = f(tf.cast(x, tf.float32))
            return np.asarray(head(emb, training=False)).argmax(-1)

        rng = np.random.default_rng(0)
        for batch in cfg["batches"]:
            x = tf.constant(rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8))
            t_py = median(time_runs(lambda: python_path(x), repeats))
            t1 = median(time_runs(lambda: {k: v.numpy() for k, v in serve1(images=x).items()}, repeats))
            t2 = median(time_runs(lambda: {k: v.numpy() for k, v in serve2(images=x).items()}, repeats))
            rows.append([batch, f"{1000 * t_py:.1f}", f"{1000 * t1:.1f}", f"{1000 * t2:.1f}",
                         f"{batch / t1:.1f}", f"{100 * (t1 / t_py - 1):+.1f}%", f"{100 * (t2 / t1 - 1):+.1f}%"])
            log(f"[serving] batch {batch}: python {t_py * 1000:.1f} ms, export 1 head {t1 * 1000:.1f} ms, "
                f"2 heads {t2 * 1000:.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = (f"{__doc__.strip()}\n\n{name} at {size} px, median of {repeats} runs.\n\n"
            + table(["batch", "Python backbone+head (ms)", "export, 1 head (ms)", "export, 2 heads (ms)",
                     "export img/s", "export overhead", "2nd head extra"], rows))
    return Section(TITLE, body)
