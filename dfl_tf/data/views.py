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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import tensorflow as tf

from dfl_tf.errors import DflError

ZOOMS = ("x20", "x5")
COLOURS = ("rgb", "gray")
FITS = ("scale", "pad", "pad-scale")
PAD_VALUE = 255.0


@dataclass(frozen=True)
class View:
    zoom: str
    colour: str

    def __str__(self) -> str:
        return f"{self.zoom}:{self.colour}"


def parse_views(spec: str | Sequence[str]) -> tuple[View, ...]:
    """Parse ``"x20:rgb,x5:gray"`` (or a list of such strings) into views, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    views = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        zoom, _, colour = item.partition(":")
        colour = colour or "rgb"
        if zoom not in ZOOMS or colour not in COLOURS:
            raise DflError(f"unknown view '{item}' (views are x20:rgb, x20:gray, x5:rgb, x5:gray)")
        view = View(zoom, colour)
        if view in views:
            raise DflError(f"view '{item}' is listed twice")
        views.append(view)
    if not views:
        raise DflError("no views given (e.g. --views x20:rgb,x5:rgb)")
    return tuple(views)


def views_to_strings(views: Sequence[View]) -> list[str]:
    return [str(v) for v in views]


def needs_context(views: Sequence[View]) -> bool:
    return any(v.zoom == "x5" for v in views)


def check_fit(fit: str) -> str:
    if fit not in FITS:
        raise DflError(f"unknown fit '{fit}' (choose from {', '.join(FITS)})")
    return fit


def _pad_or_crop(image: tf.Tensor, height, width) -> tf.Tensor:
    # resize_with_crop_or_pad pads with zeros: shift so the padding comes out white.
    return tf.image.resize_with_crop_or_pad(image - PAD_VALUE, height, width) + PAD_VALUE


def fit_field(image: tf.Tensor, size: int, fit: str = "scale", pad_to: int | None = None) -> tf.Tensor:
    """Fit a float32 field [h, w, 3] (or a batch [N, h, w, 3]) to [size, size, 3] (or [N, ...])."""
    if fit == "scale":
        out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    elif fit == "pad":
        out = _pad_or_crop(image, size, size)
    elif fit == "pad-scale":
        shape = tf.shape(image)
        side = pad_to if pad_to else tf.maximum(shape[-3], shape[-2])
        square = _pad_or_crop(image, side, side)
        out = tf.image.resize(square, (size, size), method="bilinear", antialias=True)
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
) -> tf.Tensor:
    """One sample's views as float32 [len(views), size, size, 3] in [0, 255].

    ``image`` and ``context`` are [h, w, 3] (any real or integer dtype in [0, 255]);
    ``context`` may be None (see the module docstring for the field rule). Batches
    [N, h, w, 3] work too and give [N, len(views), size, size, 3].
    """
    image = tf.cast(image, tf.float32)
    if context is not None:
        x20, x5 = image, tf.cast(context, tf.float32)
    elif needs_context(views):
        x20, x5 = centre_quarter(image), image
    else:
        x20, x5 = image, None
    fields = {"x20": fit_field(x20, size, fit, pad_to)}
    if x5 is not None and needs_context(views):
        fields["x5"] = fit_field(x5, size, fit, pad_to)
    out = []
    for view in views:
        field = fields[view.zoom]
        out.append(to_gray(field) if view.colour == "gray" else field)
    return tf.stack(out, axis=len(image.shape) - 3)
