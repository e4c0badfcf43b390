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
