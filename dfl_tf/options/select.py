"""Backbone selection options (``dfl select``, :func:`dfl_tf.select_backbones`): the linear-head
protocol, the pre-screen and the maps. How each candidate is extracted is an
:class:`~dfl_tf.options.ExtractOptions` (its ``SELECT_FIELDS``). No TensorFlow is imported here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dfl_tf.errors import DflError
from dfl_tf.options.base import option

MAP_METHODS = ("auto", "umap", "pca", "tsne")


def parse_control(value: bool | str) -> bool | str:
    """``--control``: true/auto/best -> True, false/none/off -> False, else an architecture name."""
    if isinstance(value, bool):
        return value
    low = value.strip().lower()
    if low in ("true", "yes", "1", "auto", "best"):
        return True
    if low in ("false", "no", "0", "none", "off"):
        return False
    return value


@dataclass(frozen=True)
class SelectOptions:
    """How backbones are ranked: linear heads per seed on one split, k-NN pre-screen, maps."""

    seeds: int = option(5, "Linear heads per backbone (0: k-NN only).", type=int)
    weights: str | Mapping[str, str] | None = option(
        "default", "One source for all, or name=weights pairs: 'imagenet,efficientnet_b0=none'.")
    val_fraction: float = option(0.25, "Validation share when the source has no 'split' column.", type=float)
    epochs: int = option(30, "Linear head epochs.", type=int)
    noise: float = option(0.1, "Feature-noise std (0: off).", type=float)
    lr: float = option(1e-3, "Adam learning rate of the heads.", type=float)
    head_batch_size: int = option(256, "Linear head batch size.", type=int)
    loss: str = option("focal", "Focal loss or categorical cross-entropy.", choices=("focal", "crossentropy"))
    gamma: float = option(2.0, "Focal loss gamma.", cli=False)
    alpha: float = option(0.25, "Focal loss alpha.", cli=False)
    seed: int = option(0, "First head seed.", type=int)
    split_seed: int = option(0, "Seed of the train/val split.", type=int)
    control: bool | str = option(True, "Random-init control: true (best registry architecture), false, or an "
                                 "architecture name.", shown="true", convert=parse_control)
    knn_k: int = option(10, "Neighbours of the k-NN pre-screen.", type=int)
    maps: bool = option(True, "maps.png and projector/ exports.", flag=True, negatable=True)
    map_method: str = option("auto", "auto: UMAP when umap-learn is installed, else PCA.", choices=MAP_METHODS)
    max_points: int = option(2000, "Points per map / projector set.", type=int)

    def __post_init__(self) -> None:
        if int(self.seeds) < 0:
            raise DflError(f"seeds must be >= 0, got {self.seeds}")
        if self.loss not in ("focal", "crossentropy"):
            raise DflError(f"loss must be focal or crossentropy, got {self.loss!r}")
        for label in ("epochs", "head_batch_size", "knn_k"):
            value = getattr(self, label)
            if int(value) < 1:
                raise DflError(f"{label} must be >= 1, got {value}")
