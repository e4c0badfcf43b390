"""Stain handling: HED colour deconvolution and jitter, Macenko / Reinhard normalisation.

TensorFlow ops on batches [B, H, W, 3] (uint8 or float in [0, 255]) that run the same way in extraction
and inside an exported SavedModel; fitting a normalisation target happens once, in NumPy, and gives a
small JSON-able dict.
"""
from dfl_tf.stain.hed import (JITTER_STRENGTHS, apply_hed_jitter, copy_seeds, hed_jitter, hed_to_rgb,
                              jitter_params, jitter_sigma, rgb_to_hed)
from dfl_tf.stain.normalize import (METHODS, check_params, fit_macenko, fit_reinhard, fit_target,
                                    load_params, normalize_batch, normalize_numpy, tissue_mask)

__all__ = ["JITTER_STRENGTHS", "apply_hed_jitter", "copy_seeds", "hed_jitter", "hed_to_rgb", "jitter_params",
           "jitter_sigma", "rgb_to_hed", "METHODS", "check_params", "fit_macenko", "fit_reinhard",
           "fit_target", "load_params", "normalize_batch", "normalize_numpy", "tissue_mask"]
