"""ResNet-50 v1.5 in torchvision's layout, for torchvision, DINO and SwAV weights.

v1.5: the stride-2 of a downsampling bottleneck sits in its 3x3 conv (Keras Applications'
ResNet50 is v1, stride in the first 1x1). Padding follows torch exactly: explicit
``ZeroPadding2D`` then ``valid`` convs/pools (conv1 7x7/2 pad 3, maxpool 3x3/2 pad 1,
3x3 convs pad 1), BatchNorm eps 1e-5. Inputs get ImageNet mean/std normalisation.

Weights: named sources are downloaded once, hash checked, converted (torch-free) and
cached as ``.weights.h5``; a local ``.weights.h5`` loads directly, and a local torch
checkpoint (``.pth``/``.pth.tar``) is converted in memory.
"""
from __future__ import annotations

from pathlib import Path

import keras

from dfl_tf.backbones import weights as weight_cache
from dfl_tf.backbones.layers import PREPROCESSING, wrap
from dfl_tf.backbones.registry import BackboneSpec, WeightSource, get_spec, register

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


def make_builder(spec_name: str, arch: str = "resnet50_tv", build=build_model):
    """``builder(input_size, weights)`` for a registry spec; named sources come from the spec."""

    def builder(input_size: int, weights: str | None) -> keras.Model:
        from dfl_tf.backbones import torch_import

        model, layout = build(input_size, name=spec_name)
        if weights is None:
            return model
        spec = get_spec(spec_name)
        source = spec.weight_source(weights)
        if source is not None:
            def convert(raw: Path, out: Path) -> None:
                torch_import.convert_checkpoint(lambda: build(input_size, name=spec_name), raw, arch, out)

            path = weight_cache.converted(spec_name, weights, source, convert,
                                          local_file=_local_file_of(source))
            torch_import.load_weights_file(model, layout, str(path), arch, spec_name)
        else:
            torch_import.load_weights_file(model, layout, weights, arch, spec_name)
        return model

    return builder


def _local_file_of(source: WeightSource):
    """A raw download already in the cache (converting it needs no network)."""

    def local() -> str | None:
        path = weight_cache.download_path(source)
        return str(path) if path.exists() else None

    return local


def _source(spec_name: str, key: str, url: str, sha256: str | None, license: str, note: str) -> WeightSource:
    """A downloadable checkpoint (file name: the URL's last part), offline once downloaded."""
    fields = dict(url=url, sha256=sha256, license=license, filename=url.rsplit("/", 1)[-1], note=note)
    local = _local_file_of(WeightSource(key, **fields))
    return WeightSource(key, **fields, offline_path=weight_cache.offline_checker(spec_name, key, local))


# torchvision publishes only the first 8 hex digits of the sha256 (in the file name, checked by
# torch.hub's check_hash); we verify that prefix. DINO and SwAV publish no checksum at all.
TORCHVISION = _source("resnet50_tv", "imagenet", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                      "0676ba61", "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms restrict use to "
                      "research", "torchvision IMAGENET1K_V1; sha256 prefix from the file name")
DINO = _source("dino_resnet50", "dino",
               "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth", None,
               "Apache-2.0 (DINO, facebookresearch/dino); self-supervised on ImageNet-1k", "no published checksum")
SWAV = _source("swav_resnet50", "swav", "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
               None, "CC-BY-NC-4.0 (SwAV, facebookresearch/swav): non-commercial use only",
               "800-epoch SwAV; no published checksum")

#: Trainable parameters of the pooled ResNet-50 (no fc; batch-norm statistics not counted), as torch counts them.
RESNET50_PARAMS = 23_508_032
TORCH_PREPROCESSING = PREPROCESSING["torch"]

register(BackboneSpec(
    name="resnet50_tv", builder=make_builder("resnet50_tv"), input_size=224, dim=2048,
    params=RESNET50_PARAMS, preprocessing=TORCH_PREPROCESSING,
    weights={"imagenet": TORCHVISION}, default_weights="imagenet",
    description="ResNet-50 v1.5 (torchvision layout), supervised ImageNet weights, torch preprocessing",
))
register(BackboneSpec(
    name="dino_resnet50", builder=make_builder("dino_resnet50"), input_size=224, dim=2048,
    params=RESNET50_PARAMS, preprocessing=TORCH_PREPROCESSING,
    weights={"dino": DINO}, default_weights="dino",
    description="ResNet-50 v1.5 (torchvision layout), DINO self-supervised weights",
))
register(BackboneSpec(
    name="swav_resnet50", builder=make_builder("swav_resnet50"), input_size=224, dim=2048,
    params=RESNET50_PARAMS, preprocessing=TORCH_PREPROCESSING,
    weights={"swav": SWAV}, default_weights="swav",
    description="ResNet-50 v1.5 (torchvision layout), SwAV self-supervised weights (non-commercial)",
))
