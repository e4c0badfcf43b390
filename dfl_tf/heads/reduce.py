"""Reduction in the head (``dfl train --reduce``, issue 33 item 3): PCA or PCA whitening fitted on
the training embeddings with scikit-learn, folded into one frozen ``keras.layers.Dense`` (layer
``reduce``) in front of the head's standardisation, so that ``head.keras`` stays plain Keras and
the export needs nothing new.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.heads.model import standardisation
from dfl_tf.options.train import parse_reduce

NULL_VARIANCE = 1e-6  # components with less variance than this fraction of the first one are dropped


@dataclass
class Reduction:
    """A fitted reduction: ``x @ kernel + bias`` equals scikit-learn's ``PCA.transform(x)``."""

    kernel: np.ndarray  # float32 [dim, K]
    bias: np.ndarray  # float32 [K]
    mean: np.ndarray  # standardisation of the reduced training embeddings
    std: np.ndarray
    info: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.kernel.shape[1])

    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.kernel + self.bias

    def layer(self) -> keras.layers.Dense:
        """The frozen Dense layer (built with its weights)."""
        layer = keras.layers.Dense(self.dim, trainable=False, name="reduce")
        layer.build((None, int(self.kernel.shape[0])))
        layer.set_weights([self.kernel, self.bias])
        return layer


def fit_reduction(X: np.ndarray, spec: str, seed: int = 0) -> Reduction:
    """Fit ``spec`` (``pca:K``, ``pca:0.99`` or ``whiten``) on the training embeddings ``X``."""
    from sklearn.decomposition import PCA

    method, amount = parse_reduce(spec)
    X = np.asarray(X, np.float64)
    limit = min(X.shape)
    if isinstance(amount, int) and amount > limit:
        raise DflError(f"--reduce {spec}: at most {limit} components from {X.shape[0]} training records of dim "
                       f"{X.shape[1]}")
    pca = PCA(n_components=amount, whiten=method == "whiten", svd_solver="full", random_state=seed).fit(X)
    # numerically null components (e.g. beyond the rank of fewer records than dims) are dropped: whitening
    # or standardising them would amplify float noise, not signal
    keep = pca.explained_variance_ > NULL_VARIANCE * max(float(pca.explained_variance_[0]), 1e-30)
    kernel = pca.components_[keep].T.copy()
    if method == "whiten":
        kernel = kernel / np.sqrt(pca.explained_variance_[keep])
    bias = -pca.mean_ @ kernel
    kernel, bias = kernel.astype(np.float32), bias.astype(np.float32)
    mean, std = standardisation(X.astype(np.float32) @ kernel + bias)
    ratio = pca.explained_variance_ratio_[keep]
    info = {"spec": spec, "method": method, "components": int(kernel.shape[1]), "input_dim": int(X.shape[1]),
            "null_components_dropped": int((~keep).sum()),
            "explained_variance": float(ratio.sum()), "explained_variance_ratio": [float(r) for r in ratio]}
    return Reduction(kernel, bias, mean, std, info)
