"""Backbone registry: name -> spec (builder, input size, dim, preprocessing, weight sources, licence).

Every backbone built here is a frozen ``keras.Model`` that maps float32 RGB images in
[0, 255], shape ``[N, S, S, 3]``, to pooled embeddings ``[N, dim]``: preprocessing and
global average pooling are part of the model, so callers never need to know them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
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
    """Add a spec to the registry (later registrations with the same name win)."""
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Importing the family modules registers their specs.
    import importlib

    for module in ("keras_apps", "resnet_tv", "efficientnet_lite", "vit_zoo"):
        try:
            importlib.import_module(f"dfl_tf.backbones.{module}")
        except ModuleNotFoundError as exc:  # a family not written yet
            if exc.name != f"dfl_tf.backbones.{module}":
                raise


def list_specs() -> list[BackboneSpec]:
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DflError(f"unknown backbone '{name}' (known: {known}, or a SavedModel directory)")
    return _REGISTRY[name]


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
        })
    return rows
