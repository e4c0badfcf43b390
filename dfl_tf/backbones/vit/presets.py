"""Registry entries for the ViTs: DINO, DINOv2, ImageNet ViT-B/16 and the pathology foundation models.

Every constant (architecture, position-grid, interpolation, mean/std, pooling) comes from the
authors' code or model card named in the entry's ``ref``. Weights: direct URLs (DINO, DINOv2,
Lunit) through the hash-checking cache of :mod:`~dfl_tf.backbones.weights`; Hugging Face
repositories through ``huggingface_hub`` (``pip install 'dfl_tf[hub]'``; gated repositories read
``HF_TOKEN``). ``.safetensors`` load directly each time; torch pickles are converted once to
``.weights.h5``. Every entry's ``dfl import-weights`` converter is
:func:`~dfl_tf.backbones.vit.checkpoint.convert_vit_checkpoint` with its configuration.
"""
from __future__ import annotations

import os
from pathlib import Path

import keras

from dfl_tf.backbones import weights as weight_cache
from dfl_tf.backbones.layers import LUNIT_MEAN, LUNIT_STD, describe_normalisation
from dfl_tf.backbones.registry import BackboneSpec, WeightSource, get_spec, register
from dfl_tf.backbones.vit.checkpoint import convert_vit_checkpoint, load_vit_file
from dfl_tf.backbones.vit.model import ViTConfig, build_vit
from dfl_tf.backbones.weights import HubSource
from dfl_tf.errors import DflError
from dfl_tf.runtime.files import atomic_save_weights

HOPT_MEAN, HOPT_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)


def _hub(key: str, repo: str, filename: str, license: str, gated: bool = False) -> HubSource:
    """A hub source; :func:`register_vit` binds its offline check to the entry's name."""
    return weight_cache.hub_source("", key, repo, filename, license, gated=gated)


def _url(key: str, spec_name: str, url: str, license: str) -> WeightSource:
    return weight_cache.url_source(spec_name, key, url, license, "no published checksum")


def vit_builder(spec_name: str):
    """``builder(input_size, weights)``: random init, a named source, or a local file (the
    architecture is ``CONFIGS[spec_name]``, read when building)."""

    def build(input_size: int, weights: str | None) -> keras.Model:
        from dfl_tf.backbones.checkpoints import safetensors

        config = CONFIGS[spec_name]
        source = get_spec(spec_name).weight_source(weights) if weights is not None else None
        converted = weight_cache.converted_path(spec_name, weights) if source is not None else None
        # fetch first: an offline or gated download fails before a large model is built
        raw = weight_cache.raw_file(source) if converted is not None and not converted.exists() else None
        model = build_vit(config, input_size, name=spec_name)
        if weights is None:
            return model
        if source is None or converted.exists():
            load_vit_file(model, config, weights if source is None else converted, spec_name)
            return model
        load_vit_file(model, config, raw, spec_name)
        if not safetensors.is_safetensors(raw):  # cache the slow pickle conversion once
            atomic_save_weights(model, converted)
        return model

    return build


def import_vit_weights(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike) -> Path:
    """Convert a checkpoint of the registered ViT ``arch`` to ``.weights.h5`` (any input size)."""
    if arch not in CONFIGS:
        raise DflError(f"unknown ViT architecture '{arch}' (choose from {', '.join(sorted(CONFIGS))})")
    return convert_vit_checkpoint(checkpoint, CONFIGS[arch], arch, out)


_EMBEDDING = {"cls": "class token after the final LayerNorm",
              "cls_mean": "class token ++ mean of patch tokens (after the final LayerNorm)",
              "mean": "mean of patch tokens after the final LayerNorm"}


CONFIGS: dict[str, ViTConfig] = {}  # registry name -> architecture (import-weights, tests)


def register_vit(name: str, config: ViTConfig, sources: dict[str, WeightSource], ref: str,
                 description: str) -> BackboneSpec:
    """Register one ViT; hub sources get their offline check bound to this name."""
    CONFIGS[name] = config
    bound = {key: weight_cache.hub_source(name, key, source.repo, source.filename, source.license, source.gated)
             if isinstance(source, HubSource) else source for key, source in sources.items()}
    interp = ("bicubic" if config.interpolation == "bicubic" else "bicubic antialias")
    interp += f", scale_factor offset {config.interp_offset:g}" if config.interp_offset else ", size="
    return register(BackboneSpec(
        name=name, builder=vit_builder(name), input_size=224, dim=config.out_dim,
        weights=bound, default_weights=next(iter(bound), "none"), params=config.params(),
        embedding=_EMBEDDING[config.pool], preprocessing=describe_normalisation(config.mean, config.std),
        description=f"{description}; pos-embed {config.grid}x{config.grid} resampled {interp}. Source: {ref}",
        converter=lambda checkpoint, out, input_size=None: import_vit_weights(checkpoint, name, out),
    ))


def _vit(patch, dim, depth, heads, grid, mlp_hidden=None, **kw) -> ViTConfig:
    return ViTConfig(patch=patch, dim=dim, depth=depth, heads=heads, grid=grid,
                     mlp_hidden=mlp_hidden or 4 * dim, **kw)


# ---------------------------------------------------------------- ImageNet / self-supervised ViTs

_DINO = "facebookresearch/dino vision_transformer.py (LayerNorm 1e-6, +0.1 offset bicubic, cls token)"
_DINO_LIC = "Apache-2.0 (facebookresearch/dino); self-supervised on ImageNet-1k"
for _p in (16, 8):
    register_vit(f"dino_vits{_p}", _vit(_p, 384, 12, 6, 224 // _p, interp_offset=0.1),
                 {"dino": _url("dino", f"dino_vits{_p}",
                               f"https://dl.fbaipublicfiles.com/dino/dino_deitsmall{_p}_pretrain/"
                               f"dino_deitsmall{_p}_pretrain.pth", _DINO_LIC)},
                 _DINO, f"DINO ViT-S/{_p}")

register_vit("vit_b16_imagenet", _vit(16, 768, 12, 12, 14, eps=1e-12, mean=HALF, std=HALF),
             {"imagenet": _hub("imagenet", "google/vit-base-patch16-224", "model.safetensors",
                               "Apache-2.0; ImageNet-21k pre-training, ImageNet-1k fine-tuning (research terms)")},
             "google/vit-base-patch16-224 config.json and preprocessor_config.json (transformers ViTModel)",
             "ViT-B/16 224 (the paper's ViT-patch16-224), transformers layout")

_DINOV2 = ("facebookresearch/dinov2 hub/backbones.py + models/vision_transformer.py (img_size 518, "
           "LayerScale, x_norm_clstoken; _reg: 4 registers, antialias, no offset)")
_DINOV2_LIC = "Apache-2.0 (facebookresearch/dinov2)"
for _arch, (_dim, _depth, _heads, _mlp) in {"s": (384, 12, 6, None), "b": (768, 12, 12, None),
                                            "l": (1024, 24, 16, None), "g": (1536, 40, 24, "swiglu")}.items():
    for _reg in (False, True):
        _name = f"dinov2_vit{_arch}14" + ("_reg" if _reg else "")
        _file = f"dinov2_vit{_arch}14" + ("_reg4" if _reg else "") + "_pretrain.pth"
        _cfg = _vit(14, _dim, _depth, _heads, 37, mlp_hidden=4096 if _mlp else None, mlp=_mlp or "gelu",
                    layer_scale=True, registers=4 if _reg else 0,
                    interpolation="bicubic_aa" if _reg else "bicubic", interp_offset=0.0 if _reg else 0.1)
        register_vit(_name, _cfg,
                     {"lvd142m": _url("lvd142m", _name, f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{_arch}14/"
                                      f"{_file}", _DINOV2_LIC)},
                     _DINOV2, f"DINOv2 ViT-{_arch.upper()}/14" + (" with registers" if _reg else ""))

# ---------------------------------------------------------------- pathology foundation models

_NC_ND = "CC-BY-NC-ND-4.0: non-commercial, no derivatives; gated (accept on the model page)"
_OWKIN = "Owkin non-commercial licence (owkin/phikon model card)"
register_vit("phikon", _vit(16, 768, 12, 12, 14, eps=1e-12),
             {"phikon": _hub("phikon", "owkin/phikon", "model.safetensors", _OWKIN)},
             "owkin/phikon model card (ViTModel, last_hidden_state[:, 0]) and preprocessor_config.json",
             "Owkin Phikon ViT-B/16 (iBOT on TCGA), transformers ViTModel layout")
register_vit("phikon_v2", _vit(16, 1024, 24, 16, 14, layer_scale=True),
             {"phikon_v2": _hub("phikon_v2", "owkin/phikon-v2", "model.safetensors", _OWKIN)},
             "owkin/phikon-v2 model card (Dinov2Model, last_hidden_state[:, 0]) and config.json",
             "Owkin Phikon-v2 ViT-L/16 (DINOv2 on PANCAN-XL), transformers Dinov2 layout")
register_vit("hibou_b", _vit(14, 768, 12, 12, 16, mlp_hidden=2048, mlp="swiglu", layer_scale=True, registers=4,
                             interpolation="bicubic_aa", mean=HIBOU_MEAN, std=HIBOU_STD),
             {"hibou": _hub("hibou", "histai/hibou-b", "model.safetensors", "Apache-2.0 (histai/hibou-b)")},
             "HistAI/hibou hibou/models/__init__.py build_model (vit_base, patch 14, img 224, layerscale 1e-5, "
             "swiglufused, 4 registers, interpolate_offset 0, antialias) and example.ipynb mean/std; "
             "embedding = pooler_output = normed class token", "HistAI Hibou-B ViT-B/14, SwiGLU, 4 registers")
register_vit("uni", _vit(16, 1024, 24, 16, 14, layer_scale=True, interpolation="bicubic_aa"),
             {"uni": _hub("uni", "MahmoodLab/UNI", "pytorch_model.bin", _NC_ND, gated=True)},
             "MahmoodLab/UNI model card: timm vit_large_patch16_224, init_values 1e-5, num_classes 0, "
             "dynamic_img_size (timm resample_abs_pos_embed)", "Mahmood Lab UNI ViT-L/16, timm layout")
register_vit("uni2_h", _vit(14, 1536, 24, 24, 16, mlp_hidden=4096, mlp="swiglu", layer_scale=True, registers=8,
                            pos_prefix=0, interpolation="bicubic_aa"),
             {"uni2_h": _hub("uni2_h", "MahmoodLab/UNI2-h", "pytorch_model.bin", _NC_ND, gated=True)},
             "MahmoodLab/UNI2-h model card timm_kwargs (patch 14, depth 24, 24 heads, 1536, mlp_ratio 2.66667*2 "
             "SwiGLUPacked, reg_tokens 8, no_embed_class)", "Mahmood Lab UNI2-h ViT-H/14, SwiGLU, 8 registers")
register_vit("virchow2", _vit(14, 1280, 32, 16, 16, mlp_hidden=3416, mlp="swiglu", layer_scale=True, registers=4,
                              pos_prefix=5, interpolation="bicubic_aa", pool="cls_mean"),
             {"virchow2": _hub("virchow2", "paige-ai/Virchow2", "model.safetensors", _NC_ND, gated=True)},
             "paige-ai/Virchow2 model card + config.json (vit_huge_patch14_224, mlp_ratio 5.3375 SwiGLUPacked, "
             "reg_tokens 4; embedding = cat(output[:, 0], output[:, 5:].mean(1)))",
             "Paige Virchow2 ViT-H/14, SwiGLU, 4 registers, 2560-d")
register_vit("h_optimus_0", _vit(14, 1536, 40, 24, 16, mlp_hidden=4096, mlp="swiglu", layer_scale=True,
                                 registers=4, pos_prefix=0, interpolation="bicubic_aa", mean=HOPT_MEAN, std=HOPT_STD),
             {"h_optimus_0": _hub("h_optimus_0", "bioptimus/H-optimus-0", "pytorch_model.bin",
                                  "Apache-2.0; gated (accept on the model page)", gated=True)},
             "bioptimus/H-optimus-0 model card + config.json (vit_giant_patch14_reg4_dinov2, img_size 224, "
             "init_values 1e-5, its own mean/std)", "Bioptimus H-optimus-0 ViT-g/14, SwiGLU, 4 registers")
register_vit("prov_gigapath", _vit(16, 1536, 40, 24, 14, mlp_hidden=4096, mlp="swiglu", layer_scale=True,
                                   interpolation="bicubic_aa"),
             {"gigapath": _hub("gigapath", "prov-gigapath/prov-gigapath", "pytorch_model.bin",
                               "Apache-2.0; gated (accept on the model page)", gated=True)},
             "prov-gigapath/prov-gigapath config.json (vit_giant_patch14_dinov2 with patch 16, img_size 224, "
             "init_values 1e-5, mlp_ratio 5.33334)", "Prov-GigaPath tile encoder ViT-g/16, SwiGLU")

_LUNIT = "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
_LUNIT_LIC = "Lunit Public License: non-commercial research use only (lunit-io/benchmark-ssl-pathology)"
_LUNIT_REF = ("lunit-io/benchmark-ssl-pathology README (timm VisionTransformer img 224, num_classes 0); "
              "mean/std from kaiko-ai/eva backbones/pathology/lunit.py")
for _p in (16, 8):
    register_vit(f"lunit_vits{_p}", _vit(_p, 384, 12, 6, 224 // _p, interpolation="bicubic_aa",
                                         mean=LUNIT_MEAN, std=LUNIT_STD),
                 {"lunit": _url("lunit", f"lunit_vits{_p}", f"{_LUNIT}dino_vit_small_patch{_p}_ep200.torch",
                                _LUNIT_LIC)},
                 _LUNIT_REF, f"Lunit DINO ViT-S/{_p} (TCGA), timm layout")
