"""View specs and their composition into backbone inputs, in TensorFlow ops.

A sample is seen through one or more views, each a (zoom, colour) pair: ``x20:rgb``,
``x20:gray``, ``x5:rgb``, ``x5:gray``. ``x5`` is the sibling field: same centre, 4x the
field of view. The same functions run in the extraction pipeline and inside the exported
SavedModel, so training-time and serving-time inputs are built identically. Pixels come in per
field, keyed by field factor (1: the x20 patch, 4: x5; the table is :data:`dfl_tf.data.plan.ZOOMS`):
:func:`compose_fields` (or :func:`compose_plan` with a read plan); :func:`compose_views` is the
x20/x5 pair as (image, context).

Field rule for image sources:
  * with a context image (``context_path`` column), x20 = the image and x5 = the context image
    (slides read every field around the same centre);
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

from typing import Mapping, Sequence

import tensorflow as tf

from dfl_tf.data.plan import (  # noqa: F401  (the specs live there; public here too)
    COLOURS,
    CONTEXT_FACTOR,
    FITS,
    ZOOMS,
    ReadPlan,
    View,
    check_fit,
    needs_context,
    parse_views,
    views_to_strings,
)
from dfl_tf.errors import DflError

PAD_VALUE = 255.0


def check_x5_field(shape: Sequence[int], plan: ReadPlan, name: str) -> None:
    """The centre-crop rule's check in Python: a one-line DflError naming ``name`` when the image
    is too small for ``plan`` (nothing when the plan does not enforce it, see ``min_side``)."""
    need = plan.min_side()
    if need and min(int(shape[0]), int(shape[1])) < need:
        raise DflError(f"{name}: {shape[1]}x{shape[0]} px is smaller than {need} px ({max(plan.factors)}x the x20 "
                       f"side), so its x5 view would be the image and x20 its centre quarter upsampled; add a "
                       f"context_path column, drop the x5 views, or pass --x5-from-image to accept that rule")


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


def centre_crop(image: tf.Tensor, ratio: int = CONTEXT_FACTOR) -> tf.Tensor:
    """The field ``ratio`` times narrower inside ``image``: same centre, 1/ratio of each side
    (the x20 field inside an x5 field: ratio 4)."""
    shape = tf.shape(image)
    h, w = shape[-3], shape[-2]
    ch, cw = tf.maximum(h // ratio, 1), tf.maximum(w // ratio, 1)
    return tf.image.crop_to_bounding_box(image, (h - ch) // 2, (w - cw) // 2, ch, cw)


def centre_quarter(image: tf.Tensor) -> tf.Tensor:
    """The x20 field inside an x5 field: same centre, a quarter of each side."""
    return centre_crop(image, CONTEXT_FACTOR)


def to_gray(image: tf.Tensor) -> tf.Tensor:
    """Luminance (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) replicated to three channels."""
    weights = tf.constant([0.299, 0.587, 0.114], dtype=image.dtype)
    return tf.repeat(tf.reduce_sum(image * weights, axis=-1, keepdims=True), 3, axis=-1)


def _assert_min_side(image: tf.Tensor, min_side: int) -> tf.Tensor:
    shape = tf.shape(image)
    small = tf.minimum(shape[-3], shape[-2])
    check = tf.debugging.assert_greater_equal(
        small, tf.cast(min_side, small.dtype),
        message=f"image smaller than {min_side} px: the x5 view from the image itself would upsample x20 "
                f"(the model was extracted without --x5-from-image)")
    with tf.control_dependencies([check]):
        return tf.identity(image)


def compose_fields(
    fields: Mapping[int, tf.Tensor],
    views: Sequence[View],
    size: int,
    fit: str = "scale",
    pads: Mapping[int, int | None] | None = None,
    min_side: int | None = None,
) -> tf.Tensor:
    """One sample's views as float32 [len(views), size, size, 3] in [0, 255], from its fields.

    ``fields``: pixels [h, w, 3] (or batches [N, h, w, 3], giving [N, len(views), ...]) keyed by
    field factor (1: the x20 patch field, 4: x5, ...; see :mod:`dfl_tf.data.plan`). A view whose
    field is not given is the centre crop of the widest field given (the centre-crop rule;
    ``min_side``: it fails in the graph on images with a smaller side). ``pads``: pad-scale's
    square per factor (None: the field's larger side).
    """
    pads = pads or {}
    given = {int(f): tf.cast(t, tf.float32) for f, t in fields.items()}
    widest = max(given)
    if min_side and 1 not in given:  # the centre-crop rule: the image is the widest field
        given[widest] = _assert_min_side(given[widest], min_side)
    fitted: dict[int, tf.Tensor] = {}
    out = []
    for view in views:
        f = view.factor
        if f not in fitted:
            field = given[f] if f in given else centre_crop(given[widest], widest // f)
            fitted[f] = fit_field(field, size, fit, pads.get(f))
        out.append(to_gray(fitted[f]) if view.colour == "gray" else fitted[f])
    return tf.stack(out, axis=len(given[widest].shape) - 3)


def stain_fields(fields: Mapping[int, tf.Tensor], plan: ReadPlan) -> tuple[dict[int, tf.Tensor], tf.Tensor]:
    """The fields stain-normalised as the plan records (``stain.normalize``; none: unchanged), and a
    boolean per sample ([N] for batches [N, h, w, 3], a scalar for one field [h, w, 3]): some field
    was passed through (background, near-white or near-black tissue, a degenerate estimate).

    Pixels are taken as uint8 (float inputs rounded) and normalised per image with
    :func:`dfl_tf.stain.normalize_batch`, the same op for every field, in extraction and in the
    exported signatures alike."""
    params = (plan.stain or {}).get("normalize")
    first = next(iter(fields.values()))
    single = len(first.shape) == 3
    passed = tf.zeros([] if single else tf.shape(first)[:1], tf.bool)
    if params is None:
        return dict(fields), passed
    from dfl_tf.stain.normalize import normalize_batch

    out = {}
    for factor, pixels in fields.items():
        pixels = tf.convert_to_tensor(pixels)
        if pixels.dtype != tf.uint8:
            pixels = tf.cast(tf.clip_by_value(tf.round(tf.cast(pixels, tf.float32)), 0.0, 255.0), tf.uint8)
        normed, failed = normalize_batch(pixels[None] if single else pixels, params)
        out[factor] = normed[0] if single else normed
        passed = passed | (failed[0] if single else failed)
    return out, passed


def compose_plan(fields: Mapping[int, tf.Tensor], plan: ReadPlan, min_side: int | None = None,
                 stain: bool = True) -> tf.Tensor:
    """:func:`compose_fields` with the views, input size, fit and pads of a bound read plan, after
    its stain normalisation (:func:`stain_fields`; ``stain=False``: the fields are normalised already)."""
    if stain:
        fields, _ = stain_fields(fields, plan)
    return compose_fields(fields, plan.views, int(plan.input_size), plan.fit, plan.pads(), min_side)


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
    """:func:`compose_fields` for the x20/x5 pair: ``image`` and ``context`` (x5, may be None).

    Without a context, when an x5 view is asked for, the image itself is the x5 field and x20 its
    centre quarter; otherwise the image is the x20 field. ``x5_pad_to``: the square the x5 field
    is padded to under ``pad-scale`` (None: its larger side).
    """
    if context is not None:
        fields = {1: image, CONTEXT_FACTOR: context}
    elif needs_context(views):
        fields = {CONTEXT_FACTOR: image}
    else:
        fields = {1: image}
    return compose_fields(fields, views, size, fit, {1: pad_to, CONTEXT_FACTOR: x5_pad_to}, min_side)
