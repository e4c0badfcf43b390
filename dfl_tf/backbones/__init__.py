"""Frozen feature extractors: the registry (:mod:`~dfl_tf.backbones.registry`), shared parts
(layers, batch-norm folding, the weights cache, checkpoint readers under ``checkpoints/``) and
one subpackage per backbone family (``vit/``, ``resnet/``, ``efficientnet_lite/``,
``keras_apps/``, ``savedmodel/``, ``toy/``), found by the registry without a list.

The public names below load lazily, so importing this package stays cheap.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Backbone": "dfl_tf.backbones.base",
    "BackboneSpec": "dfl_tf.backbones.registry",
    "WeightSource": "dfl_tf.backbones.registry",
    "get_spec": "dfl_tf.backbones.registry",
    "list_specs": "dfl_tf.backbones.registry",
    "load_backbone": "dfl_tf.backbones.registry",
    "register": "dfl_tf.backbones.registry",
    "import_weights": "dfl_tf.backbones.converter",
    "load_checkpoint": "dfl_tf.backbones.checkpoints.torch_pickle",
    "cache_dir": "dfl_tf.backbones.weights",
    "fetch": "dfl_tf.backbones.weights",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dfl_tf.backbones' has no attribute {name!r}")
