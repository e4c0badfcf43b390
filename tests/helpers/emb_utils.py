"""Synthetic embedding directories (shards + manifest.json) for head / evaluation tests."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dfl_tf.runtime.files import atomic_write_json
from dfl_tf.store.manifest import FORMAT_VERSION, MANIFEST
from dfl_tf.store.shards import count_by_class, make_example, write_shard


def make_embedding_dir(path, X, y, classes: Sequence[str], fingerprint: str = "f" * 64,
                       views: Sequence[str] = ("x20:rgb",), dtype: str = "float16", shard_size: int = 256,
                       backbone: str = "synthetic", ids: Sequence[str] | None = None,
                       groups: Sequence[str] | None = None, slides: Sequence[str] | None = None,
                       xy: np.ndarray | None = None) -> dict:
    """Write ``X`` [N, dim] / ``y`` [N] (-1 = unlabeled) as an embedding directory; returns the manifest.

    ``groups`` (default ``g{i % 7}``), ``slides`` ('' for none) and ``xy`` [N, 2] set those fields."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    X = np.asarray(X).astype(dtype)
    y = np.asarray(y, np.int64)
    ids = list(ids) if ids is not None else [f"s{i:06d}" for i in range(len(y))]
    shards = []
    for k, start in enumerate(range(0, len(y), shard_size)):
        name = f"shard-{k:05d}.tfrecord"
        stop = min(start + shard_size, len(y))
        records = (make_example(X[i], int(y[i]), ids[i], f"src/{ids[i]}.png",
                                group=f"g{i % 7}" if groups is None else groups[i],
                                slide=(slides[i] or None) if slides is not None else None,
                                x=None if xy is None else int(xy[i][0]), y=None if xy is None else int(xy[i][1]))
                   for i in range(start, stop))
        count, digest = write_shard(path / name, records)
        shards.append({"file": name, "records": count, "sha256": digest})
    dim = int(X.shape[1])
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": {"name": backbone, "weights": "none", "fingerprint": fingerprint, "input_size": 32,
                     "dim": dim // max(len(views), 1)},
        "views": list(views),
        "dim": dim,
        "dtype": dtype,
        "classes": list(classes),
        "counts": count_by_class(y.tolist(), list(classes)),
        "num_records": int(len(y)),
        "shards": shards,
        "skipped": [],
        "created": "2024-01-01T00:00:00+00:00",
        "dfl_tf_version": "test",
    }
    atomic_write_json(path / MANIFEST, manifest)
    return manifest


def blobs(n: int, dim: int, n_classes: int = 2, sep: float = 3.0, seed: int = 0, weights=None,
          offset: float = 5.0, scale: float = 2.0):
    """Gaussian blobs (one per class) in ``dim`` dimensions, shifted/scaled like raw embeddings."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(size=(n_classes, dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.choice(n_classes, size=n, p=weights)
    X = centres[y] + rng.normal(size=(n, dim))
    return (X * scale + offset).astype(np.float32), y.astype(np.int64)


def make_bags(n_bags: int, dim: int = 16, seed: int = 0, sizes: tuple[int, int] = (20, 40),
              tumour: tuple[float, float] = (0.05, 0.10), shift: float = 2.5, nuisance: float = 0.0):
    """Synthetic bags: a bag is positive exactly when 5-10% of its instances come from a shifted
    ("tumour") distribution. Returns ``(X [N, dim], bag index [N], is_tumour [N], bag labels [n_bags])``;
    the tumour shift lies along a fixed direction with a norm of ``shift`` (per-instance noise 1);
    ``nuisance``: std of a per-bag offset of all its instances along that direction (a slide-level
    batch effect that blurs the mean of a bag, not its outlying instances)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=dim)
    direction *= shift / np.linalg.norm(direction)
    X, bag, tum = [], [], []
    labels = np.array([i % 2 for i in range(n_bags)], np.int64)
    for b in range(n_bags):
        n = int(rng.integers(sizes[0], sizes[1] + 1))
        t = np.zeros(n, bool)
        if labels[b]:
            k = max(1, int(round(n * rng.uniform(*tumour))))
            t[rng.choice(n, k, replace=False)] = True
        x = rng.normal(size=(n, dim)) + (t[:, None] + rng.normal() * nuisance / shift) * direction
        X.append(x * 2.0 + 5.0)
        bag += [b] * n
        tum.append(t)
    return np.concatenate(X).astype(np.float32), np.array(bag), np.concatenate(tum), labels
