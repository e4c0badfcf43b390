"""Backbone registry: name -> spec (builder, input size, dim, preprocessing, weight sources, licence,
checkpoint converter).

Families are the subpackages of :mod:`dfl_tf.backbones` (``vit/``, ``resnet/``, ...): each
registers its entries with :func:`register` when imported. Nothing lists them: the first
registry access imports every subpackage found on the package path, once (a folder added to
``dfl_tf.backbones.__path__`` later is picked up on the next access).

Every backbone built here is a frozen ``keras.Model`` that maps float32 RGB images in
[0, 255], shape ``[N, S, S, 3]``, to pooled embeddings ``[N, dim]``: preprocessing and
global average pooling are part of the model, so callers never need to know them.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pkgutil
import random
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from dfl_tf.backbones.base import Backbone
from dfl_tf.backbones.fold import fold_batchnorm
from dfl_tf.errors import DflError
from dfl_tf.options import PRECISIONS

@dataclass(frozen=True)
class WeightSource:
    """Where one set of pretrained weights comes from."""

    name: str
    url: str | None = None
    sha256: str | None = None
    license: str = "unknown"
    filename: str | None = None
    note: str = ""
    # Returns a local path when the weights are available without the network, else None.
    offline_path: Callable[[], str | None] | None = None
    gated: bool = False  # the download needs an accepted licence (and a token)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone family member.

    ``builder(input_size, weights)`` returns a Keras model from float32 [0, 255] RGB to
    pooled features; ``weights`` is ``None`` (random init) or a source name or a local path.
    ``converter(checkpoint, out, input_size)``, where the family has one, is what
    ``dfl import-weights --arch NAME`` runs (it writes ``out``, a ``.weights.h5``, and returns
    it); ``import_aliases`` are further ``import_weights`` names for the same converter.
    """

    name: str
    builder: Callable[[int, str | None], keras.Model]
    input_size: int
    dim: int
    weights: dict[str, WeightSource] = field(default_factory=dict)
    default_weights: str = "imagenet"
    description: str = ""
    embedding: str = "global average pool of the last feature map"
    preprocessing: str = ""
    params: int | None = None
    converter: Callable[[str | os.PathLike, str | os.PathLike, int | None], Path] | None = None
    import_aliases: tuple[str, ...] = ()

    def weight_source(self, key: str) -> WeightSource | None:
        return self.weights.get(key)


_REGISTRY: dict[str, BackboneSpec] = {}
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded_build(seed: int):
    """Build under a global dtype policy and seeded init, isolated from other threads.

    Keras draws initializer seeds from Python's global ``random`` module, which other threads
    (tf.data, Beam workers) may use meanwhile; a private ``random.Random(seed)`` gives the same
    draws as ``keras.utils.set_random_seed(seed)`` in an undisturbed process.
    """
    with _BUILD_LOCK:
        keras.utils.set_random_seed(seed)
        try:
            from keras.src.random import seed_generator
        except ImportError:  # pragma: no cover - Keras internals moved: plain global seeding
            yield
            return
        saved = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = saved


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a spec to the registry (later registrations with the same name win).

    Called at import time by a family's modules (the entry then belongs to that family,
    :func:`family_of`), or later by anyone (tests, scripts: no family).
    """
    _REGISTRY[spec.name] = spec
    _FAMILY[spec.name] = _importing_family()
    return spec


def _importing_family() -> str | None:
    """The family folder whose module body is running the registration, if one is."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    prefix = f"{__package__}."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else None


def family_of(name: str) -> str | None:
    """The family folder that registered ``name`` (``vit``, ``resnet``, ...), None if registered by hand."""
    _ensure_loaded()
    return _FAMILY.get(name)


_SCANNED: dict[str, object] = {"path": None, "families": set()}
_FAMILY: dict[str, str | None] = {}
_LOAD_LOCK = threading.RLock()


def _ensure_loaded() -> None:
    """Import each family subpackage of :mod:`dfl_tf.backbones` once (importing registers it)."""
    path = tuple(sys.modules[__package__].__path__)
    if _SCANNED["path"] == path:
        return
    with _LOAD_LOCK:
        if _SCANNED["path"] == path:
            return
        for info in pkgutil.iter_modules(path):
            if info.ispkg and info.name not in _SCANNED["families"]:
                importlib.import_module(f"{__package__}.{info.name}")
                _SCANNED["families"].add(info.name)
        _SCANNED["path"] = path


def list_specs() -> list[BackboneSpec]:
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DflError(f"unknown backbone '{name}' (known: {known}, or a SavedModel directory)")
    return _REGISTRY[name]


def converter_names(families_only: bool = False) -> list[str]:
    """Registry names that ``dfl import-weights --arch`` accepts: the entries with a converter
    (``families_only``: those the family folders register, as the CLI reference lists them)."""
    return [spec.name for spec in list_specs()
            if spec.converter is not None and not (families_only and _FAMILY.get(spec.name) is None)]


def converter_spec(arch: str) -> BackboneSpec:
    """The entry whose converter handles ``arch`` (a registry name or one of its import aliases)."""
    specs = [spec for spec in list_specs() if spec.converter is not None]
    for spec in specs:
        if arch == spec.name:
            return spec
    for spec in specs:
        if arch in spec.import_aliases:
            return spec
    raise DflError(f"unknown architecture '{arch}' for weight import (choose from {', '.join(converter_names())})")


def fingerprint_model(model: keras.Model) -> str:
    """sha256 over the model's weights (shapes and float32 bytes, in order)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _freeze(model: keras.Model) -> keras.Model:
    model.trainable = False
    return model


def load_backbone(
    name: str,
    weights: str | None = "default",
    input_size: int | None = None,
    precision: str = "float32",
    seed: int = 0,
    fold_bn: bool = True,
) -> Backbone:
    """Build a frozen backbone by registry name or SavedModel directory.

    Args:
        name: registry name (``dfl backbones`` lists them) or a path to a SavedModel directory.
        weights: ``"default"`` (the spec's default source), a source name such as ``"imagenet"``,
            ``"none"`` (random init from ``seed``: tests and controls), or a local weights file.
        input_size: square input side in pixels; defaults to the spec's.
        precision: ``float32``, ``bfloat16`` or ``mixed_float16`` compute.
        seed: seed of the random init when ``weights="none"``.
        fold_bn: fold batch normalisation into the convolution before it (frozen inference, see
            :mod:`dfl_tf.backbones.fold`); fine-tuning, which trains it, passes False. The
            fingerprint is taken before folding: it names the weights, whichever way they run.
    """
    if precision not in PRECISIONS:
        raise DflError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if os.path.isdir(name):
        from dfl_tf.backbones.savedmodel import load_savedmodel_backbone

        return load_savedmodel_backbone(name, input_size=input_size, precision=precision)
    spec = get_spec(name)
    size = int(input_size or spec.input_size)
    if size < 16:
        raise DflError(f"input size {size} is too small (16 px at least)")
    if weights in (None, "default"):
        weights = spec.default_weights
    if weights == "none":
        build_weights, label = None, "none"
    elif weights in spec.weights:
        build_weights, label = weights, weights
    elif os.path.exists(str(weights)):
        build_weights = label = str(Path(weights).resolve())
    else:
        choices = ", ".join(["none", *spec.weights])
        raise DflError(f"weights '{weights}' for backbone '{name}': not a known source ({choices}) nor a file")

    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}[precision]
    with _seeded_build(seed):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            model = spec.builder(size, build_weights)
            fingerprint = fingerprint_model(model)
            if fold_bn:  # under the build lock: nothing here may touch another thread's seeded draws
                model, _ = fold_batchnorm(model)
        finally:
            keras.config.set_dtype_policy(previous)
    model = _freeze(model)
    dim = int(model.output_shape[-1])
    return Backbone(
        name=spec.name,
        model=model,
        input_size=size,
        dim=dim,
        weights=label,
        fingerprint=fingerprint,
        precision=precision,
    )


def offline_status(spec: BackboneSpec) -> dict[str, bool]:
    """For each weight source, whether it can be used without the network right now."""
    status = {"none": True}
    for key, source in spec.weights.items():
        if source.offline_path is not None:
            status[key] = source.offline_path() is not None
        else:
            status[key] = _in_keras_cache(source.filename)
    return status


def _in_keras_cache(filename: str | None) -> bool:
    if not filename:
        return False
    base = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return (base / "models" / filename).exists()


def describe_backbones() -> list[dict]:
    """One row per registered backbone: sizes, weight sources, licences, offline availability."""
    rows = []
    for spec in list_specs():
        rows.append({
            "name": spec.name,
            "input_size": spec.input_size,
            "dim": spec.dim,
            "default_weights": spec.default_weights,
            "sources": {k: s.url for k, s in spec.weights.items()},
            "licences": {k: s.license for k, s in spec.weights.items()},
            "offline": offline_status(spec),
            "gated": {k: s.gated for k, s in spec.weights.items()},
            "params": spec.params,
            "embedding": spec.embedding,
            "preprocessing": spec.preprocessing,
            "description": spec.description,
            "family": _FAMILY.get(spec.name),
            "converter": spec.converter is not None,
        })
    return rows
