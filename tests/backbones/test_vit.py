"""Keras ViTs against their references on random weights of the real configurations.

References: Hugging Face transformers 5.23 (ViTModel, Dinov2Model, Dinov2WithRegistersModel)
for the transformers layouts, and plain-torch models written from timm's and the DINOv2 hub's
source (tests/helpers/vit_refs.py) for theirs. Every parity check runs at 224 px and at a second size
that resamples the position embeddings. Depth is reduced except for one ViT-S per layout.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from dfl_tf.backbones.vit.model import ViTConfig, build_vit, resize_matrix  # noqa: E402
from dfl_tf.backbones.vit.presets import import_vit_weights  # noqa: E402
from dfl_tf.backbones.vit.checkpoint import load_vit_file  # noqa: E402
from dfl_tf.backbones.vit.presets import CONFIGS  # noqa: E402
from dfl_tf.errors import DflError  # noqa: E402
from tests.helpers.vit_refs import RefViT, randomise  # noqa: E402

TOL = 1e-4  # of the embedding scale (max |reference|)


def _images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (1, size, size, 3)).astype("float32")


def _check(config: ViTConfig, weights_file, reference, sizes) -> None:
    """Keras (weights from ``weights_file``) vs ``reference(nchw_normalised)`` at each size."""
    mean, std = np.asarray(config.mean, "float32"), np.asarray(config.std, "float32")
    for size in sizes:
        model = build_vit(config, size)
        load_vit_file(model, config, weights_file, "test")
        x = _images(size)
        ours = np.asarray(model(x))
        with torch.no_grad():
            ref = reference(torch.from_numpy(((x / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())).numpy()
        assert ours.shape == ref.shape
        scale = float(np.abs(ref).max())
        diff = float(np.abs(ours - ref).max())
        print(f"{size}px: max abs diff {diff:.2e} = {diff / scale:.1e} of the embedding scale")  # pytest -s
        assert diff <= TOL * scale, f"{size}px: max abs diff {diff:.2e} > {TOL:g} x scale {scale:.3f}"


@pytest.mark.parametrize("in_size,out_size,mode,offset", [
    (14, 16, "bicubic", 0.0), (37, 16, "bicubic", 0.1), (37, 12, "bicubic_aa", 0.0), (14, 20, "bicubic_aa", 0.0),
    (14, 10, "bicubic", 0.1), (28, 20, "bicubic", 0.1), (16, 12, "bicubic", 0.0), (16, 16, "bicubic_aa", 0.0)])
def test_resize_matrix_matches_torch_interpolate(in_size, out_size, mode, offset):
    # one-hot rows through F.interpolate (width 3: torch's antialias path misbehaves on width-1 inputs)
    x = torch.eye(in_size).reshape(in_size, 1, in_size, 1).repeat(1, 1, 1, 3)
    kw = {"scale_factor": ((out_size + offset) / in_size, 1.0)} if offset else {"size": (out_size, 3)}
    y = F.interpolate(x, mode="bicubic", antialias=mode == "bicubic_aa", **kw)[:, 0, :, 0].T.numpy()
    assert y.shape == (out_size, in_size)
    np.testing.assert_allclose(resize_matrix(in_size, out_size, mode, offset), y, atol=1e-5)


# ---------------------------------------------------------------- transformers layouts


def _hf_pretrained(tmp_path, model):
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("name", ["phikon"])  # vit_b16_imagenet: the same layout, eps and mean/std aside
def test_parity_transformers_vitmodel(tmp_path, name):
    from transformers import ViTConfig as HFConfig, ViTModel

    cfg = dataclasses.replace(CONFIGS[name], depth=2)
    hf = randomise(ViTModel(HFConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                                     intermediate_size=cfg.mlp_hidden, image_size=224, patch_size=16,
                                     layer_norm_eps=cfg.eps, qkv_bias=True), add_pooling_layer=False))
    path = _hf_pretrained(tmp_path, hf)
    _check(cfg, path, lambda x: hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0], (224, 128))


def _dinov2(cfg: ViTConfig, registers: bool, image_size: int):
    from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel)

    kw = dict(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, mlp_ratio=4,
              image_size=image_size, patch_size=cfg.patch, layer_norm_eps=cfg.eps,
              use_swiglu_ffn=cfg.mlp == "swiglu")
    if registers:
        return randomise(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=cfg.registers, **kw)))
    return randomise(Dinov2Model(Dinov2Config(**kw)))


def test_parity_transformers_dinov2_full_depth_vits14(tmp_path):
    """Full-depth ViT-S/14 in the Dinov2Model layout (phikon_v2's reference code, transformers' resampling)."""
    cfg = dataclasses.replace(CONFIGS["phikon_v2"], patch=14, dim=384, depth=12, heads=6, mlp_hidden=1536, grid=16)
    hf = _dinov2(cfg, registers=False, image_size=224)
    path = _hf_pretrained(tmp_path, hf)
    _check(cfg, path, lambda x: hf(pixel_values=x).last_hidden_state[:, 0], (224, 168))


@pytest.mark.parametrize("name,registers", [("phikon_v2", False), ("dinov2_vitg14", False),
                                            ("dinov2_vits14_reg", True)])
def test_parity_transformers_dinov2_layouts(tmp_path, name, registers):
    """Dinov2Model (LayerScale; SwiGLU packed as weights_in/out) and Dinov2WithRegistersModel
    (4 registers; antialiased resampling, as the _reg hub models)."""
    base = CONFIGS[name]
    if base.mlp == "swiglu":  # the weights_in/weights_out layout at ViT-S width (hidden as transformers rounds it)
        base = dataclasses.replace(base, dim=384, heads=6, mlp_hidden=(int(384 * 4 * 2 / 3) + 7) // 8 * 8)
    grid = 16 if base.patch == 14 else 14
    # transformers' Dinov2 resamples with size= (no offset): the configuration it is the reference for
    cfg = dataclasses.replace(base, depth=1, grid=grid, interp_offset=0.0)
    hf = _dinov2(cfg, registers=registers, image_size=grid * cfg.patch)
    path = _hf_pretrained(tmp_path, hf)
    _check(cfg, path, lambda x: hf(pixel_values=x).last_hidden_state[:, 0], (224, 126 if cfg.patch == 14 else 128))


# ---------------------------------------------------------------- timm and hub layouts


def _ref_for(cfg: ViTConfig, style: str) -> RefViT:
    hub = style == "hub"
    return randomise(RefViT(
        patch=cfg.patch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, hidden=cfg.mlp_hidden,
        img_size=cfg.grid * cfg.patch, swiglu=cfg.mlp == "swiglu", reg=cfg.registers,
        no_embed_class=cfg.pos_prefix == 0, init_values=1e-5 if cfg.layer_scale else None, eps=cfg.eps,
        style=style, offset=cfg.interp_offset, antialias=cfg.interpolation == "bicubic_aa", pool=cfg.pool))


def test_parity_timm_full_depth_vits16_torch_checkpoint(tmp_path):
    """Lunit's ViT-S/16 (timm VisionTransformer, full depth) read from a torch pickle."""
    cfg = CONFIGS["lunit_vits16"]
    ref = _ref_for(cfg, "timm")
    path = tmp_path / "vits16.torch"
    torch.save(ref.state_dict(), path)
    _check(cfg, path, ref, (224, 160))


@pytest.mark.parametrize("name", ["uni", "uni2_h", "virchow2", "h_optimus_0", "prov_gigapath"])
def test_parity_timm_pathology_configs(tmp_path, name):
    """Real widths, SwiGLU packed, registers with and without their own position entries, cls++mean."""
    from safetensors.torch import save_file

    cfg = dataclasses.replace(CONFIGS[name], depth=1)
    ref = _ref_for(cfg, "timm")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    _check(cfg, path, ref, (224, 126 if cfg.patch == 14 else 128))


def test_parity_hub_full_depth_dino_vits16(tmp_path):
    """facebookresearch/dino ViT-S/16 at full depth: +0.1 offset resampling."""
    cfg = CONFIGS["dino_vits16"]
    ref = _ref_for(cfg, "hub")
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, path)
    _check(cfg, path, ref, (224, 160))


def test_parity_hub_full_depth_dino_vits16_bfloat16(tmp_path):
    """Under mixed_bfloat16 (bfloat16 projections and attention matmuls, float32 softmax and
    LayerNorm) the full-depth ViT-S/16 stays within 2 % (relative L2) of the float32 reference."""
    import keras

    cfg = CONFIGS["dino_vits16"]
    ref = _ref_for(cfg, "hub")
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in ref.state_dict().items()}}, path)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_vit(cfg, 224)
    finally:
        keras.config.set_dtype_policy(previous)
    load_vit_file(model, cfg, path, "test")
    x = np.random.default_rng(1).uniform(0, 255, (4, 224, 224, 3)).astype("float32")
    ours = np.asarray(model(x))
    mean, std = np.asarray(cfg.mean, "float32"), np.asarray(cfg.std, "float32")
    with torch.no_grad():
        want = ref(torch.from_numpy(((x / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())).numpy()
    rel = np.linalg.norm(ours - want, axis=1) / np.linalg.norm(want, axis=1)
    assert ours.dtype == np.float32 and rel.max() < 0.02, rel


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_norm_matches_keras_layer_normalization(policy):
    """dfl_tf's LayerNorm (float32, five ops) computes Keras' LayerNormalization with the same weights."""
    import keras

    from dfl_tf.backbones.vit.model import LayerNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 5, 48)) * 3 + 1).astype("float32")
    ours, theirs = LayerNorm(epsilon=1e-6, dtype=policy), keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy)
    ours.build(x.shape), theirs.build(x.shape)
    weights = [rng.uniform(0.5, 1.5, 48).astype("float32"), rng.standard_normal(48).astype("float32")]
    ours.set_weights(weights), theirs.set_weights(weights)
    if policy == "float32":
        np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), atol=2e-5)
    else:  # bfloat16 in and out, float32 inside both: at most one bfloat16 rounding step apart
        xb = keras.ops.cast(x, "bfloat16")
        a, b = (np.asarray(keras.ops.cast(layer(xb), "float32")) for layer in (ours, theirs))
        assert keras.backend.standardize_dtype(ours(xb).dtype) == "bfloat16"
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -7)
    for kwargs in ({"scale": False}, {"center": False}, {"epsilon": None}):  # no gamma / no beta / default eps
        plain, keras_plain = LayerNorm(**kwargs), keras.layers.LayerNormalization(**kwargs)
        np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(keras_plain(x)), atol=2e-5)
    other_axis = LayerNorm(axis=1, epsilon=1e-6)  # not the last axis: Keras' own implementation
    keras_axis = keras.layers.LayerNormalization(axis=1, epsilon=1e-6)
    np.testing.assert_allclose(np.asarray(other_axis(x)), np.asarray(keras_axis(x)), atol=1e-6)
    assert LayerNorm.from_config(ours.get_config()).epsilon == 1e-6


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitg14_reg"])
def test_parity_hub_dinov2(tmp_path, name):
    """DINOv2 hub models: grid 37 resampled at 224 (offset 0.1, or antialias for _reg); SwiGLU w12/w3."""
    cfg = dataclasses.replace(CONFIGS[name], depth=1)
    ref = _ref_for(cfg, "hub")
    path = tmp_path / "hub.pth"
    torch.save(ref.state_dict(), path)
    _check(cfg, path, ref, (224, 126))


# ---------------------------------------------------------------- refusals and import


def test_mismatched_checkpoint_is_refused_naming_keys(tmp_path):
    cfg = dataclasses.replace(CONFIGS["dinov2_vits14"], depth=2)
    other = dataclasses.replace(cfg, dim=192, heads=3, mlp_hidden=768)
    path = tmp_path / "small.pth"
    torch.save(_ref_for(other, "hub").state_dict(), path)
    model = build_vit(cfg, 56)
    with pytest.raises(DflError, match=r"small.pth \(timm layout\) does not fit test: .*patch_embed.proj.weight "
                                       r"has shape \(192, 3, 14, 14\), expected \(384, 3, 14, 14\)"):
        load_vit_file(model, cfg, path, "test")
    state = _ref_for(cfg, "hub").state_dict()
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.7.norm1.weight"] = torch.ones(384)
    torch.save(state, path)
    with pytest.raises(DflError, match=r"missing blocks.1.attn.qkv.weight.*unexpected blocks.7.norm1.weight"):
        load_vit_file(model, cfg, path, "test")


def test_import_weights_transformers_dinov2_and_load(tmp_path):
    """`dfl import-weights --arch dinov2_vits14` on a save_pretrained Dinov2Model; then --weights X.weights.h5."""
    from click.testing import CliRunner

    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.cli import main

    cfg = dataclasses.replace(CONFIGS["dinov2_vits14"], interp_offset=0.0)
    hf = _dinov2(cfg, registers=False, image_size=518)
    path = _hf_pretrained(tmp_path, hf)
    out = tmp_path / "dinov2.weights.h5"
    result = CliRunner().invoke(main, ["import-weights", str(path), "--arch", "dinov2_vits14", "--out", str(out)])
    assert result.exit_code == 0, result.output
    backbone = load_backbone("dinov2_vits14", weights=str(out), input_size=56)
    x = _images(56)
    direct = build_vit(CONFIGS["dinov2_vits14"], 56)
    load_vit_file(direct, CONFIGS["dinov2_vits14"], path, "direct")
    np.testing.assert_array_equal(np.asarray(backbone(x)), np.asarray(direct(x)))
    assert backbone.dim == 384
    with pytest.raises(DflError, match="does not fit phikon"):
        import_vit_weights(path, "phikon", tmp_path / "wrong.weights.h5")
    assert not (tmp_path / "wrong.weights.h5").exists()
