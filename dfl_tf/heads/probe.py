"""The linear-probe reference: scikit-learn ``LogisticRegression`` beside every head.

``dfl train`` fits an L2-regularised multinomial logistic regression on the same standardised
training embeddings as the head, with ``C`` tuned the way the head's regularisation is (on the
validation set when one is given, else on the same cross-validation folds on small training
sets, see :mod:`dfl_tf.heads.tuning`), and
stores it in the head directory as ``probe.npz`` (plain arrays: weights ``[C, dim]``, biases,
standardisation mean/std; loaded with ``allow_pickle=False``). ``dfl evaluate`` scores it next
to the head (``"linear_probe"`` in ``metrics.json``), ``dfl select`` next to the linear heads,
so a report always shows whether the head adds anything over a textbook probe.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dfl_tf.runtime.files import atomic_write_bytes
from dfl_tf.errors import DflError

PROBE_FILE = "probe.npz"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: above this many records, C is tuned on a stratified subsample of this size (then refit on all)
TUNE_MAX_RECORDS = 4000
MAX_ITER = 500


class LinearProbe:
    """Softmax of ``standardise(X) @ W.T + b``: a fitted probe as plain arrays."""

    def __init__(self, W: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray):
        self.W, self.b = np.asarray(W, np.float32), np.asarray(b, np.float32)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def predict_proba(self, X: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Class probabilities ``[N, C]`` of raw embeddings ``X`` ``[N, dim]``."""
        out = np.empty((len(X), len(self.b)), np.float32)
        for i in range(0, len(X), batch_size):
            Z = (np.asarray(X[i:i + batch_size], np.float32) - self.mean) / self.std
            logits = Z @ self.W.T + self.b
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            out[i:i + batch_size] = e / e.sum(axis=1, keepdims=True)
        return out

    def save(self, head_dir: str | Path) -> Path:
        import io

        buf = io.BytesIO()
        np.savez(buf, W=self.W, b=self.b, mean=self.mean, std=self.std)
        path = Path(head_dir) / PROBE_FILE
        atomic_write_bytes(path, buf.getvalue())
        return path


def load_probe(head_dir: str | Path) -> LinearProbe | None:
    """The probe stored in a head directory, or None for head directories written before it."""
    path = Path(head_dir) / PROBE_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return LinearProbe(data["W"], data["b"], data["mean"], data["std"])
    except (OSError, ValueError, KeyError) as exc:
        raise DflError(f"{path}: unreadable linear probe ({exc})") from exc


def _fit(Z: np.ndarray, y: np.ndarray, C: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W [n_classes, dim], b [n_classes]) of a LogisticRegression fitted on standardised ``Z``."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    W = np.zeros((n_classes, Z.shape[1]), np.float32)
    b = np.full((n_classes,), -30.0, np.float32)  # classes absent from training: probability ~0
    if len(present) == 1:
        b[present[0]] = 0.0
        return W, b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at MAX_ITER: fine for a reference
        clf = LogisticRegression(C=float(C), max_iter=MAX_ITER, random_state=int(seed)).fit(Z, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(present) == 2:  # sklearn's binary form: one logit for the second class
        coef = np.stack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    W[present], b[present] = coef, intercept
    return W, b


def fit_probe(X: np.ndarray, y: np.ndarray, n_classes: int, mean: np.ndarray, std: np.ndarray,
              folds: Sequence[tuple[np.ndarray, np.ndarray]] | None = None, C: float | None = None,
              grid: Sequence[float] = C_GRID, seed: int = 0, X_val: np.ndarray | None = None,
              y_val: np.ndarray | None = None) -> tuple[LinearProbe, dict[str, Any]]:
    """Fit the probe on raw embeddings ``X`` (standardised with ``mean``/``std``); tune ``C``.

    ``C`` given: no tuning. Else the best balanced accuracy over ``grid`` on ``folds`` (the
    head's cross-validation folds), or on ``X_val``/``y_val`` when no folds are given, or on
    3 stratified folds of (a subsample of at most :data:`TUNE_MAX_RECORDS` of) the training set.
    Returns ``(probe, info)`` with the chosen ``C``, how it was chosen and the scores.
    """
    from sklearn.metrics import balanced_accuracy_score

    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    Z = (np.asarray(X, np.float32) - mean) / std
    y = np.asarray(y, np.int64)
    scores: list[dict[str, Any]] = []
    if C is not None:
        chosen_by = "given"
    else:
        if folds is not None:
            chosen_by, data = "cross-validation on the training set (the head's folds)", (Z, y, folds)
        elif X_val is not None and y_val is not None and len(y_val):
            Zv = (np.asarray(X_val, np.float32) - mean) / std
            chosen_by = "validation set"
            data = (np.concatenate([Z, Zv]), np.concatenate([y, y_val]),
                    [(np.arange(len(y)), np.arange(len(y), len(y) + len(y_val)))])
        else:
            from dfl_tf.data.splits import cv_folds

            rng = np.random.default_rng(int(seed))
            sub = np.sort(rng.permutation(len(y))[:TUNE_MAX_RECORDS])
            try:
                sub_folds, method = cv_folds(y[sub], None, k=3, seed=seed)
                chosen_by = f"{method} cross-validation on {len(sub)} training records"
                data = (Z[sub], y[sub], sub_folds)
            except DflError:  # too few records per class for 2 folds
                data, C, chosen_by = None, 1.0, "default (too few records to tune)"
    if C is None:
        Zd, yd, fd = data
        for c in grid:
            per_fold = []
            for a, b_ in fd:
                W, b = _fit(Zd[a], yd[a], c, n_classes, seed)
                pred = (Zd[b_] @ W.T + b).argmax(axis=1)
                per_fold.append(float(balanced_accuracy_score(yd[b_], pred)))
            scores.append({"C": float(c), "mean": float(np.mean(per_fold)), "std": float(np.std(per_fold))})
        C = scores[int(np.argmax([s["mean"] for s in scores]))]["C"]
    W, b = _fit(Z, y, float(C), n_classes, seed)
    info = {"model": "sklearn.linear_model.LogisticRegression (L2, lbfgs) on standardised embeddings",
            "file": PROBE_FILE, "C": float(C), "C_chosen_by": chosen_by, "scores": scores}
    return LinearProbe(W, b, mean, std), info
