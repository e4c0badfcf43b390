"""Training callbacks for heads: validation metrics with early stopping, and TensorBoard
event files written with core TensorFlow (TF 2.21 no longer installs ``tensorboard``, which
``keras.callbacks.TensorBoard`` needs)."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dfl_tf.runtime.signals import raise_if_interrupted
from dfl_tf.heads.metrics import compute_metrics, predict_probs


class InterruptCheck(keras.callbacks.Callback):
    """Stops ``fit`` at the end of an epoch when a signal was swallowed inside TensorFlow's C++
    (see :func:`dfl_tf.runtime.signals.raise_if_interrupted`); for fits without a ValidationCallback."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        raise_if_interrupted()


class ValidationCallback(keras.callbacks.Callback):
    """Validation metrics at epoch end (scikit-learn), learning rate, early stopping, best weights.

    Adds ``val_loss``, ``val_accuracy``, ``val_balanced_accuracy`` (and the monitored metric) and
    ``learning_rate`` to the epoch logs, so History, history.csv and TensorBoard get them.
    A monitored metric that is undefined (NaN) before it was ever finite, e.g. ``val_roc_auc``
    with a class absent from the validation set, is replaced by ``val_loss`` with a warning on
    stderr (``fallback`` records why) instead of silently disabling early stopping.
    """

    def __init__(self, X: np.ndarray | None, y: np.ndarray | None, n_classes: int, loss_fn, monitor: str,
                 patience: int, batch_size: int = 2048, predict_model: keras.Model | None = None):
        super().__init__()
        self.predict_model = predict_model  # predicts on raw embeddings; default: the fitted model
        self.X, self.y, self.n_classes, self.loss_fn = X, y, n_classes, loss_fn
        self.monitor, self.patience, self.batch_size = monitor, patience, batch_size
        self.mode = "min" if monitor == "val_loss" else "max"
        self.best: float | None = None
        self.best_epoch = 0
        self.best_weights = None
        self.wait = 0
        self.stopped_epoch = None
        self.requested_monitor = monitor
        self.fallback: str | None = None

    def _metrics(self) -> dict[str, float]:
        from sklearn import metrics as skm

        probs = predict_probs(self.predict_model or self.model, self.X, self.batch_size)
        pred = probs.argmax(axis=1)
        onehot = np.eye(self.n_classes, dtype=np.float32)[self.y]
        out = {"val_loss": float(keras.ops.convert_to_numpy(self.loss_fn(onehot, probs))),
               "val_accuracy": float(skm.accuracy_score(self.y, pred)),
               "val_balanced_accuracy": float(skm.balanced_accuracy_score(self.y, pred))}
        wanted = self.requested_monitor  # still logged after a fallback to val_loss
        if wanted not in out:
            m = compute_metrics(self.y, probs, [str(c) for c in range(self.n_classes)])
            key = {"val_f1_macro": "f1_macro", "val_cohen_kappa": "cohen_kappa",
                   "val_roc_auc": "roc_auc_macro_ovr", "val_pr_auc": "pr_auc_macro"}[wanted]
            out[wanted] = float("nan") if m[key] is None else float(m[key])
        return out

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        raise_if_interrupted()  # a Ctrl-C swallowed inside TensorFlow's C++ stops here at the latest
        logs = logs if logs is not None else {}
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.X is None:
            return
        logs.update(self._metrics())
        value = logs[self.monitor]
        if math.isnan(value) and self.best is None and self.monitor != "val_loss":
            self.fallback = (f"monitored metric {self.monitor} is undefined (NaN) on the validation set at epoch "
                             f"{epoch + 1}; early stopping and best weights use val_loss instead")
            print(f"warning: {self.fallback}", file=sys.stderr)
            self.monitor, self.mode = "val_loss", "min"
            value = logs["val_loss"]
        better = (self.best is None or (not math.isnan(value) and (
            (self.mode == "max" and value > self.best) or (self.mode == "min" and value < self.best))))
        if better and not math.isnan(value):
            self.best, self.best_epoch, self.wait = value, epoch + 1, 0
            self.best_weights = self.model.get_weights()
        elif self.best is None:
            self.best_epoch, self.best_weights = epoch + 1, self.model.get_weights()
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.stopped_epoch = epoch + 1
                self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def _summary_metadata(plugin: str, data_class: int) -> bytes:
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = plugin
    meta.data_class = data_class
    return meta.SerializeToString()


class TensorBoardLogger(keras.callbacks.Callback):
    """TensorBoard event files without the ``tensorboard`` package (TF 2.21 no longer ships it).

    Same layout and tags as ``keras.callbacks.TensorBoard``: ``LOGDIR/train`` gets
    ``epoch_<metric>`` scalars (loss, accuracy, learning_rate) and, every ``histogram_freq``
    epochs, one histogram per weight (tag = the weight's path, e.g. ``hidden/kernel``);
    ``LOGDIR/validation`` gets the ``val_*`` metrics as ``epoch_<metric>``. Written with the
    core ``tf.summary.write`` op and the scalar / histogram plugin metadata, so TensorBoard reads
    them like its own.
    """

    def __init__(self, log_dir: str | Path, histogram_freq: int = 1, bins: int = 30):
        super().__init__()
        self.log_dir, self.histogram_freq, self.bins = Path(log_dir), int(histogram_freq or 0), bins
        self._writers: dict[str, Any] = {}

    def _writer(self, name: str):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
        return self._writers[name]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from tensorflow.core.framework import summary_pb2

        scalar_meta = _summary_metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
        for split, items in (("train", {k: v for k, v in (logs or {}).items() if not k.startswith("val_")}),
                             ("validation", {k[4:]: v for k, v in (logs or {}).items() if k.startswith("val_")})):
            if not items:
                continue
            with self._writer(split).as_default():
                for key, value in sorted(items.items()):
                    tf.summary.write(f"epoch_{key}", tf.constant(float(value), tf.float32), step=epoch,
                                     metadata=scalar_meta)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            hist_meta = _summary_metadata("histograms", summary_pb2.DATA_CLASS_TENSOR)
            with self._writer("train").as_default():
                for weight in self.model.weights:
                    if "seed_generator" in weight.path:
                        continue
                    values = keras.ops.convert_to_numpy(weight.value).astype(np.float64).ravel()
                    lo, hi = float(values.min()), float(values.max())
                    if hi <= lo:
                        hi = lo + 1e-12
                    counts, edges = np.histogram(values, bins=self.bins, range=(lo, hi))
                    data = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
                    tf.summary.write(weight.path, tf.constant(data, tf.float64), step=epoch, metadata=hist_meta)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
