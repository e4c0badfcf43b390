"""Fusion of embedding stores: several stores of the same samples, one per backbone, joined record
by record into one store whose embedding is the concatenation of the parts (issue 33).

The fused manifest lists every part under ``parts`` (backbone name, weights, fingerprint, input
size, views, dim and offset in the fused vector) and describes the fused backbone with a
fingerprint over the parts in order, so that the one compatibility check
(:func:`dfl_tf.provenance.check_compatible`) refuses a head trained on A+B for B+A or A alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dfl_tf import __version__
from dfl_tf.errors import DflError
from dfl_tf.provenance import FIELDS, check_compatible
from dfl_tf.runtime.files import atomic_write_json
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.store.manifest import FORMAT_VERSION, MANIFEST, load_manifest
from dfl_tf.store.shards import DTYPES, EmbeddingSet, count_by_class, load_embeddings, make_example, write_shard

#: Fields of the compatibility check that parts of a fusion must share (the backbone, its input
#: size and the dim are what differ between parts).
GEOMETRY_FIELDS = tuple(f for f in FIELDS if f not in ("backbone fingerprint", "dim", "input size"))
SHOWN = 3  # differing ids named in an error


def _parts_of(manifest: dict[str, Any], store: str) -> list[dict[str, Any]]:
    """The parts of one input store (a fused input contributes its own parts)."""
    if manifest.get("parts"):
        return [dict(p) for p in manifest["parts"]]
    bb = manifest["backbone"]
    return [{"backbone": bb.get("name"), "weights": bb.get("weights"), "fingerprint": bb.get("fingerprint"),
             "input_size": bb.get("input_size"), "views": list(manifest["views"]), "dim": int(manifest["dim"]),
             "store": store}]


def part_labels(parts: Sequence[dict[str, Any]]) -> list[str]:
    """Each part's backbone name, with ``@input_size`` where two parts share a name."""
    names = [str(p["backbone"]) for p in parts]
    return [f"{n}@{p['input_size']}" if names.count(n) > 1 else n for n, p in zip(names, parts)]


def fused_backbone(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``backbone`` record of a fused store: a name and a fingerprint over the parts in order."""
    key = [[p["backbone"], p["fingerprint"], p["input_size"], list(p["views"]), int(p["dim"])] for p in parts]
    sizes = {p["input_size"] for p in parts}
    return {"name": "fused:" + "+".join(part_labels(parts)), "weights": "fused",
            "fingerprint": hashlib.sha256(json.dumps(key).encode()).hexdigest(),
            "input_size": sizes.pop() if len(sizes) == 1 else None,
            "dim": sum(int(p["dim"]) for p in parts), "parts": [dict(p) for p in parts]}


def _keys(es: EmbeddingSet) -> list[tuple]:
    return [(es.ids[i], es.sources[i], es.slides[i], int(es.xy[i, 0]), int(es.xy[i, 1])) for i in range(len(es))]


def _index(es: EmbeddingSet, store: str) -> dict[tuple, int]:
    keys = _keys(es)
    index = {k: i for i, k in enumerate(keys)}
    if len(index) != len(keys):
        seen: set[tuple] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise DflError(f"{store}: record id {dup[0]} appears more than once; stores with repeated ids cannot be fused")
    return index


def _shown(keys: Sequence[tuple]) -> str:
    shown = ", ".join(str(k[0]) if not k[2] else f"{k[0]} ({k[2]} {k[3]},{k[4]})" for k in keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def _check_same_records(first: EmbeddingSet, other: EmbeddingSet, names: tuple[str, str],
                        order: list[int]) -> None:
    """Refuse ``other`` unless it holds the records of ``first`` with the same labels and groups."""
    keys_a, index_b = _keys(first), _index(other, names[1])
    index_a = set(keys_a)
    only_a = [k for k in keys_a if k not in index_b]
    only_b = [k for k in _keys(other) if k not in index_a]
    if only_a or only_b:
        side = (f"{len(only_a)} ids only in {names[0]} ({_shown(only_a)})" if only_a else "")
        side += ("; " if only_a and only_b else "") + (
            f"{len(only_b)} ids only in {names[1]} ({_shown(only_b)})" if only_b else "")
        raise DflError(f"{names[0]} and {names[1]} hold different samples: {side}")
    order[:] = [index_b[k] for k in keys_a]
    for what, a, b in (("labels", first.y, other.y[order]),
                       ("groups", np.asarray(first.groups, object), np.asarray(other.groups, object)[order])):
        bad = [keys_a[i] for i in np.flatnonzero(a != b)]
        if bad:
            raise DflError(f"{names[0]} and {names[1]} disagree on the {what} of {len(bad)} records "
                           f"({_shown(bad)})")


def _check_manifests(manifests: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
    first = manifests[0]
    for manifest, name in zip(manifests[1:], names[1:]):
        if list(manifest["classes"]) != list(first["classes"]):
            raise DflError(f"{names[0]} and {name} disagree on classes: {','.join(first['classes'])} vs "
                           f"{','.join(manifest['classes'])}")
        check_compatible(first, manifest, names[0], name, fields=GEOMETRY_FIELDS)


def _fused_manifest(manifests: Sequence[dict[str, Any]], parts: list[dict[str, Any]], first: EmbeddingSet,
                    shards: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    base = manifests[0]
    offset = 0
    for part in parts:
        part["offset"], offset = offset, offset + int(part["dim"])
    backbone = fused_backbone(parts)
    geometry = dict(base["geometry"]) if "geometry" in base else None
    if geometry is not None and backbone["input_size"] is None:
        geometry["input_size"] = None  # each part has its own (in ``parts``)
    manifest = {
        "format_version": FORMAT_VERSION, "backbone": backbone, "parts": parts, "views": list(base["views"]),
        "dim": offset, "dtype": dtype, "classes": list(base["classes"]),
        "counts": count_by_class(first.y.tolist(), list(base["classes"])), "num_records": len(first),
        "shards": shards, "skipped": list(base.get("skipped", [])),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dfl_tf_version": __version__,
    }
    for key in ("source", "settings"):
        if key in base:
            manifest[key] = base[key]
    if geometry is not None:
        manifest["geometry"] = geometry
    return manifest


def _clear(out: Path) -> None:
    for path in out.glob("shard-*.tfrecord"):
        path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / ".parts", ignore_errors=True)


def fuse_stores(stores: Sequence[str | Path], out: str | Path, overwrite: bool = False,
                shard_size: int = 1024) -> dict[str, Any]:
    """Join embedding stores of the same samples into one store at ``out``; returns its manifest.

    Records are joined on ``id`` (and source, slide, x, y); the fused embedding of a record is the
    concatenation of its embeddings in the order of ``stores``, written in the record order of the
    first store (float16 when every part is float16, else float32: no value changes). Stores that
    disagree on the set of ids, the labels, classes, groups or read geometry are refused, naming the
    first differences.
    """
    names = [str(s) for s in stores]
    if len(names) < 2:
        raise DflError(f"dfl fuse needs at least two embedding stores (got {len(names)})")
    if len(set(map(lambda s: str(Path(s).resolve()), names))) != len(names):
        raise DflError("the same embedding store is given twice; fuse different stores")
    status = prepare_out(out, "embeddings", inputs=names, overwrite=overwrite)
    out = Path(out)
    if status != "new" and not overwrite:
        raise DflError(f"--out {out} already holds an embedding store; pass --overwrite to replace it, or choose "
                       "another --out")
    manifests = [load_manifest(s) for s in names]
    _check_manifests(manifests, names)
    sets = [load_embeddings(s) for s in names]
    _index(sets[0], names[0])
    columns = [sets[0].X]
    for es, name in zip(sets[1:], names[1:]):
        order: list[int] = []
        _check_same_records(sets[0], es, (names[0], name), order)
        columns.append(es.X[order])
    parts = [p for manifest, name in zip(manifests, names) for p in _parts_of(manifest, name)]
    dtype = "float16" if all(m["dtype"] == "float16" for m in manifests) else "float32"
    X = np.concatenate(columns, axis=1).astype(DTYPES[dtype])
    first = sets[0]
    if status != "new":
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(len(first) / shard_size))
    shards = []
    for k in range(n_shards):
        name = f"shard-{k:05d}-of-{n_shards:05d}.tfrecord"
        rows = range(k * shard_size, min(len(first), (k + 1) * shard_size))
        records = (make_example(X[i], int(first.y[i]), first.ids[i], first.sources[i], first.groups[i] or None,
                                first.slides[i] or None, *(first.xy[i] if first.xy[i, 0] >= 0 else (None, None)))
                   for i in rows)
        count, digest = write_shard(out / name, records)
        shards.append({"file": name, "records": count, "sha256": digest})
    manifest = _fused_manifest(manifests, parts, first, shards, dtype)
    atomic_write_json(out / MANIFEST, manifest)  # last: the store is complete once it exists
    return manifest
