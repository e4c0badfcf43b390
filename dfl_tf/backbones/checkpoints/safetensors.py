"""Read ``.safetensors`` files into numpy arrays, validating the header first.

Format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte
after the header), then the data. Before any tensor is read we check that the header fits in
the file and is a JSON object, that every dtype is known, every shape a list of non-negative
integers whose byte count equals ``end - begin``, and that the ranges lie inside the file and
do not overlap. A bad file raises one :class:`DflError` naming the file and the tensor.

Tensors are then read one at a time with plain file reads (:class:`LazyTensor`): the
``safetensors`` package's numpy API maps the whole file (a ViT-g's 4.5 GB then count in the
resident set while the model is assigned) and has no ``BF16``, which is widened to float32
here, bit-exactly. The package itself is only used by the tests, to write files.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from dfl_tf.errors import DflError

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def is_safetensors(path: str | os.PathLike) -> bool:
    """True for a ``.safetensors`` name, or a file that starts like one (length + ``{``)."""
    path = Path(path)
    if path.name.lower().endswith(".safetensors"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < min(_MAX_HEADER, path.stat().st_size)


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """Validated ``{name: {"dtype", "shape", "data_offsets"}}`` and the data start offset."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise DflError(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(raw_len, "little")
            if length <= 0 or length > _MAX_HEADER or 8 + length > size:
                raise DflError(f"{name}: safetensors header length {length} does not fit the file ({size} bytes)")
            text = fh.read(length)
    except OSError as exc:
        raise DflError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DflError(f"{name}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DflError(f"{name}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_len = 8 + length, size - 8 - length
    spans = []
    for key, entry in header.items():
        where = f"{name}: tensor '{key}'"
        if not isinstance(entry, dict):
            raise DflError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise DflError(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise DflError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise DflError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise DflError(f"{where}: data_offsets [{begin}, {end}] lie outside the {data_len} data bytes "
                           f"(file truncated or corrupt)")
        expected = math.prod(shape) * _ITEMSIZE[dtype]  # Python ints: a huge shape cannot wrap to a small size
        if end - begin != expected:
            raise DflError(f"{where}: shape {shape} of {dtype} needs {expected} bytes, "
                           f"data_offsets give {end - begin}")
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise DflError(f"{name}: tensors '{key_a}' and '{key_b}' overlap in the data")
    return header, data_start


class LazyTensor:
    """One tensor of a validated file, read (and freed) only when called: loading a ViT-g
    then holds one tensor at a time instead of the whole 4.5 GB state dict."""

    def __init__(self, path: Path, entry: dict, data_start: int):
        self.path, self.dtype = path, entry["dtype"]
        self.shape = tuple(entry["shape"])
        self.offset = data_start + entry["data_offsets"][0]
        self.nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]

    def __call__(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            raw = fh.read(self.nbytes)
        if len(raw) != self.nbytes:
            raise DflError(f"{self.path.name}: file shrank while reading (truncated)")
        if self.dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        dtype = np.dtype(_NUMPY[self.dtype]).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(self.shape)


_NUMPY = {"F64": "f8", "F32": "f4", "F16": "f2", "I64": "i8", "U64": "u8", "I32": "i4", "U32": "u4",
          "I16": "i2", "U16": "u2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def lazy_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """``{name: LazyTensor}`` of a validated file; call a value to read that tensor."""
    path = Path(path)
    header, data_start = read_header(path)
    return {key: LazyTensor(path, entry, data_start) for key, entry in header.items()}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a validated safetensors file as numpy arrays (floats as stored, BF16 -> float32)."""
    return {key: tensor() for key, tensor in lazy_safetensors(path).items()}
