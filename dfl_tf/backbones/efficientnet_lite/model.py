"""EfficientNet-Lite0 in Keras, matching the ``efficientnet_lite_pytorch`` reference.

Lite variants drop squeeze-and-excitation, use ReLU6, and keep the stem (32) and head
(1280) widths fixed. Convs use TensorFlow ``same`` padding (asymmetric for stride 2,
which is what the reference's ``Conv2dStaticSamePadding`` reproduces); BatchNorm eps 1e-3.
Inputs are mapped with ``(x - 127) / 128``, the "inception-style" normalisation the
official Lite models were trained with.

The entry, its weights and its checkpoint converter are in :mod:`.presets`.
"""
from __future__ import annotations

import keras

from dfl_tf.backbones.layers import wrap

BN_EPS = 1e-3
MEAN, STD = 127.0, 128.0
BASE_NAME = "efficientnet_lite0_base"
# (repeats, kernel, stride, expand, in, out), efficientnet_lite_builder.py with the Lite0
# coefficients (width 1.0, depth 1.0); the first and last stages are never rescaled.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280


def build_model(input_size: int, name: str = "efficientnet_lite0"):
    """Wrapped model ([0,255] RGB -> 1280-d pooled features) and its torch layout."""
    layout: list = []

    def kname(prefix: str) -> str:
        return prefix.strip("_").replace("._", "_").replace(".", "_")

    def conv(x, filters, kernel, stride, prefix):
        layer = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                    name=kname(prefix))
        layout.append((layer, prefix, "conv"))
        return layer(x)

    def dwconv(x, kernel, stride, prefix):
        layer = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                             name=kname(prefix))
        layout.append((layer, prefix, "dwconv"))
        return layer(x)

    def bn(x, prefix):
        layer = keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=0.99, name=kname(prefix))
        layout.append((layer, prefix, "bn"))
        return layer(x)

    def relu6(x, prefix):
        return keras.layers.ReLU(max_value=6.0, name=kname(prefix) + "_relu6")(x)

    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / STD, offset=-MEAN / STD, name="lite_normalise")(inputs)
    x = relu6(bn(conv(x, STEM, 3, 2, "_conv_stem"), "_bn0"), "_stem")
    index = 0
    for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
        for r in range(repeats):
            prefix = f"_blocks.{index}"
            block_in = in_ch if r == 0 else out_ch
            block_stride = stride if r == 0 else 1
            y = x
            if expand != 1:
                y = relu6(bn(conv(y, block_in * expand, 1, 1, f"{prefix}._expand_conv"), f"{prefix}._bn0"),
                          f"{prefix}._expand")
            y = relu6(bn(dwconv(y, kernel, block_stride, f"{prefix}._depthwise_conv"), f"{prefix}._bn1"),
                      f"{prefix}._depthwise")
            y = bn(conv(y, out_ch, 1, 1, f"{prefix}._project_conv"), f"{prefix}._bn2")
            if block_stride == 1 and block_in == out_ch:
                y = keras.layers.Add(name=kname(prefix) + "_add")([y, x])
            x = y
            index += 1
    x = relu6(bn(conv(x, HEAD, 1, 1, "_conv_head"), "_bn1"), "_head")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    base = keras.Model(inputs, x, name=BASE_NAME)
    return wrap(base, input_size, "none", name), layout
