"""Bags of stored embeddings and their slide labels.

A bag is the set of records sharing a ``slide`` (slide sources) or, for records without one, a
``group`` (image sources: pre-tiled datasets keep one group per slide). Slide labels come from a
CSV ``slide,label[,patient][,split]`` whose ``slide`` matches a bag's slide path, its file stem or
its group.

Memory: :func:`load_bags` reads the shards once, as a stream of record batches (the store's
``record_dataset``), and spools each embedding to a disk-backed ``numpy.memmap`` (float16 or
float32, as stored) in a temporary folder, keeping in RAM only the per-record bag index and
metadata (id, x, y). A bag is then read from the memmap by its row indices, so what training holds
in memory is one step's bags (``bags_per_step x max_instances x dim``), not the store; the memmap's
pages are the operating system's cache and are dropped under pressure.
"""
from __future__ import annotations

import csv
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.store.manifest import load_manifest
from dfl_tf.store.shards import record_dataset

LABEL_COLUMNS = ("slide", "label")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass
class SlideLabels:
    """The rows of a slide label CSV: slide -> label (and patient, split where given)."""

    path: str
    labels: dict[str, str]
    patients: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.values()))


def read_slide_labels(path: str | Path) -> SlideLabels:
    """Read ``slide,label[,patient][,split]``; refuses a missing column, an empty file, or a slide
    listed with two labels (naming the file and the slide)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise DflError(f"{path}: cannot read slide labels ({exc})") from None
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        raise DflError(f"{path}: slide label CSV needs columns slide,label[,patient][,split]; "
                       f"missing {', '.join(missing)} (header: {','.join(header) or 'none'})")
    out = SlideLabels(str(path), {})
    for n, row in enumerate(rows, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        slide, label = row["slide"], row["label"]
        if not slide or not label:
            raise DflError(f"{path}: line {n}: empty slide or label")
        if out.labels.get(slide, label) != label:
            raise DflError(f"{path}: slide '{slide}' is listed with two labels "
                           f"('{out.labels[slide]}', '{label}')")
        out.labels[slide] = label
        if row.get("patient"):
            out.patients[slide] = row["patient"]
        if row.get("split"):
            out.splits[slide] = row["split"]
    if not out.labels:
        raise DflError(f"{path}: no slide labels")
    if len(out.classes) < 2:
        raise DflError(f"{path}: a slide head needs at least 2 classes, the labels hold {out.classes}")
    return out


def bag_key(slide: str, group: str) -> str:
    """The bag of a record: its slide, else its group ('' when it has neither)."""
    return slide or group


def match_label(labels: SlideLabels, slide: str, group: str) -> str | None:
    """The CSV key that labels a bag: its slide path, file stem or name, or its group."""
    candidates = [slide, PurePosixPath(slide).name, PurePosixPath(slide).stem] if slide else []
    candidates.append(group)
    return next((c for c in candidates if c and c in labels.labels), None)


@dataclass
class Bags:
    """The labeled bags of one store: row indices into a disk-backed embedding memmap."""

    store: str
    names: list[str]            # bag key (slide path or group)
    label_keys: list[str]       # the CSV slide value that matched
    y: np.ndarray               # int64 [B], index into ``classes``
    rows: list[np.ndarray]      # int64 row indices per bag
    ids: np.ndarray             # object [N]
    xy: np.ndarray              # int64 [N, 2]
    emb: np.ndarray             # memmap [N, dim]
    classes: list[str]
    manifest: dict[str, Any]
    left_out: dict[str, int]
    spool: Any = None           # the TemporaryDirectory holding the memmap

    def __len__(self) -> int:
        return len(self.names)

    def bag(self, i: int, subset: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of bag ``i`` (float32 [n, dim]); ``subset``: positions within the bag."""
        rows = self.rows[i] if subset is None else self.rows[i][np.sort(subset)]
        return np.asarray(self.emb[rows], np.float32)

    def mean_pooled(self) -> np.ndarray:
        """Mean embedding per bag (float32 [B, dim]), read one bag at a time."""
        return np.stack([self.bag(i).mean(axis=0) for i in range(len(self))]) if len(self) else \
            np.zeros((0, int(self.manifest["dim"])), np.float32)


def _spool(emb_dir: str | Path, manifest: dict[str, Any], tmp: str) -> tuple[np.ndarray, list, list, list, list]:
    """One pass over the shards: embeddings into a memmap, metadata kept as lists."""
    n, dim = int(manifest["num_records"]), int(manifest["dim"])
    dtype = np.float16 if manifest["dtype"] == "float16" else np.float32
    emb = np.lib.format.open_memmap(Path(tmp) / "embeddings.npy", mode="w+", dtype=dtype, shape=(max(n, 1), dim))
    slides, groups, ids, xy = [], [], [], []
    at = 0
    for batch in record_dataset(emb_dir, batch_size=1024, with_meta=True, manifest=manifest):
        e = batch["embedding"].numpy()
        if at + len(e) > len(emb):
            raise DflError(f"{emb_dir}: shards hold more records than the manifest's num_records ({n})")
        emb[at:at + len(e)] = e.astype(dtype)
        at += len(e)
        slides += [s.decode("utf-8") for s in batch["slide"].numpy()]
        groups += [g.decode("utf-8") for g in batch["group"].numpy()]
        ids += [i.decode("utf-8") for i in batch["id"].numpy()]
        xy.append(np.stack([batch["x"].numpy(), batch["y"].numpy()], axis=1))
    xy_arr = np.concatenate(xy) if xy else np.zeros((0, 2), np.int64)
    return emb, slides, groups, ids, xy_arr


def load_bags(emb_dir: str | Path, labels: SlideLabels, classes: list[str] | None = None,
              role: str = "training") -> Bags:
    """The labeled bags of ``emb_dir``. Records without a slide or group, and bags without a label,
    are left out (a note with the counts); a store none of whose bags matches a label is refused,
    naming a few bag ids and label ids. ``classes``: the class order (default: the labels')."""
    manifest = load_manifest(emb_dir)
    classes = list(classes or labels.classes)
    spool = tempfile.TemporaryDirectory(prefix="dfl-bags-")
    emb, slides, groups, ids, xy = _spool(emb_dir, manifest, spool.name)
    members: dict[str, list[int]] = {}
    match: dict[str, str | None] = {}
    no_key = 0
    for r, (s, g) in enumerate(zip(slides, groups)):
        key = bag_key(s, g)
        if not key:
            no_key += 1
            continue
        if key not in match:
            match[key] = match_label(labels, s, g)
        members.setdefault(key, []).append(r)
    names = [k for k in members if match[k] is not None and labels.labels[match[k]] in classes]
    if not names:
        ours = ", ".join(sorted(members)[:3]) or "none (records have no slide or group)"
        theirs = ", ".join(sorted(labels.labels)[:3])
        raise DflError(f"{emb_dir}: none of its {len(members)} slides matches a slide of {labels.path} "
                       f"(store slides: {ours}; label slides: {theirs}); 'slide' must be the slide path, "
                       f"its file stem or the group")
    unlabeled = [k for k in members if k not in names]
    left_out = {"records_without_slide_or_group": no_key, "slides_without_label": len(unlabeled),
                "records_of_slides_without_label": sum(len(members[k]) for k in unlabeled)}
    if no_key or unlabeled:
        _note(f"{emb_dir}: {len(unlabeled)} slides without a label ({left_out['records_of_slides_without_label']} "
              f"records) and {no_key} records without slide or group left out of {role}")
    y = np.array([classes.index(labels.labels[match[k]]) for k in names], np.int64)
    return Bags(str(emb_dir), names, [match[k] for k in names], y,
                [np.asarray(members[k], np.int64) for k in names], np.asarray(ids, object), xy, emb, classes,
                manifest, left_out, spool)
