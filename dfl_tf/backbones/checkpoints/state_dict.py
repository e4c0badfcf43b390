"""Torch state dicts -> Keras layers: unwrap and rename the keys, copy the tensors by a layout.

A family's builder returns its Keras model and a *layout*, the list of
``(keras_layer, torch_prefix, kind)`` its checkpoints fill; :func:`convert_checkpoint` writes a
checkpoint as a Keras ``.weights.h5`` file that ``load_backbone(..., weights="X.weights.h5")``
loads with no torch installed. Imports no family: they import it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from dfl_tf.backbones.checkpoints.torch_pickle import load_checkpoint
from dfl_tf.errors import DflError
from dfl_tf.runtime.files import atomic_save_weights

# --------------------------------------------------------------------------------------
# state-dict normalisation

_NESTING_KEYS = ("state_dict", "model", "teacher", "module")
_STRIP_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, np.ndarray) for v in obj.values())


def extract_state_dict(obj: Any, ignore_prefixes: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Unwrap ``state_dict``/``model``/``teacher`` nesting and strip ``module.``/``backbone.``.

    Keys starting with one of ``ignore_prefixes`` (after stripping) and BatchNorm
    ``num_batches_tracked`` counters are dropped.
    """
    for _ in range(5):
        if _is_state_dict(obj):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not _is_state_dict(obj):
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise DflError(f"no tensors found in the checkpoint (top level: {keys})")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            continue
        key = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.endswith("num_batches_tracked") or any(key.startswith(p) for p in ignore_prefixes):
            continue
        out[key] = value
    return out


# --------------------------------------------------------------------------------------
# assigning into Keras layers

# layout entry: (keras layer, torch prefix, kind) with kind in conv / dwconv / bn / dense
Layout = list


def _torch_tensors(layer, prefix: str, kind: str) -> list[tuple[str, Any]]:
    """The torch keys a Keras layer needs and how to turn each into the Keras value."""
    if kind == "conv":
        keys = [(f"{prefix}.weight", lambda w: np.transpose(w, (2, 3, 1, 0)))]
        if layer.use_bias:
            keys.append((f"{prefix}.bias", lambda b: b))
        return keys
    if kind == "dwconv":
        keys = [(f"{prefix}.weight", lambda w: np.transpose(w, (2, 3, 0, 1)))]
        if layer.use_bias:
            keys.append((f"{prefix}.bias", lambda b: b))
        return keys
    if kind == "bn":
        return [(f"{prefix}.{n}", lambda v: v) for n in ("weight", "bias", "running_mean", "running_var")]
    if kind == "dense":
        return [(f"{prefix}.weight", lambda w: np.transpose(w)), (f"{prefix}.bias", lambda b: b)]
    raise ValueError(f"unknown layout kind {kind!r}")


def assign_state_dict(layout: Layout, state: dict[str, np.ndarray], source: str, arch: str) -> None:
    """Copy ``state`` into the layers of ``layout``; one DflError lists the first mismatches."""
    problems: list[str] = []
    assignments = []
    used: set[str] = set()
    for layer, prefix, kind in layout:
        values = []
        expected = [tuple(w.shape) for w in layer.weights]
        for (key, convert), want in zip(_torch_tensors(layer, prefix, kind), expected):
            if key not in state:
                problems.append(f"missing {key}")
                continue
            used.add(key)
            value = convert(np.asarray(state[key]))
            if tuple(value.shape) != want:
                problems.append(f"{key} has shape {tuple(state[key].shape)}, "
                                f"expected {_torch_shape(kind, want)}")
                continue
            values.append(value.astype(np.float32))
        assignments.append((layer, values))
    unexpected = sorted(set(state) - used)
    problems.extend(f"unexpected {key}" for key in unexpected)
    if len(used) == 0:
        raise DflError(f"{source}: no {arch} weights found in the checkpoint "
                       f"(keys look like: {', '.join(sorted(state)[:4])})")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DflError(f"{source} does not fit {arch}: {len(problems)} mismatches: {shown}{more}")
    for layer, values in assignments:
        layer.set_weights(values)


def _torch_shape(kind: str, keras_shape: tuple) -> tuple:
    """Keras weight shape -> the torch shape the checkpoint should have held."""
    if kind == "conv" and len(keras_shape) == 4:
        h, w, i, o = keras_shape
        return (o, i, h, w)
    if kind == "dwconv" and len(keras_shape) == 4:
        h, w, c, m = keras_shape
        return (c * m, 1, h, w)
    if kind == "dense" and len(keras_shape) == 2:
        return keras_shape[::-1]
    return keras_shape


# --------------------------------------------------------------------------------------
# torch checkpoint or Keras file -> a built model


def load_torch_into(layout: Layout, checkpoint: str | os.PathLike, arch: str, ignore: Iterable[str] = ()) -> None:
    """Read ``checkpoint`` (torch-free) and assign it into the layers of ``layout``; keys starting
    with one of ``ignore`` (classifier or projection heads) are dropped first."""
    raw = load_checkpoint(checkpoint)
    state = extract_state_dict(raw, ignore)
    assign_state_dict(layout, state, Path(checkpoint).name, arch)


def is_keras_weights(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".weights.h5") or name.endswith(".keras") or name.endswith(".h5")


def load_weights_file(model, layout: Layout, path: str, arch: str, label: str, ignore: Iterable[str] = ()) -> None:
    """Load a local file into a built model: Keras weights directly, else a torch checkpoint."""
    if is_keras_weights(path):
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.load_weights(path)
                error = None
            except Exception as exc:  # noqa: BLE001 - Keras raises several types for a wrong file
                text = str(exc).strip()
                error = text.splitlines()[0] if text else type(exc).__name__
        # Keras only warns when parts of the file do not line up; a matching file loads silently
        skipped = [w for w in caught if "retain their freshly-initialized" in str(w.message)
                   or "Skipping" in str(w.message)]
        if error is None and skipped:
            error = f"{len(skipped)} parts of the model were not in the file"
        if error is not None:
            raise DflError(f"weights file {Path(path).name} does not fit {label}: {error[:200]}")
    else:
        load_torch_into(layout, path, arch, ignore)


def convert_checkpoint(build: Callable[[], tuple[Any, Layout]], checkpoint: str | os.PathLike, arch: str,
                       out: str | os.PathLike, ignore: Iterable[str] = ()) -> Path:
    """Read ``checkpoint`` into the model ``build()`` returns (built in float32) and write its
    weights to ``out`` (``.weights.h5``) through a temporary name and a rename.

    The families call this to fill their weight cache and as their ``dfl import-weights``
    converter; ``arch`` names the layout in messages, ``ignore`` as in :func:`load_torch_into`.
    """
    import keras

    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise DflError(f"output file name must end in .weights.h5 (got {out.name})")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        model, layout = build()
    finally:
        keras.config.set_dtype_policy(previous)
    load_torch_into(layout, checkpoint, arch, ignore)
    return atomic_save_weights(model, out)
