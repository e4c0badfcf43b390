"""Keras Applications backbones: ResNet50 (v1), ConvNeXt, EfficientNetB0, DenseNet121.

ImageNet weights come from the Keras download (URL and file hash inside Keras, cached in
``~/.keras/models``); ``weights=None`` gives a random init; a path loads a local weights file.
"""
from __future__ import annotations

import keras

from dfl_tf.backbones.layers import wrap
from dfl_tf.backbones.registry import BackboneSpec, WeightSource, register

_KERAS_LICENSE = "Keras Applications weights (Apache-2.0 code); trained on ImageNet-1k, whose terms restrict use to research"


def _imagenet(filename: str, url: str) -> dict[str, WeightSource]:
    return {"imagenet": WeightSource("imagenet", url=url, filename=filename, license=_KERAS_LICENSE,
                                     note="Keras download, hash checked by keras.utils.get_file")}


def _builder(app, mode: str, name: str, **app_kwargs):
    def build(input_size: int, weights: str | None) -> keras.Model:
        base = app(include_top=False, weights=weights, input_shape=(input_size, input_size, 3),
                   pooling="avg", **app_kwargs)
        return wrap(base, input_size, mode, name)

    return build


_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"

register(BackboneSpec(
    name="resnet50",
    builder=_builder(keras.applications.ResNet50, "caffe", "resnet50"),
    input_size=224, dim=2048,
    weights=_imagenet("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      _BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    description="ResNet-50 v1 (Keras Applications), caffe preprocessing",
))
register(BackboneSpec(
    name="convnext_tiny",
    builder=_builder(keras.applications.ConvNeXtTiny, "none", "convnext_tiny"),
    input_size=224, dim=768,
    weights=_imagenet("convnext_tiny_notop.h5", _BASE + "convnext/convnext_tiny_notop.h5"),
    description="ConvNeXt-Tiny (Keras Applications), built-in normalisation",
))
register(BackboneSpec(
    name="efficientnet_b0",
    builder=_builder(keras.applications.EfficientNetB0, "none", "efficientnet_b0"),
    input_size=224, dim=1280,
    weights=_imagenet("efficientnetb0_notop.h5", _BASE + "efficientnetb0_notop.h5"),
    description="EfficientNet-B0 (Keras Applications), built-in rescaling",
))
register(BackboneSpec(
    name="densenet121",
    builder=_builder(keras.applications.DenseNet121, "torch", "densenet121"),
    input_size=224, dim=1024,
    weights=_imagenet("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      _BASE + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    description="DenseNet-121 (Keras Applications), torch preprocessing",
))
