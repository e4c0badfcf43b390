"""Many small heads trained at once: the cross-validation fits of model selection.

Model selection at small n trains one head per (candidate setting, fold). Fitting them one by
one with ``keras.Model.fit`` costs a trace and a Python epoch loop per head; here all ``G`` of
them are stacked (kernels ``[G, dim, hidden]``) and trained together by one compiled step, each
on its own fold with its own shuffling, noise std and weight decay. The model and optimiser are
the ones :func:`dfl_tf.train_head` builds: per-fold standardisation, Gaussian feature noise and
feature dropout on the standardised embedding, ReLU hidden layer with dropout, softmax; focal
or cross-entropy loss with class weights (mean over the batch, as Keras); Adam, or AdamW with
decoupled weight decay on the kernels (Keras' update rule, epsilon 1e-7; TensorFlow's fused
kernel, :func:`apply_adam`). Mixup, scaled noise and balanced sampling are not applied in these fits.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

from dfl_tf.runtime.signals import raise_if_interrupted


def apply_adam(var: Any, m: Any, v: Any, grad: Any, step: Any, lr: Any, beta_1: float, beta_2: float,
               epsilon: float) -> None:
    """One Adam step on ``var`` (moments ``m``, ``v``; ``step`` counts from 1), TensorFlow's fused
    kernel (``ResourceApplyAdam``: one pass instead of about ten elementwise ops). Keras' rule:
    ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``,
    ``var -= alpha m / (sqrt(v) + epsilon)``. ``var``, ``m``, ``v``: ``tf.Variable`` s or Keras
    variables of any shape (here the stacked ``[G, ...]`` kernels); numbers are cast to ``var``'s dtype."""
    import tensorflow as tf

    dtype = var.dtype
    step = tf.cast(step, dtype)
    b1, b2 = tf.cast(beta_1, dtype), tf.cast(beta_2, dtype)
    tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(b1, step),
                                 beta2_power=tf.pow(b2, step), lr=tf.cast(lr, dtype), beta1=b1, beta2=b2,
                                 epsilon=tf.cast(epsilon, dtype), grad=tf.cast(grad, dtype))


def _schedule(train_sets: Sequence[np.ndarray], epochs: int, batch_size: int, seed: int
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per epoch, (indices [steps, G, B], mask [steps, G, B]): per model, a fresh permutation.

    Generated epoch by epoch, so memory stays flat in ``epochs``."""
    rng = np.random.default_rng(int(seed))
    G = len(train_sets)
    longest = max(len(t) for t in train_sets)
    per_epoch = math.ceil(longest / batch_size)
    for _ in range(epochs):
        idx = np.zeros((per_epoch, G, batch_size), np.int32)
        mask = np.zeros((per_epoch, G, batch_size), np.float32)
        for g, t in enumerate(train_sets):
            perm = rng.permutation(t)
            for s in range(math.ceil(len(t) / batch_size)):
                part = perm[s * batch_size:(s + 1) * batch_size]
                idx[s, g, :len(part)] = part
                mask[s, g, :len(part)] = 1.0
        yield idx, mask


def fit_predict(X: np.ndarray, y: np.ndarray, n_classes: int, train_sets: Sequence[np.ndarray],
                eval_sets: Sequence[np.ndarray], *, hidden: int, noise: Sequence[float],
                weight_decay: Sequence[float], dropout: float = 0.0, feature_dropout: float = 0.0,
                lr: float = 1e-3, epochs: int = 50, batch_size: int = 256, loss: str = "focal",
                gamma: float = 2.0, alpha: float = 0.25, class_weights: np.ndarray | None = None,
                seed: int = 0, zero_output: Sequence[bool] | bool = True,
                init_weights: Sequence[np.ndarray] | None = None, noise_sampler: str = "table") -> list[np.ndarray]:
    """Train ``G = len(train_sets)`` heads on rows ``train_sets[g]`` of ``X`` (model ``g`` with
    ``noise[g]`` and ``weight_decay[g]``); return each one's probabilities on ``X[eval_sets[g]]``.

    ``zero_output`` (per model or for all): zero output kernel as :func:`build_head` (False:
    Glorot, as heads were initialised before; for the study). ``init_weights``: starting
    kernels then biases, each with a leading ``G`` axis (tests: the same start as a Keras head).
    ``noise_sampler``: as the ``noise`` augmentation's ``sampler`` (:mod:`dfl_tf.heads.augment`)."""
    import tensorflow as tf

    from dfl_tf.heads.augment import sample_noise

    X = np.asarray(X, np.float32)
    G, N, dim = len(train_sets), X.shape[0], X.shape[1]
    C, H = int(n_classes), int(hidden)
    means, stds = _standardisations(X, train_sets)
    kernels, biases = _initial_weights(G, dim, H, C, seed, zero_output, init_weights)
    params = kernels + biases
    m_s = [tf.Variable(tf.zeros_like(p)) for p in params]
    v_s = [tf.Variable(tf.zeros_like(p)) for p in params]
    Xt, yt = tf.constant(X), tf.constant(np.eye(C, dtype=np.float32)[np.asarray(y)])
    cw = tf.constant(np.ones(C, np.float32) if class_weights is None else np.asarray(class_weights, np.float32))
    mean_t, std_t = tf.constant(means), tf.constant(stds)
    noise_t = tf.constant(np.asarray(noise, np.float32).reshape(G, 1, 1))
    wd_t = [tf.constant(np.asarray(weight_decay, np.float32).reshape(G, 1, 1)) for _ in kernels]
    b1, b2, eps = 0.9, 0.999, 1e-7
    seed_t = tf.constant([int(seed), 7], tf.int64)

    def forward(z, training: bool, step=None):
        h = z
        if training:
            h = h + sample_noise(noise_sampler, tf.shape(h), tf.random.experimental.stateless_fold_in(seed_t, step * 3),
                                 noise_t, tf.float32, dim)
            if feature_dropout > 0:
                keep = tf.random.stateless_uniform(tf.shape(h), tf.random.experimental.stateless_fold_in(
                    seed_t, step * 3 + 1)) >= feature_dropout
                h = tf.where(keep, h / (1.0 - feature_dropout), 0.0)
        for i, (k, b) in enumerate(zip(kernels, biases)):
            h = tf.einsum("gbd,gdh->gbh", h, k) + b[:, None, :]
            if i < len(kernels) - 1:
                h = tf.nn.relu(h)
                if training and dropout > 0:
                    keep = tf.random.stateless_uniform(tf.shape(h), tf.random.experimental.stateless_fold_in(
                        seed_t, step * 3 + 2)) >= dropout
                    h = tf.where(keep, h / (1.0 - dropout), 0.0)
        return h

    @tf.function(reduce_retracing=True)
    def train_step(idx, mask, step):
        x = tf.gather(Xt, idx)  # [G, B, dim]
        z = (x - mean_t[:, None, :]) / std_t[:, None, :]
        onehot = tf.gather(yt, idx)
        with tf.GradientTape() as tape:
            logits = forward(z, True, step)
            per = _loss_per_record(logits, onehot, loss, alpha, gamma)
            w = tf.reduce_sum(onehot * cw, axis=-1) * mask
            per_model = tf.reduce_sum(per * w, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            total = tf.reduce_sum(per_model)
        grads = tape.gradient(total, params)
        t = tf.cast(step + 1, tf.float32)
        for i, (p_, g_, m_, v_) in enumerate(zip(params, grads, m_s, v_s)):
            if i < len(kernels):
                p_.assign_sub(p_ * wd_t[i] * lr)
            apply_adam(p_, m_, v_, g_, t, lr, b1, b2, eps)

    step = 0
    for idx, mask in _schedule(train_sets, int(epochs), int(batch_size), seed):
        for s in range(len(idx)):
            train_step(tf.constant(idx[s]), tf.constant(mask[s]), tf.constant(step, tf.int64))
            step += 1
            raise_if_interrupted()

    return _predict(X, eval_sets, means, stds, [k.numpy() for k in kernels], [b.numpy() for b in biases])


def _standardisations(X: np.ndarray, train_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (tiny stds as 1) of each model's training rows, stacked ``[G, dim]``."""
    means = np.stack([X[t].mean(axis=0) for t in train_sets]).astype(np.float32)
    stds = np.stack([X[t].std(axis=0) for t in train_sets])
    return means, np.where(stds < 1e-6, 1.0, stds).astype(np.float32)


def _initial_weights(G: int, dim: int, H: int, C: int, seed: int, zero_output: Sequence[bool] | bool,
                     init_weights: Sequence[np.ndarray] | None) -> tuple[list, list]:
    """Kernels and biases (``tf.Variable``, leading ``G`` axis) as :func:`build_head` starts them:
    Glorot hidden kernel, zero output kernel (where ``zero_output``), zero biases; or ``init_weights``."""
    import tensorflow as tf

    rng = np.random.default_rng(int(seed) + 1)

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (G, fan_in, fan_out)).astype(np.float32)

    shapes = [(dim, H), (H, C)] if H > 0 else [(dim, C)]
    zero = np.broadcast_to(np.asarray(zero_output, bool), (G,))
    kernels = [tf.Variable(glorot(a, b) if i < len(shapes) - 1 else np.where(zero[:, None, None], 0.0, glorot(a, b))
                           .astype(np.float32)) for i, (a, b) in enumerate(shapes)]
    biases = [tf.Variable(np.zeros((G, b), np.float32)) for _, b in shapes]
    if init_weights is not None:
        for var, value in zip(kernels + biases, init_weights):
            var.assign(np.asarray(value, np.float32))
    return kernels, biases


def _loss_per_record(logits, onehot, loss: str, alpha: float, gamma: float):
    """Focal or categorical cross-entropy of each record (probabilities clipped to [1e-7, 1 - 1e-7])."""
    import tensorflow as tf

    p = tf.clip_by_value(tf.nn.softmax(logits), 1e-7, 1.0 - 1e-7)
    if loss == "focal":
        return tf.reduce_sum(-alpha * tf.pow(1.0 - p, gamma) * onehot * tf.math.log(p), axis=-1)
    return -tf.reduce_sum(onehot * tf.math.log(p), axis=-1)


def _predict(X: np.ndarray, eval_sets: Sequence[np.ndarray], means: np.ndarray, stds: np.ndarray,
             kernels: list[np.ndarray], biases: list[np.ndarray]) -> list[np.ndarray]:
    """Softmax probabilities of model ``g`` on ``X[eval_sets[g]]``, in NumPy."""
    out = []
    for g, e in enumerate(eval_sets):
        h = (X[e] - means[g]) / stds[g]
        for i, (k, b) in enumerate(zip(kernels, biases)):
            h = h @ k[g] + b[g]
            if i < len(kernels) - 1:
                h = np.maximum(h, 0)
        h = h - h.max(axis=1, keepdims=True)
        p = np.exp(h)
        out.append(p / p.sum(axis=1, keepdims=True))
    return out
