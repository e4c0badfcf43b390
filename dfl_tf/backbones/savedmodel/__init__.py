"""Local SavedModel / TF-Hub-format backbones through ``keras.layers.TFSMLayer``.

Convention (that of TF-Hub image feature vectors): the endpoint takes float32 RGB in
[0, 1], shape [N, S, S, 3], and returns [N, dim] features (a 4-D feature map is
average-pooled). The input size comes from the signature when it is static, else from
``input_size``. The fingerprint is the sha256 of the variables and the graph.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import tensorflow as tf

from dfl_tf.backbones.layers import Preprocess
from dfl_tf.backbones.base import Backbone
from dfl_tf.errors import DflError


def _fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        if file.name == "fingerprint.pb":
            continue
        digest.update(file.relative_to(directory).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def check_savedmodel_files(directory: str | Path, what: str = "SavedModel") -> Path:
    """Refuse, naming what is missing, a directory that is not a complete SavedModel
    (``saved_model.pb`` and ``variables/variables.index``), before TensorFlow reads it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DflError(f"{what} {directory} is not a directory")
    if not (directory / "saved_model.pb").is_file():
        raise DflError(f"{what} {directory} is incomplete: no saved_model.pb")
    if not (directory / "variables").is_dir():
        raise DflError(f"{what} {directory} is incomplete: no variables/ folder")
    if not (directory / "variables" / "variables.index").is_file():
        raise DflError(f"{what} {directory} is incomplete: no variables/variables.index")
    return directory


def load_savedmodel_backbone(path: str, input_size: int | None = None, precision: str = "float32",
                             endpoint: str = "serving_default") -> Backbone:
    directory = Path(path)
    if not (directory / "saved_model.pb").exists():
        raise DflError(f"{directory}: not a SavedModel directory (no saved_model.pb)")
    check_savedmodel_files(directory, "backbone SavedModel")
    try:
        loaded = tf.saved_model.load(str(directory))
        signature = loaded.signatures[endpoint]
    except KeyError:
        raise DflError(f"{directory}: no signature '{endpoint}'") from None
    except Exception as exc:
        raise DflError(f"{directory}: cannot load SavedModel ({type(exc).__name__}: {exc})") from exc
    specs = list(signature.structured_input_signature[1].values())
    if len(specs) != 1:
        raise DflError(f"{directory}: signature '{endpoint}' must take one image tensor (takes {len(specs)})")
    shape = specs[0].shape
    size = input_size or (shape[1] if shape.rank == 4 else None)
    if not size:
        raise DflError(f"{directory}: input size is not fixed by the signature; pass --input-size")
    layer = keras.layers.TFSMLayer(str(directory), call_endpoint=endpoint, trainable=False)
    inputs = keras.Input((size, size, 3), name="images")
    outputs = layer(Preprocess("unit")(inputs))
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    if len(outputs.shape) == 4:
        outputs = keras.layers.GlobalAveragePooling2D()(outputs)
    outputs = keras.layers.Activation("linear", dtype="float32", name="embedding")(outputs)
    model = keras.Model(inputs, outputs, name=f"savedmodel_{directory.name}")
    model.trainable = False
    return Backbone(name=f"savedmodel:{directory.name}", model=model, input_size=int(size),
                    dim=int(model.output_shape[-1]), weights=f"savedmodel:{directory.resolve()}",
                    fingerprint=_fingerprint(directory), precision="float32")
