"""Registry entries of the torchvision-layout ResNet-50 (:mod:`.model`): torchvision ImageNet,
DINO, SwAV and Lunit's pathology ResNet-50s, and their checkpoint converter.

Weights: named sources are downloaded once, hash checked, converted (torch-free) and cached as
``.weights.h5``; a local ``.weights.h5`` loads directly, and a local torch checkpoint
(``.pth``/``.pth.tar``) is converted in memory. ``dfl import-weights --arch NAME`` converts any
of these entries' checkpoints with :func:`convert_resnet` (one layout for all).
"""
from __future__ import annotations

import os
from pathlib import Path

import keras

from dfl_tf.backbones import weights as weight_cache
from dfl_tf.backbones.checkpoints import state_dict
from dfl_tf.backbones.layers import LUNIT_MEAN, LUNIT_STD, PREPROCESSING, Normalize, describe_normalisation
from dfl_tf.backbones.registry import BackboneSpec, get_spec, register
from dfl_tf.backbones.resnet.model import BASE_NAME, build_model

ARCH = "resnet50_tv"  # the layout's name in conversion messages
#: torch keys outside the trunk: classifier, DINO/SwAV projection heads and prototypes
IGNORED = ("fc.", "projection_head.", "prototypes.", "head.")


def convert_resnet(checkpoint: str | os.PathLike, out: str | os.PathLike, input_size: int | None = None) -> Path:
    """``dfl import-weights`` for every ResNet-50 entry: a torchvision-layout checkpoint -> ``.weights.h5``."""
    return state_dict.convert_checkpoint(lambda: build_model(input_size or 224, name=ARCH), checkpoint, ARCH, out,
                                         IGNORED)


def make_builder(spec_name: str, arch: str = ARCH, build=build_model):
    """``builder(input_size, weights)`` for a registry spec; named sources come from the spec."""

    def builder(input_size: int, weights: str | None) -> keras.Model:
        model, layout = build(input_size, name=spec_name)
        if weights is None:
            return model
        source = get_spec(spec_name).weight_source(weights)
        if source is not None:
            def convert(raw: Path, out: Path) -> None:
                state_dict.convert_checkpoint(lambda: build(input_size, name=spec_name), raw, arch, out, IGNORED)

            weights = str(weight_cache.converted(spec_name, weights, source, convert,
                                                 local_file=weight_cache.downloaded(source)))
        state_dict.load_weights_file(model, layout, weights, arch, spec_name, IGNORED)
        return model

    return builder


def _lunit_resnet(input_size: int, name: str = "lunit_resnet50"):
    """The torchvision ResNet-50 trunk behind Lunit's mean/std."""
    wrapped, layout = build_model(input_size, name=name)
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = Normalize(LUNIT_MEAN, LUNIT_STD, name="preprocess")(inputs)
    x = wrapped.get_layer(BASE_NAME)(x, training=False)
    x = keras.layers.Activation("linear", dtype="float32", name="embedding")(x)
    return keras.Model(inputs, x, name=name), layout


# torchvision publishes only the first 8 hex digits of the sha256 (in the file name, checked by
# torch.hub's check_hash); we verify that prefix. DINO and SwAV publish no checksum at all.
TORCHVISION = weight_cache.url_source(
    "resnet50_tv", "imagenet", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms restrict use to research",
    "torchvision IMAGENET1K_V1; sha256 prefix from the file name", sha256="0676ba61")
DINO = weight_cache.url_source(
    "dino_resnet50", "dino", "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
    "Apache-2.0 (DINO, facebookresearch/dino); self-supervised on ImageNet-1k", "no published checksum")
SWAV = weight_cache.url_source(
    "swav_resnet50", "swav", "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
    "CC-BY-NC-4.0 (SwAV, facebookresearch/swav): non-commercial use only", "800-epoch SwAV; no published checksum")

#: Trainable parameters of the pooled ResNet-50 (no fc; batch-norm statistics not counted), as torch counts them.
RESNET50_PARAMS = 23_508_032
TORCH_PREPROCESSING = PREPROCESSING["torch"]

for _name, _source, _aliases, _what in (
        ("resnet50_tv", TORCHVISION, ("resnet50",), "supervised ImageNet weights, torch preprocessing"),
        ("dino_resnet50", DINO, (), "DINO self-supervised weights"),
        ("swav_resnet50", SWAV, (), "SwAV self-supervised weights (non-commercial)")):
    register(BackboneSpec(
        name=_name, builder=make_builder(_name), input_size=224, dim=2048, params=RESNET50_PARAMS,
        preprocessing=TORCH_PREPROCESSING, weights={_source.name: _source}, default_weights=_source.name,
        description=f"ResNet-50 v1.5 (torchvision layout), {_what}", converter=convert_resnet,
        import_aliases=_aliases,
    ))

_LUNIT = "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
_LUNIT_LIC = "Lunit Public License: non-commercial research use only (lunit-io/benchmark-ssl-pathology)"
_LUNIT_REF = ("lunit-io/benchmark-ssl-pathology README (timm VisionTransformer img 224, num_classes 0); "
              "mean/std from kaiko-ai/eva backbones/pathology/lunit.py")
for _method in ("bt", "swav", "mocov2"):
    _name = f"lunit_resnet50_{_method}"
    register(BackboneSpec(
        name=_name, builder=make_builder(_name, build=_lunit_resnet), input_size=224, dim=2048,
        weights={_method: weight_cache.url_source(_name, _method, f"{_LUNIT}{_method}_rn50_ep200.torch", _LUNIT_LIC,
                                                  "no published checksum")},
        default_weights=_method, params=RESNET50_PARAMS, preprocessing=describe_normalisation(LUNIT_MEAN, LUNIT_STD),
        description=f"Lunit ResNet-50 ({_method}, TCGA), torchvision layout. Source: {_LUNIT_REF}",
        converter=convert_resnet,
    ))
