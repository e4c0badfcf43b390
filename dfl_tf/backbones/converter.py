"""``dfl import-weights``: build an architecture and convert a checkpoint into ``.weights.h5``.

Above the architecture modules (:mod:`~dfl_tf.backbones.resnet_tv`,
:mod:`~dfl_tf.backbones.efficientnet_lite`, the ViT zoo :mod:`~dfl_tf.backbones.vit_zoo`) and
the readers they share (:mod:`~dfl_tf.backbones.torch_import`,
:mod:`~dfl_tf.backbones.vit_weights`), which import none of them.
"""
from __future__ import annotations

import os
from pathlib import Path

from dfl_tf.runtime.files import atomic_save_weights
from dfl_tf.backbones.torch_import import canonical_arch, convert_checkpoint
from dfl_tf.errors import DflError


def build_with_layout(arch: str, input_size: int | None = None):
    """Build the wrapped Keras model of ``arch`` (random init) and its torch layout."""
    arch = canonical_arch(arch)
    if arch == "resnet50_tv":
        from dfl_tf.backbones import resnet_tv

        return resnet_tv.build_model(input_size or 224, name="resnet50_tv")
    from dfl_tf.backbones import efficientnet_lite

    return efficientnet_lite.build_model(input_size or 224, name="efficientnet_lite0")


def import_weights(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike,
                   input_size: int | None = None) -> Path:
    """Convert a PyTorch checkpoint of ``arch`` into a Keras ``.weights.h5`` file.

    Args:
        checkpoint: a torchvision / DINO / SwAV ResNet-50 or EfficientNet-Lite0 checkpoint
            (``module.``/``backbone.`` prefixes and ``state_dict``/``model``/``teacher``
            nesting are handled; classifier and projection heads are ignored), or a ViT
            checkpoint (safetensors or torch; timm, hub or transformers keys).
        arch: ``resnet50_tv`` (aliases ``dino_resnet50``, ``swav_resnet50``, ...),
            ``efficientnet_lite0`` or a ViT registry name.
        out: destination, must end in ``.weights.h5``; written atomically.
        input_size: side of the model built for the conversion (weights do not depend on it).

    Returns:
        ``out`` as a Path; load it later with ``load_backbone(name, weights=out)``.
    """
    if arch in vit_archs():
        return import_vit_weights(checkpoint, arch, out)
    return convert_checkpoint(lambda: build_with_layout(arch, input_size), checkpoint, arch, out)


def vit_archs() -> tuple[str, ...]:
    """Registry names of the ViTs, usable as ``dfl import-weights --arch``."""
    from dfl_tf.backbones.vit_zoo import CONFIGS

    return tuple(sorted(CONFIGS))


def import_vit_weights(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike) -> Path:
    """Convert a ViT checkpoint (safetensors or torch; timm, hub or transformers keys) to ``.weights.h5``.

    The Keras model is built at the checkpoint's own grid, so the file loads at any input size.
    """
    import keras

    from dfl_tf.backbones.vit import build_vit
    from dfl_tf.backbones.vit_weights import assign_vit, read_state
    from dfl_tf.backbones.vit_zoo import CONFIGS

    if arch not in CONFIGS:
        raise DflError(f"unknown ViT architecture '{arch}' (choose from {', '.join(sorted(CONFIGS))})")
    config, out = CONFIGS[arch], Path(out)
    if not out.name.endswith(".weights.h5"):
        raise DflError(f"output file name must end in .weights.h5 (got {out.name})")
    state = read_state(checkpoint)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        model = build_vit(config, config.grid * config.patch, name=arch)
    finally:
        keras.config.set_dtype_policy(previous)
    assign_vit(model, config, state, Path(checkpoint).name, arch)
    del state
    return atomic_save_weights(model, out)
