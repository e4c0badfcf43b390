"""Train a slide head (attention MIL, mean or max pooling) on bags of stored embeddings.

HEAD_DIR (written to a temporary folder renamed at the end): ``head.keras`` (inputs
``embeddings [B, N, dim]`` and ``mask [B, N]``; outputs ``probabilities`` and ``attention``),
``head.json`` (``kind: "slide"``, aggregator, bag settings, classes, backbone, views, dim,
extraction geometry, standardisation, label file), ``metrics.json`` (slide-level metrics on
``--val``, else on the training bags, and the mean-pool logistic-regression reference under
``linear_probe``), ``probe.npz`` (that reference, on mean-pooled bags), ``history.csv``.

Each step draws ``bags_per_step`` bags and at most ``max_instances`` random instances of each
(padded, masked); evaluation uses every instance of a bag, one bag at a time. Bags are read from a
disk-backed spool (:mod:`dfl_tf.heads.slide.bags`), so memory holds one step's bags.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dfl_tf.errors import DflError
from dfl_tf.heads.inputs import class_weights, history_csv
from dfl_tf.heads.metrics import compute_metrics
from dfl_tf.heads.model import HEAD_FILE, HEAD_JSON, safe_std
from dfl_tf.heads.probe import fit_probe
from dfl_tf.heads.slide.bags import Bags, load_bags, read_slide_labels
from dfl_tf.heads.slide.model import build_slide_head
from dfl_tf.heads.tuning import make_optimizer
from dfl_tf.options.train import TrainOptions
from dfl_tf.provenance import check_compatible
from dfl_tf.runtime.files import atomic_write_json, atomic_write_text, replace_dir
from dfl_tf.store.manifest import load_manifest

SLIDE_HEAD_KIND = "slide"
SLIDE_HEAD_FORMAT_VERSION = 1
DEFAULT_SLIDE_HIDDEN = 128
DEFAULT_SLIDE_NOISE = 0.1
DEFAULT_SLIDE_WEIGHT_DECAY = 1e-4


def bag_statistics(bags: Bags) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every instance of every bag (float64 sums, one bag at a time)."""
    dim = int(bags.manifest["dim"])
    s, ss, n = np.zeros(dim), np.zeros(dim), 0
    for i in range(len(bags)):
        x = bags.bag(i).astype(np.float64)
        s += x.sum(axis=0)
        ss += np.square(x).sum(axis=0)
        n += len(x)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - np.square(mean), 0.0))
    return mean.astype(np.float32), safe_std(std)


def pad_bags(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bags of different sizes as ``[B, max n, dim]`` zeros-padded embeddings and a ``[B, max n]`` mask."""
    n = max(len(a) for a in arrays)
    X = np.zeros((len(arrays), n, arrays[0].shape[1]), np.float32)
    M = np.zeros((len(arrays), n), np.float32)
    for i, a in enumerate(arrays):
        X[i, :len(a)], M[i, :len(a)] = a, 1.0
    return X, M


def _predict_fn(model: keras.Model):
    """The model on one whole bag as a traced function (any bag size: traced once)."""
    dim = model.get_layer("standardize").mean.shape[-1]

    @tf.function(input_signature=[tf.TensorSpec([1, None, dim], tf.float32)])
    def call(x):
        return model({"embeddings": x, "mask": tf.ones(tf.shape(x)[:2])}, training=False)

    return call


def predict_bags(model: keras.Model, bags: Bags) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probabilities ``[B, C]`` and per-instance attention of every bag (all instances, one bag per call)."""
    probs, attention = [], []
    call = _predict_fn(model)
    for i in range(len(bags)):
        x = bags.bag(i)[None]
        out = call(tf.constant(x))
        probs.append(keras.ops.convert_to_numpy(out["probabilities"])[0])
        attention.append(keras.ops.convert_to_numpy(out["attention"])[0])
    return np.asarray(probs, np.float64), attention


@dataclass
class SlidePlan:
    """What a slide head is trained from."""

    train: str
    val: str | None
    options: TrainOptions
    labels: Any
    bags: Bags
    val_bags: Bags | None
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    hidden: int
    noise: float
    weight_decay: float
    cw: np.ndarray | None


def plan_slide_training(train: str | Path, val: str | Path | None, o: TrainOptions) -> SlidePlan:
    """Labels read, stores checked and bagged, standardisation computed."""
    labels = read_slide_labels(o.slide_labels)
    tm = load_manifest(train)
    if val is not None:
        check_compatible(tm, load_manifest(val), f"training embeddings {train}", f"validation embeddings {val}")
    keras.utils.set_random_seed(int(o.seed))
    tf.config.experimental.enable_op_determinism()
    bags = load_bags(train, labels)
    classes = bags.classes
    counts = np.bincount(bags.y, minlength=len(classes))
    if (counts == 0).any():
        empty = [c for c, k in zip(classes, counts) if k == 0]
        raise DflError(f"{train}: class(es) {', '.join(map(repr, empty))} of {o.slide_labels} have no slide in "
                       f"the training store (slides per class: "
                       f"{', '.join(f'{c} {int(k)}' for c, k in zip(classes, counts))})")
    val_bags = load_bags(val, labels, classes, "validation") if val is not None else None
    if val is None:
        print("note: no --val: training for all epochs; metrics.json holds training-bag metrics", file=sys.stderr)
    mean, std = bag_statistics(bags)
    return SlidePlan(str(train), None if val is None else str(val), o, labels, bags, val_bags, classes, mean, std,
                     DEFAULT_SLIDE_HIDDEN if not o.hidden else int(o.hidden),
                     DEFAULT_SLIDE_NOISE if o.noise is None else float(o.noise),
                     DEFAULT_SLIDE_WEIGHT_DECAY if o.weight_decay is None else float(o.weight_decay),
                     class_weights(o.class_weight, counts, classes))


def _step_batch(bags: Bags, chosen: np.ndarray, max_instances: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """The step's bags, each cut to a random subset of ``max_instances`` instances."""
    arrays = []
    for i in chosen:
        n = len(bags.rows[i])
        subset = rng.choice(n, max_instances, replace=False) if n > max_instances else None
        arrays.append(bags.bag(int(i), subset))
    return pad_bags(arrays)


def _score(plan: SlidePlan, model: keras.Model, loss_fn) -> dict[str, float]:
    """Validation loss and balanced accuracy of the current weights."""
    from sklearn.metrics import balanced_accuracy_score

    probs, _ = predict_bags(model, plan.val_bags)
    onehot = np.eye(len(plan.classes), dtype=np.float32)[plan.val_bags.y]
    with warnings.catch_warnings():  # one class in validation: balanced accuracy is the recall of that class
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(plan.val_bags.y, probs.argmax(axis=1)))
    return {"val_loss": float(keras.ops.convert_to_numpy(loss_fn(onehot, probs.astype(np.float32)))),
            "val_balanced_accuracy": balanced}


def fit_slide_head(plan: SlidePlan, progress: bool) -> tuple[keras.Model, dict[str, list], int, int]:
    """The fit: (model with the best weights, history, best epoch, epochs run)."""
    o = plan.options
    model = build_slide_head(int(plan.bags.manifest["dim"]), len(plan.classes), o.aggregator, plan.hidden,
                             o.dropout, plan.noise, plan.mean, plan.std, seed=o.seed)
    loss_fn = (keras.losses.CategoricalFocalCrossentropy(alpha=o.alpha, gamma=o.gamma) if o.loss == "focal"
               else keras.losses.CategoricalCrossentropy())
    optimizer = make_optimizer(o.lr, plan.weight_decay)
    cw = tf.constant(plan.cw if plan.cw is not None else np.ones(len(plan.classes), np.float32))

    @tf.function(reduce_retracing=True)
    def step(X, M, y):
        onehot = tf.one_hot(y, len(plan.classes))
        with tf.GradientTape() as tape:
            probs = model({"embeddings": X, "mask": M}, training=True)["probabilities"]
            loss = loss_fn(onehot, probs, sample_weight=tf.gather(cw, y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(int(o.seed))
    history: dict[str, list] = {"loss": []}
    best, best_epoch, best_weights, waited, epoch = None, 0, None, 0, 0
    for epoch in range(1, int(o.epochs) + 1):
        order = rng.permutation(len(plan.bags))
        losses = []
        for start in range(0, len(order), int(o.bags_per_step)):
            chosen = order[start:start + int(o.bags_per_step)]
            X, M = _step_batch(plan.bags, chosen, int(o.max_instances), rng)
            losses.append(float(step(tf.constant(X), tf.constant(M), tf.constant(plan.bags.y[chosen]))))
        history["loss"].append(float(np.mean(losses)))
        if plan.val_bags is None:
            best_epoch = epoch
            continue
        scores = _score(plan, model, loss_fn)
        for k, v in scores.items():
            history.setdefault(k, []).append(v)
        key = (-scores["val_loss"],) if o.monitor == "val_loss" else (scores["val_balanced_accuracy"],
                                                                       -scores["val_loss"])
        if best is None or key > best:
            best, best_epoch, best_weights, waited = key, epoch, model.get_weights(), 0
        else:
            waited += 1
            if o.patience and waited >= o.patience:
                break
        if progress:
            print(f"epoch {epoch}: loss {history['loss'][-1]:.4f}, val balanced accuracy "
                  f"{scores['val_balanced_accuracy']:.4f}", file=sys.stderr)
    if best_weights is not None:
        model.set_weights(best_weights)
    return model, history, best_epoch, epoch


def slide_metrics(plan: SlidePlan, model: keras.Model) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(metrics.json, the probe, its info): slide-level metrics on --val (else the training bags), the
    mean-pool logistic regression reference under ``linear_probe`` (C tuned on --val when given)."""
    evalb, split = (plan.val_bags, "validation") if plan.val_bags is not None else (plan.bags, "train")
    probs, _ = predict_bags(model, evalb)
    metrics = {"split": split, "level": "slide", **compute_metrics(evalb.y, probs, plan.classes)}
    Xb = plan.bags.mean_pooled()
    mean = Xb.mean(axis=0).astype(np.float32)
    std = safe_std(Xb.std(axis=0))
    Xe = evalb.mean_pooled()
    probe, info = fit_probe(Xb, plan.bags.y, len(plan.classes), mean, std, seed=plan.options.seed,
                            X_val=Xe if plan.val_bags is not None else None,
                            y_val=evalb.y if plan.val_bags is not None else None)
    info = {**info, "model": "LogisticRegression on mean-pooled bag embeddings (standardised)"}
    metrics["linear_probe"] = {**compute_metrics(evalb.y, probe.predict_proba(Xe), plan.classes), "C": info["C"]}
    return metrics, probe, info


def _bags_info(bags: Bags) -> dict[str, Any]:
    return {"path": str(Path(bags.store).resolve()), "slides": len(bags),
            "records": int(sum(len(r) for r in bags.rows)), "left_out": bags.left_out,
            "counts": {c: int(n) for c, n in zip(bags.classes, np.bincount(bags.y, minlength=len(bags.classes)))}}


def slide_head_info(plan: SlidePlan, best_epoch: int, epochs_run: int, probe: dict[str, Any]) -> dict[str, Any]:
    """head.json of a slide head."""
    from dfl_tf import __version__

    o, tm = plan.options, plan.bags.manifest
    return {
        "format_version": SLIDE_HEAD_FORMAT_VERSION, "kind": SLIDE_HEAD_KIND, "aggregator": o.aggregator,
        "bags": {"by": "slide, else group", "max_instances": int(o.max_instances),
                 "bags_per_step": int(o.bags_per_step), "labels": str(Path(o.slide_labels).resolve())},
        "classes": plan.classes, "n_classes": len(plan.classes),
        "views": list(tm["views"]), "backbone": dict(tm["backbone"]), "dim": int(tm["dim"]),
        "extraction": {k: tm[k] for k in ("dtype", "settings", "geometry") if k in tm},
        "standardisation": {"mean": plan.mean.tolist(), "std": plan.std.tolist()},
        "settings": {"hidden": plan.hidden, "dropout": float(o.dropout), "noise": plan.noise,
                     "weight_decay": plan.weight_decay, "loss": o.loss, "gamma": float(o.gamma),
                     "alpha": float(o.alpha), "epochs": int(o.epochs), "lr": float(o.lr), "seed": int(o.seed),
                     "patience": int(o.patience), "monitor": o.monitor if plan.val else None,
                     "class_weights": None if plan.cw is None else plan.cw.tolist()},
        "seed": int(o.seed), "best_epoch": best_epoch, "epochs_run": epochs_run, "linear_probe": probe,
        "train": _bags_info(plan.bags), "val": None if plan.val_bags is None else _bags_info(plan.val_bags),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dfl_tf_version": __version__,
    }


def train_slide_head(train: str | Path, out: str | Path, val: str | Path | None, options: TrainOptions,
                     progress: bool = True) -> dict[str, Any]:
    """Train a slide head on the bags of ``train`` labeled by ``options.slide_labels`` and write
    HEAD_DIR ``out`` (see the module docstring). Called by :func:`dfl_tf.heads.train.train_head`
    (which checks and locks ``out``) when ``slide_labels`` is given. Returns a summary dict."""
    t0, out = time.time(), Path(out)
    plan = plan_slide_training(train, val, options)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model, history, best_epoch, epochs_run = fit_slide_head(plan, progress)
        metrics, probe, probe_info = slide_metrics(plan, model)
        metrics["best_epoch"] = best_epoch
        info = slide_head_info(plan, best_epoch, epochs_run, probe_info)
        model.save(tmp / HEAD_FILE)
        probe.save(tmp)
        atomic_write_json(tmp / HEAD_JSON, info)
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "history.csv", history_csv(history))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"kind": SLIDE_HEAD_KIND, "out": str(out), "aggregator": options.aggregator, "classes": plan.classes,
            "best_epoch": best_epoch, "epochs_run": epochs_run, "metrics": metrics,
            "train_slides": len(plan.bags), "val_slides": None if plan.val_bags is None else len(plan.val_bags),
            "left_out": plan.bags.left_out, "seconds": round(time.time() - t0, 2)}
