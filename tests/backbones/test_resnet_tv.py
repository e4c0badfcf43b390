"""ResNet-50 v1.5 (torchvision layout): parity with torch, registry entries, weight cache."""
from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dfl_tf.backbones import load_backbone, register  # noqa: E402
from dfl_tf.backbones import registry, weights  # noqa: E402
from dfl_tf.backbones.registry import BackboneSpec, WeightSource, get_spec, offline_status  # noqa: E402
from dfl_tf.backbones.resnet.presets import make_builder  # noqa: E402
from dfl_tf.backbones.converter import import_weights  # noqa: E402
from dfl_tf.errors import DflError  # noqa: E402
from dfl_tf.runtime.files import sha256_file  # noqa: E402

from tests.helpers.torch_resnet import random_resnet50  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@pytest.fixture(scope="module")
def torch_model():
    return random_resnet50(seed=0)


@pytest.fixture(scope="module")
def checkpoint(torch_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "resnet50-random.pth"
    torch.save(torch_model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DFL_TF_CACHE", str(folder))
    return folder


def _images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def _torch_features(model, images):
    x = torch.from_numpy(((images / 255.0 - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.features(x).numpy()


def test_parity_with_torch(tmp_path, torch_model, checkpoint):
    out = import_weights(checkpoint, "resnet50_tv", tmp_path / "rn.weights.h5", input_size=64)
    backbone = load_backbone("resnet50_tv", weights=str(out), input_size=64)
    assert backbone.dim == 2048 and backbone.weights == str(out.resolve())  # full path: export can rebuild it
    images = _images(2, 64)
    reference = _torch_features(torch_model, images)
    got = np.asarray(backbone(images))
    assert got.shape == (2, 2048) and got.dtype == np.float32
    diff = np.abs(got - reference).max()
    print(f"resnet50_tv parity max abs diff {diff:.2e} (feature max {np.abs(reference).max():.2f})")
    assert diff <= 1e-4
    # a torch checkpoint passed directly converts in memory to the same weights
    direct = load_backbone("resnet50_tv", weights=str(checkpoint), input_size=64)
    assert direct.fingerprint == backbone.fingerprint
    # the same file serves the DINO/SwAV specs (same layout), at another input size and precision
    half = load_backbone("dino_resnet50", weights=str(out), input_size=32, precision="bfloat16")
    feats = np.asarray(half(_images(1, 32)))
    assert feats.dtype == np.float32 and feats.shape == (1, 2048) and np.isfinite(feats).all()


def test_registry_entries():
    expected = {
        "resnet50_tv": ("imagenet", "resnet50-0676ba61.pth", "BSD-3-Clause"),
        "dino_resnet50": ("dino", "dino_resnet50_pretrain.pth", "Apache-2.0"),
        "swav_resnet50": ("swav", "swav_800ep_pretrain.pth.tar", "CC-BY-NC-4.0"),
    }
    for name, (key, filename, licence) in expected.items():
        spec = get_spec(name)
        assert (spec.input_size, spec.dim, spec.default_weights) == (224, 2048, key)
        source = spec.weights[key]
        assert source.url.endswith(filename) and source.filename == filename
        assert source.license.startswith(licence)
        assert offline_status(spec) == {"none": True, key: False}
    assert get_spec("resnet50_tv").weights["imagenet"].sha256 == "0676ba61"


def test_offline_status_follows_cache(cache):
    spec = get_spec("dino_resnet50")
    assert offline_status(spec)["dino"] is False
    converted = weights.converted_path("dino_resnet50", "dino")
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"")
    assert converted.parent.parent == cache
    assert offline_status(spec)["dino"] is True


def test_named_weights_download_convert_and_cache(checkpoint, cache):
    digest = sha256_file(checkpoint)
    source = WeightSource("test", url=checkpoint.as_uri(), sha256=digest[:8], license="test",
                          filename="resnet50-test.pth",
                          offline_path=weights.offline_checker("test_resnet_file", "test"))
    register(BackboneSpec(name="test_resnet_file", builder=make_builder("test_resnet_file"), input_size=32,
                          dim=2048, weights={"test": source}, default_weights="test"))
    try:
        assert offline_status(get_spec("test_resnet_file"))["test"] is False
        first = load_backbone("test_resnet_file")
        download = cache / "downloads" / "resnet50-test.pth"
        converted = cache / "converted" / "test_resnet_file-test.weights.h5"
        assert download.exists() and converted.exists()
        assert offline_status(get_spec("test_resnet_file"))["test"] is True
        download.unlink()  # later loads read only the converted file
        second = load_backbone("test_resnet_file")
        assert second.fingerprint == first.fingerprint and second.weights == "test"
        assert not download.exists()
        assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    finally:
        registry._REGISTRY.pop("test_resnet_file", None)


def test_fetch_hash_mismatch(checkpoint, cache):
    source = WeightSource("bad", url=checkpoint.as_uri(), sha256="deadbeef", filename="bad.pth")
    with pytest.raises(DflError, match="expected deadbeef"):
        weights.fetch(source)
    assert not any((cache / "downloads").iterdir())


def test_fetch_full_hash_and_reuse(checkpoint):
    source = WeightSource("ok", url=checkpoint.as_uri(), sha256=sha256_file(checkpoint), filename="ok.pth")
    path = weights.fetch(source)
    assert path.read_bytes() == checkpoint.read_bytes()
    assert weights.fetch(source) == path


def test_fetch_offline_error():
    url = "http://127.0.0.1:9/resnet50-offline.pth"
    source = WeightSource("off", url=url, filename="resnet50-offline.pth")
    with pytest.raises(DflError) as err:
        weights.fetch(source)
    message = str(err.value)
    assert url in message and "--weights" in message and "\n" not in message


def test_wrong_keras_weights_file(tmp_path):
    from dfl_tf.backbones.efficientnet_lite.model import build_model

    model, _ = build_model(32)
    path = tmp_path / "lite.weights.h5"
    model.save_weights(path)
    with pytest.raises(DflError, match="does not fit resnet50_tv"):
        load_backbone("resnet50_tv", weights=str(path), input_size=32)
