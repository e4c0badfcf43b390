"""Train a head on stored embeddings: tf.data pipeline, loss, callbacks, TensorBoard, HEAD_DIR.

HEAD_DIR (written to a temporary directory and renamed at the end):

* ``head.keras``: the model; input = raw ``float32 [dim]`` embedding, output = softmax.
* ``head.json``: classes, views, backbone, dim, standardisation mean/std, training settings,
  best epoch, decision threshold (two-class tasks), seed, dfl_tf version.
* ``history.csv``: one row per epoch.
* ``metrics.json``: validation metrics at the best epoch (:func:`dfl_tf.heads.metrics.compute_metrics`).
* ``probe.npz``: the linear-probe reference (:mod:`dfl_tf.heads.probe`).
* ``logs/``: TensorBoard event files (unless ``logdir`` points elsewhere).

Small training sets get their regularisation chosen first, on the validation set when one is
given, else by cross-validation (:mod:`dfl_tf.heads.tuning`); ``head.json`` records the
method, the choice and the scores.

:func:`train_head` runs in three steps: :func:`plan_training` (the options, validated by
:class:`~dfl_tf.options.TrainOptions`; the stores loaded; the selection decided), the fit
(:func:`choose_settings`: selection on the validation set or by cross-validation and the probe;
:func:`fit_head`: the final fit; :func:`tune_threshold`) and the record (:func:`head_info`,
:func:`write_head`: head.json, metrics, probe, history, written to a temporary folder renamed at
the end).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from dfl_tf.errors import DflError
from dfl_tf.heads.augment import augment_layers, mixup_alpha, resolve_augment
from dfl_tf.heads.callbacks import TensorBoardLogger, ValidationCallback
from dfl_tf.heads.inputs import check_memory, class_weights, history_csv, load_val
from dfl_tf.heads.metrics import best_f1_threshold, compute_metrics, predict_probs
from dfl_tf.heads.model import (HEAD_FILE, HEAD_JSON, build_head, resolve_positive, standardize_values,
                                training_view)
from dfl_tf.heads.reduce import fit_reduction
from dfl_tf.heads.train_data import TrainData
from dfl_tf.heads.tuning import (DEFAULT_HIDDEN, DEFAULT_WEIGHT_DECAY, PROBE_CHOICE, SmallData, grid_candidates,
                                 make_optimizer)
from dfl_tf.options.base import takes_options
from dfl_tf.options.train import LOSSES, MONITORS, TrainOptions  # noqa: F401  (public here too)
from dfl_tf.provenance import check_compatible  # the one shared check (fingerprint, views, geometry)
from dfl_tf.runtime.devices import resolve_strategy
from dfl_tf.runtime.devices import scope as strategy_scope
from dfl_tf.runtime.files import atomic_write_json, atomic_write_text, replace_dir
from dfl_tf.runtime.locks import locks_output
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.store.manifest import load_manifest

HEAD_FORMAT_VERSION = 1


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# plan: validated options, loaded stores, the selection decided


@dataclass
class TrainPlan:
    """What a head is trained from: options, stores, class weights, and the head's settings (the
    given ones, then those :func:`choose_settings` picked)."""

    train: str | Path
    val: str | Path | None
    options: TrainOptions
    manifest: dict[str, Any]
    classes: list[str]
    pos: int
    data: TrainData
    cw: np.ndarray | None
    Xv: np.ndarray | None
    yv: np.ndarray | None
    val_unlabeled: int
    loss_fn: Any
    small: SmallData
    candidates: list[dict[str, Any]]
    hidden: int
    weight_decay: float
    noise: float | None
    specs: list[Any]
    selection: dict[str, Any] = field(default_factory=dict)
    probe_model: Any = None
    probe_info: dict[str, Any] | None = None
    reduction: Any = None  # a fitted dfl_tf.heads.reduce.Reduction (--reduce)


def _manifests(train: str | Path, val: str | Path | None, positive_class: str | None
               ) -> tuple[dict[str, Any], list[str], int]:
    """The training manifest, its classes and the positive class; the validation store checked against it."""
    tm = load_manifest(train)
    classes = list(tm["classes"])
    if len(classes) < 2:
        raise DflError(f"{train}: a head needs at least 2 classes, the manifest has {classes}")
    pos = resolve_positive(classes, positive_class, f"training embeddings {train}")
    if val is not None:
        vm = load_manifest(val)
        check_compatible(tm, vm, f"training embeddings {train}", f"validation embeddings {val}")
        if list(vm["classes"]) != classes:
            raise DflError(f"training embeddings {train} and validation embeddings {val} disagree on classes: "
                           f"{classes} vs {list(vm['classes'])}")
    return tm, classes, pos


def _training_records(train: str | Path, tm: dict[str, Any], classes: list[str], cache_gb: float) -> TrainData:
    """The labeled training records; a class of the manifest without any is refused."""
    data = TrainData(train, tm, cache_gb)
    if data.unlabeled:
        _note(f"{train}: {data.unlabeled} unlabeled records dropped from training")
    if data.num == 0:
        raise DflError(f"{train}: no labeled records to train on")
    if (data.counts == 0).any():  # whatever --select says: a head would never predict that class
        empty = [c for c, n in zip(classes, data.counts) if n == 0]
        counts = ", ".join(f"{c} {int(n)}" for c, n in zip(classes, data.counts))
        raise DflError(f"{train}: class(es) {', '.join(map(repr, empty))} of the manifest have no labeled "
                       f"training records (counts: {counts}); add records of them or re-extract without those classes")
    return data


def _validation_records(val: str | Path | None, o: TrainOptions) -> tuple[Any, Any, int]:
    """(X, y, unlabeled count) of the validation set, or (None, None, 0) without one."""
    if val is None:
        if o.monitor != "val_loss" or o.patience:
            _note("no --val: training for all epochs, no early stopping; metrics.json holds training-set metrics")
        return None, None, 0
    Xv, yv, unlabeled = load_val(val)
    if unlabeled:
        _note(f"{val}: {unlabeled} unlabeled records dropped from validation")
    if len(yv) == 0:
        raise DflError(f"{val}: no labeled records to validate on")
    return Xv, yv, unlabeled


def plan_training(train: str | Path, val: str | Path | None, o: TrainOptions) -> TrainPlan:
    """Check what the options name (augmentations, grid, classes, memory), load the stores and
    decide whether small-data selection runs (:class:`~dfl_tf.heads.tuning.SmallData`)."""
    hidden = DEFAULT_HIDDEN if o.hidden is None else o.hidden
    noise_given = o.noise is not None or any(
        (e if isinstance(e, str) else e.get("name") if isinstance(e, Mapping) else None) == "noise"
        for e in o.augment or [])
    specs = resolve_augment(o.augment, o.noise)
    candidates = grid_candidates(o.cv_grid, fixed={"weight_decay": o.weight_decay is not None, "noise": noise_given,
                                                   "hidden": o.hidden is not None})
    tm, classes, pos = _manifests(train, val, o.positive_class)
    check_memory(int(tm["dim"]), len(classes), hidden, int(o.batch_size))  # before any record is read

    keras.utils.set_random_seed(int(o.seed))
    tf.config.experimental.enable_op_determinism()
    data = _training_records(train, tm, classes, o.cache_gb)
    cw = class_weights(o.class_weight, data.counts, classes)
    Xv, yv, val_unlabeled = _validation_records(val, o)
    loss_fn = (keras.losses.CategoricalFocalCrossentropy(alpha=o.alpha, gamma=o.gamma) if o.loss == "focal"
               else keras.losses.CategoricalCrossentropy())
    small = SmallData(train, data, o.select, o.cv_folds, o.seed, candidates)
    reduction = None
    if o.reduce is not None:  # fitted on the training embeddings; no selection over the reduced head
        reduction = fit_reduction(small.arrays()[0], o.reduce, int(o.seed))
        small.selecting, small.reason = False, "--reduce"
    weight_decay = DEFAULT_WEIGHT_DECAY if o.weight_decay is None else float(o.weight_decay)
    return TrainPlan(train, val, o, tm, classes, pos, data, cw, Xv, yv, val_unlabeled, loss_fn, small, candidates,
                     int(hidden), weight_decay, o.noise, specs, {"performed": False, "reason": small.reason},
                     reduction=reduction)


# --------------------------------------------------------------------------------------------
# fit: selection on the validation set or by cross-validation, the final fit, the threshold


def choose_settings(plan: TrainPlan, progress: bool) -> None:
    """Small data: choose the regularisation (or the linear probe) on ``val``, else by
    cross-validation on the training set; fit the probe reference beside it. Updates ``plan``."""
    o, data = plan.options, plan.data
    if plan.small.selecting:
        plan.selection = plan.small.select(
            plan.candidates, plan.specs, mean=data.mean, std=data.std, X_val=plan.Xv, y_val=plan.yv,
            hidden=plan.hidden, dropout=float(o.dropout), lr=float(o.lr), epochs=int(o.epochs),
            batch_size=int(o.batch_size), loss=o.loss, gamma=float(o.gamma), alpha=float(o.alpha),
            class_weights=plan.cw, weight_decay=plan.weight_decay, progress=progress)
        choice = plan.selection["choice"]
        plan.weight_decay = choice.get("weight_decay", plan.weight_decay)
        plan.hidden = int(choice.get("hidden", plan.hidden))
        if "noise" in choice:
            plan.noise = choice["noise"]
            plan.specs = resolve_augment(plan.specs, plan.noise)
        if choice.get("model") == PROBE_CHOICE:  # the head becomes the probe (linear)
            plan.hidden, plan.noise, plan.specs = 0, 0.0, []
    if o.probe or plan.selection["performed"]:
        plan.probe_model, plan.probe_info = plan.small.probe(data.mean, data.std, plan.Xv, plan.yv)


def steps_per_execution(steps: int, cap: int = 32) -> int:
    """Train steps Keras runs per call of its compiled train function: the largest divisor of the
    epoch's ``steps`` up to ``cap``, so epochs keep their exact length. Fewer Python round trips
    per epoch (about 5 % more embeddings/s per CPU second at batch 256 on 2 cores); batch-level
    callbacks then see one call per ``steps_per_execution`` steps (ours are epoch-level)."""
    return max(d for d in range(1, max(1, min(cap, steps)) + 1) if steps % d == 0)



@dataclass
class Trainer:
    """The head (what is saved), the model fitted (the head after its standardisation, or the
    head itself), the endless training dataset and its steps per epoch."""

    model: keras.Model
    fitted: keras.Model
    dataset: tf.data.Dataset
    steps: int
    replicas: int


def build_trainer(plan: TrainPlan) -> Trainer:
    """Build and compile the head (under a MirroredStrategy over several devices) and its dataset."""
    o, data = plan.options, plan.data
    keras.utils.set_random_seed(int(o.seed))
    strategy = resolve_strategy(o.devices)  # MirroredStrategy over several GPUs (or given devices)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    red = plan.reduction  # with --reduce the head standardises the reduced embedding
    dim, mean, std = (red.dim, red.mean, red.std) if red is not None else (data.dim, data.mean, data.std)
    pre, post = augment_layers(plan.specs, dim, std)
    with strategy_scope(strategy):
        model = build_head(data.dim, len(plan.classes), plan.hidden, o.dropout, mean, std, augment=post,
                           pre_augment=pre, reduce=None if red is None else red.layer())
        # Trained on embeddings standardised once beforehand (not at every step): the part of the head
        # after its standardisation, sharing its layers; the full head when layers precede it.
        view = training_view(model)
        trainer = view if view is not None else model
        trainer.compile(optimizer=make_optimizer(o.lr, plan.weight_decay), loss=plan.loss_fn,
                        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                        # several steps per call fails under MirroredStrategy (Keras 3.13): one there
                        steps_per_execution=steps_per_execution(math.ceil(data.num / int(o.batch_size)))
                        if replicas == 1 else 1)
        if view is not None:  # head.keras keeps the compile config and optimizer state, as before
            model.compile(optimizer=trainer.optimizer, loss=plan.loss_fn,
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    ds, steps = data.dataset(int(o.batch_size), int(o.seed), bool(o.balanced_sampling), plan.cw,
                             mixup_alpha(plan.specs),
                             standardise=None if view is None else standardize_values(data.mean, data.std))
    return Trainer(model, trainer, ds, steps, replicas)


@dataclass
class Fitted:
    """The trained head and what its fit recorded."""

    model: keras.Model
    valcb: ValidationCallback
    history: dict[str, list[float]]
    epochs_run: int
    best_epoch: int
    replicas: int


def fit_head(plan: TrainPlan, log_root: Path, progress: bool,
             callbacks: Sequence[keras.callbacks.Callback] | None = None) -> Fitted:
    """The final fit on the whole training set (early stopping on ``val``), or the probe's weights
    when selection preferred the linear probe."""
    o = plan.options
    t = build_trainer(plan)
    valcb = ValidationCallback(plan.Xv, plan.yv, len(plan.classes), plan.loss_fn, o.monitor,
                               int(o.patience) if plan.val else 0, batch_size=max(int(o.batch_size), 2048),
                               predict_model=t.model)
    if (plan.selection.get("choice") or {}).get("model") == PROBE_CHOICE:
        # selection preferred the probe: a linear head with its weights, no training
        t.model.get_layer("probabilities").set_weights([plan.probe_model.W.T, plan.probe_model.b])
        return Fitted(t.model, valcb, {}, 0, 0, t.replicas)
    history = t.fitted.fit(t.dataset, epochs=int(o.epochs), steps_per_epoch=t.steps,
                           callbacks=[valcb, TensorBoardLogger(log_root, o.histogram_freq), *(callbacks or [])],
                           verbose=2 if progress else 0, shuffle=False)
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    epochs_run = len(next(iter(hist.values()))) if hist else 0
    best_epoch = valcb.best_epoch if plan.val is not None else epochs_run
    return Fitted(t.model, valcb, hist, epochs_run, best_epoch, t.replicas)


def tune_threshold(plan: TrainPlan, fitted: Fitted) -> tuple[float | None, str | None, dict[str, Any]]:
    """(threshold, how it was chosen, metrics): two-class tasks get the max-F1 threshold of the
    positive class on ``val`` (0.5 without one); metrics on ``val``, else on the training set."""
    classes, pos = plan.classes, plan.pos
    if plan.val is not None:
        probs, y_eval, split = predict_probs(fitted.model, plan.Xv), plan.yv, "validation"
    else:
        X_train, y_train = plan.small.arrays()
        probs, y_eval, split = predict_probs(fitted.model, X_train), y_train, "train"
    threshold, threshold_from = None, None
    if len(classes) == 2:
        if plan.val is None:  # never tuned on the training data
            threshold, threshold_from = 0.5, "not tuned (no validation set): 0.5"
        else:
            threshold = best_f1_threshold(y_eval == pos, probs[:, pos])
            threshold_from = f"max F1 of '{classes[pos]}' on validation"
            if threshold is None:
                threshold, threshold_from = 0.5, "not tuned (F1 undefined: one class only in validation): 0.5"
    metrics = compute_metrics(y_eval, probs, classes, threshold, positive=pos)
    return threshold, threshold_from, {"split": split, "best_epoch": fitted.best_epoch, **metrics}


# --------------------------------------------------------------------------------------------
# record: head.json, metrics, probe, history, written atomically


def _settings(plan: TrainPlan, fitted: Fitted) -> dict[str, Any]:
    """head.json's ``settings``: the options as used (after selection) and how the run went."""
    o = plan.options
    return {"hidden": int(plan.hidden), "dropout": float(o.dropout), "noise": plan.noise, "augment": plan.specs,
            "weight_decay": float(plan.weight_decay), "select": o.select, "cv_folds": int(o.cv_folds),
            "loss": o.loss, "gamma": float(o.gamma), "alpha": float(o.alpha), "epochs": int(o.epochs),
            "lr": float(o.lr), "batch_size": int(o.batch_size), "seed": int(o.seed), "patience": int(o.patience),
            "monitor": o.monitor, "class_weight": o.class_weight if not isinstance(o.class_weight, Mapping)
            else dict(o.class_weight), "class_weights": None if plan.cw is None else plan.cw.tolist(),
            "balanced_sampling": bool(o.balanced_sampling), "histogram_freq": o.histogram_freq,
            "cache_gb": o.cache_gb, "in_memory": plan.data.in_memory, "replicas": fitted.replicas}


def _store_info(path: str | Path, classes: list[str], y: np.ndarray, unlabeled: int) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "records": int(len(y)), "unlabeled_dropped": unlabeled,
            "counts": {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)))}}


def head_info(plan: TrainPlan, fitted: Fitted, threshold: float | None, threshold_from: str | None,
              logdir: str | Path | None) -> dict[str, Any]:
    """head.json: what the head needs to be served and what its training decided."""
    from dfl_tf import __version__

    o, tm, classes, data, valcb = plan.options, plan.manifest, plan.classes, plan.data, fitted.valcb
    two = len(classes) == 2
    return {
        "format_version": HEAD_FORMAT_VERSION, "classes": classes, "n_classes": len(classes),
        "positive_class": classes[plan.pos] if two else None,
        "positive_class_chosen_by": (None if not two else "given" if o.positive_class is not None
                                     else "default (second class in manifest order)"),
        "views": list(tm["views"]), "backbone": dict(tm["backbone"]), "dim": int(tm["dim"]),
        "extraction": {k: tm[k] for k in ("dtype", "settings", "geometry") if k in tm},
        "standardisation": {"mean": data.mean.tolist(), "std": data.std.tolist()},
        "settings": _settings(plan, fitted), "seed": int(o.seed),
        "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run,
        "stopped_early": valcb.stopped_epoch is not None, "best_value": valcb.best,
        "threshold": threshold, "threshold_chosen_by": threshold_from,
        "threshold_tuned": None if threshold is None else plan.val is not None and threshold_from.startswith("max"),
        "monitor": valcb.monitor if plan.val is not None else None, "monitor_fallback": valcb.fallback,
        "selection": plan.selection, "linear_probe": plan.probe_info if o.probe else None,
        "train": {"path": str(Path(plan.train).resolve()), "records": data.num, "unlabeled_dropped": data.unlabeled,
                  "counts": {c: int(n) for c, n in zip(classes, data.counts)}},
        "val": None if plan.val is None else _store_info(plan.val, classes, plan.yv, plan.val_unlabeled),
        "logdir": str(Path(logdir)) if logdir else "logs",
        **({"reduce": plan.reduction.info} if plan.reduction is not None else {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dfl_tf_version": __version__,
    }


def write_head(tmp: Path, plan: TrainPlan, fitted: Fitted, info: dict[str, Any], metrics: dict[str, Any]) -> None:
    """head.keras, probe.npz, head.json, history.csv and metrics.json into the folder ``tmp``."""
    fitted.model.save(tmp / HEAD_FILE)
    if plan.probe_model is not None and plan.options.probe:
        plan.probe_model.save(tmp)
    atomic_write_json(tmp / HEAD_JSON, info)
    atomic_write_text(tmp / "history.csv", history_csv(fitted.history))
    atomic_write_json(tmp / "metrics.json", metrics)


# --------------------------------------------------------------------------------------------
# train_head


@takes_options(TrainOptions)
@locks_output("train", inside=False,  # HEAD_DIR is replaced whole: lock beside it
              prepare=lambda a: prepare_out(a["out"], "head", (a["train"], a["val"]), a["overwrite"]))
def train_head(train: str | Path, out: str | Path, val: str | Path | None = None, *, options: TrainOptions,
               logdir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
               callbacks: Sequence[keras.callbacks.Callback] | None = None) -> dict[str, Any]:
    """Train a softmax head on the embedding directory ``train``; write HEAD_DIR ``out``.

    ``options``: a :class:`~dfl_tf.options.TrainOptions`, or its fields as keyword arguments
    (``hidden=``, ``epochs=``...; a keyword wins over ``options``).

    ``noise``: std of the isotropic Gaussian feature noise (None: the ``noise`` entry of
    ``augment``, else 0.1; 0 disables it). ``augment``: list of augmentations, e.g.
    ``[{"name": "noise", "std": 0.1}, {"name": "mixup", "alpha": 0.2}]`` (see
    :mod:`dfl_tf.heads.augment`). ``loss``: ``focal`` (CategoricalFocalCrossentropy(alpha,
    gamma)) or ``crossentropy``. ``weight_decay``: AdamW's decoupled weight decay on the
    kernels (0: Adam; None: 1e-4 or chosen by selection). ``select``: ``auto`` chooses
    ``hidden``, ``weight_decay`` and the noise std (those not given) over ``cv_grid``, and whether
    the linear probe replaces the head, when the training set is small (< 2,000 records or < 50
    in a class): with ``val``, each candidate is fitted on the training set and scored on ``val``;
    without, by ``cv_folds``-fold cross-validation on the training set (stratified, grouped by
    ``group``); then the head is trained on all of it (``head.json``'s ``selection`` records the
    method and the scores); ``always`` / ``never`` force it. Numeric options outside their range
    (:data:`dfl_tf.options.train.TRAIN_RANGES`), a head too large for the available memory and a
    class without training records are refused. ``probe``: also fit the linear-probe
    reference (``probe.npz``). ``positive_class``: the positive class of a two-class task (the
    threshold, PR curve and GeoJSON class; default: the second class in manifest order); the
    threshold is tuned for F1 on ``val`` and stays 0.5 without it. Early stopping on ``monitor``
    (computed on ``val`` at each epoch end; patience 0 disables stopping; a metric undefined on
    ``val`` falls back to ``val_loss`` with a warning) restores the best weights. ``class_weight``:
    None, ``"balanced"`` or {class: weight}; ``balanced_sampling`` draws classes uniformly.
    Training records are kept in memory when they take at most ``cache_gb`` GB in their
    storage dtype, else streamed from the shards. ``callbacks``: extra Keras callbacks
    (Python API only); their ``self.model`` is the model being fitted, which (without
    ``scaled-noise``) is the head after its standardisation layer, sharing the head's layers and
    taking standardised embeddings (:func:`dfl_tf.heads.model.training_view`). ``devices``: train
    under ``tf.distribute.MirroredStrategy`` (see
    :mod:`dfl_tf.runtime.devices`; default: all GPUs when more than one is visible); the batch is
    the global batch, split across replicas. ``overwrite``: replace an earlier head directory at
    ``out`` (never an input, nor a folder holding other files; see
    :func:`dfl_tf.runtime.outputs.prepare_out`). ``slide_labels``: train a slide head instead
    (:func:`dfl_tf.heads.slide.train.train_slide_head`: ``aggregator``, ``max_instances``,
    ``bags_per_step``). Returns a summary dict.
    """
    if options.slide_labels is not None:  # a slide head on bags (dfl_tf.heads.slide)
        from dfl_tf.heads.slide.train import train_slide_head

        return train_slide_head(train, out, val, options, progress=progress)
    t0 = time.time()
    out = Path(out)  # checked by prepare_out (locks_output above): not an input, a head directory or new
    plan = plan_training(train, val, options)
    choose_settings(plan, progress)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fitted = fit_head(plan, Path(logdir) if logdir else tmp / "logs", progress, callbacks)
        threshold, threshold_from, metrics = tune_threshold(plan, fitted)
        info = head_info(plan, fitted, threshold, threshold_from, logdir)
        write_head(tmp, plan, fitted, info, metrics)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out), "classes": plan.classes, "best_epoch": fitted.best_epoch, "epochs_run": fitted.epochs_run,
        "monitor": options.monitor, "best_value": fitted.valcb.best, "threshold": threshold, "metrics": metrics,
        "train_records": plan.data.num, "val_records": None if plan.yv is None else int(len(plan.yv)),
        "replicas": fitted.replicas, "selection": info["selection"], "linear_probe": info["linear_probe"],
        "seconds": round(time.time() - t0, 2),
    }
