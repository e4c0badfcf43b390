"""Backbone selection: which frozen backbone suits this dataset? (the paper's Table 1 protocol)

For every candidate backbone:

1. extract once into a cache keyed by the backbone fingerprint, the extraction settings (views,
   input size, fit, dtype...) and the data fingerprint (``OUT/cache/<name>-<fp12>-<data12>-<set8>``;
   a rerun reuses it, an interrupted one resumes);
2. split the labeled samples into train/validation, the same split for every backbone: the
   ``split`` column of a CSV source (``train`` / ``val``; other rows, e.g. ``test``, are left out)
   when present, else stratified and grouped by ``group`` when samples have groups (no
   patient/slide in both parts), else stratified; seeded by ``split_seed``;
3. train a linear softmax head (no hidden layer; standardised embeddings, isotropic Gaussian
   feature noise, focal loss, Adam, a fixed number of epochs) once per seed and score it on the
   validation part: balanced accuracy, Cohen's kappa, weighted F1 (mean and std over seeds),
   beside the linear-probe reference (scikit-learn LogisticRegression, :mod:`dfl_tf.heads.probe`);
4. a training-free pre-screen on all labeled records: cross-validated k-NN accuracy and the
   silhouette score of the classes (standardised embeddings, Euclidean);
5. rank by mean balanced accuracy; add a random-init control of the best architecture
   (``weights="none"``), marked ``(random init control)``;
6. write ``table.md``, ``results.csv``, ``results.json`` (atomically), ``maps.png`` and
   ``projector/`` (:mod:`dfl_tf.select.maps`).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dfl_tf.runtime.files import atomic_write_json, atomic_write_text
from dfl_tf.errors import DflError
from dfl_tf.runtime.outputs import clear_out, prepare_out
from dfl_tf.options import SELECT_FIELDS, ExtractOptions, SelectOptions, takes_options
from dfl_tf.options.base import takes_options as takes
from dfl_tf.data.splits import split_samples  # noqa: F401  (public here too)
from dfl_tf.select.report import CSV_FIELDS, _fmt, results_csv, table_markdown  # noqa: F401  (public here too)
from dfl_tf.select.scores import (_summary, linear_probe_score, separability,  # noqa: F401  (public here too)
                                  train_linear_head)

CONTROL_SUFFIX = " (random init control)"
SIDE_FILE = "dfl_select.json"


def _note(message: str, notes: list[str]) -> None:
    notes.append(message)
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# arguments


def parse_backbones(backbones: str | Sequence[str]) -> list[str]:
    if isinstance(backbones, str):
        names = [b.strip() for b in backbones.split(",")]
    else:
        names = [str(b).strip() for b in backbones]
    names = [n for n in names if n]
    if not names:
        raise DflError("no backbones given (e.g. --backbones resnet50,efficientnet_b0)")
    if len(set(names)) != len(names):
        raise DflError(f"a backbone is listed twice: {names}")
    return names


def parse_weights(weights: str | Mapping[str, str] | None, names: Sequence[str]) -> dict[str, str]:
    """Per-backbone weights from one value (``imagenet``), ``name=weights`` pairs or a mapping.

    In a comma-separated string an entry without ``=`` sets the weights of every backbone not
    named in a pair, e.g. ``imagenet,efficientnet_lite0=none``.
    """
    default, pairs = "default", {}
    if weights is None:
        pass
    elif isinstance(weights, Mapping):
        pairs = {str(k): str(v) for k, v in weights.items()}
    else:
        for entry in str(weights).split(","):
            entry = entry.strip()
            if not entry:
                continue
            if "=" in entry:
                key, value = entry.split("=", 1)
                pairs[key.strip()] = value.strip()
            else:
                default = entry
    unknown = sorted(set(pairs) - set(names))
    if unknown:
        raise DflError(f"--weights names {unknown} that are not among the backbones {list(names)}")
    return {n: pairs.get(n, default) for n in names}


# --------------------------------------------------------------------------------------------
# one candidate


def _safe(name: str) -> str:
    base = Path(name).name if os.path.isdir(name) else name
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)
    return keep.strip("._") or "backbone"


def cache_key(bb, views: Sequence[str], data_fingerprint: str, settings: Mapping[str, Any]) -> str:
    """``<name>-<fp12>-<data12>-<settings8>``: one directory per distinct extraction."""
    blob = json.dumps({"views": list(views), "input_size": bb.input_size, **settings}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"{_safe(bb.name)}-{bb.fingerprint[:12]}-{data_fingerprint[:12]}-{digest}"


def _cached(directory: Path, bb, views: Sequence[str], data_fingerprint: str) -> bool:
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (manifest.get("backbone", {}).get("fingerprint") == bb.fingerprint
            and list(manifest.get("views", [])) == list(views)
            and manifest.get("source", {}).get("fingerprint") == data_fingerprint
            and all((directory / s["file"]).exists() for s in manifest.get("shards", [])))


class _Candidate:
    def __init__(self, name: str, weights: str, control: bool = False):
        self.name, self.weights, self.control = name, weights, control
        self.display = f"{name}{CONTROL_SUFFIX}" if control else (
            _safe(name) if os.path.isdir(name) else name)
        self.registry = not os.path.isdir(name)


def _run_candidate(cand: _Candidate, ctx: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    from dfl_tf.heads.metrics import compute_metrics
    from dfl_tf.extraction.core import build_backbone
    from dfl_tf.extraction.local import extract
    from dfl_tf.store.shards import load_embeddings

    t0 = time.time()
    options = ctx["options"].replace(backbone=cand.name, weights=cand.weights)
    bb = build_backbone(options)
    load_s = time.time() - t0
    key = cache_key(bb, ctx["views"], ctx["data_fp"],
                    options.records_settings(exclude=("backbone", "weights", "views", "input_size")))
    directory = ctx["cache"] / key
    side = directory / SIDE_FILE
    cached = _cached(directory, bb, ctx["views"], ctx["data_fp"])
    extract_s = 0.0
    if cached:
        previous = json.loads(side.read_text()) if side.exists() else {}
        original_s = previous.get("extract_seconds")
    else:
        t1 = time.time()
        extract(ctx["dataset"], directory, options=options, model=bb, progress=ctx["progress"],
                classes=ctx["classes"])
        extract_s = time.time() - t1
        original_s = extract_s
        atomic_write_json(side, {"backbone": cand.name, "weights": bb.weights, "fingerprint": bb.fingerprint,
                                 "extract_seconds": round(extract_s, 3), "load_seconds": round(load_s, 3),
                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    describe = bb.describe()
    del bb
    gc.collect()

    emb = load_embeddings(directory)
    position = {sid: i for i, sid in enumerate(emb.ids)}
    tr = np.array([position[i] for i in ctx["train_ids"] if i in position], np.int64)
    va = np.array([position[i] for i in ctx["val_ids"] if i in position], np.int64)
    missing = len(ctx["train_ids"]) + len(ctx["val_ids"]) - len(tr) - len(va)
    if len(tr) == 0 or len(va) == 0:
        raise DflError(f"{cand.display}: no embedded records in the train or validation part")
    classes = emb.classes
    labeled = np.concatenate([tr, va])

    t2 = time.time()
    sep = separability(emb.X[labeled], emb.y[labeled], [emb.groups[i] for i in labeled], k=ctx["knn_k"],
                       seed=ctx["split_seed"])
    knn_s = time.time() - t2

    per_seed: dict[str, list[float]] = {"balanced_accuracy": [], "cohen_kappa": [], "f1_weighted": []}
    t3 = time.time()
    for s in range(int(ctx["seeds"])):
        probs = train_linear_head(emb.X[tr], emb.y[tr], emb.X[va], len(classes), seed=ctx["seed0"] + s,
                                  **ctx["head"])
        m = compute_metrics(emb.y[va], probs, classes)
        for key_ in per_seed:
            per_seed[key_].append(m[key_])
    probe_bacc = linear_probe_score(emb, tr, va, ctx["split_seed"]) if int(ctx["seeds"]) > 0 else None
    train_s = time.time() - t3

    row = {
        "backbone": cand.display,
        "name": describe["name"] if cand.registry else cand.name,
        "weights": describe["weights"],
        "control": cand.control,
        "architecture": cand.name if cand.registry else None,
        "fingerprint": describe["fingerprint"],
        "input_size": describe["input_size"],
        "dim": int(emb.manifest["dim"]),
        "records": {"train": int(len(tr)), "val": int(len(va)), "missing": int(missing)},
        **{k: _summary(v) for k, v in per_seed.items()},
        "probe_balanced_accuracy": probe_bacc,
        **sep,
        "cache": str(directory),
        "cached": cached,
        "load_seconds": round(load_s, 3),
        "extract_seconds": round(extract_s, 3),
        "extract_seconds_original": None if original_s is None else round(float(original_s), 3),
        "train_seconds": round(train_s, 3),
        "knn_seconds": round(knn_s, 3),
    }
    return row, directory


def _rank_key(row: dict[str, Any]) -> tuple:
    def val(x):
        return -1.0 if x is None else float(x)

    return (-val(row["balanced_accuracy"]["mean"]), -val(row.get("knn_balanced_accuracy")),
            -val(row.get("silhouette")))


# --------------------------------------------------------------------------------------------
# public


@takes_options(only=SELECT_FIELDS)
@takes(SelectOptions, param="protocol")
def select_backbones(dataset: str | Path, backbones: str | Sequence[str], out: str | Path, *,
                     options: ExtractOptions | None = None, protocol: SelectOptions,
                     cache_dir: str | Path | None = None, classes: Sequence[str] | None = None,
                     progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Rank frozen ``backbones`` on ``dataset`` with linear heads; write OUT/table.md etc.

    Args:
        dataset: image folder, image CSV or slide coordinates CSV (as for :func:`dfl_tf.extract`).
        backbones: registry names or SavedModel directories (list or comma-separated string).
        out: output directory (``table.md``, ``results.csv``, ``results.json``, ``maps.png``,
            ``projector/``, and ``cache/`` unless ``cache_dir``).
        weights: one weight source for all, ``name=weights`` pairs, or a {name: weights} mapping.
        seeds: linear heads trained per backbone (seeds ``seed`` .. ``seed+seeds-1``); 0 runs only
            the training-free pre-screen (ranked by k-NN balanced accuracy).
        control: True: add a random-init (``weights="none"``) copy of the best registry
            architecture; a registry name: that architecture; False: none.
        epochs, noise, lr, head_batch_size, loss, gamma, alpha: the linear head's training.
        protocol: a :class:`~dfl_tf.options.SelectOptions` holding ``seeds``, ``weights``,
            ``control``, the head's training, ``knn_k`` and the maps' settings, or its fields as
            keyword arguments.
        options: how each candidate is extracted (:class:`~dfl_tf.options.ExtractOptions`, or its
            fields as keyword arguments: views, input_size, fit, batch_size, mpp ...); its
            ``backbone`` and ``weights`` are replaced by each candidate's.
        overwrite: replace the results of an earlier selection in ``out`` (its extraction cache
            is kept; a run that stopped before its results resumes without it). See
            :func:`dfl_tf.runtime.outputs.prepare_out`.
    Returns the content of ``results.json``.
    """
    from dfl_tf.data.sources import load_source

    assert options is not None  # resolved by @takes_options
    p = protocol
    t_start = time.time()
    names = parse_backbones(backbones)
    weight_map = parse_weights(p.weights, names)
    out = Path(out)
    cache = _prepare_out(out, cache_dir, [dataset, *names], overwrite)  # names: SavedModels are inputs too
    samples = load_source(dataset, classes=classes)
    if len(samples.classes) < 2:
        raise DflError(f"{dataset}: selection needs at least 2 classes, found {samples.classes}")
    train_ids, val_ids, split = split_samples(dataset, samples, p.val_fraction, p.split_seed)
    head = {"epochs": int(p.epochs), "lr": float(p.lr), "batch_size": int(p.head_batch_size),
            "noise": float(p.noise or 0.0), "loss": p.loss, "gamma": float(p.gamma), "alpha": float(p.alpha)}
    ctx = {
        "dataset": str(dataset), "views": list(options.views), "cache": cache, "options": options,
        "classes": classes, "data_fp": samples.fingerprint(), "train_ids": train_ids, "val_ids": val_ids,
        "seeds": int(p.seeds), "seed0": int(p.seed), "split_seed": int(p.split_seed), "knn_k": int(p.knn_k),
        "progress": progress, "head": head,
    }
    notes: list[str] = []
    rows, dirs = _run_candidates(names, weight_map, ctx, notes)
    control_row = _run_control(p.control, rows, dirs, ctx, notes)
    result = _result(ctx, samples.classes, split, rows, control_row, notes)
    if p.maps and dirs:
        result["maps"] = _maps(rows, dirs, out, p.map_method, p.max_points, p.split_seed)
    return _write_results(out, result, t_start)


def _maps(rows: list[dict[str, Any]], dirs: dict[str, Path], out: Path, method: str, max_points: int,
          seed: int) -> dict[str, Any]:
    """maps.png and projector/ of every candidate, in rank order (:mod:`dfl_tf.select.maps`)."""
    from dfl_tf.select.maps import embedding_maps

    ordered = {r["backbone"]: dirs[r["backbone"]] for r in rows}
    titles = {r["backbone"]: f"{r['backbone']}\nbal. acc {_fmt(r['balanced_accuracy'])}" for r in rows}
    return embedding_maps(ordered, out, method=method, max_points=max_points, seed=seed, titles=titles)


def _prepare_out(out: Path, cache_dir: str | Path | None, inputs: list[Any], overwrite: bool) -> Path:
    """Check (and on ``overwrite`` clear) ``out``; make it and the extraction cache; the cache's path."""
    if prepare_out(out, "select", inputs, overwrite) == "replace":
        clear_out(out, "select")  # the earlier results and maps; the cache stays
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _run_candidates(names: Sequence[str], weight_map: dict[str, str], ctx: dict[str, Any], notes: list[str]
                    ) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Extract (or reuse) and score every candidate: its rows, ranked, and embedding folders by name."""
    rows, dirs = [], {}
    for name in names:
        cand = _Candidate(name, weight_map[name])
        base, k = cand.display, 1
        while cand.display in dirs:  # two SavedModel folders with the same name
            k += 1
            cand.display = f"{base}_{k}"
        row, directory = _run_candidate(cand, ctx)
        rows.append(row)
        dirs[cand.display] = directory
        if row["records"]["missing"]:
            _note(f"{cand.display}: {row['records']['missing']} samples have no embedding (skipped)", notes)
    if ctx["seeds"] == 0:
        _note("seeds=0: no heads trained; ranked by cross-validated k-NN balanced accuracy", notes)
    rows.sort(key=_rank_key)
    return rows, dirs


def _control_arch(control: bool | str, rows: list[dict[str, Any]], notes: list[str]) -> str | None:
    """The architecture of the random-init control (None: no control)."""
    if isinstance(control, str) and control.strip().lower() in ("false", "no", "0", "none", "off", ""):
        return None
    if not control:
        return None
    if isinstance(control, str) and control.strip().lower() not in ("true", "1", "yes", "auto", "best"):
        return control
    real = [r for r in rows if r["architecture"] and r["weights"] != "none"]
    arch = real[0]["architecture"] if real else None
    if arch is None:
        _note("random init control skipped: no registry architecture with pretrained weights among the "
              "candidates (pass control=NAME to choose one)", notes)
    elif rows[0]["architecture"] != arch:
        _note(f"control: the best candidate is not a registry architecture; using {arch}", notes)
    return arch


def _run_control(control: bool | str, rows: list[dict[str, Any]], dirs: dict[str, Path], ctx: dict[str, Any],
                 notes: list[str]) -> dict[str, Any] | None:
    """Score the random-init control beside the candidates (``rows`` re-ranked, numbered)."""
    control_row = None
    arch = _control_arch(control, rows, notes)
    if arch is not None:
        cand = _Candidate(arch, "none", control=True)
        control_row, directory = _run_candidate(cand, ctx)
        rows.append(control_row)
        dirs[cand.display] = directory
        rows.sort(key=_rank_key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return control_row


def _result(ctx: dict[str, Any], classes: list[str], split: dict[str, Any], rows: list[dict[str, Any]],
            control_row: dict[str, Any] | None, notes: list[str]) -> dict[str, Any]:
    """results.json without maps and timing."""
    head, seeds = ctx["head"], ctx["seeds"]
    real_rows = [r for r in rows if not r["control"]]
    return {
        "dataset": ctx["dataset"],
        "views": ctx["views"],
        "classes": classes,
        "protocol": {"head": "linear softmax (hidden 0)", "loss": head["loss"], "gamma": head["gamma"],
                     "alpha": head["alpha"], "optimizer": "adam", "lr": head["lr"], "epochs": head["epochs"],
                     "batch_size": head["batch_size"], "noise": head["noise"], "seeds": seeds,
                     "seed": ctx["seed0"], "metrics_on": "validation part", "std": "sample std over seeds (ddof=1)",
                     "knn": {"k": ctx["knn_k"], "cv": "stratified (group) k-fold, up to 5 folds, standardised"},
                     "silhouette": "Euclidean on standardised embeddings"},
        "split": split,
        "results": rows,
        "ranking": [r["backbone"] for r in rows],
        "ranked_by": "balanced_accuracy (mean over seeds)" if seeds else "knn_balanced_accuracy",
        "best": real_rows[0]["backbone"] if real_rows else None,
        "control": None if control_row is None else control_row["backbone"],
        "notes": notes,
    }


def _write_results(out: Path, result: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Timing and version into ``result``; table.md, results.csv and results.json written atomically."""
    from dfl_tf import __version__

    result["seconds"] = round(time.time() - t_start, 2)
    result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["dfl_tf_version"] = __version__
    atomic_write_text(out / "table.md", table_markdown(result))
    atomic_write_text(out / "results.csv", results_csv(result["results"]))
    atomic_write_json(out / "results.json", result)
    return result
