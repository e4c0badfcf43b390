"""Frozen feature extractors: a registry of named backbones and their builders."""
from dfl_tf.backbones.registry import (  # noqa: F401
    Backbone,
    BackboneSpec,
    WeightSource,
    get_spec,
    list_specs,
    load_backbone,
    register,
)
from dfl_tf.backbones.converter import import_weights  # noqa: F401,E402
from dfl_tf.backbones.torch_import import load_checkpoint  # noqa: F401,E402  (numpy only, no torch)
from dfl_tf.backbones.weights import cache_dir, fetch  # noqa: F401,E402
