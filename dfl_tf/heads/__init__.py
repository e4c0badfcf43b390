"""Heads trained on stored embeddings: model builder, feature-space augmentations, training.

``dfl_tf.heads.model`` (build_head, load_head), ``dfl_tf.heads.augment`` (noise, scaled noise,
feature dropout, mixup), ``dfl_tf.heads.train`` (train_head), ``dfl_tf.heads.tuning``
(small-data cross-validation; fits batched by ``dfl_tf.heads.batched``) and
``dfl_tf.heads.probe`` (the linear-probe reference); ``dfl_tf.heads.slide``: slide-level heads
(attention MIL on bags of records). Submodules are imported lazily.
"""
from __future__ import annotations


def __getattr__(name: str):
    import importlib

    api = {"train_head": "dfl_tf.heads.train", "build_head": "dfl_tf.heads.model",
           "load_head": "dfl_tf.heads.model"}
    if name in api:
        return getattr(importlib.import_module(api[name]), name)
    raise AttributeError(f"module 'dfl_tf.heads' has no attribute {name!r}")


__all__ = ["train_head", "build_head", "load_head"]
