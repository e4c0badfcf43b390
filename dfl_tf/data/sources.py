"""Sources: image folders, CSV manifests and slide coordinates, turned into ``Sample`` lists.

* Image folder: one subfolder per class (``root/<class>/<image>``); images directly under
  ``root`` are unlabeled. Classes are the sorted subfolder names.
* CSV manifest: ``path,label[,context_path][,group][,split][,id]``; paths relative to the CSV.
* Slide coordinates CSV: ``slide,x,y[,label][,group][,mpp][,size][,slide_mpp][,split]``; x/y
  are level-0 pixel centres; ``mpp`` and ``size`` are the um/px and side in px to read the x20
  patch at (``dfl tile`` writes the values it tiled with; defaults ``--mpp``/``--patch-size``);
  ``slide_mpp`` is the slide's own level-0 um/px, an override for slides without resolution
  metadata (``--slide-mpp`` for all rows). Both take um/px (``0.5``) or an objective power (``20x``).

Labels become class indices in ``classes`` order; an empty label is -1 (unlabeled).

Hostile inputs: a CSV header that names a column twice is refused, as are two labels that differ
only by case; duplicate ids and a path (or slide position) listed with two labels are warned about
once, with counts. In a folder, a file name that is not valid UTF-8 or a dangling symlink is an
unreadable sample (``Sample.error``; refused, or skipped and recorded with ``--skip-bad``); a class
folder whose name is not valid UTF-8 is refused.
"""
from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dfl_tf.errors import DflError

if TYPE_CHECKING:
    from dfl_tf.data.plan import ReadPlan

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Sample:
    """One sample to embed. ``label`` is a class index, -1 when unlabeled."""

    id: str
    source: str
    label: int = -1
    group: str | None = None
    context: str | None = None
    slide: str | None = None
    x: int | None = None
    y: int | None = None
    slide_mpp: float | None = None
    mpp: float | None = None
    patch_size: int | None = None
    split: str | None = None
    error: str | None = None  # unreadable, known before any read (a name that is not UTF-8, a dangling symlink)


def display_path(path: str | os.PathLike) -> str:
    """``path`` as it can be printed and stored: bytes that are not valid UTF-8 (decoded by Python
    as surrogates) become backslash escapes (``\\xff``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class SampleSet:
    samples: list[Sample]
    classes: list[str]
    kind: str  # "folder", "csv" or "slides"
    root: str

    def fingerprint(self) -> str:
        """sha256 over every sample's fields, in order: identifies the data of an extraction."""
        digest = hashlib.sha256()
        for sample in self.samples:
            fields = asdict(sample)
            if fields["error"] is None:  # as before the field existed: stored fingerprints stay valid
                del fields["error"]
            digest.update(repr(sorted(fields.items())).encode("utf-8", "backslashreplace"))
        digest.update(repr(self.classes).encode())
        return digest.hexdigest()


def load_source(source: str | os.PathLike, split: str | None = None,
                classes: Sequence[str] | None = None) -> SampleSet:
    """Read a folder, image CSV or slide coordinates CSV into samples."""
    path = Path(source)
    if not path.exists():
        raise DflError(f"source not found: {path}")
    path = path.resolve()  # stored paths stay valid from any working directory
    if path.is_dir():
        if split:
            raise DflError(f"--split needs a CSV source with a 'split' column, not the folder {path}")
        result = _from_folder(path, classes)
    else:
        result = _from_csv(path, split, classes)
    if not result.samples:
        raise DflError(f"source {path} holds no samples" + (f" for split '{split}'" if split else ""))
    return result


def _resolve_classes(found: set[str], given: Sequence[str] | None, where: Path) -> list[str]:
    if given is None:
        return sorted(found)
    missing = sorted(found - set(given))
    if missing:
        raise DflError(f"{where}: labels {missing[:5]} are not among the given classes {list(given)}")
    return list(given)


def _from_folder(root: Path, classes: Sequence[str] | None) -> SampleSet:
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in subdirs:  # a class name is stored and served as text
        if not _is_text(name):
            raise DflError(f"class folder name is not valid UTF-8: {display_path(root / name)} (rename it)")
    _check_case(subdirs, root)
    class_list = _resolve_classes(set(subdirs), classes, root)
    index = {c: i for i, c in enumerate(class_list)}
    samples = []
    for file in sorted(root.rglob("*")):
        dangling = file.is_symlink() and not file.exists()
        if not (file.is_file() or dangling) or file.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        label = index[rel.parts[0]] if len(rel.parts) > 1 else -1
        error = None
        if not _is_text(str(file)):  # ids and sources are stored as UTF-8: refused, or skipped with --skip-bad
            error = f"file name is not valid UTF-8: {display_path(file)}"
        elif dangling:
            error = f"image not found: {file} is a dangling symlink (to {display_path(os.readlink(file))})"
        samples.append(Sample(id=display_path(rel.as_posix()), source=display_path(file), label=label, error=error))
    return SampleSet(samples, class_list, "folder", str(root))


def refuse_unreadable(samples: SampleSet, skip_bad: bool) -> None:
    """Without ``skip_bad``, refuse the first sample known unreadable before any read (a file name
    that is not UTF-8, a dangling symlink: ``Sample.error``), before an output is touched."""
    bad = next((s for s in samples.samples if s.error), None)
    if bad is not None and not skip_bad:
        raise DflError(f"{bad.error} (pass --skip-bad to skip unreadable samples)")


def _check_case(labels: Sequence[str], where: Path) -> None:
    """Refuse two labels that differ only by case (a typo, not two classes)."""
    seen: dict[str, str] = {}
    for label in sorted(labels):
        other = seen.setdefault(label.casefold(), label)
        if other != label:
            raise DflError(f"{where}: labels '{other}' and '{label}' differ only by case (one class spelled twice?)")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_rows(path: Path, keys: list[tuple[str, str, str]]) -> None:
    """Warn once each on duplicate ids and on a path listed with two labels; ``keys``: (id, path, label)."""
    ids = Counter(k[0] for k in keys)
    dup_ids = {i: n for i, n in ids.items() if n > 1}
    if dup_ids:
        example = next(iter(dup_ids))
        _warn(f"{path}: ids that appear more than once: {len(dup_ids)} ({sum(dup_ids.values())} rows; e.g. "
              f"'{example}' x{dup_ids[example]})")
    labels: dict[str, set[str]] = {}
    for _, where, label in keys:
        if label:
            labels.setdefault(where, set()).add(label)
    mixed = {p: sorted(v) for p, v in labels.items() if len(v) > 1}
    if mixed:
        example = next(iter(mixed))
        _warn(f"{path}: paths listed with more than one label: {len(mixed)} (e.g. '{example}': "
              f"{', '.join(mixed[example])})")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            twice = sorted({f for f in fields if f and fields.count(f) > 1})
            if twice:  # DictReader would keep the last one silently
                raise DflError(f"{path}: column '{twice[0]}' appears more than once in the header")
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
            return fields, rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DflError(f"{path}: not a readable CSV ({exc})") from exc


def _from_csv(path: Path, split: str | None, classes: Sequence[str] | None) -> SampleSet:
    fields, rows = _read_csv(path)
    if {"slide", "x", "y"} <= set(fields):
        kind = "slides"
    elif "path" in fields:
        kind = "csv"
    else:
        raise DflError(f"{path}: a CSV source needs columns 'path[,label]' or 'slide,x,y' (found {fields})")
    if split is not None:
        if "split" not in fields:
            raise DflError(f"{path}: --split {split} given but the CSV has no 'split' column")
    base = path.parent
    from dfl_tf.data.slides import parse_magnification

    labels = {r.get("label", "") for r in rows} - {""}
    _check_case(sorted(labels), path)
    class_list = _resolve_classes(labels, classes, path)
    index = {c: i for i, c in enumerate(class_list)}
    samples = []
    for line, row in enumerate(rows, start=2):
        if split is not None and row.get("split") != split:
            continue
        label = index[row["label"]] if row.get("label") else -1
        group = row.get("group") or None
        if kind == "csv":
            if not row.get("path"):
                raise DflError(f"{path}:{line}: empty 'path'")
            src = str((base / row["path"]))
            ctx = str(base / row["context_path"]) if row.get("context_path") else None
            samples.append(Sample(id=row.get("id") or row["path"], source=src, label=label,
                                  group=group, context=ctx, split=row.get("split") or None))
        else:
            try:
                x, y = int(round(float(row["x"]))), int(round(float(row["y"])))
                size = int(row["size"]) if row.get("size") else None
            except ValueError as exc:
                raise DflError(f"{path}:{line}: x, y and size must be numbers ({exc})") from exc
            try:  # um/px (0.5) or an objective power (20x), as everywhere
                mpp = parse_magnification(row["mpp"]) if row.get("mpp") else None
                slide_mpp = parse_magnification(row["slide_mpp"]) if row.get("slide_mpp") else None
            except DflError as exc:
                raise DflError(f"{path}:{line}: mpp / slide_mpp: {exc}") from None
            slide = str(base / row["slide"])
            samples.append(Sample(id=row.get("id") or f"{Path(row['slide']).name}@{x},{y}", source=slide,
                                  label=label, group=group or Path(row["slide"]).stem, slide=slide,
                                  x=x, y=y, slide_mpp=slide_mpp, mpp=mpp, patch_size=size,
                                  split=row.get("split") or None))
    where = [s.source if kind == "csv" else f"{s.slide}@{s.x},{s.y}" for s in samples]
    _check_rows(path, [(s.id, w, class_list[s.label] if s.label >= 0 else "") for s, w in zip(samples, where)])
    return SampleSet(samples, class_list, kind, str(path))


def read_image(path: str) -> np.ndarray:
    """Decode an image file to uint8 RGB [h, w, 3] with the shared decoder (see
    :mod:`dfl_tf.data.decode`: the same pixels as the serving signatures); DflError naming the
    file on failure."""
    from dfl_tf.data.decode import read_image as _read

    return _read(path)


@dataclass(frozen=True)
class SlideRead:
    """How slide samples are read: target um/px and patch side in output pixels."""

    mpp: float = 0.5
    patch_size: int = 256
    slide_mpp: float | None = None  # override for slides without mpp metadata

    def __post_init__(self) -> None:
        """Magnifications may be given as um/px or an objective power (``"20x"``)."""
        from dfl_tf.data.slides import parse_magnification

        object.__setattr__(self, "mpp", parse_magnification(self.mpp))
        if self.slide_mpp is not None:
            object.__setattr__(self, "slide_mpp", parse_magnification(self.slide_mpp))


def load_fields(sample: Sample, plan: "ReadPlan", factors: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """The sample's pixels per field (uint8 RGB), keyed by field factor: ``plan.loaded_fields``
    (bound to the source, :meth:`~dfl_tf.data.plan.ReadPlan.bind`). Slides: one tile per field at
    the plan's mpp (or the row's) around the sample's centre. Images: the image as the x20 field,
    its context image as the x5 field, or under the centre-crop rule the image as the widest field.
    ``factors``: other fields to read (e.g. ``plan.serving_fields``)."""
    if sample.error:
        raise DflError(sample.error)
    factors = tuple(factors or plan.loaded_fields)
    if sample.slide is not None:
        from dfl_tf.data.slides import read_fields

        return read_fields(sample.slide, sample.x, sample.y, sample.mpp or plan.mpp,
                           sample.patch_size or plan.patch_size, factors,
                           mpp_override=sample.slide_mpp or plan.slide_mpp)
    image = read_image(sample.source)
    if len(factors) == 2:  # a context image per sample
        if not sample.context:
            raise DflError(f"{sample.id}: no context image (its model needs a context_path per sample)")
        return {factors[0]: image, factors[1]: read_image(sample.context)}
    return {factors[0]: image}


def load_sample(sample: Sample, context: bool, slide_read: SlideRead | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The sample's image and, where it has one, its context (x5) image, as uint8 RGB (the x20/x5
    pair; :func:`load_fields` reads the fields of any read plan)."""
    if sample.error:
        raise DflError(sample.error)
    if sample.slide is not None:
        from dfl_tf.data.slides import read_views

        read = slide_read or SlideRead()
        return read_views(sample.slide, sample.x, sample.y, sample.mpp or read.mpp,
                          sample.patch_size or read.patch_size, context,
                          mpp_override=sample.slide_mpp or read.slide_mpp)
    image = read_image(sample.source)
    ctx = read_image(sample.context) if (context and sample.context) else None
    return image, ctx
