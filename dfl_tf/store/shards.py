"""TFRecord shards: the Example schema, an atomic shard writer and tf.data readers.

One ``tf.train.Example`` per sample: ``embedding`` (raw bytes, dtype from the manifest),
``label`` (int64, -1 when unlabeled), ``id``, ``source`` and, where known, ``group``,
``slide``, ``x``, ``y``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

from dfl_tf.runtime.files import sha256_file, write_error
from dfl_tf.errors import DflError
from dfl_tf.options import STORAGE_DTYPES
from dfl_tf.store.integrity import check_shards, shard_problems
from dfl_tf.store.manifest import load_manifest

DTYPES = {name: getattr(np, name) for name in STORAGE_DTYPES}  # storage name -> numpy type


def _bytes(value: str | bytes) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(embedding: np.ndarray, label: int, id: str, source: str, group: str | None = None,
                 slide: str | None = None, x: int | None = None, y: int | None = None) -> bytes:
    features = {"embedding": _bytes(np.ascontiguousarray(embedding).tobytes()), "label": _int(label),
                "id": _bytes(id), "source": _bytes(source)}
    if group is not None:
        features["group"] = _bytes(group)
    if slide is not None:
        features["slide"] = _bytes(slide)
    if x is not None and y is not None:
        features["x"], features["y"] = _int(x), _int(y)
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)  # map order fixed across processes


def write_shard(path: str | Path, records: Iterable[bytes]) -> tuple[int, str]:
    """Write serialized records to ``path`` via a temporary name; returns (count, sha256)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for record in records:
                writer.write(record)
                count += 1
        with open(tmp, "rb+") as fh:  # on disk before the rename, like every other output
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:  # ENOSPC/EIO or a signal: no partial file under any name
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, tf.errors.OpError)):
            raise write_error(path, exc) from exc
        raise
    return count, digest


_SCHEMA = {
    "embedding": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.string),
    "source": tf.io.FixedLenFeature([], tf.string),
    "group": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "slide": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "x": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "y": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


def shard_paths(emb_dir: str | Path, manifest: dict[str, Any] | None = None, verify: bool = True) -> list[str]:
    """The shard files of ``emb_dir``, checked against the manifest's sha256 first (cached; see
    :mod:`dfl_tf.store.integrity`) unless ``verify`` is false."""
    manifest = manifest or load_manifest(emb_dir)
    if verify:
        check_shards(emb_dir, manifest)
    return [str(Path(emb_dir) / s["file"]) for s in manifest["shards"]]


_LAYOUT_OK: set[tuple[str, int, int, str, int]] = set()  # shards whose first record matched (per process)


def check_record_layout(emb_dir: str | Path, manifest: dict[str, Any], paths: Sequence[str]) -> None:
    """Refuse a shard whose records do not hold ``dim`` values of the manifest's ``dtype`` (e.g. a
    manifest that says float32 over float16 records): its first record's ``embedding`` field is
    checked, once per shard and process, naming the shard and the field."""
    dtype, dim = manifest["dtype"], int(manifest["dim"])
    expected = dim * np.dtype(DTYPES.get(dtype, np.float32)).itemsize
    for path in paths:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, dtype, dim)
        if key in _LAYOUT_OK:
            continue
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
        if first is not None:
            feature = tf.train.Example.FromString(first.numpy()).features.feature.get("embedding")
            found = len(feature.bytes_list.value[0]) if feature is not None and feature.bytes_list.value else 0
            if found != expected:
                fits = " or ".join(f"{found // np.dtype(t).itemsize} {name}" for name, t in DTYPES.items()
                                   if found % np.dtype(t).itemsize == 0)
                raise DflError(f"{path}: field 'embedding' holds {found} bytes per record "
                               f"({fits or 'no whole value'}), but the manifest declares {dim} {dtype} "
                               f"({expected} bytes)")
        _LAYOUT_OK.add(key)


def record_dataset(emb_dir: str | Path, batch_size: int | None = None, with_meta: bool = False,
                   manifest: dict[str, Any] | None = None) -> tf.data.Dataset:
    """Records as dicts with ``embedding`` float32 [dim] and ``label`` int64 (plus metadata).

    With ``batch_size`` the records are parsed in batches (much faster for large shards).
    """
    manifest = manifest or load_manifest(emb_dir)
    dtype = tf.float16 if manifest["dtype"] == "float16" else tf.float32
    dim = int(manifest["dim"])
    keys = list(_SCHEMA) if with_meta else ["embedding", "label"]
    schema = {k: _SCHEMA[k] for k in keys}

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, schema) if batch_size else tf.io.parse_single_example(serialized, schema)
        emb = tf.io.decode_raw(parsed["embedding"], dtype)
        parsed["embedding"] = tf.cast(tf.reshape(emb, ([-1] if batch_size else []) + [dim]), tf.float32)
        return parsed

    paths = shard_paths(emb_dir, manifest)
    check_record_layout(emb_dir, manifest, paths)
    ds = tf.data.TFRecordDataset(paths, num_parallel_reads=1)
    if batch_size:
        ds = ds.batch(batch_size)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclass
class EmbeddingSet:
    """All records of an embedding directory in memory."""

    X: np.ndarray  # float32 [N, dim]
    y: np.ndarray  # int64 [N], -1 unlabeled
    ids: list[str]
    sources: list[str]
    groups: list[str]
    slides: list[str]
    xy: np.ndarray  # int64 [N, 2], -1 when unknown
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def __len__(self) -> int:
        return len(self.y)


def load_embeddings(emb_dir: str | Path, batch_size: int = 4096) -> EmbeddingSet:
    """Read every record of ``emb_dir`` into memory, in shard order."""
    manifest = load_manifest(emb_dir)
    parts: dict[str, list] = {k: [] for k in _SCHEMA}
    for batch in record_dataset(emb_dir, batch_size=batch_size, with_meta=True, manifest=manifest):
        for key in parts:
            parts[key].append(batch[key].numpy())
    dim = int(manifest["dim"])

    def cat(key, empty):
        return np.concatenate(parts[key]) if parts[key] else empty

    def text(key) -> list[str]:
        return [v.decode("utf-8") for v in cat(key, np.zeros((0,), object))]

    return EmbeddingSet(
        X=cat("embedding", np.zeros((0, dim), np.float32)),
        y=cat("label", np.zeros((0,), np.int64)),
        ids=text("id"), sources=text("source"), groups=text("group"), slides=text("slide"),
        xy=np.stack([cat("x", np.zeros((0,), np.int64)), cat("y", np.zeros((0,), np.int64))], axis=1),
        manifest=manifest,
    )


def verify_shards(emb_dir: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """Shards missing or whose sha256 disagrees with the manifest (empty list when all are intact)."""
    manifest = manifest or load_manifest(emb_dir)
    return [file for file, _reason in shard_problems(emb_dir, manifest)]


def count_by_class(labels: Sequence[int], classes: Sequence[str]) -> dict[str, int]:
    counts = {c: 0 for c in classes}
    unlabeled = 0
    for label in labels:
        if label < 0:
            unlabeled += 1
        else:
            counts[classes[label]] += 1
    if unlabeled:
        counts["(unlabeled)"] = unlabeled
    return counts
