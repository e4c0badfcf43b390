"""Head training options (``dfl train``, :func:`dfl_tf.train_head`): one frozen dataclass,
validated once, at the boundary (a value out of range is a one-line error naming its flag).

The CLI builds the flags from the fields (``dfl_tf.cli.option_flags``); YAML configs are checked
against their types (:func:`dfl_tf.config.merge`). Fields with ``cli=False`` are Python and config
only. This module does not import TensorFlow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dfl_tf.data.splits import DEFAULT_FOLDS
from dfl_tf.errors import DflError
from dfl_tf.options.base import option

LOSSES = ("focal", "crossentropy")
LOSS_ALIASES = ("ce", "categorical_crossentropy", "cross-entropy")  # accepted for crossentropy
MONITORS = ("val_balanced_accuracy", "val_loss", "val_accuracy", "val_f1_macro", "val_cohen_kappa",
            "val_roc_auc", "val_pr_auc")
SELECT_MODES = ("auto", "always", "never")
CLASS_WEIGHTS = ("none", "balanced")
AGGREGATORS = ("abmil", "mean", "max")  # slide heads (dfl_tf.heads.slide.model)

#: train_head's numeric options: (flag, lowest, lowest included, highest, highest included); None: unbounded
TRAIN_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "epochs": (1, True, None, False), "batch_size": (1, True, None, False), "hidden": (0, True, None, False),
    "patience": (0, True, None, False), "cv_folds": (2, True, None, False), "dropout": (0, True, 1, False),
    "noise": (0, True, 1, True), "weight_decay": (0, True, None, False), "lr": (0, False, None, False),
    "gamma": (0, True, None, False), "alpha": (0, True, 1, True), "max_instances": (1, True, None, False),
    "bags_per_step": (1, True, None, False),
}


def check_ranges(**values: Any) -> None:
    """Refuse (:class:`DflError` naming the option and its flag) a numeric option of ``train_head``
    outside its range (:data:`TRAIN_RANGES`; None values are skipped), wherever it came from
    (flag, ``--config`` file, Python)."""
    for name, value in values.items():
        if value is None:
            continue
        low, low_in, high, high_in = TRAIN_RANGES[name]
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise DflError(f"{name} must be a number (--{name.replace('_', '-')}), got {value!r}") from None
        ok = math.isfinite(v) and (v >= low if low_in else v > low) and (
            high is None or (v <= high if high_in else v < high))
        if not ok:
            if high is None:
                rule = f">= {low:g}" if low_in else f"> {low:g}"
            else:
                rule = f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            label = "noise std" if name == "noise" else name
            raise DflError(f"{label} must be {rule} (--{name.replace('_', '-')}), got {value}")


def parse_reduce(spec: str) -> tuple[str, int | float | None]:
    """``pca:K`` -> ("pca", K), ``pca:0.99`` -> ("pca", 0.99), ``whiten`` -> ("whiten", None)."""
    text = str(spec).strip()
    if text == "whiten":
        return "whiten", None
    method, _, amount = text.partition(":")
    try:
        value: int | float = int(amount) if amount.isdigit() else float(amount)
    except ValueError:
        value = -1
    if method != "pca" or not (isinstance(value, int) and value >= 1 or isinstance(value, float) and 0 < value < 1):
        raise DflError(f"--reduce must be pca:K (K >= 1 components), pca:F (a variance fraction in (0, 1)) or "
                       f"whiten, got {spec!r}")
    return method, value


@dataclass(frozen=True)
class TrainOptions:
    """How a head is trained on stored embeddings: model, regularisation, selection, loss, fit."""

    hidden: int | None = option(None, "Hidden units (0: linear softmax head).", type=int, shown=256)
    dropout: float = option(0.0, "Dropout after the hidden layer.", type=float)
    noise: float | None = option(None, "Feature-noise std in [0, 1] (default: chosen by --select on small training "
                                 "sets, else 0.1; 0 disables it).", type=float)
    weight_decay: float | None = option(None, "AdamW decoupled weight decay on the kernels (0: Adam; default: chosen "
                                        "by --select on small training sets, else 1e-4).", type=float)
    select: str = option("auto", "Choose hidden units, weight decay and noise std (those not given), or the linear "
                         "probe, on --val, else by cross-validation on the training set (auto: when it has < 2,000 "
                         "records or < 50 in a class); the grid is the config key cv_grid.", choices=SELECT_MODES)
    cv_folds: int = option(DEFAULT_FOLDS, "Folds of that cross-validation, without --val (stratified, grouped by "
                           "group).", type=int)
    probe: bool = option(True, "Also fit the linear-probe reference (LogisticRegression, probe.npz).", flag=True,
                         negatable=True)
    positive_class: str | None = option(None, "Two-class tasks: the positive class (threshold, PR curve, GeoJSON; "
                                        "default: the second class).")
    loss: str = option("focal", "Focal loss (--gamma, --alpha) or categorical cross-entropy.", choices=LOSSES)
    gamma: float = option(2.0, "Focal loss gamma.", type=float)
    alpha: float = option(0.25, "Focal loss alpha.", type=float)
    epochs: int = option(50, "Maximum epochs.", type=int)
    lr: float = option(1e-3, "Adam(W) learning rate.", type=float)
    batch_size: int = option(256, "Training batch size.", type=int)
    seed: int = option(0, "Seed of init, shuffling, noise and cross-validation folds (same seed, same weights).",
                       type=int)
    patience: int = option(10, "Early-stopping patience (0: off).", type=int)
    monitor: str = option("val_balanced_accuracy", "Validation metric for early stopping and best weights (needs "
                          "--val).", choices=MONITORS)
    class_weight: str | Mapping[str, float] | None = option(
        None, "balanced: weight the loss by inverse class frequency.", choices=CLASS_WEIGHTS, shown="none")
    balanced_sampling: bool = option(False, "Draw classes uniformly in each batch.", flag=True, negatable=True)
    devices: str | Sequence[str] | None = option(
        None, "Mirror over devices: auto, none, all or /gpu:0,/gpu:1 (default: $DFL_TF_DEVICES, else auto).")
    reduce: str | None = option(None, "Reduce the embedding in the head: pca:K (K components), pca:0.99 (the "
                                "components keeping that variance fraction) or whiten (PCA whitening), fitted on "
                                "the training embeddings (a frozen Dense layer; no selection then).")
    slide_labels: str | None = option(None, "Slide label CSV slide,label[,patient][,split]: train a slide head on "
                                      "bags of records sharing a slide (or group) instead of a patch head.")
    aggregator: str = option("abmil", "Slide heads: gated attention MIL (abmil), mean or max pooling.",
                             choices=AGGREGATORS)
    max_instances: int = option(512, "Slide heads: instances drawn per bag and training step (all in evaluation).",
                                type=int)
    bags_per_step: int = option(8, "Slide heads: bags per training step.", type=int)
    # Python and config only
    augment: Sequence[Any] | None = option(None, "Augmentations, e.g. [{name: noise, std: 0.1}, {name: mixup, "
                                           "alpha: 0.2}] (dfl_tf.heads.augment).", cli=False)
    cv_grid: Mapping[str, Sequence[float]] | None = option(None, "Selection grid {hidden, weight_decay, noise: "
                                                           "[values]}.", cli=False)
    histogram_freq: int = option(1, "TensorBoard histograms every N epochs (0: off).", cli=False)
    cache_gb: float = option(2.0, "Keep training records in memory up to this many GB, else stream them.",
                             cli=False)

    def __post_init__(self) -> None:
        if self.loss in LOSS_ALIASES:
            object.__setattr__(self, "loss", "crossentropy")
        if self.loss not in LOSSES:
            raise DflError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.monitor not in MONITORS:
            raise DflError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        check_ranges(**{name: getattr(self, name) for name in TRAIN_RANGES})
        if self.reduce is not None:
            parse_reduce(self.reduce)
        if self.aggregator not in AGGREGATORS:
            raise DflError(f"aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        if self.select not in SELECT_MODES:
            raise DflError(f"select must be one of {', '.join(SELECT_MODES)}, got {self.select!r}")

    def settings(self) -> dict[str, Any]:
        """The fields as plain values (numbers as int/float), for head.json."""
        return {"dropout": float(self.dropout), "select": self.select, "cv_folds": int(self.cv_folds),
                "loss": self.loss, "gamma": float(self.gamma), "alpha": float(self.alpha), "epochs": int(self.epochs),
                "lr": float(self.lr), "batch_size": int(self.batch_size), "seed": int(self.seed),
                "patience": int(self.patience), "monitor": self.monitor}
