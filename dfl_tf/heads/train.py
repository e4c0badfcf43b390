"""Train a head on stored embeddings: tf.data pipeline, loss, callbacks, TensorBoard, HEAD_DIR.

HEAD_DIR (written to a temporary directory and renamed at the end):

* ``head.keras``: the model; input = raw ``float32 [dim]`` embedding, output = softmax.
* ``head.json``: classes, views, backbone, dim, standardisation mean/std, training settings,
  best epoch, decision threshold (two-class tasks), seed, dfl_tf version.
* ``history.csv``: one row per epoch.
* ``metrics.json``: validation metrics at the best epoch (:func:`dfl_tf.heads.evaluate.compute_metrics`).
* ``probe.npz``: the linear-probe reference (:mod:`dfl_tf.heads.probe`).

Small training sets get their regularisation chosen first, on the validation set when one is
given, else by cross-validation (:mod:`dfl_tf.heads.tuning`); ``head.json`` records the
method, the choice and the scores.
* ``logs/``: TensorBoard event files (unless ``logdir`` points elsewhere).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from dfl_tf.runtime.files import atomic_write_json, atomic_write_text, replace_dir
from dfl_tf.runtime.locks import locks_output
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.provenance import check_compatible  # the one shared check (fingerprint, views, geometry)
from dfl_tf.runtime.devices import resolve_strategy
from dfl_tf.runtime.devices import scope as strategy_scope
from dfl_tf.errors import DflError
from dfl_tf.heads.evaluate import best_f1_threshold, compute_metrics, predict_probs
from dfl_tf.heads.augment import augment_layers, mixup_alpha, mixup_batch, resolve_augment
from dfl_tf.heads.inputs import (check_memory, check_ranges, class_weights, history_csv, index_batches,
                                 load_val, refuse_non_finite)
from dfl_tf.heads.callbacks import TensorBoardLogger, ValidationCallback
from dfl_tf.heads.model import (HEAD_FILE, HEAD_JSON, build_head, resolve_positive, safe_std, standardisation,
                                 standardize_values, training_view)
from dfl_tf.heads.tuning import (DEFAULT_FOLDS, DEFAULT_HIDDEN, DEFAULT_WEIGHT_DECAY, PROBE_CHOICE,
                                       SELECT_MODES, SmallData, grid_candidates, make_optimizer)
from dfl_tf.store.manifest import load_manifest
from dfl_tf.store.shards import DTYPES, record_dataset

LOSSES = ("focal", "crossentropy")
MONITORS = ("val_balanced_accuracy", "val_loss", "val_accuracy", "val_f1_macro", "val_cohen_kappa",
            "val_roc_auc", "val_pr_auc")
HEAD_FORMAT_VERSION = 1


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# data


class _TrainData:
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



# --------------------------------------------------------------------------------------------
# train_head


def steps_per_execution(steps: int, cap: int = 32) -> int:
    """Train steps Keras runs per call of its compiled train function: the largest divisor of the
    epoch's ``steps`` up to ``cap``, so epochs keep their exact length. Fewer Python round trips
    per epoch (about 5 % more embeddings/s per CPU second at batch 256 on 2 cores); batch-level
    callbacks then see one call per ``steps_per_execution`` steps (ours are epoch-level)."""
    return max(d for d in range(1, max(1, min(cap, steps)) + 1) if steps % d == 0)


@locks_output("train", inside=False,  # HEAD_DIR is replaced whole: lock beside it
              prepare=lambda a: prepare_out(a["out"], "head", (a["train"], a["val"]), a["overwrite"]))
def train_head(
    train: str | Path,
    out: str | Path,
    val: str | Path | None = None,
    hidden: int | None = None,
    dropout: float = 0.0,
    noise: float | None = None,
    augment: Sequence[Any] | None = None,
    weight_decay: float | None = None,
    positive_class: str | None = None,
    select: str = "auto",
    cv_folds: int = DEFAULT_FOLDS,
    cv_grid: Mapping[str, Sequence[float]] | None = None,
    probe: bool = True,
    loss: str = "focal",
    gamma: float = 2.0,
    alpha: float = 0.25,
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    patience: int = 10,
    monitor: str = "val_balanced_accuracy",
    class_weight: str | Mapping[str, float] | None = None,
    balanced_sampling: bool = False,
    logdir: str | Path | None = None,
    histogram_freq: int = 1,
    cache_gb: float = 2.0,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    devices: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train a softmax head on the embedding directory ``train``; write HEAD_DIR ``out``.

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
    (:data:`dfl_tf.heads.inputs.TRAIN_RANGES`), a head too large for the available memory and a
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
    :func:`dfl_tf.runtime.outputs.prepare_out`). Returns a summary dict.
    """
    t0 = time.time()
    out = Path(out)  # checked by prepare_out (locks_output above): not an input, a head directory or new
    if loss in ("ce", "categorical_crossentropy", "cross-entropy"):
        loss = "crossentropy"
    if loss not in LOSSES:
        raise DflError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if monitor not in MONITORS:
        raise DflError(f"monitor must be one of {', '.join(MONITORS)}, got {monitor!r}")
    hidden_given, hidden = hidden is not None, DEFAULT_HIDDEN if hidden is None else hidden
    check_ranges(epochs=epochs, batch_size=batch_size, hidden=hidden, patience=patience, cv_folds=cv_folds,
                 dropout=dropout, noise=noise, weight_decay=weight_decay, lr=lr, gamma=gamma, alpha=alpha)
    if select not in SELECT_MODES:
        raise DflError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    noise_given = noise is not None or any(
        (e if isinstance(e, str) else e.get("name") if isinstance(e, Mapping) else None) == "noise"
        for e in augment or [])
    specs = resolve_augment(augment, noise)
    candidates = grid_candidates(cv_grid, fixed={"weight_decay": weight_decay is not None, "noise": noise_given,
                                                 "hidden": hidden_given})

    tm = load_manifest(train)
    classes = list(tm["classes"])
    if len(classes) < 2:
        raise DflError(f"{train}: a head needs at least 2 classes, the manifest has {classes}")
    pos = resolve_positive(classes, positive_class, f"training embeddings {train}")
    vm = None
    if val is not None:
        vm = load_manifest(val)
        check_compatible(tm, vm, f"training embeddings {train}", f"validation embeddings {val}")
        if list(vm["classes"]) != classes:
            raise DflError(f"training embeddings {train} and validation embeddings {val} disagree on classes: "
                           f"{classes} vs {list(vm['classes'])}")

    check_memory(int(tm["dim"]), len(classes), hidden, int(batch_size))  # before any record is read

    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()

    data = _TrainData(train, tm, cache_gb)
    if data.unlabeled:
        _note(f"{train}: {data.unlabeled} unlabeled records dropped from training")
    if data.num == 0:
        raise DflError(f"{train}: no labeled records to train on")
    if (data.counts == 0).any():  # whatever --select says: a head would never predict that class
        empty = [c for c, n in zip(classes, data.counts) if n == 0]
        raise DflError(f"{train}: class(es) {', '.join(map(repr, empty))} of the manifest have no labeled "
                       f"training records (counts: {', '.join(f'{c} {int(n)}' for c, n in zip(classes, data.counts))}); "
                       "add records of them or re-extract without those classes")
    cw = class_weights(class_weight, data.counts, classes)
    Xv = yv = None
    val_unlabeled = 0
    if val is not None:
        Xv, yv, val_unlabeled = load_val(val)
        if val_unlabeled:
            _note(f"{val}: {val_unlabeled} unlabeled records dropped from validation")
        if len(yv) == 0:
            raise DflError(f"{val}: no labeled records to validate on")
    elif monitor != "val_loss" or patience:
        _note("no --val: training for all epochs, no early stopping; metrics.json holds training-set metrics")

    loss_fn = (keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma) if loss == "focal"
               else keras.losses.CategoricalCrossentropy())
    # Small data: regularisation chosen on --val, else by cross-validation on the training set; the probe beside it.
    small = SmallData(train, data, select, cv_folds, seed, candidates)
    weight_decay = DEFAULT_WEIGHT_DECAY if weight_decay is None else float(weight_decay)
    selection: dict[str, Any] = {"performed": False, "reason": small.reason}
    if small.selecting:
        selection = small.select(candidates, specs, mean=data.mean, std=data.std, X_val=Xv, y_val=yv,
                                 hidden=int(hidden),
                                 dropout=float(dropout), lr=float(lr),
                                 epochs=int(epochs), batch_size=int(batch_size), loss=loss, gamma=float(gamma),
                                 alpha=float(alpha), class_weights=cw, weight_decay=weight_decay,
                                 progress=progress)
        weight_decay = selection["choice"].get("weight_decay", weight_decay)
        hidden = int(selection["choice"].get("hidden", hidden))
        if "noise" in selection["choice"]:
            noise = selection["choice"]["noise"]
            specs = resolve_augment(specs, noise)
        if selection["choice"].get("model") == PROBE_CHOICE:  # the head becomes the probe (linear)
            hidden, noise, specs = 0, 0.0, []
    probe_model, probe_info = (small.probe(data.mean, data.std, Xv, yv) if probe or selection["performed"]
                               else (None, None))

    keras.utils.set_random_seed(int(seed))
    strategy = resolve_strategy(devices)  # MirroredStrategy over several GPUs (or given devices)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    pre, post = augment_layers(specs, data.dim, data.std)
    with strategy_scope(strategy):
        model = build_head(data.dim, len(classes), hidden, dropout, data.mean, data.std, augment=post,
                           pre_augment=pre)
        # Trained on embeddings standardised once beforehand (not at every step): the part of the head
        # after its standardisation, sharing its layers; the full head when layers precede it.
        view = training_view(model)
        trainer = view if view is not None else model
        trainer.compile(optimizer=make_optimizer(lr, weight_decay), loss=loss_fn,
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                      # several steps per call fails under MirroredStrategy (Keras 3.13): one there
                      steps_per_execution=steps_per_execution(math.ceil(data.num / int(batch_size)))
                      if replicas == 1 else 1)
        if view is not None:  # head.keras keeps the compile config and optimizer state, as before
            model.compile(optimizer=trainer.optimizer, loss=loss_fn,
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    ds, steps = data.dataset(int(batch_size), int(seed), bool(balanced_sampling), cw, mixup_alpha(specs),
                             standardise=None if view is None else standardize_values(data.mean, data.std))

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        log_root = Path(logdir) if logdir else tmp / "logs"
        valcb = ValidationCallback(Xv, yv, len(classes), loss_fn, monitor, int(patience) if val else 0,
                                   batch_size=max(int(batch_size), 2048), predict_model=model)
        if (selection.get("choice") or {}).get("model") == PROBE_CHOICE:
            # selection preferred the probe: a linear head with its weights, no training
            model.get_layer("probabilities").set_weights([probe_model.W.T, probe_model.b])
            hist, epochs_run, best_epoch = {}, 0, 0
        else:
            history = trainer.fit(ds, epochs=int(epochs), steps_per_epoch=steps,
                                callbacks=[valcb, TensorBoardLogger(log_root, histogram_freq), *(callbacks or [])],
                                verbose=2 if progress else 0, shuffle=False)
            hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
            epochs_run = len(next(iter(hist.values()))) if hist else 0
            best_epoch = valcb.best_epoch if val is not None else epochs_run

        threshold, threshold_from = None, None
        if val is not None:
            probs, y_eval, split = predict_probs(model, Xv), yv, "validation"
        else:
            X_train, y_train = small.arrays()
            probs, y_eval, split = predict_probs(model, X_train), y_train, "train"
        if len(classes) == 2:
            if val is None:  # never tuned on the training data
                threshold, threshold_from = 0.5, "not tuned (no validation set): 0.5"
            else:
                threshold = best_f1_threshold(y_eval == pos, probs[:, pos])
                threshold_from = f"max F1 of '{classes[pos]}' on validation"
                if threshold is None:
                    threshold, threshold_from = 0.5, "not tuned (F1 undefined: one class only in validation): 0.5"
        metrics = compute_metrics(y_eval, probs, classes, threshold, positive=pos)
        metrics = {"split": split, "best_epoch": best_epoch, **metrics}

        settings = {"hidden": int(hidden), "dropout": float(dropout), "noise": noise, "augment": specs,
                    "weight_decay": float(weight_decay), "select": select, "cv_folds": int(cv_folds),
                    "loss": loss, "gamma": float(gamma), "alpha": float(alpha), "epochs": int(epochs),
                    "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed), "patience": int(patience),
                    "monitor": monitor, "class_weight": class_weight if not isinstance(class_weight, Mapping)
                    else dict(class_weight), "class_weights": None if cw is None else cw.tolist(),
                    "balanced_sampling": bool(balanced_sampling), "histogram_freq": histogram_freq,
                    "cache_gb": cache_gb, "in_memory": data.in_memory, "replicas": replicas}
        from dfl_tf import __version__

        info = {
            "format_version": HEAD_FORMAT_VERSION,
            "classes": classes,
            "n_classes": len(classes),
            "positive_class": classes[pos] if len(classes) == 2 else None,
            "positive_class_chosen_by": (None if len(classes) != 2 else "given" if positive_class is not None
                                         else "default (second class in manifest order)"),
            "views": list(tm["views"]),
            "backbone": dict(tm["backbone"]),
            "dim": int(tm["dim"]),
            "extraction": {k: tm[k] for k in ("dtype", "settings", "geometry") if k in tm},
            "standardisation": {"mean": data.mean.tolist(), "std": data.std.tolist()},
            "settings": settings,
            "seed": int(seed),
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "stopped_early": valcb.stopped_epoch is not None,
            "best_value": valcb.best,
            "threshold": threshold,
            "threshold_chosen_by": threshold_from,
            "threshold_tuned": None if threshold is None else val is not None and threshold_from.startswith("max"),
            "monitor": valcb.monitor if val is not None else None,
            "monitor_fallback": valcb.fallback,
            "selection": selection,
            "linear_probe": probe_info if probe else None,
            "train": {"path": str(Path(train).resolve()), "records": data.num, "unlabeled_dropped": data.unlabeled,
                      "counts": {c: int(n) for c, n in zip(classes, data.counts)}},
            "val": None if val is None else {
                "path": str(Path(val).resolve()), "records": int(len(yv)), "unlabeled_dropped": val_unlabeled,
                "counts": {c: int(n) for c, n in zip(classes, np.bincount(yv, minlength=len(classes)))}},
            "logdir": str(Path(logdir)) if logdir else "logs",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dfl_tf_version": __version__,
        }
        model.save(tmp / HEAD_FILE)
        if probe_model is not None and probe:
            probe_model.save(tmp)
        atomic_write_json(tmp / HEAD_JSON, info)
        atomic_write_text(tmp / "history.csv", history_csv(hist))
        atomic_write_json(tmp / "metrics.json", metrics)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out), "classes": classes, "best_epoch": best_epoch, "epochs_run": epochs_run,
        "monitor": monitor, "best_value": valcb.best, "threshold": threshold, "metrics": metrics,
        "train_records": data.num, "val_records": None if yv is None else int(len(yv)), "replicas": replicas,
        "selection": info["selection"], "linear_probe": info["linear_probe"],
        "seconds": round(time.time() - t0, 2),
    }
