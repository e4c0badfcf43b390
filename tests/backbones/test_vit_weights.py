"""safetensors validation, Hugging Face downloads offline, Lunit ResNet-50 layout, `dfl backbones`."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from dfl_tf.backbones.checkpoints.safetensors import load_safetensors, read_header
from dfl_tf.errors import DflError


def _write(path, header: dict, data: bytes, raw_header: bytes | None = None) -> None:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_safetensors_roundtrip_including_bf16(tmp_path):
    from safetensors.numpy import save_file

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1.5, -2.0], dtype=np.float16)
    save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"))
    got = load_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    # BF16: the upper 16 bits of float32; values exactly representable come back exactly
    values = np.array([1.0, -3.5, 0.15625, 2.0 ** -10], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    _write(tmp_path / "bf.safetensors", {"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, bits)
    np.testing.assert_array_equal(load_safetensors(tmp_path / "bf.safetensors")["w"], values.reshape(2, 2))


@pytest.mark.parametrize("header,data,message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8,
     r"bad.safetensors: tensor 'w': data_offsets \[0, 16\] lie outside the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16,
     r"tensor 'w': shape \[3\] of F32 needs 12 bytes, data_offsets give 16"),
    ({"w": {"dtype": "Q8", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, r"tensor 'w': unsupported dtype 'Q8'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, r"tensor 'w': shape \[-1\]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, r"'w' and 'v' overlap"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, r"tensor 'w': data_offsets \[0\]"),
])
def test_bad_safetensors_refused_naming_file_and_tensor(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write(path, header, data)
    with pytest.raises(DflError, match=message):
        load_safetensors(path)


def test_bad_safetensors_header_itself(tmp_path):
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(DflError, match=r"h.safetensors: safetensors header length 1000000 does not fit the file"):
        read_header(path)
    _write(path, {}, b"", raw_header=b"{not json")
    with pytest.raises(DflError, match="h.safetensors: safetensors header is not valid JSON"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(DflError, match="not a safetensors file"):
        read_header(path)


def test_gated_download_offline_names_page_and_licence(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hub_constants

    from dfl_tf.backbones.registry import load_backbone

    monkeypatch.setenv("DFL_TF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DflError) as err:
        load_backbone("uni", input_size=32)
    text = str(err.value)
    assert "\n" not in text
    assert "https://huggingface.co/MahmoodLab/UNI" in text and "CC-BY-NC-ND-4.0" in text and "HF_TOKEN" in text
    assert "--weights PATH" in text


def test_lunit_resnet_reads_torchvision_layout(tmp_path):
    """Lunit's ResNet-50 trunks share torchvision's keys: the existing converter, Lunit's mean/std."""
    torch = pytest.importorskip("torch")
    from tests.helpers.torch_resnet import random_resnet50

    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.backbones.layers import LUNIT_MEAN, LUNIT_STD

    ref = random_resnet50()
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "bt_rn50_ep200.torch")
    backbone = load_backbone("lunit_resnet50_bt", weights=str(tmp_path / "bt_rn50_ep200.torch"), input_size=64)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    norm = (x / 255.0 - np.array(LUNIT_MEAN, "float32")) / np.array(LUNIT_STD, "float32")
    with torch.no_grad():
        feats = ref.features(torch.from_numpy(norm.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(backbone(x)), feats, atol=1e-4 * np.abs(feats).max())


def test_dfl_backbones_lists_vits_with_gated_flags():
    from dfl_tf.cli import main

    result = CliRunner().invoke(main, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    names = {"dino_vits16", "dino_vits8", "vit_b16_imagenet", "convnext_base", "phikon", "phikon_v2", "hibou_b",
             "uni", "uni2_h", "virchow2", "h_optimus_0", "prov_gigapath", "lunit_vits16", "lunit_vits8",
             "lunit_resnet50_bt", "lunit_resnet50_swav", "lunit_resnet50_mocov2"}
    names |= {f"dinov2_vit{a}14{r}" for a in "sblg" for r in ("", "_reg")}
    assert names <= set(rows)
    assert rows["virchow2"]["dim"] == 2560 and rows["virchow2"]["gated"] == {"virchow2": True}
    assert rows["phikon"]["gated"] == {"phikon": False}
    assert rows["dinov2_vitg14"]["params"] > 1.1e9
    assert "0.707223" in rows["h_optimus_0"]["preprocessing"]
    assert "mean of patch tokens" in rows["virchow2"]["embedding"]
    text = CliRunner().invoke(main, ["backbones"]).output
    assert "[gated]" in text and "uni2_h" in text
