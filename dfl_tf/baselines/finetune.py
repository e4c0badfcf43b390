"""The traditional baseline: fine-tune the whole backbone end to end (the paper's "deep learning").

The same backbone as in deep feature learning, but unfrozen, with a softmax head on top,
trained on images with augmentation (random flips, 90-degree rotations, colour jitter:
brightness, contrast, saturation, hue via ``tf.image`` stateless ops) and focal loss (Adam).
Wall time and the same validation metrics as heads (:func:`dfl_tf.heads.evaluate.compute_metrics`)
are recorded, so the cost/accuracy comparison with ``extract`` + ``train`` can be reproduced.

One view only (``x20:rgb`` by default; ``x20:gray`` / ``x5:*`` also work as a single view):
multi-view fine-tuning is not implemented. SavedModel backbones are trained only as far as
their variables are trainable through ``keras.layers.TFSMLayer``; registry backbones fully.

OUT (written to a temporary directory, renamed at the end): ``model.keras`` (images float32
[0, 255] [N, S, S, 3] -> softmax), ``metrics.json``, ``history.csv``, ``finetune.json``.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.runtime.files import atomic_write_json, atomic_write_text, replace_dir
from dfl_tf.runtime.signals import raise_if_interrupted
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.options import FINETUNE_FIELDS, ExtractOptions, takes_options


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def augment_image(x, seed, strength: float = 1.0):
    """Random flip (both axes), 90-degree rotation and colour jitter of one float32 [S, S, 3] image in [0, 255].

    ``seed``: int64 [2] stateless seed. Colour jitter: brightness +-0.1, contrast and saturation
    x[0.8, 1.2], hue +-0.05 (times ``strength``), on [0, 1] values, clipped.
    """
    import tensorflow as tf

    seed = tf.cast(seed, tf.int64)
    s = [tf.random.experimental.stateless_fold_in(seed, i) for i in range(7)]
    x = tf.clip_by_value(x / 255.0, 0.0, 1.0)
    x = tf.image.stateless_random_flip_left_right(x, s[0])
    x = tf.image.stateless_random_flip_up_down(x, s[1])
    k = tf.random.stateless_uniform([], s[2], minval=0, maxval=4, dtype=tf.int32)
    x = tf.image.rot90(x, k)
    if strength > 0:
        x = tf.image.stateless_random_brightness(x, 0.1 * strength, s[3])
        x = tf.image.stateless_random_contrast(x, 1 - 0.2 * strength, 1 + 0.2 * strength, s[4])
        x = tf.image.stateless_random_saturation(x, 1 - 0.2 * strength, 1 + 0.2 * strength, s[5])
        x = tf.image.stateless_random_hue(x, min(0.5, 0.05 * strength), s[6])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _image_dataset(samples, plan, n_classes: int, batch_size: int, training: bool, seed: int, augment: bool,
                   jitter: float):
    """Batches of (one view fitted to the input, one-hot label) read through ``plan`` (bound to
    the samples' source: the fields extraction reads, fitted as extraction fits them)."""
    import tensorflow as tf

    from dfl_tf.data.pipeline import fixed_prefetch
    from dfl_tf.data.sources import load_fields
    from dfl_tf.data.views import compose_plan

    keys, size = plan.loaded_fields, int(plan.input_size)
    labels = tf.constant(np.array([s.label for s in samples], np.int64))

    def load(index):
        fields = load_fields(samples[int(index)], plan)
        return tuple(fields[k] for k in keys)

    def compose(index):
        pixels = tf.numpy_function(load, [index], [tf.uint8] * len(keys), stateful=False)
        for p in pixels:
            p.set_shape([None, None, 3])
        x = compose_plan(dict(zip(keys, pixels)), plan)[0]
        x.set_shape([size, size, 3])
        return x, tf.one_hot(tf.gather(labels, index), n_classes)

    n = len(samples)
    ds = tf.data.Dataset.range(n)
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(compose, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if training and augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(lambda xy, s: (augment_image(xy[0], s, jitter), xy[1]),
                                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Training drops the last partial batch (when there is a full one): one traced train step.
    return fixed_prefetch(ds.batch(batch_size, drop_remainder=training and n >= batch_size))


def _history_csv(hist: dict[str, list[float]]) -> str:
    keys = list(hist)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for e in range(len(hist[keys[0]]) if keys else 0):
        writer.writerow([e + 1, *[hist[k][e] if e < len(hist[k]) else "" for k in keys]])
    return buf.getvalue()


def _check_settings(options: ExtractOptions, loss: str, epochs: int, batch_size: int, patience: int,
                    dropout: float) -> None:
    if len(options.views) != 1:  # validated (and normalised) by ExtractOptions
        raise DflError(f"finetune takes one view (e.g. x20:rgb), got {','.join(options.views)}")
    if loss not in ("focal", "crossentropy"):
        raise DflError(f"loss must be focal or crossentropy, got {loss!r}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 0)):
        if int(value) < low:
            raise DflError(f"{name} must be >= {low}, got {value}")
    if not 0 <= float(dropout) < 1:
        raise DflError(f"dropout must be in [0, 1), got {dropout}")


def _split(dataset: str | Path, val: str | Path | None, val_fraction: float, split_seed: int):
    """(train source, val source, training samples, validation samples, split record)."""
    from dfl_tf.data.sources import load_source
    from dfl_tf.data.splits import split_samples

    source = load_source(dataset)
    classes = source.classes
    if len(classes) < 2:
        raise DflError(f"{dataset}: fine-tuning needs at least 2 classes, found {classes}")
    if val is not None:
        val_set = load_source(val, classes=classes)
        train_samples = [s for s in source.samples if s.label >= 0]
        val_samples = [s for s in val_set.samples if s.label >= 0]
        split = {"method": "separate source", "val_source": str(val)}
    else:
        val_set = source
        train_ids, val_ids, split = split_samples(dataset, source, val_fraction, split_seed)
        by_id = {s.id: s for s in source.samples}
        train_samples = [by_id[i] for i in train_ids]
        val_samples = [by_id[i] for i in val_ids]
    if not train_samples or not val_samples:
        raise DflError("fine-tuning needs labeled training and validation samples")
    return source, val_set, train_samples, val_samples, {**split, "train": len(train_samples),
                                                         "val": len(val_samples)}


def _build_model(options: ExtractOptions, n_classes: int, seed: int, dropout: float, loss: str, gamma: float,
                 alpha: float, lr: float):
    """(backbone, trainable backbone + softmax head compiled with Adam, loss function)."""
    import keras

    from dfl_tf.backbones.registry import load_backbone

    keras.utils.set_random_seed(int(seed))
    bb = load_backbone(options.backbone, weights=options.weights, input_size=options.input_size, seed=int(seed),
                       fold_bn=False)  # its normalisation trains
    size = bb.input_size
    bb.model.trainable = True
    inputs = keras.Input((size, size, 3), name="images")
    x = bb.model(inputs)
    if dropout > 0:
        x = keras.layers.Dropout(float(dropout), name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"finetuned_{bb.name.replace(':', '_')}")
    loss_fn = (keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma) if loss == "focal"
               else keras.losses.CategoricalCrossentropy())
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(lr)), loss=loss_fn,
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return bb, model, loss_fn


def _validator(val_ds, y_val: np.ndarray, n_classes: int, loss_fn, patience: int):
    """A Keras callback: validation loss, accuracy and balanced accuracy after every epoch; keeps the
    best epoch's weights and probabilities; stops after ``patience`` epochs without improvement."""
    import keras

    class Validate(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.best_weights, self.wait = None, 0, None, 0
            self.probs = None

        def on_epoch_end(self, epoch, logs=None):
            from sklearn import metrics as skm

            raise_if_interrupted()  # a Ctrl-C swallowed inside TensorFlow's C++ stops here at the latest
            logs = logs if logs is not None else {}
            probs = np.asarray(self.model.predict(val_ds, verbose=0), np.float32)
            onehot = np.eye(n_classes, dtype=np.float32)[y_val]
            logs["val_loss"] = float(keras.ops.convert_to_numpy(loss_fn(onehot, probs)))
            logs["val_accuracy"] = float(skm.accuracy_score(y_val, probs.argmax(1)))
            logs["val_balanced_accuracy"] = value = float(skm.balanced_accuracy_score(y_val, probs.argmax(1)))
            if self.best is None or value > self.best:
                self.best, self.best_epoch, self.wait = value, epoch + 1, 0
                self.best_weights = self.model.get_weights()
                self.probs = probs
            else:
                self.wait += 1
                if patience and self.wait >= int(patience):
                    self.model.stop_training = True

    return Validate()


@takes_options(only=FINETUNE_FIELDS)
def finetune(
    dataset: str | Path,
    out: str | Path,
    *,
    options: ExtractOptions | None = None,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    val: str | Path | None = None,
    val_fraction: float = 0.25,
    split_seed: int = 0,
    loss: str = "focal",
    gamma: float = 2.0,
    alpha: float = 0.25,
    dropout: float = 0.0,
    augment: bool = True,
    jitter: float = 1.0,
    patience: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` end to end on ``dataset`` with a softmax head; write OUT.

    Validation: the source ``val`` when given (same classes), else a split of ``dataset``
    (``split`` column, else stratified by class and grouped by ``group``; see
    :func:`dfl_tf.data.splits.split_samples`). After every epoch the validation balanced
    accuracy is computed; the best epoch's weights are kept (early stopping after ``patience``
    epochs without improvement, 0: off). ``options``: an
    :class:`~dfl_tf.options.ExtractOptions`, or its fields as keyword arguments; fine-tuning
    uses ``backbone``, ``weights``, ``input_size``, ``views`` (one), ``fit``, ``pad_to`` and the
    slide read (``mpp``, ``patch_size``, ``slide_mpp``): its read plan, as extraction reads.
    ``batch_size`` is the training batch.
    ``overwrite``: replace an earlier fine-tuning folder at ``out`` (nothing else; see
    :func:`dfl_tf.runtime.outputs.prepare_out`). Returns the content of ``metrics.json``.
    """
    assert options is not None  # resolved by @takes_options
    t0 = time.time()
    _check_settings(options, loss, epochs, batch_size, patience, dropout)
    out = Path(out)
    prepare_out(out, "finetune", (dataset, val), overwrite)
    source, val_set, train_samples, val_samples, split = _split(dataset, val, val_fraction, split_seed)
    classes = source.classes
    bb, model, loss_fn = _build_model(options, len(classes), seed, dropout, loss, gamma, alpha, lr)
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    # the read plan, bound to each source (centre-crop rule and slide geometry as extraction; mixed
    # per-row geometry and small images under the centre-crop rule accepted, as fine-tuning always did)
    plan = options.plan(bb.input_size).replace(allow_mixed_geometry=True, x5_from_image=True)
    train_ds = _image_dataset(train_samples, plan.bind(source), len(classes), int(batch_size), True, int(seed),
                              bool(augment), float(jitter))
    val_ds = _image_dataset(val_samples, plan.bind(val_set), len(classes), int(batch_size), False, int(seed),
                            False, 0.0)
    y_val = np.array([s.label for s in val_samples], np.int64)
    cb = _validator(val_ds, y_val, len(classes), loss_fn, patience)
    settings = {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed),
                "loss": loss, "gamma": float(gamma), "alpha": float(alpha), "dropout": float(dropout),
                "augment": ["flip", "rot90", "brightness", "contrast", "saturation", "hue"] if augment else [],
                "jitter": float(jitter), "fit": options.fit, "pad_to": options.pad_to, "patience": int(patience),
                "optimizer": "adam"}
    info = {"kind": "finetune", "classes": classes,
            "backbone": {**bb.describe(), "fingerprint_before_finetuning": bb.fingerprint},
            "views": list(options.views), "input_size": bb.input_size, "trainable_params": trainable,
            "split": split, "settings": settings, "dataset": str(dataset)}
    return _fit_and_write(model, train_ds, val_ds, cb, y_val, classes, int(epochs), progress, out, info, t0)


def _fit_and_write(model, train_ds, val_ds, cb, y_val: np.ndarray, classes: list[str], epochs: int,
                   progress: bool, out: Path, info: dict[str, Any], t0: float) -> dict[str, Any]:
    """Fit, keep the best epoch, write OUT (temporary folder, then renamed); returns metrics.json."""
    from dfl_tf import __version__
    from dfl_tf.heads.evaluate import compute_metrics

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t_fit = time.time()
        history = model.fit(train_ds, epochs=epochs, callbacks=[cb], verbose=2 if progress else 0, shuffle=False)
        train_s = time.time() - t_fit
        if cb.best_weights is not None:
            model.set_weights(cb.best_weights)
        hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        epochs_run = len(next(iter(hist.values()))) if hist else 0
        probs = cb.probs if cb.probs is not None else np.asarray(model.predict(val_ds, verbose=0))
        metrics = compute_metrics(y_val, probs, classes)
        model.save(tmp / "model.keras")
        wall_s = time.time() - t0
        metrics = {"split": "validation", "best_epoch": cb.best_epoch, "epochs_run": epochs_run,
                   **metrics, "wall_seconds": round(wall_s, 3), "train_seconds": round(train_s, 3)}
        info = {**info, "wall_seconds": round(wall_s, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dfl_tf_version": __version__}
        atomic_write_text(tmp / "history.csv", _history_csv(hist))
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_json(tmp / "finetune.json", info)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics
