"""Classification metrics of a head's softmax outputs: the one metric function shared by training
(``metrics.json``, the validation callback, selection), evaluation and the fine-tuning baseline.

No import of the rest of :mod:`dfl_tf.heads`: training and evaluation import it, not the other way.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np

from dfl_tf.errors import DflError


def _f(value: Any) -> float | None:
    """A JSON-friendly float (None for NaN/inf)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _per_class(skm, y: np.ndarray, pred: np.ndarray, probs: np.ndarray, classes: Sequence[str],
               present: set) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Precision, recall, F1, support, average precision and ROC-AUC of each class; the supports."""
    p, r, f1, support = skm.precision_recall_fscore_support(y, pred, labels=list(range(len(classes))),
                                                            zero_division=0)
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        binary = (y == c).astype(int)
        defined = c in present and len(present) > 1
        per_class[name] = {
            "precision": _f(p[c]), "recall": _f(r[c]), "f1": _f(f1[c]), "support": int(support[c]),
            "average_precision": _f(skm.average_precision_score(binary, probs[:, c])) if c in present else None,
            "roc_auc": _f(skm.roc_auc_score(binary, probs[:, c])) if defined else None,
        }
    return per_class, support


def _roc_auc(skm, y: np.ndarray, probs: np.ndarray, n_classes: int, present: set) -> float | None:
    """ROC-AUC (two classes) or its one-vs-rest macro average (None when a class is absent)."""
    if len(present) <= 1:
        return None
    if n_classes == 2:
        return _f(skm.roc_auc_score(y, probs[:, 1]))  # symmetric in the class order
    if len(present) == n_classes:
        return _f(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))
    return None


def _at_threshold(skm, y: np.ndarray, probs: np.ndarray, positive: int, threshold: float,
                  labels: list[int]) -> dict[str, Any]:
    """Two-class metrics of ``probs[:, positive] >= threshold``."""
    tpred = np.where(probs[:, positive] >= threshold, positive, 1 - positive).astype(np.int64)
    tp, tr, tf1, _ = skm.precision_recall_fscore_support(y, tpred, labels=[positive], zero_division=0)
    return {
        "threshold": float(threshold),
        "precision": _f(tp[0]), "recall": _f(tr[0]), "f1": _f(tf1[0]),
        "accuracy": _f(skm.accuracy_score(y, tpred)),
        "balanced_accuracy": _f(skm.balanced_accuracy_score(y, tpred)),
        "cohen_kappa": _f(skm.cohen_kappa_score(y, tpred, labels=labels)),
        "confusion_matrix": skm.confusion_matrix(y, tpred, labels=labels).tolist(),
    }


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                    threshold: float | None = None, positive: int = 1) -> dict[str, Any]:
    """Classification metrics of softmax outputs ``probs`` [N, C] against labels ``y_true`` [N].

    Predictions are the argmax; for two-class tasks the positive class is index ``positive``
    (the head's ``positive_class``; 1 by default) and, with a ``threshold``, metrics are also
    given for ``probs[:, positive] >= threshold``. AUCs of a class absent from ``y_true`` (or the
    only one present) are None.
    """
    from sklearn import metrics as skm

    y = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape[1] != n_classes or len(y) != len(probs):
        raise DflError(f"probabilities of shape {probs.shape} do not match {len(y)} labels and "
                       f"{n_classes} classes")
    if len(y) == 0:
        raise DflError("no labeled records to evaluate")
    labels = list(range(n_classes))
    pred = probs.argmax(axis=1)
    present = set(np.unique(y).tolist())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined metrics (absent classes) -> 0 / None, documented
        per_class, support = _per_class(skm, y, pred, probs, classes, present)
        averages = {}
        for avg in ("macro", "weighted"):
            ap, ar, af, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg,
                                                                zero_division=0)
            averages[avg] = {"precision": _f(ap), "recall": _f(ar), "f1": _f(af)}
        aps = [v["average_precision"] for v in per_class.values() if v["average_precision"] is not None]
        result: dict[str, Any] = {
            "num_records": int(len(y)),
            "classes": list(classes),
            "support": {name: int(support[c]) for c, name in enumerate(classes)},
            "accuracy": _f(skm.accuracy_score(y, pred)),
            "balanced_accuracy": _f(skm.balanced_accuracy_score(y, pred)),
            "cohen_kappa": _f(skm.cohen_kappa_score(y, pred, labels=labels)),
            "precision_macro": averages["macro"]["precision"], "recall_macro": averages["macro"]["recall"],
            "f1_macro": averages["macro"]["f1"],
            "precision_weighted": averages["weighted"]["precision"],
            "recall_weighted": averages["weighted"]["recall"], "f1_weighted": averages["weighted"]["f1"],
            "roc_auc_macro_ovr": _roc_auc(skm, y, probs, n_classes, present),
            "pr_auc_macro": _f(np.mean(aps)) if aps else None,
            "log_loss": _f(skm.log_loss(y, np.clip(probs, 1e-7, 1.0), labels=labels)),
            "per_class": per_class,
            "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        }
        if n_classes == 2:
            if positive not in (0, 1):
                raise DflError(f"positive class index must be 0 or 1, got {positive}")
            pos = classes[positive]
            result["positive_class"] = {"index": positive, "name": pos, **{k: per_class[pos][k] for k in
                                        ("precision", "recall", "f1", "average_precision", "roc_auc")}}
            if threshold is not None:
                result["at_threshold"] = _at_threshold(skm, y, probs, positive, threshold, labels)
    return result


def best_f1_threshold(y_true: Sequence[int], pos_probs: np.ndarray) -> float | None:
    """The threshold on the positive-class probability that maximises F1 (None if undefined)."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(y_true)
    if y.sum() == 0 or y.sum() == len(y):
        return None
    precision, recall, thresholds = precision_recall_curve(y, pos_probs)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
    return float(thresholds[int(np.argmax(f1))])


def predict_probs(model, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax outputs of a head on an in-memory embedding matrix (inference mode)."""
    if len(X) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.asarray(model.predict(np.asarray(X, np.float32), batch_size=batch_size, verbose=0), np.float32)
