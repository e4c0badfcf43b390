"""The labeled training records of a head: in memory when small enough, else streamed from the shards."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from dfl_tf.heads.augment import mixup_batch
from dfl_tf.heads.inputs import index_batches, refuse_non_finite
from dfl_tf.heads.model import safe_std, standardisation
from dfl_tf.store.shards import DTYPES, record_dataset


class TrainData:
    """The labeled training records: in memory (storage dtype) when small enough, else streamed."""

    def __init__(self, emb_dir: str | Path, manifest: dict[str, Any], cache_gb: float):
        self.emb_dir, self.manifest = emb_dir, manifest
        self.dim = int(manifest["dim"])
        self.n_classes = len(manifest["classes"])
        storage = np.dtype(DTYPES[manifest["dtype"]])
        total = int(manifest["num_records"])
        self.in_memory = total * self.dim * storage.itemsize <= cache_gb * 1e9
        self.X: np.ndarray | None = None
        self.y: np.ndarray | None = None
        if self.in_memory:
            X = np.empty((total, self.dim), storage)
            y = np.empty((total,), np.int64)
            i = 0
            for batch in record_dataset(emb_dir, batch_size=8192, manifest=manifest):
                n = int(batch["label"].shape[0])
                emb = batch["embedding"].numpy()
                if not np.isfinite(emb).all():
                    refuse_non_finite(emb_dir, manifest)
                X[i:i + n] = emb.astype(storage)
                y[i:i + n] = batch["label"].numpy()
                i += n
            X, y = X[:i], y[:i]
            keep = y >= 0
            self.unlabeled = int((~keep).sum())
            if self.unlabeled:
                X, y = X[keep], y[keep]
            self.X, self.y = X, y
            self.mean, self.std = standardisation(X)
            self.counts = np.bincount(y, minlength=self.n_classes)
        else:
            self._stream_stats()
        self.num = int(self.counts.sum())

    def _stream_stats(self) -> None:
        """Mean/std and class counts in one pass (Chan's parallel merge, float64)."""
        n, mean, m2 = 0, np.zeros(self.dim), np.zeros(self.dim)
        counts = np.zeros(self.n_classes, np.int64)
        unlabeled = 0
        for batch in record_dataset(self.emb_dir, batch_size=8192, manifest=self.manifest):
            y = batch["label"].numpy()
            keep = y >= 0
            unlabeled += int((~keep).sum())
            X = batch["embedding"].numpy()[keep].astype(np.float64)
            if not np.isfinite(X).all():
                refuse_non_finite(self.emb_dir, self.manifest)
            if not len(X):
                continue
            counts += np.bincount(y[keep], minlength=self.n_classes)
            bn, bmean = len(X), X.mean(axis=0)
            bm2 = ((X - bmean) ** 2).sum(axis=0)
            delta = bmean - mean
            tot = n + bn
            mean = mean + delta * bn / tot
            m2 = m2 + bm2 + delta ** 2 * n * bn / tot
            n = tot
        self.mean = mean.astype(np.float32)
        self.std = safe_std(np.sqrt(m2 / max(n, 1)))
        self.counts, self.unlabeled = counts, unlabeled

    def _standardise_in_place(self, mean: np.ndarray, denominator: np.ndarray, chunk: int = 65536) -> None:
        """``X = (X - mean) / denominator`` in float32, chunk by chunk, stored back in X's dtype."""
        for i in range(0, len(self.X), chunk):
            part = self.X[i:i + chunk].astype(np.float32)
            part -= mean
            part /= denominator
            self.X[i:i + chunk] = part

    def dataset(self, batch_size: int, seed: int, balanced: bool, class_weights: np.ndarray | None,
                mixup: float, standardise: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[tf.data.Dataset, int | None]:
        """(endless dataset of (x, y_onehot, sample_weight) batches, steps_per_epoch).

        ``standardise=(mean, denominator)``: the batches are standardised embeddings (for
        :func:`dfl_tf.heads.model.training_view`). In memory they are standardised once, in place
        and in the storage dtype (so a float16 store adds one float16 rounding of the standardised
        value, far below the noise augmentation's 0.1 std), and the raw records are no longer
        kept (``X`` becomes None); streamed batches are standardised in the pipeline."""
        C = self.n_classes
        steps = math.ceil(self.num / batch_size)
        cw = tf.constant(class_weights if class_weights is not None else np.ones(C), tf.float32)

        def finish(x, label):
            x = tf.cast(x, tf.float32)
            if standardise is not None and not self.in_memory:
                x = (x - standardise[0]) / standardise[1]
            y = tf.one_hot(label, C, dtype=tf.float32)
            w = tf.reduce_sum(y * cw, axis=-1)
            return x, y, w

        if self.in_memory:
            if standardise is not None:
                self._standardise_in_place(*standardise)
            Xc, yc = tf.constant(self.X), tf.constant(self.y)
            if standardise is not None:
                self.X = None  # standardised now: raw records are read from the shards if asked for
            if balanced:
                parts = [tf.data.Dataset.from_tensor_slices(np.flatnonzero(self.y == c).astype(np.int64))
                         .shuffle(int(self.counts[c]), seed=seed + c, reshuffle_each_iteration=True).repeat()
                         for c in range(C) if self.counts[c] > 0]
                idx = tf.data.Dataset.sample_from_datasets(parts, weights=[1.0 / len(parts)] * len(parts),
                                                           seed=seed).batch(batch_size)
            else:
                idx = index_batches(self.num, batch_size, seed)  # a fresh permutation per epoch
            ds = idx.map(lambda i: finish(tf.gather(Xc, i), tf.gather(yc, i)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            # Filter at batch level (cheap), then unbatch -> shuffle -> batch (per record).
            def labeled(r, c=None):
                keep = r["label"] >= 0 if c is None else tf.equal(r["label"], c)
                return tf.boolean_mask(r["embedding"], keep), tf.boolean_mask(r["label"], keep)

            rec = record_dataset(self.emb_dir, batch_size=1024, manifest=self.manifest)
            if balanced:
                parts = [rec.map(lambda r, c=c: labeled(r, c)).unbatch().repeat()
                         for c in range(C) if self.counts[c] > 0]
                rec = tf.data.Dataset.sample_from_datasets(parts, weights=[1.0 / len(parts)] * len(parts),
                                                           seed=seed)
            else:
                rec = rec.map(labeled).unbatch()
            rec = rec.shuffle(min(self.num, 65536), seed=seed, reshuffle_each_iteration=True)
            ds = rec.batch(batch_size).map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if mixup > 0:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda b, s: mixup_batch(*b, s, alpha=mixup), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
        # One pass = ceil(num / batch_size) batches (partial last batch); repeated, with the
        # explicit steps_per_epoch, so Keras never has to guess the length of a filtered stream.
        ds = ds.repeat().prefetch(tf.data.AUTOTUNE)
        return ds, steps
