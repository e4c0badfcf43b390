"""Extraction options: one frozen dataclass, validated once, at the boundary.

:func:`dfl_tf.extract`, :func:`dfl_tf.extraction.beam.extract_beam`, :func:`dfl_tf.select_backbones`
and :func:`dfl_tf.finetune` take ``options=ExtractOptions(...)`` or the same fields as keyword
arguments (:func:`takes_options` forwards them into the dataclass). The CLI builds its flags from
the fields (``dfl_tf.cli.option_flags``) and YAML configs are checked against them
(:func:`dfl_tf.config.merge`).

Adding an option is a one-place change: a field below (default and ``help`` text; ``records``
when it changes the stored embeddings) and, if it needs one, a check in ``__post_init__``.
This module does not import TensorFlow (the CLI reads its fields before any command runs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dfl_tf.data.view_spec import FITS, check_fit, parse_views, views_to_strings
from dfl_tf.errors import DflError
from dfl_tf.options.base import option
from dfl_tf.options.base import takes_options as _takes_options

if TYPE_CHECKING:
    from dfl_tf.data.plan import ReadPlan

PRECISIONS = ("float32", "bfloat16", "mixed_float16")
STORAGE_DTYPES = ("float16", "float32")
STAIN_METHODS = ("macenko", "reinhard")  # dfl_tf.stain.normalize.METHODS (this module does not import TF)


_opt = option  # the shared field helper (dfl_tf.options.base)


@dataclass(frozen=True)
class ExtractOptions:
    """How samples become embeddings: backbone, views, read geometry, storage and run settings."""

    backbone: str = _opt("resnet50", "Registry name or SavedModel directory.", records=True)
    weights: str | None = _opt("default", "imagenet | none | a source name | a local file.", records=True)
    views: tuple[str, ...] = _opt(("x20:rgb",), "Comma-separated: x20:rgb,x20:gray,x5:rgb,x5:gray.", records=True)
    input_size: int | None = _opt(None, "Backbone input side in px (default: the backbone's).", type=int,
                                  records=True)
    fit: str = _opt("scale", "Fit each field to the input: resize, white padding, or pad then resize.",
                    choices=FITS, records=True)
    pad_to: int | None = _opt(None, "Square side to pad to before scaling (pad-scale).", type=int, records=True)
    batch_size: int = _opt(32, "Backbone batch size.", type=int)
    precision: str = _opt("float32", "Backbone compute precision.", choices=PRECISIONS, records=True)
    dtype: str = _opt("float16", "Storage dtype of the embeddings.", choices=STORAGE_DTYPES, records=True)
    shard_size: int = _opt(1024, "Records per shard.", type=int)
    skip_bad: bool = _opt(False, "Skip unreadable samples and list them in the manifest.", flag=True)
    mpp: float | str = _opt(0.5, "Slides: um/px of the x20 patch, or 20x.", records=True)
    patch_size: int = _opt(256, "Slides: patch side in px at --mpp.", type=int, records=True)
    slide_mpp: float | str | None = _opt(None, "Slides: level-0 um/px (0.5) or objective power (20x) for slides without "
                                   "metadata.", records=True)
    x5_from_image: bool = _opt(False, "Images without a context_path: accept the x5 view from the image itself "
                               "(x20 = its centre quarter) on images smaller than 4x the input side.", flag=True,
                               records=True)
    allow_mixed_geometry: bool = _opt(False, "Slide CSVs: accept rows with different mpp or size columns (every "
                                      "value is recorded).", flag=True, records=True)
    stain_norm: str | None = _opt(None, "Stain-normalise every field before the backbone (and in the exported "
                                  "model) to --stain-target.", choices=STAIN_METHODS, records=True)
    stain_target: str | None = _opt(None, "Stain normalisation target: an H&E image (fitted once) or a stored fit "
                                    "(JSON).", records=True)
    workers: int | None = _opt(None, "Parallel decode/read calls (default: auto).", type=int)
    jit: bool = _opt(False, "Compile the backbone with XLA.", flag=True)
    devices: str | tuple[str, ...] | None = _opt(
        None, "Mirror over devices: auto, none, all or /gpu:0,/gpu:1 (default: $DFL_TF_DEVICES, else auto).")

    def __post_init__(self) -> None:
        from dfl_tf.data.slides import parse_magnification

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("views", tuple(views_to_strings(parse_views(self.views))))
        check_fit(self.fit)
        if self.precision not in PRECISIONS:
            raise DflError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        if self.dtype not in STORAGE_DTYPES:
            raise DflError(f"unknown dtype '{self.dtype}' (float16 or float32)")
        put("backbone", str(self.backbone))
        put("weights", None if self.weights is None else str(self.weights))
        put("mpp", parse_magnification(self.mpp))
        for name, low, optional in (("batch_size", 1, False), ("shard_size", 1, False), ("patch_size", 1, False),
                                    ("input_size", 1, True), ("pad_to", 1, True), ("workers", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise DflError(f"{name.replace('_', ' ')} must be a whole number (got {value!r})") from None
            if number < low or number != value:
                raise DflError(f"{name.replace('_', ' ')} must be a whole number of at least {low} (got {value})")
            put(name, number)
        if self.slide_mpp is not None:  # um/px (0.5) or an objective power (20x), like mpp
            try:
                put("slide_mpp", parse_magnification(self.slide_mpp))
            except DflError as exc:
                raise DflError(f"slide_mpp: {exc}") from None
        if self.stain_norm is not None and self.stain_norm not in STAIN_METHODS:
            raise DflError(f"stain_norm must be one of {', '.join(STAIN_METHODS)} (got {self.stain_norm!r})")
        if (self.stain_norm is None) != (self.stain_target is None):
            raise DflError("--stain-norm and --stain-target go together (a method and the image to fit it on)")
        put("stain_target", None if self.stain_target is None else str(self.stain_target))
        for name in ("skip_bad", "jit", "x5_from_image", "allow_mixed_geometry"):
            put(name, bool(getattr(self, name)))
        if self.devices is not None and not isinstance(self.devices, str):
            put("devices", tuple(str(d) for d in self.devices))

    def plan(self, input_size: int | None = None, precision: str | None = None) -> "ReadPlan":
        """The read plan of these options (:class:`dfl_tf.data.plan.ReadPlan`); ``input_size`` and
        ``precision``: the backbone's, once it is built."""
        from dfl_tf.data.plan import ReadPlan

        return ReadPlan.from_options(self, input_size, precision)

    def replace(self, **changes: Any) -> "ExtractOptions":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def records_settings(self, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The fields that change the stored embeddings, as a JSON-ready mapping."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata["records"] and f.name not in exclude}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ExtractOptions))
# What each command reads of the options (extract and the Beam runner: all of them).
SELECT_FIELDS = tuple(name for name in FIELDS if name not in ("backbone", "weights", "devices"))
FINETUNE_FIELDS = ("backbone", "weights", "input_size", "views", "fit", "pad_to", "mpp", "patch_size", "slide_mpp")


def takes_options(*, exclude: Sequence[str] = (), only: Sequence[str] | None = None
                  ) -> Callable[[Callable], Callable]:
    """Let a public function take ``options=ExtractOptions(...)`` and/or option fields as keywords
    (:func:`dfl_tf.options.base.takes_options`; ``exclude`` / ``only``: the fields it does not use /
    the only ones it uses)."""
    return _takes_options(ExtractOptions, exclude=exclude, only=only)
