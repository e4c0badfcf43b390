"""View specs and their composition into backbone inputs, in TensorFlow ops.

A sample is seen through one or more views, each a (zoom, colour) pair: ``x20:rgb``,
``x20:gray``, ``x5:rgb``, ``x5:gray``. ``x5`` is the sibling field: same centre, 4x the
field of view. The same functions run in the extraction pipeline and inside the exported
SavedModel, so training-time and serving-time inputs are built identically.

Field rule for image sources:
  * with a context image (``context_path`` column, or a slide's x5 read), x20 = the image
    and x5 = the context image;
  * without one, when an x5 view is asked for, the image itself is the x5 field and x20 is
    its centre crop of a quarter of each side;
  * otherwise x20 is the whole image.
Each field is then fitted to the backbone input (``fit``): ``scale`` resizes (bilinear,
antialiased), ``pad`` pads with white (centre crop when larger), ``pad-scale`` pads to a
square of side ``pad_to`` (default: the larger side) and then resizes.

Views never collapse silently:
  * ``pad`` keeps the pixel scale, so an x5 field at the image's um/px (a context image, or the
    image itself) cannot fit the input: x5 views with ``pad`` are refused on image sources
    (slides read x5 already at the patch size, so ``pad`` works there);
  * under ``pad-scale`` the x5 field is padded to ``x5_pad_to`` = 4 x ``pad_to`` when it is at
    the image's um/px (context images are taken at the image's um/px), ``pad_to`` on slides;
  * the centre-crop rule on an image smaller than 4x the input side (4x ``pad_to`` under
    ``pad-scale``) would upsample x20; it is refused unless the user asks for it
    (``x5_from_image``).
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dfl_tf.data.view_spec import (  # noqa: F401  (the specs live there; public here too)
    COLOURS,
    FITS,
    ZOOMS,
    View,
    check_fit,
    needs_context,
    parse_views,
    views_to_strings,
)
from dfl_tf.errors import DflError

PAD_VALUE = 255.0
#: The x5 field covers CONTEXT_FACTOR times the side of the x20 field.
CONTEXT_FACTOR = 4


def x5_source(views: Sequence[View], context: str, source_kind: str) -> str | None:
    """Where the x5 field comes from: ``slide`` (read at the patch size), ``context image``
    (a context_path image at the image's um/px), ``image`` (the centre-crop rule) or None."""
    if not needs_context(views):
        return None
    if source_kind == "slides":
        return "slide"
    return "context image" if context == "separate" else "image"


def check_x5_fit(views: Sequence[View], fit: str, source: str | None, where: str = "") -> None:
    """Refuse an x5 view that ``fit`` would collapse (see the module docstring)."""
    if needs_context(views) and fit == "pad" and source in ("context image", "image"):
        field = "the context image" if source == "context image" else "the whole image"
        raise DflError(f"{where + ': ' if where else ''}--fit pad keeps the pixel scale, so the x5 view "
                       f"({field}, 4x the x20 field) cannot fit the input: use --fit scale or pad-scale, or "
                       f"drop the x5 views")


def min_x5_side(size: int, fit: str, pad_to: int | None) -> int:
    """Smallest image side for the centre-crop rule without upsampling x20 (4x the input side,
    or 4x ``pad_to`` under ``pad-scale``)."""
    side = pad_to if (fit == "pad-scale" and pad_to) else size
    return CONTEXT_FACTOR * int(side)


def check_x5_field(shape: Sequence[int], size: int, fit: str, pad_to: int | None, name: str) -> None:
    """The centre-crop rule's check in Python: a one-line DflError naming ``name`` when the image
    is too small (the caller skips it when the user passed ``x5_from_image``)."""
    need = min_x5_side(size, fit, pad_to)
    if min(int(shape[0]), int(shape[1])) < need:
        raise DflError(f"{name}: {shape[1]}x{shape[0]} px is smaller than {need} px (4x the x20 side), so its x5 "
                       f"view would be the image and x20 its centre quarter upsampled; add a context_path "
                       f"column, drop the x5 views, or pass --x5-from-image to accept that rule")


def _pad_or_crop(image: tf.Tensor, height, width) -> tf.Tensor:
    # resize_with_crop_or_pad pads with zeros: shift so the padding comes out white.
    return tf.image.resize_with_crop_or_pad(image - PAD_VALUE, height, width) + PAD_VALUE


def resize_field(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear antialiased resize of [..., h, w, 3] to [..., size, size, 3].

    A field that is already size x size passes through unchanged: the resize would return the
    same numbers (at scale 1 the triangle kernel puts weight 1 on the pixel itself and 0 on its
    neighbours; tested), at about 1 ms per 224 px tile on a CPU core, which the reader needs.
    """
    h, w = image.shape[-3], image.shape[-2]
    if h == size and w == size:
        return tf.cast(image, tf.float32)  # a no-op on float32 (tf.image.resize returns float32)

    def resize():
        return tf.image.resize(image, (size, size), method="bilinear", antialias=True)

    if h is not None and w is not None:
        return resize()
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[-3], size), tf.equal(shape[-2], size))
    return tf.cond(same, lambda: tf.cast(image, tf.float32), resize)


def fit_field(image: tf.Tensor, size: int, fit: str = "scale", pad_to: int | None = None) -> tf.Tensor:
    """Fit a float32 field [h, w, 3] (or a batch [N, h, w, 3]) to [size, size, 3] (or [N, ...])."""
    if fit == "scale":
        out = resize_field(image, size)
    elif fit == "pad":
        out = _pad_or_crop(image, size, size)
    elif fit == "pad-scale":
        shape = tf.shape(image)
        side = pad_to if pad_to else tf.maximum(shape[-3], shape[-2])
        square = _pad_or_crop(image, side, side)
        out = resize_field(square, size)
    else:
        raise DflError(f"unknown fit '{fit}'")
    return tf.ensure_shape(out, [None] * (len(out.shape) - 3) + [size, size, 3])


def centre_quarter(image: tf.Tensor) -> tf.Tensor:
    """The x20 field inside an x5 field: same centre, a quarter of each side."""
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    ch, cw = tf.maximum(h // 4, 1), tf.maximum(w // 4, 1)
    return tf.image.crop_to_bounding_box(image, (h - ch) // 2, (w - cw) // 2, ch, cw)


def to_gray(image: tf.Tensor) -> tf.Tensor:
    """Luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) replicated to three channels."""
    weights = tf.constant([0.299, 0.587, 0.114], dtype=image.dtype)
    return tf.repeat(tf.reduce_sum(image * weights, axis=-1, keepdims=True), 3, axis=-1)


def compose_views(
    image: tf.Tensor,
    context: tf.Tensor | None,
    views: Sequence[View],
    size: int,
    fit: str = "scale",
    pad_to: int | None = None,
    x5_pad_to: int | None = None,
    min_side: int | None = None,
) -> tf.Tensor:
    """One sample's views as float32 [len(views), size, size, 3] in [0, 255].

    ``image`` and ``context`` are [h, w, 3] (any real or integer dtype in [0, 255]);
    ``context`` may be None (see the module docstring for the field rule). Batches
    [N, h, w, 3] work too and give [N, len(views), size, size, 3]. ``x5_pad_to``: the square
    the x5 field is padded to under ``pad-scale`` (the geometry's ``x5_pad_to``; None: its larger
    side). ``min_side``: the centre-crop rule fails (in the graph) on images with a smaller side.
    """
    image = tf.cast(image, tf.float32)
    if context is not None:
        x20, x5 = image, tf.cast(context, tf.float32)
    elif needs_context(views):
        if min_side:
            shape = tf.shape(image)
            small = tf.minimum(shape[-3], shape[-2])
            check = tf.debugging.assert_greater_equal(
                small, tf.cast(min_side, small.dtype),
                message=f"image smaller than {min_side} px: the x5 view from the image itself would upsample x20 "
                        f"(the model was extracted without --x5-from-image)")
            with tf.control_dependencies([check]):
                image = tf.identity(image)
        x20, x5 = centre_quarter(image), image
    else:
        x20, x5 = image, None
    fields = {"x20": fit_field(x20, size, fit, pad_to)}
    if x5 is not None and needs_context(views):
        fields["x5"] = fit_field(x5, size, fit, x5_pad_to)
    out = []
    for view in views:
        field = fields[view.zoom]
        out.append(to_gray(field) if view.colour == "gray" else field)
    return tf.stack(out, axis=len(image.shape) - 3)
