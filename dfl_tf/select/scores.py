"""Scores of one backbone's embeddings in the selection protocol: the linear head, the probe
reference and the training-free pre-screen (k-NN, silhouette)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from dfl_tf.errors import DflError


def train_linear_head(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, n_classes: int,
                      seed: int = 0, epochs: int = 30, lr: float = 1e-3, batch_size: int = 256,
                      noise: float = 0.1, loss: str = "focal", gamma: float = 2.0, alpha: float = 0.25
                      ) -> np.ndarray:
    """The protocol's linear softmax head, trained in memory; returns validation probabilities."""
    import keras

    from dfl_tf.heads.metrics import predict_probs
    from dfl_tf.heads.callbacks import InterruptCheck
    from dfl_tf.heads.model import build_head, standardisation

    keras.utils.set_random_seed(int(seed))
    mean, std = standardisation(X_train)
    augment = [keras.layers.GaussianNoise(float(noise), seed=int(seed), name="noise")] if noise and noise > 0 else []
    model = build_head(X_train.shape[1], n_classes, hidden=0, mean=mean, std=std, augment=augment,
                       name="linear_head")
    loss_fn = (keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma) if loss == "focal"
               else keras.losses.CategoricalCrossentropy())
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(lr)), loss=loss_fn)
    onehot = np.eye(n_classes, dtype=np.float32)[y_train]
    model.fit(np.asarray(X_train, np.float32), onehot, epochs=int(epochs), batch_size=int(batch_size),
              shuffle=True, verbose=0, callbacks=[InterruptCheck()])
    probs = predict_probs(model, X_val)
    del model
    return probs


def linear_probe_score(emb, tr: np.ndarray, va: np.ndarray, seed: int = 0) -> float:
    """Validation balanced accuracy of the linear-probe reference (:mod:`dfl_tf.heads.probe`)
    trained on the train part, ``C`` by 3-fold cross-validation there (grouped when possible)."""
    from sklearn.metrics import balanced_accuracy_score

    from dfl_tf.heads.model import standardisation
    from dfl_tf.heads.probe import fit_probe
    from dfl_tf.data.splits import cv_folds

    y_tr = emb.y[tr]
    try:
        folds, _ = cv_folds(y_tr, [emb.groups[i] for i in tr], k=3, seed=seed)
    except DflError:
        folds = None  # too few records for folds: C tuned on a plain split inside fit_probe
    mean, std = standardisation(emb.X[tr])
    probe, _ = fit_probe(emb.X[tr], y_tr, len(emb.classes), mean, std, folds=folds, seed=seed)
    return float(balanced_accuracy_score(emb.y[va], probe.predict_proba(emb.X[va]).argmax(axis=1)))


def separability(X: np.ndarray, y: np.ndarray, groups: Sequence[str | None] | None = None, k: int = 10,
                 seed: int = 0, max_points: int = 5000) -> dict[str, float | None]:
    """Training-free pre-screen: cross-validated k-NN (standardised, Euclidean) and silhouette."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, silhouette_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    result: dict[str, float | None] = {"knn_accuracy": None, "knn_balanced_accuracy": None, "silhouette": None,
                                       "knn_k": None}
    y = np.asarray(y)
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2:
        return result
    n_splits = int(min(5, counts.min()))
    if n_splits >= 2:
        smallest_train = len(y) - math.ceil(len(y) / n_splits)
        kk = int(max(1, min(k, smallest_train)))
        model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=kk))
        pred = None
        if groups is not None and any(g for g in groups):
            g = np.array([gr or f"__{i}" for i, gr in enumerate(groups)])
            try:
                cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                pred = cross_val_predict(model, X, y, groups=g, cv=cv)
            except ValueError:
                pred = None
        if pred is None:
            cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            pred = cross_val_predict(model, X, y, cv=cv)
        result.update(knn_accuracy=float(accuracy_score(y, pred)),
                      knn_balanced_accuracy=float(balanced_accuracy_score(y, pred)), knn_k=kk)
    if len(counts) < len(y):
        std = X.std(axis=0)
        Xs = (X - X.mean(axis=0)) / np.where(std < 1e-6, 1.0, std)
        size = min(len(y), max_points)
        try:
            result["silhouette"] = float(silhouette_score(Xs, y, sample_size=size if size < len(y) else None,
                                                          random_state=seed))
        except ValueError:
            pass
    return result


def _summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None], np.float64)
    if not len(arr):
        return {"mean": None, "std": None, "values": []}
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}
