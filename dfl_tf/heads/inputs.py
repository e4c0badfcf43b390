"""Inputs of head training: checks and small helpers shared by :mod:`dfl_tf.heads.train`."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.options.train import TRAIN_RANGES, check_ranges  # noqa: F401  (public here too)
from dfl_tf.store.manifest import load_manifest
from dfl_tf.store.shards import record_dataset


def refuse_non_finite(emb_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Raise :class:`DflError` naming the first record (id, shard) with a NaN/inf embedding value."""
    manifest = manifest or load_manifest(emb_dir)
    for shard in manifest["shards"]:
        one = {**manifest, "shards": [shard]}
        for batch in record_dataset(emb_dir, batch_size=4096, with_meta=True, manifest=one):
            bad = np.flatnonzero(~np.isfinite(batch["embedding"].numpy()).all(axis=1))
            if len(bad):
                sid = batch["id"].numpy()[bad[0]].decode("utf-8", "replace")
                raise DflError(f"{emb_dir}: record '{sid}' in shard {shard['file']} has a non-finite (NaN/inf) "
                               f"embedding ({len(bad)} such records in that batch); re-extract or drop it")


def load_val(emb_dir: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(X, y, unlabeled count) of the labeled validation records; non-finite embeddings refused."""
    from dfl_tf.store.shards import load_embeddings

    data = load_embeddings(emb_dir)
    if not np.isfinite(data.X).all():
        refuse_non_finite(emb_dir, data.manifest)
    keep = data.y >= 0
    return data.X[keep], data.y[keep], int((~keep).sum())


def class_weights(class_weight: Any, counts: np.ndarray, classes: Sequence[str]) -> np.ndarray | None:
    """Per-class loss weights from ``class_weight`` (None, ``"balanced"`` or {class: weight})."""
    if class_weight in (None, "none", "None", False):
        return None
    if class_weight == "balanced":
        n, C = counts.sum(), len(counts)
        return np.where(counts > 0, n / (C * np.maximum(counts, 1)), 0.0).astype(np.float32)
    if isinstance(class_weight, Mapping):
        unknown = set(map(str, class_weight)) - set(classes)
        if unknown:
            raise DflError(f"class_weight names unknown classes {sorted(unknown)} (classes: {list(classes)})")
        return np.array([float(class_weight.get(c, 1.0)) for c in classes], np.float32)
    raise DflError(f"class_weight must be none, 'balanced' or a mapping class -> weight, got {class_weight!r}")


def history_csv(history: dict[str, list]) -> str:
    """history.csv text: one row per epoch, one column per logged metric."""
    keys = sorted(history)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["epoch"] + keys)
    for i in range(len(history[keys[0]]) if keys else 0):
        writer.writerow([i + 1] + [f"{float(history[k][i]):.8g}" for k in keys])
    return buf.getvalue()


def index_batches(num: int, batch_size: int, seed: int):
    """Endless ``tf.data`` stream of int64 index batches over ``range(num)``: each epoch a fresh
    uniform permutation (stateless, from ``(seed, epoch)``) cut into ``ceil(num / batch_size)``
    batches, the last one partial. One element per batch: shuffling and batching record by record
    (``Dataset.range(num).shuffle(num).batch(B)``) costs tf.data about 2 us per record, CPU time
    that the training step's matmuls compete for."""
    import tensorflow as tf

    if num < 1 or batch_size < 1:  # an empty epoch would make the stream loop forever
        raise DflError(f"index_batches needs num >= 1 and batch_size >= 1, got {num} and {batch_size}")
    starts = tf.range(0, num, batch_size, dtype=tf.int64)

    def epoch(e):
        perm = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64),
                                                        seed=tf.stack([tf.constant(seed, tf.int64), e]))
        # rows of a ragged tensor come out as dense 1-D tensors (a map inside flat_map here made
        # TensorFlow 2.21 log an error about an unknown MapDataset attribute)
        return tf.data.Dataset.from_tensor_slices(tf.RaggedTensor.from_row_starts(perm, starts))

    return tf.data.Dataset.counter().flat_map(epoch)


def available_memory() -> int | None:
    """Bytes of memory this process can still take: ``MemAvailable`` of /proc/meminfo, lowered to
    the cgroup (v2) limit's headroom when one is set; ``os.sysconf`` elsewhere; None if unknown."""
    import os

    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def head_memory(dim: int, n_classes: int, hidden: int, batch_size: int, models: int = 1) -> int:
    """Bytes that training ``models`` heads of this shape together needs at least: float32
    parameters four times over (weights, Adam's two moments, gradients) plus a batch's
    activations and their gradients."""
    hidden = int(hidden)
    params = (dim * hidden + hidden + hidden * n_classes + n_classes) if hidden > 0 else dim * n_classes + n_classes
    activations = int(batch_size) * (max(hidden, 0) + n_classes) * 2
    return 4 * int(models) * (4 * params + activations)


def check_memory(dim: int, n_classes: int, hidden: int, batch_size: int, models: int = 1,
                 what: str = "the head") -> None:
    """Refuse (:class:`DflError`, naming ``--hidden`` and the memory needed) a head too large for the
    memory available (:func:`available_memory`); nothing is checked when that is unknown."""
    need, avail = head_memory(dim, n_classes, hidden, batch_size, models), available_memory()
    if avail is not None and need > avail:
        raise DflError(f"--hidden {int(hidden)}: training {what} needs at least {need / 1e9:.3g} GB of memory "
                       f"(float32 weights, Adam moments and gradients for {dim}-dim embeddings), "
                       f"{avail / 1e9:.3g} GB is available; use a smaller --hidden")
