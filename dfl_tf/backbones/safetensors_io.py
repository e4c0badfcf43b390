"""Read ``.safetensors`` files into numpy arrays, validating the header first.

Format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte
after the header), then the data. Before any tensor is read we check that the header fits in
the file and is a JSON object, that every dtype is known, every shape a list of non-negative
integers whose byte count equals ``end - begin``, and that the ranges lie inside the file and
do not overlap. A bad file raises one :class:`DflError` naming the file and the tensor.

Tensors are read with the ``safetensors`` package's numpy API; ``BF16`` (which numpy lacks)
is widened to float32 here, bit-exactly.
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


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a validated safetensors file as numpy arrays (floats as stored, BF16 -> float32)."""
    path = Path(path)
    header, data_start = read_header(path)
    out: dict[str, np.ndarray] = {}
    plain = [k for k, e in header.items() if e["dtype"] != "BF16"]
    if plain:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:
                for key in plain:
                    out[key] = np.array(handle.get_tensor(key))
        except Exception as exc:  # noqa: BLE001 - the package raises its own error types
            raise DflError(f"{path.name}: cannot read tensors ({str(exc).splitlines()[0][:160]})") from None
    wide = [k for k, e in header.items() if e["dtype"] == "BF16"]
    if wide:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for key in wide:
            begin, end = header[key]["data_offsets"]
            raw = np.frombuffer(data[data_start + begin:data_start + end], dtype="<u2")
            out[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[key]["shape"])
        del data
    return out
