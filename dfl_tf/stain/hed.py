"""HED colour deconvolution and the HED stain jitter, as TensorFlow ops.

Colour deconvolution follows Ruifrok & Johnston (Anal. Quant. Cytol. Histol. 2001) with the stain matrix
scikit-image uses in ``skimage.color.rgb2hed`` / ``hed2rgb`` (rows: haematoxylin, eosin, DAB optical-density
vectors). HED values here are stain concentrations in optical-density units (natural log):
``hed = -ln(max(rgb / 255, 1e-6)) @ inv(RGB_FROM_HED)``. scikit-image (>= 0.19) returns the same values
divided by ``-ln(1e-6)`` and clipped at 0; this module does not clip, so ``hed_to_rgb(rgb_to_hed(x))``
gives ``x`` back (up to float32 rounding) for every pixel, including those with a negative DAB component.

The jitter is the HED augmentation of Tellez et al. (IEEE TMI 2018, "Whole-slide mitosis detection in H&E
breast histology using PHH3 as a reference ..."; compared in Tellez et al., Med. Image Anal. 2019,
"Quantifying the effects of data augmentation and stain color normalization ..."): after deconvolution each
channel ``c`` of H, E, D is changed to ``alpha_c * c + beta_c`` with ``alpha_c ~ U(1 - sigma, 1 + sigma)``
and ``beta_c ~ U(-sigma, sigma)``, drawn once per image, then the image is recomposed to RGB. The same
form is in the DIAG pathology augmentation code (``HedColorAugmenter``: scale the rgb2hed channel, add a
bias, hed2rgb, clip). Presets: ``light`` = 0.05 and ``strong`` = 0.2, the HED-light / HED-strong ranges of
Tellez et al. 2019, in optical-density units.

All ops take a batch ``[B, H, W, 3]`` (uint8, or float in [0, 255]), work in float32 and are graph-safe
(any spatial size, any batch size), so extraction and an exported SavedModel run the same computation.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from dfl_tf.errors import DflError

#: Optical-density vectors of haematoxylin, eosin and DAB (rows), as in ``skimage.color.rgb_from_hed``.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: Named jitter strengths -> sigma (Tellez et al. 2019: HED-light and HED-strong).
JITTER_STRENGTHS = {"light": 0.05, "strong": 0.2}

_EPS = 1e-6  # smallest light fraction before the logarithm, as in scikit-image (0 -> OD 13.8)

Images = Union[tf.Tensor, np.ndarray]


def jitter_sigma(strength: Union[str, float, int], name: str = "--stain-jitter") -> float:
    """The sigma for a named strength (``light``, ``strong``) or a number in [0, 1).

    Raises DflError naming ``name`` for an unknown preset or a sigma outside [0, 1) (a scale
    ``1 - sigma`` must stay positive).
    """
    if isinstance(strength, str):
        key = strength.strip().lower()
        if key in JITTER_STRENGTHS:
            return JITTER_STRENGTHS[key]
        try:
            value = float(key)
        except ValueError:
            raise DflError(f"{name} must be one of {', '.join(JITTER_STRENGTHS)} or a number in [0, 1) "
                           f"(got {strength!r})") from None
    elif isinstance(strength, (int, float)) and not isinstance(strength, bool):
        value = float(strength)
    else:
        raise DflError(f"{name} must be one of {', '.join(JITTER_STRENGTHS)} or a number in [0, 1) "
                       f"(got {strength!r})")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise DflError(f"{name} must be one of {', '.join(JITTER_STRENGTHS)} or a number in [0, 1) "
                       f"(got {strength!r})")
    return value


def rgb_to_hed(images: Images) -> tf.Tensor:
    """HED concentrations (optical density, float32) of RGB ``images`` [..., 3] in [0, 255]."""
    rgb = tf.cast(images, tf.float32) / 255.0
    od = -tf.math.log(tf.maximum(rgb, _EPS))
    return tf.tensordot(od, tf.constant(HED_FROM_RGB, tf.float32), axes=[[-1], [0]])


def hed_to_rgb(hed: Images) -> tf.Tensor:
    """RGB (float32 in [0, 255]) of HED concentrations [..., 3]; the inverse of :func:`rgb_to_hed`."""
    od = tf.tensordot(tf.cast(hed, tf.float32), tf.constant(RGB_FROM_HED, tf.float32), axes=[[-1], [0]])
    return tf.clip_by_value(255.0 * tf.exp(-od), 0.0, 255.0)


def _like_input(rgb: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """float32 [0, 255] -> the input's dtype (uint8 rounded)."""
    if dtype == tf.uint8:
        return tf.cast(tf.round(rgb), tf.uint8)
    return tf.cast(rgb, dtype)


def apply_hed_jitter(images: Images, alpha: Images, beta: Images) -> tf.Tensor:
    """``images`` [B, H, W, 3] with HED channel ``c`` changed to ``alpha[:, c] * c + beta[:, c]``.

    ``alpha`` and ``beta`` are [B, 3] (one draw per image). The result has the input's dtype
    (uint8 rounded, float in [0, 255]).
    """
    images = tf.convert_to_tensor(images)
    alpha, beta = tf.cast(alpha, tf.float32), tf.cast(beta, tf.float32)
    # od' = ((od @ HED_FROM_RGB) * alpha + beta) @ RGB_FROM_HED, folded into one [3, 3] map and a bias
    to_hed, to_od = tf.constant(HED_FROM_RGB, tf.float32), tf.constant(RGB_FROM_HED, tf.float32)
    mix = tf.einsum("ij,bj,jk->bik", to_hed, alpha, to_od)                     # [B, 3, 3]
    bias = tf.matmul(beta, to_od)                                               # [B, 3]
    od = -tf.math.log(tf.maximum(tf.cast(images, tf.float32) / 255.0, _EPS))
    od = tf.einsum("bhwi,bik->bhwk", od, mix) + bias[:, None, None, :]
    return _like_input(tf.clip_by_value(255.0 * tf.exp(-od), 0.0, 255.0), images.dtype)


def copy_seeds(seed: int, sample_ids: Images, copy: Union[int, Images]) -> tf.Tensor:
    """Stateless seeds [B, 2] (int64) from the global ``seed``, each sample's id and its copy index.

    The id enters through ``tf.strings.to_hash_bucket_fast`` (FarmHash Fingerprint64, stable across
    platforms and TF versions), so a sample's draw depends on what it is, not where it sits in a batch.
    ``copy`` is a scalar or [B] (0 is the original, 1..N the jittered copies).
    """
    ids = tf.convert_to_tensor(sample_ids, tf.string)
    id_hash = tf.strings.to_hash_bucket_fast(ids, 2 ** 62)
    copy = tf.broadcast_to(tf.cast(copy, tf.int64), tf.shape(id_hash))
    second = tf.constant(int(seed) % (2 ** 40), tf.int64) * (2 ** 20) + copy
    return tf.stack([id_hash, second], axis=-1)


def jitter_params(seeds: Images, sigma: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-sample ``alpha`` ~ U(1 - sigma, 1 + sigma) and ``beta`` ~ U(-sigma, sigma), each [B, 3].

    Drawn with ``tf.random.stateless_uniform`` from each row of ``seeds`` [B, 2]: the same seed gives
    the same draw in eager code, in a ``tf.function`` and in a tf.data map.
    """
    seeds = tf.cast(tf.convert_to_tensor(seeds), tf.int64)

    def draw(one_seed):
        return tf.random.stateless_uniform([6], one_seed, minval=-1.0, maxval=1.0, dtype=tf.float32)

    u = tf.map_fn(draw, seeds, fn_output_signature=tf.TensorSpec([6], tf.float32))
    u = tf.reshape(u, [-1, 6])
    sigma = tf.constant(float(sigma), tf.float32)
    return 1.0 + sigma * u[:, :3], sigma * u[:, 3:]


def hed_jitter(views: Union[Images, Sequence[Images]], sample_ids: Images, copy: Union[int, Images],
               seed: int, sigma: float):
    """Stain-jitter every view of each sample with one seeded draw per (seed, sample id, copy).

    ``views`` is one batch [B, H, W, 3] or a list of batches of the same B (e.g. x20 and its x5 sibling:
    one piece of tissue, so one draw for both). Returns the same structure, each with its input's dtype.
    ``sigma`` 0 returns the views unchanged.
    """
    single = not isinstance(views, (list, tuple))
    batches = [views] if single else list(views)
    if float(sigma) == 0.0:
        out = [tf.convert_to_tensor(v) for v in batches]
    else:
        alpha, beta = jitter_params(copy_seeds(seed, sample_ids, copy), sigma)
        out = [apply_hed_jitter(v, alpha, beta) for v in batches]
    return out[0] if single else out
