"""Macenko and Reinhard stain normalisation: fit on a target in NumPy, apply in TensorFlow.

A fitted target is a small JSON-able dict (method, the target's stain matrix / LAB statistics, and the
settings that the apply step needs), so a manifest or an export can store it and rebuild the same
computation. :func:`normalize_batch` applies it as graph-safe TF ops on a batch [B, H, W, 3] (uint8, or float
in [0, 255]); :func:`normalize_numpy` is the NumPy reference of the same computation, one image at a time.

What is taken from where:

* Macenko et al., ISBI 2009 ("A method for normalizing histology slides for quantitative analysis"),
  following torchstain's NumPy backend (``torchstain.numpy.normalizers.macenko``, itself adapted from
  github.com/schaugf/HEnorm_python): optical density ``-ln((I + 1) / Io)`` with ``Io = 240``; pixels with
  OD >= ``beta = 0.15`` in every channel estimate the stain plane (eigenvectors of their OD covariance);
  the stain vectors are the ``alpha = 1`` and ``99`` percentiles of the angle in that plane (the one with
  the larger red component first: haematoxylin); concentrations by least squares; each stain's
  concentration scaled so its 99th percentile matches the target's; recomposed with the target's matrix.
  The estimate (stain plane, angles, percentiles) uses every pixel up to ``max_pixels`` (4096, a
  64 px tile) and a regular stride of the pixels beyond that, which keeps a 224 px tile's cost low;
  every pixel is then recomposed. ``max_pixels = 0`` estimates on all pixels, exactly as torchstain.
  One deliberate addition: the principal eigenvector's sign is fixed (component sum > 0, as staintools
  does) so the angle never wraps around +-pi whatever sign the eigen solver returns.
* Reinhard et al., IEEE CG&A 2001 ("Color transfer between images"), as torchstain's NumPy backend
  does it (``torchstain.numpy.normalizers.reinhard``, after HistomicsTK and StainTools): CIELAB (sRGB, D65,
  scikit-image's conversion formulas), each channel standardised by the image's mean and standard
  deviation and rescaled to the target's.

torchstain's TensorFlow backend is not used at run time: it works on one [C, H, W] image with
Python-side shapes, has no guard against background-only tiles (an empty pixel set gives NaN), and its
``lab2rgb`` mixes up two tensors in the linear branch. Its NumPy backend is the reference in the tests
when it is installed.

Robustness: a tile is passed through unchanged, and flagged in the returned ``passed_through`` mask,
when fewer than ``min_tissue`` of its pixels are tissue (OD >= ``beta`` in some channel, and not
near-black: some channel at least ``dark``), i.e. background, near-white or near-black tiles,
when its stain estimate is degenerate (the two stain vectors parallel, a zero concentration, a flat
channel), or when the result is not finite. No NaN reaches the output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import numpy as np
import tensorflow as tf

from dfl_tf.errors import DflError

METHODS = ("macenko", "reinhard")
VERSION = 1
MIN_STAINED = 10  # Macenko needs at least this many pixels stained in every channel to estimate from

#: Defaults shared by fit and apply (stored in the fitted dict so the apply step never guesses).
DEFAULTS: dict[str, float] = {
    "io": 240.0,          # transmitted light intensity (Macenko; also the tissue test)
    "beta": 0.15,         # OD threshold: tissue reaches it in some channel, Macenko estimates on all-channel
    "alpha": 1.0,         # angle percentile (Macenko)
    "dark": 20.0,         # a pixel with every channel below this is near-black, not tissue
    "min_tissue": 0.05,   # a tile with a smaller tissue fraction is passed through
    "max_pixels": 4096,   # the tissue gate and Macenko's estimate use a regular stride of at most this
                          # many pixels (0: all)
}

# sRGB (D65) <-> XYZ, as in scikit-image's colour conversions.
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], dtype=np.float64)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float64)

Images = Union[tf.Tensor, np.ndarray]


# ---------------------------------------------------------------------------------------------
# NumPy: tissue test, colour spaces, fit, reference apply
# ---------------------------------------------------------------------------------------------
def tissue_mask(image: np.ndarray, io: float = DEFAULTS["io"], beta: float = DEFAULTS["beta"],
                dark: float = DEFAULTS["dark"]) -> np.ndarray:
    """Boolean mask [...] of tissue pixels: OD >= ``beta`` in some channel (not background) and some
    channel at least ``dark`` (not near-black)."""
    rgb = np.asarray(image, dtype=np.float64)
    od = -np.log((rgb + 1.0) / io)
    return np.any(od >= beta, axis=-1) & np.any(rgb >= dark, axis=-1)


def rgb_to_lab_numpy(image: np.ndarray) -> np.ndarray:
    """CIELAB (L in [0, 100]) of RGB in [0, 255], scikit-image's formulas (sRGB, D65, 2 degrees)."""
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _XYZ_FROM_RGB.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb_numpy(lab: np.ndarray) -> np.ndarray:
    """RGB in [0, 255] (float, clipped) of CIELAB, the inverse of :func:`rgb_to_lab_numpy`."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0.0)], axis=-1)
    xyz = np.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787) * _WHITE
    lin = xyz @ _RGB_FROM_XYZ.T
    rgb = np.where(lin > 0.0031308, 1.055 * np.power(np.maximum(lin, 0.0031308), 1 / 2.4) - 0.055,
                   12.92 * lin)
    return np.clip(rgb, 0.0, 1.0) * 255.0


def _stride(n: int, max_pixels: float) -> int:
    """Pixel stride of the Macenko estimate: every pixel up to ``max_pixels``, then a regular subsample."""
    return 1 if max_pixels <= 0 else max(1, -(-n // int(max_pixels)))


def _macenko_estimate(image: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(stain matrix [3, 2] H then E, 99th-percentile concentrations [2]) or None if degenerate."""
    rgb = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    rgb = rgb[::_stride(len(rgb), p["max_pixels"])]
    od = -np.log((rgb + 1.0) / p["io"])
    stained = np.all(od >= p["beta"], axis=1)  # the estimate uses every stained pixel, as torchstain
    if tissue_mask(rgb, p["io"], p["beta"], p["dark"]).sum() < max(2, p["min_tissue"] * len(rgb)) \
            or stained.sum() < MIN_STAINED:
        return None
    od_hat = od[stained]
    _, eigvecs = np.linalg.eigh(np.cov(od_hat.T))
    plane = eigvecs[:, 1:3].copy()
    if plane[:, 1].sum() < 0:  # principal direction with positive OD: angles stay inside (0, pi)
        plane[:, 1] *= -1
    t_hat = od_hat @ plane
    phi = np.arctan2(t_hat[:, 1], t_hat[:, 0])
    lo, hi = np.percentile(phi, p["alpha"]), np.percentile(phi, 100 - p["alpha"])
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_min, v_max], axis=1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], axis=1)
    gram = he.T @ he
    if np.linalg.det(gram) < 1e-6:
        return None
    conc = np.linalg.solve(gram, he.T @ od.T)
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(max_c)) or np.any(max_c <= 1e-6):
        return None
    return he, max_c


def _settings(overrides: dict) -> dict:
    p = dict(DEFAULTS)
    for key, value in overrides.items():
        if key not in DEFAULTS:
            raise TypeError(f"unknown stain setting {key!r}")
        p[key] = float(value)
    return p


def _no_tissue(source: str, image: np.ndarray, p: dict, what: str) -> DflError:
    frac = float(tissue_mask(image, p["io"], p["beta"], p["dark"]).mean()) if np.size(image) else 0.0
    return DflError(f"stain target {source}: {what} ({100 * frac:.1f}% of pixels are tissue, at least "
                    f"{100 * p['min_tissue']:.0f}% needed); pick an H&E image that shows tissue")


def _as_rgb_array(image: Any, source: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.size == 0:
        raise DflError(f"stain target {source}: expected an RGB image [H, W, 3], got shape {arr.shape}")
    return arr


def fit_macenko(image: np.ndarray, source: str = "image", **settings: float) -> dict:
    """Fit Macenko on a target RGB image [H, W, 3]; a JSON-able dict for :func:`normalize_batch`.

    Raises DflError naming ``source`` when the image has too little stained tissue to estimate stains.
    """
    p = _settings(settings)
    image = _as_rgb_array(image, source)
    found = _macenko_estimate(image, p)
    if found is None:
        raise _no_tissue(source, image, p, "no tissue to estimate the stain matrix from")
    he, max_c = found
    return {"method": "macenko", "version": VERSION, **p,
            "stain_matrix": he.tolist(), "max_concentrations": max_c.tolist()}


def fit_reinhard(image: np.ndarray, source: str = "image", **settings: float) -> dict:
    """Fit Reinhard (LAB mean and std over the whole image, as torchstain) on a target RGB image."""
    p = _settings(settings)
    image = _as_rgb_array(image, source)
    if tissue_mask(image, p["io"], p["beta"], p["dark"]).mean() < p["min_tissue"]:
        raise _no_tissue(source, image, p, "no tissue to take colour statistics from")
    lab = rgb_to_lab_numpy(image).reshape(-1, 3)
    mean, std = lab.mean(axis=0), lab.std(axis=0)
    if np.any(std < 1e-6):
        raise _no_tissue(source, image, p, "a flat colour channel")
    return {"method": "reinhard", "version": VERSION, **p,
            "lab_mean": mean.tolist(), "lab_std": std.tolist()}


def fit_target(path: Union[str, Path], method: str, **settings: float) -> dict:
    """Read the image at ``path`` (any format Pillow reads) and fit ``method`` on it."""
    from PIL import Image, UnidentifiedImageError

    if method not in METHODS:
        raise DflError(f"--stain-norm must be one of {', '.join(METHODS)} (got {method!r})")
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DflError(f"stain target {path}: cannot read the image ({exc.__class__.__name__})") from None
    fit = fit_macenko if method == "macenko" else fit_reinhard
    return fit(image, source=str(path), **settings)


def check_params(params: Any, source: str = "stain target") -> dict:
    """Validate a stored fitted dict (e.g. read from JSON); DflError naming ``source`` and the field."""
    if not isinstance(params, dict):
        raise DflError(f"{source}: expected a JSON object with the fitted stain target")
    method = params.get("method")
    if method not in METHODS:
        raise DflError(f"{source}: field 'method' must be one of {', '.join(METHODS)} (got {method!r})")
    if params.get("version") != VERSION:
        raise DflError(f"{source}: field 'version' must be {VERSION} (got {params.get('version')!r})")
    shapes = {"stain_matrix": (3, 2), "max_concentrations": (2,)} if method == "macenko" else \
        {"lab_mean": (3,), "lab_std": (3,)}
    fields = {**{k: () for k in DEFAULTS}, **shapes}
    for key, shape in fields.items():
        try:
            value = np.asarray(params[key], dtype=np.float64)
        except KeyError:
            raise DflError(f"{source}: field {key!r} is missing") from None
        except (TypeError, ValueError):
            raise DflError(f"{source}: field {key!r} must be numeric") from None
        if value.shape != shape or not np.all(np.isfinite(value)):
            raise DflError(f"{source}: field {key!r} must be finite numbers of shape {list(shape)}")
    if method == "macenko" and np.any(np.asarray(params["max_concentrations"]) <= 0):
        raise DflError(f"{source}: field 'max_concentrations' must be positive")
    if method == "reinhard" and np.any(np.asarray(params["lab_std"]) <= 0):
        raise DflError(f"{source}: field 'lab_std' must be positive")
    return params


def load_params(path: Union[str, Path]) -> dict:
    """A fitted dict stored as JSON at ``path``, validated."""
    try:
        params = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DflError(f"stain target {path}: cannot read it as JSON ({exc.__class__.__name__})") from None
    return check_params(params, f"stain target {path}")


def normalize_numpy(image: np.ndarray, params: dict) -> tuple[np.ndarray, bool]:
    """Reference: one RGB image [H, W, 3] normalised (float64 in [0, 255]) and whether it was passed through."""
    image = np.asarray(image)
    rgb = image.astype(np.float64)
    p = {k: float(params[k]) for k in DEFAULTS}
    if params["method"] == "macenko":
        found = _macenko_estimate(rgb, p)
        if found is None:
            return rgb, True
        he, max_c = found
        od = -np.log((rgb.reshape(-1, 3) + 1.0) / p["io"])
        conc = np.linalg.solve(he.T @ he, he.T @ od.T)
        conc = conc * (np.asarray(params["max_concentrations"]) / max_c)[:, None]
        out = np.minimum(p["io"] * np.exp(-np.asarray(params["stain_matrix"]) @ conc), 255.0)
        out = out.T.reshape(rgb.shape)
    else:
        sample = rgb.reshape(-1, 3)[::_stride(rgb.size // 3, p["max_pixels"])]  # the gate's pixels, as in TF
        if tissue_mask(sample, p["io"], p["beta"], p["dark"]).mean() < p["min_tissue"]:
            return rgb, True
        lab = rgb_to_lab_numpy(rgb)
        mean, std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0)
        if np.any(std < 1e-6):
            return rgb, True
        lab = (lab - mean) / std * np.asarray(params["lab_std"]) + np.asarray(params["lab_mean"])
        out = lab_to_rgb_numpy(lab)
    if not np.all(np.isfinite(out)):
        return rgb, True
    return out, False


# ---------------------------------------------------------------------------------------------
# TensorFlow: the same computation on a batch, graph-safe
# ---------------------------------------------------------------------------------------------
def _tissue_tf(flat: tf.Tensor, p: dict) -> tf.Tensor:
    """[B, N] tissue mask (as :func:`tissue_mask`) of float RGB [B, N, 3]."""
    od = -tf.math.log((flat + 1.0) / p["io"])
    return tf.logical_and(tf.reduce_any(od >= p["beta"], axis=-1), tf.reduce_any(flat >= p["dark"], axis=-1))


def _percentile(values: tf.Tensor, mask: tf.Tensor, n: tf.Tensor, q: float) -> tf.Tensor:
    """Per-row ``q``-th percentile [B] of ``values`` [B, N] where ``mask``, linear as ``np.percentile``.

    Uses ``top_k`` from the near end (only about (100 - q)% of a row is ranked), not a full sort.
    """
    if q < 50.0:
        return -_percentile(-values, mask, n, 100.0 - q)
    big = tf.where(mask, values, tf.constant(-np.inf, values.dtype))
    size = tf.shape(values)[1]
    nf = tf.maximum(tf.cast(n, tf.float32), 1.0)
    pos = (q / 100.0) * (nf - 1.0)                       # ascending rank, as np.percentile
    lo = tf.floor(pos)
    frac = pos - lo
    lo_i = tf.cast(lo, tf.int32)
    n_i = tf.cast(nf, tf.int32)
    hi_i = tf.minimum(lo_i + 1, n_i - 1)
    k = tf.clip_by_value(tf.reduce_max(n_i - lo_i), 1, size)
    top = tf.math.top_k(big, k=k, sorted=True).values   # descending: ascending rank r is index n - 1 - r
    v_lo = tf.gather(top, tf.clip_by_value(n_i - 1 - lo_i, 0, k - 1)[:, None], batch_dims=1)[:, 0]
    v_hi = tf.gather(top, tf.clip_by_value(n_i - 1 - hi_i, 0, k - 1)[:, None], batch_dims=1)[:, 0]
    return v_lo + frac * (v_hi - v_lo)


def _macenko_tf(flat: tf.Tensor, params: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """Normalised [B, N, 3] (float32) and the failed mask [B] for float RGB ``flat`` [B, N, 3]."""
    p = {k: float(params[k]) for k in DEFAULTS}
    he_ref = tf.constant(np.asarray(params["stain_matrix"], np.float32))        # [3, 2]
    max_ref = tf.constant(np.asarray(params["max_concentrations"], np.float32))  # [2]
    od_all = -tf.math.log((flat + 1.0) / p["io"])                               # [B, N, 3]
    flat, od = _subsample(flat, p["max_pixels"]), _subsample(od_all, p["max_pixels"])  # the estimate's pixels
    size = tf.shape(flat)[1]
    n_tissue = tf.reduce_sum(tf.cast(_tissue_tf(flat, p), tf.float32), axis=1)
    failed = n_tissue < tf.maximum(2.0, p["min_tissue"] * tf.cast(size, tf.float32))
    tissue = tf.reduce_all(od >= p["beta"], axis=-1)                            # stained: the estimate set
    w = tf.cast(tissue, tf.float32)
    n = tf.reduce_sum(w, axis=1)                                                # [B]
    failed = failed | (n < MIN_STAINED)
    mean = tf.reduce_sum(od * w[..., None], axis=1) / tf.maximum(n, 1.0)[:, None]
    centred = (od - mean[:, None, :]) * w[..., None]
    cov = tf.einsum("bni,bnj->bij", centred, centred) / tf.maximum(n - 1.0, 1.0)[:, None, None]
    cov = tf.where(failed[:, None, None], tf.eye(3, batch_shape=[1]), cov)
    _, eigvecs = tf.linalg.eigh(cov)                                            # ascending eigenvalues
    second, principal = eigvecs[:, :, 1], eigvecs[:, :, 2]
    principal = principal * tf.where(tf.reduce_sum(principal, axis=1, keepdims=True) < 0, -1.0, 1.0)
    plane = tf.stack([second, principal], axis=-1)                              # [B, 3, 2]
    t_hat = tf.einsum("bni,bij->bnj", od, plane)
    phi = tf.atan2(t_hat[..., 1], t_hat[..., 0])
    lo = _percentile(phi, tissue, n, p["alpha"])
    hi = _percentile(phi, tissue, n, 100.0 - p["alpha"])
    v_min = tf.einsum("bij,bj->bi", plane, tf.stack([tf.cos(lo), tf.sin(lo)], axis=-1))
    v_max = tf.einsum("bij,bj->bi", plane, tf.stack([tf.cos(hi), tf.sin(hi)], axis=-1))
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = tf.stack([tf.where(h_first, v_min, v_max), tf.where(h_first, v_max, v_min)], axis=-1)  # [B,3,2]
    gram = tf.einsum("bki,bkj->bij", he, he)                                    # [B, 2, 2]
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    failed = failed | ~(det >= 1e-6)
    safe_det = tf.where(failed, 1.0, det)
    inv = tf.stack([tf.stack([gram[:, 1, 1], -gram[:, 0, 1]], -1),
                    tf.stack([-gram[:, 1, 0], gram[:, 0, 0]], -1)], axis=1) / safe_det[:, None, None]
    pinv = tf.einsum("bij,bkj->bik", inv, he)                                   # [B, 2, 3] least squares
    conc = tf.einsum("bik,bnk->bin", pinv, od)                                  # [B, 2, n] (subsample)
    everywhere = tf.ones_like(tissue)
    n_all = tf.fill(tf.shape(n), tf.cast(size, tf.float32))
    max_c = tf.stack([_percentile(conc[:, 0], everywhere, n_all, 99.0),
                      _percentile(conc[:, 1], everywhere, n_all, 99.0)], axis=-1)  # [B, 2]
    failed = failed | ~(tf.reduce_min(max_c, axis=1) > 1e-6)
    scale = max_ref / tf.where(failed[:, None], 1.0, max_c)
    # all pixels: OD -> concentrations -> rescaled -> target stains, one [3, 3] map per image
    mix = tf.einsum("ij,bj,bjk->bik", he_ref, scale, pinv)                      # [B, 3, 3]
    out = p["io"] * tf.exp(-tf.einsum("bik,bnk->bni", mix, od_all))
    return tf.minimum(out, 255.0), failed


def _pow(x: tf.Tensor, exponent: float) -> tf.Tensor:
    """``x ** exponent`` for x > 0 as exp(exponent * log x): several times faster than tf.pow on CPU."""
    return tf.exp(exponent * tf.math.log(x))


_LINEAR_LUT = np.where(np.arange(256) / 255.0 > 0.04045, ((np.arange(256) / 255.0 + 0.055) / 1.055) ** 2.4,
                       np.arange(256) / 255.0 / 12.92).astype(np.float32)  # sRGB decoding of uint8 values


def _rgb_to_lab_tf(rgb: tf.Tensor, codes: tf.Tensor | None = None) -> tf.Tensor:
    """CIELAB of float RGB [..., 3]; ``codes`` (the same pixels as uint8) decode through a table."""
    if codes is not None:
        lin = tf.gather(tf.constant(_LINEAR_LUT), tf.cast(codes, tf.int32))
    else:
        rgb = rgb / 255.0
        lin = tf.where(rgb > 0.04045, _pow((tf.maximum(rgb, 0.04045) + 0.055) / 1.055, 2.4), rgb / 12.92)
    xyz = tf.tensordot(lin, tf.constant((_XYZ_FROM_RGB.T / _WHITE).astype(np.float32)), axes=[[-1], [0]])
    f = tf.where(xyz > 0.008856, _pow(tf.maximum(xyz, 0.008856), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    return tf.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _lab_to_rgb_tf(lab: tf.Tensor) -> tf.Tensor:
    fy = (lab[..., 0] + 16.0) / 116.0
    f = tf.stack([lab[..., 1] / 500.0 + fy, fy, tf.maximum(fy - lab[..., 2] / 200.0, 0.0)], axis=-1)
    xyz = tf.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787) * _WHITE.astype(np.float32)
    lin = tf.tensordot(xyz, tf.constant(_RGB_FROM_XYZ.T.astype(np.float32)), axes=[[-1], [0]])
    rgb = tf.where(lin > 0.0031308, 1.055 * _pow(tf.maximum(lin, 0.0031308), 1.0 / 2.4) - 0.055,
                   12.92 * lin)
    return tf.clip_by_value(rgb, 0.0, 1.0) * 255.0


def _subsample(flat: tf.Tensor, max_pixels: float) -> tf.Tensor:
    """A regular stride of at most ``max_pixels`` pixels of [B, N, 3] (all of them when 0)."""
    if max_pixels <= 0:
        return flat
    stride = tf.maximum(1, (tf.shape(flat)[1] + int(max_pixels) - 1) // int(max_pixels))
    return flat[:, ::stride]


def _reinhard_tf(flat: tf.Tensor, params: dict, codes: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    p = {k: float(params[k]) for k in DEFAULTS}
    target_mean = tf.constant(np.asarray(params["lab_mean"], np.float32))
    target_std = tf.constant(np.asarray(params["lab_std"], np.float32))
    frac = tf.reduce_mean(tf.cast(_tissue_tf(_subsample(flat, p["max_pixels"]), p), tf.float32), axis=1)
    lab = _rgb_to_lab_tf(flat, codes)                                           # [B, N, 3]
    mean = tf.reduce_mean(lab, axis=1, keepdims=True)
    std = tf.math.reduce_std(lab, axis=1, keepdims=True)
    failed = (frac < p["min_tissue"]) | ~(tf.reduce_min(std[:, 0], axis=-1) >= 1e-6)
    std = tf.where(failed[:, None, None], 1.0, std)
    return _lab_to_rgb_tf((lab - mean) / std * target_std + target_mean), failed


def normalize_batch(images: Images, params: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """Stain-normalise a batch [B, H, W, 3] with a fitted target (from :func:`fit_target` and friends).

    Returns the batch in the input's dtype (uint8 rounded; float in [0, 255]) and a boolean [B] mask of
    the tiles passed through unchanged (too little tissue, a degenerate estimate, a non-finite result).
    Graph-safe: any batch and spatial size, so it runs inside ``tf.function`` and exported SavedModels.
    """
    images = tf.convert_to_tensor(images)
    rgb = tf.cast(images, tf.float32)
    shape = tf.shape(rgb)
    flat = tf.reshape(rgb, [shape[0], -1, 3])
    if params["method"] == "macenko":
        out, failed = _macenko_tf(flat, params)
    elif params["method"] == "reinhard":
        codes = tf.reshape(images, [shape[0], -1, 3]) if images.dtype == tf.uint8 else None
        out, failed = _reinhard_tf(flat, params, codes)
    else:
        raise DflError(f"stain normalisation must be one of {', '.join(METHODS)} (got {params['method']!r})")
    failed = failed | ~tf.reduce_all(tf.math.is_finite(out), axis=[1, 2])
    out = tf.where(failed[:, None, None], flat, out)
    out = tf.reshape(out, shape)
    if images.dtype == tf.uint8:
        out = tf.cast(tf.round(out), tf.uint8)
    else:
        out = tf.cast(out, images.dtype)
    return out, failed


__all__ = ["METHODS", "DEFAULTS", "tissue_mask", "fit_macenko", "fit_reinhard", "fit_target",
           "check_params", "load_params", "normalize_batch", "normalize_numpy", "rgb_to_lab_numpy",
           "lab_to_rgb_numpy"]
