"""Vision transformers in Keras: one architecture for the DINO, DINOv2, timm and transformers ViTs.

The Keras model is the same for every reference; what differs between references is kept
in :class:`ViTConfig` and reproduced exactly:

* position embeddings: which prefix tokens they cover (class token only: DINO, DINOv2,
  transformers; class and register tokens: timm ``no_embed_class=False``; none: timm
  ``no_embed_class=True``), and how they are resized to another patch grid: torch's
  ``interpolate(mode="bicubic")`` with ``size=`` (transformers ViT/Dinov2), with
  ``scale_factor=(g + 0.1) / M`` (DINO and the DINOv2 hub models: the "0.1 offset"), or
  ``antialias=True`` (timm's ``resample_abs_pos_embed``, DINOv2 ``_reg`` hub models,
  transformers ``Dinov2WithRegisters``). Each is a separable linear map, built here in numpy
  exactly as torch's kernels compute it and applied to the stored embedding in the graph;
* blocks: pre-norm attention with one fused ``qkv`` projection (separate q/k/v checkpoints
  are concatenated on import), optional LayerScale, a GELU MLP or a SwiGLU MLP (packed
  ``fc1 -> [x1, x2] -> silu(x1) * x2``; unpacked checkpoints are packed on import);
* pooling: the normalised class token, or class token concatenated with the mean of the
  patch tokens (Virchow2), or the mean of the patch tokens.

Checkpoint key layouts and the registry entries live beside it, in
:mod:`dfl_tf.backbones.vit.checkpoint` and :mod:`dfl_tf.backbones.vit.presets`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dfl_tf.backbones.layers import IMAGENET_MEAN, IMAGENET_STD, Normalize

INTERPOLATIONS = ("bicubic", "bicubic_aa")
POOLS = ("cls", "cls_mean", "mean")
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that distinguishes one reference ViT from another.

    ``mlp_hidden`` is the width fed to ``fc2`` (for SwiGLU, half of the packed ``fc1`` width).
    ``pos_prefix`` is how many leading tokens (class, then registers) have their own position
    embedding; ``grid`` is the side of the stored patch position grid.
    """

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    grid: int
    mlp: str = "gelu"
    registers: int = 0
    pos_prefix: int = 1
    layer_scale: bool = False
    eps: float = 1e-6
    interpolation: str = "bicubic"
    interp_offset: float = 0.0
    pool: str = "cls"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.mlp not in MLPS or self.pool not in POOLS or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"bad ViT config {self}")
        if self.pos_prefix > 1 + self.registers:
            raise ValueError("pos_prefix cannot exceed the class and register tokens")

    @property
    def out_dim(self) -> int:
        return 2 * self.dim if self.pool == "cls_mean" else self.dim

    def params(self) -> int:
        """Parameter count of the backbone (no head), for listings."""
        d, h = self.dim, self.mlp_hidden
        fc1 = 2 * h if self.mlp == "swiglu" else h
        block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * fc1 + fc1) + (h * d + d)
        block += 2 * d if self.layer_scale else 0
        embed = 3 * self.patch ** 2 * d + d + d + self.registers * d + (self.pos_prefix + self.grid ** 2) * d
        return embed + self.depth * block + 2 * d


# --------------------------------------------------------------------------------------
# position-embedding resampling matrices (torch's kernels, in float64)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a, 0.0))


def resize_matrix(in_size: int, out_size: int, interpolation: str = "bicubic",
                  offset: float = 0.0) -> np.ndarray:
    """``[out_size, in_size]`` matrix equal to torch's 1-D ``F.interpolate(..., mode="bicubic")``.

    ``offset > 0`` reproduces the call with ``scale_factor=(out_size + offset) / in_size``
    (torch then maps coordinates with ``1 / scale_factor``); otherwise ``size=out_size``.
    ``bicubic_aa`` is ``antialias=True`` (Keys a=-0.5, weights renormalised at the borders);
    ``bicubic`` is a=-0.75 with clamped border indices, as ``upsample_bicubic2d``.
    """
    if in_size == out_size and offset == 0.0:
        return np.eye(out_size)
    scale = in_size / (out_size + offset) if offset else in_size / out_size
    matrix = np.zeros((out_size, in_size))
    if interpolation == "bicubic":
        for i in range(out_size):
            real = scale * (i + 0.5) - 0.5
            base = math.floor(real)
            t = real - base
            for k, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
                matrix[i, min(max(base + k, 0), in_size - 1)] += w
        return matrix
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
        total = weights.sum()
        matrix[i, lo:hi] = weights / total if total != 0 else weights
    return matrix


# --------------------------------------------------------------------------------------
# layers


@keras.saving.register_keras_serializable(package="dfl_tf")
class LayerNorm(keras.layers.LayerNormalization):
    """LayerNormalization over the last axis in float32 whatever the policy, in five ops
    (mean, centre, mean of squares, rsqrt, scale and shift) instead of Keras' eleven: under
    ``mixed_bfloat16`` half the time of ``keras.layers.LayerNormalization`` on ViT-S/16 token
    matrices (benchmarks/vit_kernels.py). Same weights (``gamma``, ``beta``) and config."""

    def call(self, inputs):
        rank = len(inputs.shape)
        axes = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        if [a % rank for a in axes] != [rank - 1] or self.rms_scaling or inputs.dtype == tf.float64:
            return super().call(inputs)
        epsilon = keras.config.epsilon() if self.epsilon is None else self.epsilon
        x = tf.cast(inputs, "float32")
        centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
        scale = tf.math.rsqrt(variance + epsilon)
        if self.scale:
            scale = scale * tf.cast(self.gamma, "float32")
        out = centred * scale
        if self.center:
            out = out + tf.cast(self.beta, "float32")
        return tf.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="dfl_tf")
class ViTEmbed(keras.layers.Layer):
    """Patch embedding, class/register tokens and (resampled) position embeddings.

    Output tokens are ordered ``[class, registers..., patches...]``.
    """

    def __init__(self, patch: int, dim: int, grid: int, registers: int = 0, pos_prefix: int = 1,
                 interpolation: str = "bicubic", interp_offset: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.patch, self.dim, self.grid = patch, dim, grid
        self.registers, self.pos_prefix = registers, pos_prefix
        self.interpolation, self.interp_offset = interpolation, interp_offset

    def build(self, input_shape):
        self.proj_kernel = self.add_weight(shape=(self.patch, self.patch, 3, self.dim), name="proj_kernel",
                                           initializer="glorot_uniform")
        self.proj_bias = self.add_weight(shape=(self.dim,), name="proj_bias", initializer="zeros")
        small = keras.initializers.RandomNormal(stddev=0.02)
        self.cls_token = self.add_weight(shape=(1, 1, self.dim), name="cls_token", initializer=small)
        if self.registers:
            self.reg_token = self.add_weight(shape=(1, self.registers, self.dim), name="reg_token",
                                             initializer=small)
        self.pos_embed = self.add_weight(shape=(1, self.pos_prefix + self.grid ** 2, self.dim),
                                         name="pos_embed", initializer=small)
        rows, cols = input_shape[1] // self.patch, input_shape[2] // self.patch
        # DINO/DINOv2 skip resampling when the grid already matches (the offset then plays no part)
        offset = 0.0 if (rows, cols) == (self.grid, self.grid) else self.interp_offset
        self._resize_rows = resize_matrix(self.grid, rows, self.interpolation, offset).astype(np.float32)
        self._resize_cols = resize_matrix(self.grid, cols, self.interpolation, offset).astype(np.float32)

    def call(self, images):
        dtype = self.compute_dtype
        kernel = ops.cast(self.proj_kernel, dtype)
        x = ops.conv(ops.cast(images, dtype), kernel, strides=self.patch, padding="valid")
        x = x + ops.cast(self.proj_bias, dtype)
        rows, cols = self._resize_rows.shape[0], self._resize_cols.shape[0]
        x = ops.reshape(x, (-1, rows * cols, self.dim))
        pos = ops.cast(self.pos_embed, "float32")
        grid = ops.reshape(pos[0, self.pos_prefix:], (self.grid, self.grid, self.dim))
        grid = ops.einsum("hm,mnd,wn->hwd", ops.convert_to_tensor(self._resize_rows), grid,
                          ops.convert_to_tensor(self._resize_cols))
        x = x + ops.cast(ops.reshape(grid, (1, rows * cols, self.dim)), dtype)
        prefix = ops.cast(self.cls_token, dtype)
        if self.registers:
            prefix = ops.concatenate([prefix, ops.cast(self.reg_token, dtype)], axis=1)
        if self.pos_prefix:
            prefix_pos = pos[:, :self.pos_prefix]
            pad = 1 + self.registers - self.pos_prefix
            if pad:
                prefix_pos = ops.concatenate([prefix_pos, ops.zeros((1, pad, self.dim), "float32")], axis=1)
            prefix = prefix + ops.cast(prefix_pos, dtype)
        batch = ops.shape(x)[0]
        prefix = ops.broadcast_to(prefix, (batch, 1 + self.registers, self.dim))
        return ops.concatenate([prefix, x], axis=1)

    def compute_output_shape(self, input_shape):
        tokens = 1 + self.registers + (input_shape[1] // self.patch) * (input_shape[2] // self.patch)
        return (input_shape[0], tokens, self.dim)

    def get_config(self):
        return {**super().get_config(), "patch": self.patch, "dim": self.dim, "grid": self.grid,
                "registers": self.registers, "pos_prefix": self.pos_prefix,
                "interpolation": self.interpolation, "interp_offset": self.interp_offset}


@keras.saving.register_keras_serializable(package="dfl_tf")
class ViTBlock(keras.layers.Layer):
    """Pre-norm transformer block: ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, mlp: str = "gelu", layer_scale: bool = False,
                 eps: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.heads, self.mlp_hidden, self.mlp = dim, heads, mlp_hidden, mlp
        self.layer_scale, self.eps = layer_scale, eps
        self.norm1 = LayerNorm(epsilon=eps, name="norm1")
        self.qkv = keras.layers.Dense(3 * dim, name="qkv")
        self.proj = keras.layers.Dense(dim, name="proj")
        self.norm2 = LayerNorm(epsilon=eps, name="norm2")
        self.fc1 = keras.layers.Dense(2 * mlp_hidden if mlp == "swiglu" else mlp_hidden, name="fc1")
        self.fc2 = keras.layers.Dense(dim, name="fc2")

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.qkv.build(input_shape)
        self.proj.build(input_shape)
        self.norm2.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build((*input_shape[:-1], self.mlp_hidden))
        if self.layer_scale:
            self.ls1 = self.add_weight(shape=(self.dim,), name="ls1", initializer=keras.initializers.Constant(0.1))
            self.ls2 = self.add_weight(shape=(self.dim,), name="ls2", initializer=keras.initializers.Constant(0.1))

    def _dense(self, layer: keras.layers.Dense, x):
        """``[T, in] -> [T, out]`` as one 2-D MatMul + BiasAdd, which oneDNN runs as one fused
        matmul (Keras' Dense on a 3-D input is tensordot -> reshape -> add, which it does not fuse)."""
        dtype = self.compute_dtype
        return tf.nn.bias_add(tf.matmul(x, ops.cast(layer.kernel, dtype)), ops.cast(layer.bias, dtype))

    def _attention(self, x, tokens):
        """``[B*N, dim]`` -> ``[B*N, dim]``. The two attention matmuls run in the compute dtype
        (bfloat16 under ``mixed_bfloat16``, float16 under ``mixed_float16``, as torch's autocast
        runs them), the scaled logits' softmax in float32. q, k and v come out of one transpose
        to ``[3, B, H, N, Dh]``, not three strided slices (A/B: benchmarks/vit_kernels.py)."""
        head_dim = self.dim // self.heads
        qkv = ops.reshape(self._dense(self.qkv, x), (-1, tokens, 3, self.heads, head_dim))
        q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # each [B, H, N, Dh]
        if q.dtype == tf.float16:  # float16's range (65504): scale q before the product, not the logits after
            logits = tf.cast(tf.matmul(q * tf.cast(head_dim ** -0.5, q.dtype), k, transpose_b=True), "float32")
        else:
            logits = tf.cast(tf.matmul(q, k, transpose_b=True), "float32") * head_dim ** -0.5
        weights = tf.cast(tf.nn.softmax(logits, axis=-1), q.dtype)
        out = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])  # [B, N, H, Dh]
        return self._dense(self.proj, tf.reshape(out, (-1, self.dim)))

    def _mlp(self, x):
        h = self._dense(self.fc1, x)
        if self.mlp == "swiglu":
            h = ops.silu(h[..., :self.mlp_hidden]) * h[..., self.mlp_hidden:]
        else:
            h = tf.nn.gelu(h, approximate=False)
        return self._dense(self.fc2, h)

    def call(self, x):
        # tokens of all images as one [B*N, dim] matrix: every projection is a plain 2-D matmul
        dtype = self.compute_dtype
        shape, tokens = ops.shape(x), ops.shape(x)[1]
        x = ops.reshape(x, (-1, self.dim))
        y = self._attention(ops.cast(self.norm1(x), dtype), tokens)
        x = x + (y * ops.cast(self.ls1, y.dtype) if self.layer_scale else y)
        y = self._mlp(ops.cast(self.norm2(x), dtype))
        x = x + (y * ops.cast(self.ls2, y.dtype) if self.layer_scale else y)
        return ops.reshape(x, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "mlp_hidden": self.mlp_hidden,
                "mlp": self.mlp, "layer_scale": self.layer_scale, "eps": self.eps}


@keras.saving.register_keras_serializable(package="dfl_tf")
class ViTPool(keras.layers.Layer):
    """Token sequence -> embedding: ``cls``, ``cls_mean`` (class ++ mean of patches) or ``mean``."""

    def __init__(self, mode: str = "cls", prefix: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.prefix = mode, prefix

    def call(self, x):
        cls = x[:, 0]
        if self.mode == "cls":
            return cls
        mean = ops.mean(ops.cast(x[:, self.prefix:], "float32"), axis=1)
        if self.mode == "mean":
            return mean
        return ops.concatenate([ops.cast(cls, "float32"), mean], axis=-1)

    def compute_output_shape(self, input_shape):
        dim = input_shape[-1] * (2 if self.mode == "cls_mean" else 1)
        return (input_shape[0], dim)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "prefix": self.prefix}


def build_vit(config: ViTConfig, input_size: int, name: str = "vit") -> keras.Model:
    """Frozen-backbone model: float RGB [0, 255] ``[N, S, S, 3]`` -> ``[N, config.out_dim]`` float32."""
    inputs = keras.Input((input_size, input_size, 3), name="images")
    x = Normalize(config.mean, config.std, name="preprocess")(inputs)
    x = ViTEmbed(config.patch, config.dim, config.grid, config.registers, config.pos_prefix,
                 config.interpolation, config.interp_offset, name="embed")(x)
    for index in range(config.depth):
        x = ViTBlock(config.dim, config.heads, config.mlp_hidden, config.mlp, config.layer_scale, config.eps,
                     name=f"blocks_{index}")(x)
    x = LayerNorm(epsilon=config.eps, name="norm")(x)
    x = ViTPool(config.pool, 1 + config.registers, name="pool")(x)
    x = keras.layers.Activation("linear", dtype="float32", name="embedding")(x)
    return keras.Model(inputs, x, name=name)
