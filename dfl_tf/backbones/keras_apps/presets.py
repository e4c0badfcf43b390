"""Keras Applications backbones: ResNet50 (v1), ConvNeXt-Tiny and -Base, EfficientNetB0, DenseNet121.

ImageNet weights come from the Keras download (URL and file hash inside Keras, cached in
``~/.keras/models``); ``weights=None`` gives a random init; a path loads a local weights file.
No checkpoint converter: Keras files load as they are.
"""
from __future__ import annotations

import keras

from dfl_tf.backbones.layers import PREPROCESSING, wrap
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

# name, application, preprocessing mode, dim, trainable parameters (without batch-norm statistics;
# tests/backbones/test_backbones_listing.py builds each and counts), weights file under _BASE, description
_APPS = (
    ("resnet50", keras.applications.ResNet50, "caffe", 2048, 23_534_592,
     "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
     "ResNet-50 v1 (Keras Applications), caffe preprocessing"),
    ("convnext_tiny", keras.applications.ConvNeXtTiny, "none", 768, 27_820_128, "convnext/convnext_tiny_notop.h5",
     "ConvNeXt-Tiny (Keras Applications), built-in normalisation"),
    ("convnext_base", keras.applications.ConvNeXtBase, "none", 1024, 87_566_464, "convnext/convnext_base_notop.h5",
     "ConvNeXt-Base (Keras Applications ConvNeXtBase; the paper's ConvNeXt-B)"),
    ("efficientnet_b0", keras.applications.EfficientNetB0, "none", 1280, 4_007_548, "efficientnetb0_notop.h5",
     "EfficientNet-B0 (Keras Applications), built-in rescaling"),
    ("densenet121", keras.applications.DenseNet121, "torch", 1024, 6_953_856,
     "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
     "DenseNet-121 (Keras Applications), torch preprocessing"),
)
for _name, _app, _mode, _dim, _params, _file, _description in _APPS:
    register(BackboneSpec(name=_name, builder=_builder(_app, _mode, _name), input_size=224, dim=_dim,
                          weights=_imagenet(_file.rsplit("/", 1)[-1], _BASE + _file), description=_description,
                          params=_params, preprocessing=PREPROCESSING[_mode]))
