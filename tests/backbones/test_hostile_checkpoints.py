"""Hostile and corrupt PyTorch checkpoints: refused with one line naming file and tensor, never
read outside a storage, never a traceback, never a weights file (issue 16, item 1)."""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dfl_tf.backbones.checkpoints import torch_pickle
from dfl_tf.backbones.converter import import_weights
from dfl_tf.backbones.checkpoints.torch_pickle import load_checkpoint
from dfl_tf.errors import DflError


# -- a torch-free writer of zip checkpoints whose tensors may lie ------------------------------

def _p(obj) -> bytes:
    """Protocol-2 opcodes of a plain value, without PROTO and STOP."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _tensor(key: str, storage: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    pid = (b"(" + _p("storage") + b"ctorch\n" + storage.encode() + b"\n" + _p(key) + _p("cpu") + _p(numel)
           + b"tQ")  # MARK ... TUPLE, BINPERSID
    args = b"(" + pid + _p(offset) + _p(size) + _p(stride) + _p(False) + b"ccollections\nOrderedDict\n)R" + b"t"
    return b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"


def write_zip(path: Path, tensors: dict, storages: dict[str, bytes], storage_type: str = "FloatStorage",
              byteorder: str | None = "little", extra_ops: bytes = b"") -> Path:
    """tensors: name -> (storage key, numel, offset, size, stride)."""
    body = b"\x80\x02}(" + b"".join(_p(name) + _tensor(*spec[:1], storage_type, *spec[1:])
                                     for name, spec in tensors.items()) + b"u" + extra_ops + b"."
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", body)
        if byteorder is not None:
            zf.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


def _floats(n: int, order: str = "<") -> bytes:
    return np.arange(n, dtype=f"{order}f4").tobytes()


def test_honest_handmade_checkpoint_loads(tmp_path):
    path = write_zip(tmp_path / "ok.pth", {"w": ("0", 6, 0, (2, 3), (3, 1)), "t": ("0", 6, 1, (2, 2), (1, 3))},
                     {"0": _floats(6)})
    got = load_checkpoint(path)
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(got["t"], np.array([[1, 4], [2, 5]], np.float32))


def test_big_endian_storage_is_read_as_such(tmp_path):
    path = write_zip(tmp_path / "be.pth", {"w": ("0", 4, 0, (4,), (1,))}, {"0": _floats(4, ">")}, byteorder="big")
    got = load_checkpoint(path)["w"]
    np.testing.assert_array_equal(got, np.arange(4, dtype=np.float32))
    assert got.dtype == np.float32 and got.dtype.isnative
    bad = write_zip(tmp_path / "bo.pth", {"w": ("0", 4, 0, (4,), (1,))}, {"0": _floats(4)}, byteorder="middle")
    with pytest.raises(DflError, match="bo.pth.*byte order"):
        load_checkpoint(bad)


@pytest.mark.parametrize("spec, match", [
    (("0", 4, 0, (64, 3, 7, 7), (147, 49, 7, 1)), r"conv1\.weight .*reaches element 9407 of a storage of 4"),
    (("0", 4, 9, (1,), (1,)), r"conv1\.weight .*offset 9"),
    (("0", 4, 0, (2, 2), (2,)), r"conv1\.weight has 2 dims but 1 strides"),
    (("0", 4, 0, (2, 2), (-1, 1)), r"conv1\.weight has an invalid shape"),
    (("0", 4, 0, (-2, 2), (2, 1)), r"conv1\.weight has an invalid shape"),
    (("0", 4, 0, (1 << 20, 1 << 20), (0, 0)), r"conv1\.weight of shape .* is larger than"),
    (("0", 8, 0, (2,), (1,)), r"storage 0 holds 16 bytes, the pickle declares 8 x 4"),
    (("missing", 4, 0, (2,), (1,)), r"member 'archive/data/missing' is missing"),
])
def test_lying_tensors_are_refused(tmp_path, spec, match):
    path = write_zip(tmp_path / "liar.pth", {"conv1.weight": spec}, {"0": _floats(4)})
    with pytest.raises(DflError, match=match) as err:
        load_checkpoint(path)
    assert "liar.pth" in str(err.value) and "\n" not in str(err.value)


def test_archive_member_size_limit(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "big.pth", {"w": ("0", 64, 0, (64,), (1,))}, {"0": _floats(64)})
    monkeypatch.setattr(torch_pickle, "MAX_TENSOR_BYTES", 100)
    with pytest.raises(DflError, match=r"big.pth.*declares 256 bytes \(limit 100\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("ops, name", [(b"\x82\x01", "EXT1"), (b"(i__main__\nX\n", "INST")])
def test_opcodes_torch_never_writes_are_refused(tmp_path, ops, name):
    path = write_zip(tmp_path / "op.pth", {"w": ("0", 4, 0, (4,), (1,))}, {"0": _floats(4)}, extra_ops=ops + b"0")
    with pytest.raises(DflError, match=f"op.pth.*opcode {name}"):
        load_checkpoint(path)


def test_shared_references_are_visited_once(tmp_path):
    obj: list = []
    for _ in range(60):  # 2**60 paths through 60 list objects: a naive walk never ends
        obj = [obj, obj]
    with zipfile.ZipFile(tmp_path / "dag.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": obj}, protocol=2))
    got = load_checkpoint(tmp_path / "dag.pth")
    assert got["x"][0] is got["x"][1]


def test_lying_checkpoint_cli_exit_2_and_no_weights_file(tmp_path):
    from click.testing import CliRunner

    from dfl_tf import cli

    path = write_zip(tmp_path / "liar.pth", {"conv1.weight": ("0", 4, 0, (64, 3, 7, 7), (147, 49, 7, 1))},
                     {"0": _floats(4)})
    out = tmp_path / "x.weights.h5"
    result = CliRunner().invoke(cli.main, ["import-weights", str(path), "--arch", "resnet50_tv", "--out", str(out),
                                           "--input-size", "32"])
    assert result.exit_code == 2
    assert "liar.pth" in result.output and "conv1.weight" in result.output
    assert "Traceback" not in result.output and not out.exists() and not list(tmp_path.glob(".*tmp*"))


# -- fuzzing real torch files --------------------------------------------------------------------

def _real_checkpoint(tmp_path: Path, zip_format: bool) -> tuple[Path, dict]:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    obj = collections.OrderedDict(conv=torch.randn(4, 3, 3, 3, generator=gen), bias=torch.randn(4, generator=gen),
                                  half=torch.randn(5, generator=gen).half(), steps=torch.arange(3))
    path = tmp_path / f"small_{zip_format}.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path, {k: v.numpy() for k, v in obj.items()}


def _same(got, want) -> bool:
    return (isinstance(got, dict) and set(got) == set(want)
            and all(isinstance(got[k], np.ndarray) and got[k].dtype == want[k].dtype
                    and np.array_equal(got[k], want[k]) for k in want))


def test_fuzz_zip_checkpoint_flips_and_truncations(tmp_path):
    """The zip format has CRCs: a flipped byte either changes nothing or gives a DflError."""
    path, want = _real_checkpoint(tmp_path, zip_format=True)
    data = path.read_bytes()
    rng = np.random.default_rng(16)
    bad = tmp_path / "fuzz.pth"
    outcomes = {"same": 0, "error": 0}
    for trial in range(300):
        mutated = bytearray(data)
        if trial % 3 == 0:
            mutated = mutated[: int(rng.integers(0, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                mutated[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(mutated))
        try:
            got = load_checkpoint(bad)
        except DflError as exc:
            assert "\n" not in str(exc) and "fuzz.pth" in str(exc)
            outcomes["error"] += 1
            continue
        assert _same(got, want), f"trial {trial}: silently wrong values"
        outcomes["same"] += 1
    assert outcomes["error"] > 100


def test_fuzz_legacy_checkpoint_never_crashes(tmp_path):
    """The legacy format has no checksum: flipped storage bytes cannot be noticed, but nothing
    crashes, nothing reads outside a storage, and every failure is a one-line DflError."""
    path, want = _real_checkpoint(tmp_path, zip_format=False)
    data = path.read_bytes()
    rng = np.random.default_rng(17)
    bad = tmp_path / "fuzz.pth"
    errors = 0
    for trial in range(300):
        mutated = bytearray(data)
        if trial % 2 == 0:
            mutated = mutated[: int(rng.integers(0, len(data)))]
        else:
            mutated[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(mutated))
        try:
            load_checkpoint(bad)
        except DflError as exc:
            assert "\n" not in str(exc) and "fuzz.pth" in str(exc)
            errors += 1
    assert errors > 100


# -- safetensors (reader: dfl_tf/backbones/checkpoints/safetensors.py) ------------------------------------

def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path.read_bytes()


def test_safetensors_wrapping_shape_refused(tmp_path):
    import json
    import struct

    from dfl_tf.backbones.checkpoints.safetensors import load_safetensors

    for dtype in ("F32", "BF16"):  # 2**32 x 2**32 elements: an int64 product wraps to 0 bytes
        header = json.dumps({"w": {"dtype": dtype, "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}).encode()
        path = tmp_path / f"wrap_{dtype}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        with pytest.raises(DflError, match=r"wrap_.*tensor 'w'"):
            load_safetensors(path)


def test_fuzz_safetensors_header_flips_and_truncations(tmp_path):
    """Header flips and truncations give a DflError or the same tensors (the data bytes carry no
    checksum in this format, so only the header region is flipped)."""
    pytest.importorskip("safetensors")
    from dfl_tf.backbones.checkpoints.safetensors import load_safetensors

    rng = np.random.default_rng(18)
    want = {"conv": rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "bias": np.arange(4, dtype=np.float32),
            "half": rng.normal(size=5).astype(np.float16)}
    data = _safetensors(tmp_path / "ok.safetensors", want)
    header_end = 8 + int.from_bytes(data[:8], "little")
    bad = tmp_path / "fuzz.safetensors"
    errors = 0
    for trial in range(300):
        mutated = bytearray(data)
        if trial % 3 == 0:
            mutated = mutated[: int(rng.integers(0, len(data)))]
        else:
            mutated[int(rng.integers(0, header_end))] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(mutated))
        try:
            got = load_safetensors(bad)
        except DflError as exc:
            assert "\n" not in str(exc) and "fuzz.safetensors" in str(exc)
            errors += 1
            continue
        assert _same(got, want) or _renamed(got, want), f"trial {trial}: silently wrong values"
    assert errors > 100


def _renamed(got: dict, want: dict) -> bool:
    """The same tensors under a flipped name: weight assignment then reports missing/unexpected keys."""
    def sig(d):
        return sorted((v.dtype.str, v.shape, v.tobytes()) for v in d.values())
    return sig(got) == sig(want)
