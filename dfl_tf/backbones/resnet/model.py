"""ResNet-50 v1.5 in torchvision's layout, for torchvision, DINO, SwAV and Lunit weights.

v1.5: the stride-2 of a downsampling bottleneck sits in its 3x3 conv (Keras Applications'
ResNet50 is v1, stride in the first 1x1). Padding follows torch exactly: explicit
``ZeroPadding2D`` then ``valid`` convs/pools (conv1 7x7/2 pad 3, maxpool 3x3/2 pad 1,
3x3 convs pad 1), BatchNorm eps 1e-5. Inputs get ImageNet mean/std normalisation.

The entries, their weights and the checkpoint converter are in :mod:`.presets`.
"""
from __future__ import annotations

import keras

from dfl_tf.backbones.layers import wrap

BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
BN_EPS = 1e-5
BASE_NAME = "resnet50_tv_base"  # shared by every ResNet-50 spec so converted files interchange


def build_model(input_size: int, name: str = "resnet50_tv"):
    """Wrapped model ([0,255] RGB -> 2048-d pooled features) and its torch layout.

    The layout lists ``(keras_layer, torch_prefix, kind)`` for the weight converter.
    """
    layout: list = []

    def conv(x, filters, kernel, stride, prefix, pad):
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{prefix}_pad".replace(".", "_"))(x)
        layer = keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                                    name=prefix.replace(".", "_"))
        layout.append((layer, prefix, "conv"))
        return layer(x)

    def bn(x, prefix):
        layer = keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=0.9, name=prefix.replace(".", "_"))
        layout.append((layer, prefix, "bn"))
        return layer(x)

    def relu(x, name):
        return keras.layers.ReLU(name=name.replace(".", "_"))(x)

    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = conv(inputs, 64, 7, 2, "conv1", pad=3)
    x = relu(bn(x, "bn1"), "relu")
    # torch pads the max-pool with -inf; after the ReLU every value is >= 0, so zeros are equivalent
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS), start=1):
        for index in range(blocks):
            prefix = f"layer{stage}.{index}"
            stride = 2 if (index == 0 and stage > 1) else 1
            out_channels = width * EXPANSION
            shortcut = x
            y = relu(bn(conv(x, width, 1, 1, f"{prefix}.conv1", 0), f"{prefix}.bn1"), f"{prefix}.relu1")
            y = relu(bn(conv(y, width, 3, stride, f"{prefix}.conv2", 1), f"{prefix}.bn2"), f"{prefix}.relu2")
            y = bn(conv(y, out_channels, 1, 1, f"{prefix}.conv3", 0), f"{prefix}.bn3")
            if index == 0 and (stride != 1 or in_channels != out_channels):
                shortcut = bn(conv(x, out_channels, 1, stride, f"{prefix}.downsample.0", 0),
                              f"{prefix}.downsample.1")
            x = keras.layers.Add(name=f"{prefix}_add".replace(".", "_"))([y, shortcut])
            x = relu(x, f"{prefix}.relu")
            in_channels = out_channels
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    base = keras.Model(inputs, x, name=BASE_NAME)
    return wrap(base, input_size, "torch", name), layout
