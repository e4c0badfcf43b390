"""Fine-tuning baseline options (``dfl finetune``, :func:`dfl_tf.finetune`): training of the
backbone and its softmax head end to end. How samples are read is an
:class:`~dfl_tf.options.ExtractOptions` (its ``FINETUNE_FIELDS``). No TensorFlow is imported here.

The flags are generated from these fields; :func:`dfl_tf.finetune` still types them as keyword
arguments (the fine-tuning code is being split by other work), and ``tests/test_options_flags.py``
holds its defaults equal to these.
"""
from __future__ import annotations

from dataclasses import dataclass

from dfl_tf.errors import DflError
from dfl_tf.options.base import option
from dfl_tf.options.train import LOSSES


@dataclass(frozen=True)
class FinetuneOptions:
    """How the backbone is fine-tuned: epochs, optimiser, split, loss, augmentation."""

    epochs: int = option(10, "Maximum epochs.", type=int)
    lr: float = option(1e-4, "Adam learning rate.", type=float)
    batch_size: int = option(32, "Training batch size.", type=int)
    seed: int = option(0, "Seed of init, augmentation and shuffling.", type=int)
    val_fraction: float = option(0.25, "Validation share when there is no --val and no 'split' column.", type=float)
    split_seed: int = option(0, "Seed of the train/val split.", type=int)
    loss: str = option("focal", "Focal loss (--gamma, --alpha) or categorical cross-entropy.", choices=LOSSES)
    gamma: float = option(2.0, "Focal loss gamma.", type=float)
    alpha: float = option(0.25, "Focal loss alpha.", type=float)
    dropout: float = option(0.0, "Dropout before the softmax layer.", type=float)
    augment: bool = option(True, "Flips, 90-degree rotations, colour jitter.", flag=True, negatable=True)
    jitter: float = option(1.0, "Colour-jitter strength (0: off).", type=float)
    patience: int = option(0, "Early-stopping patience (0: off).", type=int)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise DflError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
