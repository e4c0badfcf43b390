"""``dfl import-weights``: convert a checkpoint into ``.weights.h5`` with its family's converter.

Each family declares the converter of its entries (``BackboneSpec.converter``: key renaming,
ignored prefixes, aliases live in the family's folder); this module only looks it up, and gives
the CLI its ``--arch`` choice. Cheap to import: the registry loads when first needed.
"""
from __future__ import annotations

import os
from pathlib import Path

import click


def import_weights(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike,
                   input_size: int | None = None) -> Path:
    """Convert a checkpoint of ``arch`` into a Keras ``.weights.h5`` file.

    Args:
        checkpoint: a torchvision / DINO / SwAV / Lunit ResNet-50 or EfficientNet-Lite0 torch
            checkpoint (``module.``/``backbone.`` prefixes and ``state_dict``/``model``/``teacher``
            nesting are handled; classifier and projection heads are ignored), or a ViT
            checkpoint (safetensors or torch; timm, hub or transformers keys).
        arch: a registry name with a converter (:func:`import_archs`; ``resnet50`` is accepted
            for ``resnet50_tv``).
        out: destination, must end in ``.weights.h5``; written atomically.
        input_size: side of the model built for the conversion (weights do not depend on it).

    Returns:
        ``out`` as a Path; load it later with ``load_backbone(name, weights=out)``.
    """
    from dfl_tf.backbones.registry import converter_spec

    return converter_spec(arch).converter(checkpoint, out, input_size)


def import_archs() -> list[str]:
    """The names ``dfl import-weights --arch`` accepts (registered entries with a converter)."""
    from dfl_tf.backbones.registry import converter_names

    return converter_names()


class ArchChoice(click.Choice):
    """``import-weights --arch``: the registered backbones with a converter, read from the registry
    when first needed (``dfl --help`` imports no backbone family)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(import_archs())

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns it
        pass

    @property
    def documented(self) -> tuple[str, ...]:
        """The choices the family folders register (what docs/cli.md lists; tests may add more)."""
        from dfl_tf.backbones.registry import converter_names

        return tuple(converter_names(families_only=True))
