"""ViT checkpoints -> the Keras ViT of :mod:`dfl_tf.backbones.vit.model`, without torch.

Three key layouts are recognised from the keys themselves and renamed to one canonical
(timm-style) layout before assignment:

* **timm** (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``ls1.gamma``, ``reg_token``,
  ``mlp.fc1``/``fc2``; SwiGLU packed in ``fc1`` or unpacked as ``fc1_g``/``fc1_x``);
* **facebookresearch hub** (DINO, DINOv2: as timm, plus ``register_tokens``, SwiGLU as
  ``mlp.w12``/``w3`` or ``w1``/``w2``/``w3``, chunked ``blocks.C.N``, ``mask_token``);
* **transformers** (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel`` as saved by
  ``save_pretrained``: ``embeddings.*``, ``encoder.layer.N.attention.attention.query`` ...,
  separate q/k/v concatenated here; ``vit.``/``dinov2.`` wrapper prefixes stripped).

Files: ``.safetensors`` (validated header, :mod:`~dfl_tf.backbones.checkpoints.safetensors`),
torch checkpoints (:func:`~dfl_tf.backbones.checkpoints.torch_pickle.load_checkpoint`), or Keras
``.weights.h5``. A checkpoint whose keys or
shapes do not fit is refused with one error naming the first mismatches.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dfl_tf.backbones.checkpoints import safetensors, state_dict, torch_pickle
from dfl_tf.backbones.vit.model import ViTConfig, build_vit
from dfl_tf.errors import DflError

# keys of a backbone file that are not part of the feature extractor
_IGNORED = re.compile(r"^(mask_token|head\b.*|pooler\..*|classifier\..*|embeddings\.mask_token)$")
# transformers name inside ``encoder.layer.N.`` -> timm name inside ``blocks.N.`` (then ``.weight``/``.bias``)
_HF_BLOCK = {r"(?:layernorm_before|norm1)": "norm1", r"(?:layernorm_after|norm2)": "norm2",
             r"attention\.attention\.(?P<part>query|key|value)": r"attn.\g<part>",
             r"attention\.output\.dense": "attn.proj", r"intermediate\.dense": "mlp.fc1", r"output\.dense": "mlp.fc2",
             r"mlp\.(?:fc1|weights_in)": "mlp.fc1", r"mlp\.(?:fc2|weights_out)": "mlp.fc2"}
_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    *((rf"^encoder\.layer\.(?P<i>\d+)\.{old}\.(?P<leaf>weight|bias)$", rf"blocks.\g<i>.{new}.\g<leaf>")
      for old, new in _HF_BLOCK.items()),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
_HUB_RULES = [
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # chunked DINOv2 blocks keep the global index
    (r"^register_tokens$", "reg_token"),
    (r"^blocks\.(\d+)\.mlp\.w12\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.w3\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.mlp\.(?:w1|fc1_g)\.", r"blocks.\1.mlp.gate."),
    (r"^blocks\.(\d+)\.mlp\.(?:w2|fc1_x)\.", r"blocks.\1.mlp.value."),
]


def detect_layout(keys) -> tuple[str, str]:
    """``("transformers" | "timm", prefix)`` from the keys; prefix is a wrapper such as ``vit.``."""
    for key in keys:
        for anchor, layout in (("embeddings.patch_embeddings.projection.weight", "transformers"),
                               ("patch_embed.proj.weight", "timm")):
            if key.endswith(anchor):
                return layout, key[: -len(anchor)]
    shown = ", ".join(sorted(keys)[:4])
    raise DflError(f"no ViT patch embedding in the checkpoint (keys look like: {shown})")


def canonical_state(state: dict) -> tuple[dict, dict[str, str], str]:
    """Rename a timm / hub / transformers state dict to timm names; fuse q/k/v and pack SwiGLU.

    Returns the canonical dict, ``canonical key -> source key(s)`` for messages, and the layout.
    """
    layout, prefix = detect_layout(state)
    rules = _HF_RULES if layout == "transformers" else _HUB_RULES
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # outside the backbone (a classifier of a wrapper model)
        name = key[len(prefix):]
        if _IGNORED.match(name):
            continue
        new = name
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new], origin[new] = value, key
    for kind, parts, fused in (("attn", ("query", "key", "value"), "qkv"), ("mlp", ("gate", "value"), "fc1")):
        for key in [k for k in out if re.fullmatch(rf"blocks\.\d+\.{kind}\.{parts[0]}\.(weight|bias)", k)]:
            stem, leaf = key.rsplit(f".{parts[0]}.", 1)
            names = [f"{stem}.{p}.{leaf}" for p in parts]
            if all(n in out for n in names):
                origin[f"{stem}.{fused}.{leaf}"] = "+".join(origin.pop(n) for n in names)
                out[f"{stem}.{fused}.{leaf}"] = _Concat([out.pop(n) for n in names])
    return out, origin, layout


class _Concat:
    """Tensors joined along axis 0 when read (q/k/v -> qkv, gate/value -> packed SwiGLU)."""

    def __init__(self, parts: list):
        self.parts = parts
        shapes = [tuple(p.shape) for p in parts]
        self.shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if all(s[1:] == shapes[0][1:] for s in shapes) \
            else ("mismatched parts", *shapes)

    def __call__(self) -> np.ndarray:
        return np.concatenate([_read(p) for p in self.parts], axis=0)


def _read(value) -> np.ndarray:
    """An array, or the array a lazy value (safetensors tensor, concatenation) reads."""
    return np.asarray(value) if isinstance(value, np.ndarray) else value()


def _targets(model, config: ViTConfig) -> dict:
    """canonical key -> (Keras variable, torch value -> Keras value)."""
    same = np.asarray
    linear = np.transpose
    embed = model.get_layer("embed")
    targets = {
        "patch_embed.proj.weight": (embed.proj_kernel, lambda w: np.transpose(w, (2, 3, 1, 0))),
        "patch_embed.proj.bias": (embed.proj_bias, same),
        "cls_token": (embed.cls_token, same),
        "pos_embed": (embed.pos_embed, same),
    }
    if config.registers:
        targets["reg_token"] = (embed.reg_token, same)
    for i in range(config.depth):
        block = model.get_layer(f"blocks_{i}")
        for norm in ("norm1", "norm2"):
            layer = getattr(block, norm)
            targets[f"blocks.{i}.{norm}.weight"] = (layer.gamma, same)
            targets[f"blocks.{i}.{norm}.bias"] = (layer.beta, same)
        for key, layer in (("attn.qkv", block.qkv), ("attn.proj", block.proj), ("mlp.fc1", block.fc1),
                           ("mlp.fc2", block.fc2)):
            targets[f"blocks.{i}.{key}.weight"] = (layer.kernel, linear)
            targets[f"blocks.{i}.{key}.bias"] = (layer.bias, same)
        if config.layer_scale:
            targets[f"blocks.{i}.ls1.gamma"] = (block.ls1, same)
            targets[f"blocks.{i}.ls2.gamma"] = (block.ls2, same)
    norm = model.get_layer("norm")
    targets["norm.weight"] = (norm.gamma, same)
    targets["norm.bias"] = (norm.beta, same)
    return targets


def _torch_shape(key: str, shape: tuple) -> tuple:
    if key == "patch_embed.proj.weight":
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def assign_vit(model, config: ViTConfig, state: dict, source: str, arch: str) -> str:
    """Copy a ViT state dict (any layout) into ``model``; returns the layout name.

    ``state`` is consumed (emptied). Nothing is assigned unless every key and shape fits; the
    error names the first mismatches (canonical names are timm's for missing keys, the source's
    names otherwise).
    """
    canon, origin, layout = canonical_state(state)
    state.clear()  # consumed: each tensor is freed once assigned (ViT-g: 4.5 GB less at the peak)
    targets = _targets(model, config)
    problems = [f"missing {k}" for k in targets if k not in canon]
    for key, value in canon.items():
        if key not in targets:
            problems.append(f"unexpected {origin[key]}")
            continue
        want = _torch_shape(key, tuple(targets[key][0].shape))
        if tuple(value.shape) != want:
            problems.append(f"{origin[key]} has shape {tuple(value.shape)}, expected {want}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DflError(f"{source} ({layout} layout) does not fit {arch}: {len(problems)} mismatches: {shown}{more}")
    for key in list(canon):
        variable, convert = targets[key]
        variable.assign(np.ascontiguousarray(convert(_read(canon.pop(key))), dtype=np.float32))
    return layout


def read_state(path: str | os.PathLike) -> dict:
    """A ViT state dict from ``.safetensors`` (lazy tensors) or a torch checkpoint (arrays;
    nesting and ``module.``/``backbone.`` prefixes unwrapped)."""
    if safetensors.is_safetensors(path):
        return safetensors.lazy_safetensors(path)  # read tensor by tensor while assigning
    obj = torch_pickle.load_checkpoint(path)
    # DINO-style files nest {"teacher": {"backbone.<key>": ...}}; transformers keys keep "encoder."
    for _ in range(5):
        if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "teacher", "module") if isinstance(obj.get(k), dict)),
                         None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, dict):
        raise DflError(f"{Path(path).name}: no tensors found in the checkpoint")
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            key = str(key)
            for prefix in ("module.", "backbone."):
                key = key[len(prefix):] if key.startswith(prefix) else key
            state[key] = value
    return state


def load_vit_file(model, config: ViTConfig, path: str | os.PathLike, arch: str) -> None:
    """Load a local file into a built ViT: Keras ``.weights.h5`` directly, else convert on the fly."""
    if state_dict.is_keras_weights(path):
        state_dict.load_weights_file(model, [], str(path), arch, arch)
        return
    assign_vit(model, config, read_state(path), Path(path).name, arch)


def convert_vit_checkpoint(checkpoint: str | os.PathLike, config: ViTConfig, arch: str,
                           out: str | os.PathLike) -> Path:
    """Convert a ViT checkpoint (safetensors or torch; timm, hub or transformers keys) to ``.weights.h5``.

    The Keras model is built at the checkpoint's own grid, so the file loads at any input size.
    """
    import keras

    from dfl_tf.runtime.files import atomic_save_weights

    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise DflError(f"output file name must end in .weights.h5 (got {out.name})")
    state = read_state(checkpoint)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        model = build_vit(config, config.grid * config.patch, name=arch)
    finally:
        keras.config.set_dtype_policy(previous)
    assign_vit(model, config, state, Path(checkpoint).name, arch)
    del state
    return atomic_save_weights(model, out)
