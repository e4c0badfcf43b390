"""The read plan: how a sample's pixels become backbone inputs, as one frozen value (no TensorFlow).

A view is data: a zoom and a colour (``x20:rgb``, ``x5:gray``). A zoom is a *field factor*: the
side of its field relative to the x20 patch field (same centre). The table :data:`ZOOMS` is the one
place zooms are known; ``xN`` has factor 20/N (x20 -> 1, x10 -> 2, x5 -> 4). Adding a zoom is
``register_zoom("x10")``: slides read every distinct factor around the same centre at
``mpp * factor``; image sources carry the x20 field and one x5 field (a context image or the
image itself, :data:`IMAGE_FACTORS`), so other zooms are refused there with a clear error.

:class:`ReadPlan` is built once from the options (:meth:`dfl_tf.options.ExtractOptions.plan` or
:meth:`ReadPlan.from_options`), bound to its source once (:meth:`ReadPlan.bind`: source kind,
where the wider fields come from, per-sample mpp and patch sizes) and passed down to the sources,
the slide reader, extraction, fine-tuning, parity and prediction. :meth:`ReadPlan.to_record` is the
manifest's ``geometry`` field (same layout as before the plan existed) and
:meth:`ReadPlan.from_artefact` reads it back from a manifest, head.json or export.json, older
ones included.

``stain`` is the stain handling applied to every field of a sample before view composition
(issue 31): ``{"normalize": <fitted target>}`` for ``--stain-norm`` (method and fitted parameters,
:mod:`dfl_tf.stain.target`), None for raw pixels. It is part of the record, so the compatibility
check (:mod:`dfl_tf.provenance`) refuses mixing normalised and raw artefacts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from dfl_tf.errors import DflError

#: Zoom name -> field factor relative to the x20 patch field. The one table of zooms.
ZOOMS: dict[str, int] = {"x20": 1, "x5": 4}
#: The zooms shipped (the others were registered at run time, e.g. by a test).
DEFAULT_ZOOMS = dict(ZOOMS)
#: Fields an image source can give: the image (x20) and one context field (x5).
IMAGE_FACTORS = (1, 4)
#: The x5 field covers CONTEXT_FACTOR times the side of the x20 field.
CONTEXT_FACTOR = ZOOMS["x5"]
COLOURS = ("rgb", "gray")
FITS = ("scale", "pad", "pad-scale")
SLIDE_DECODER = "slide reader (OpenSlide/tifffile, Lanczos resize)"


def register_zoom(name: str, factor: int | None = None) -> int:
    """Add a zoom ``xN`` to :data:`ZOOMS` (factor 20/N unless given; a whole number >= 1)."""
    if factor is None:
        try:
            factor = 20 / float(name.removeprefix("x"))
        except ValueError:
            raise DflError(f"zoom '{name}' is not xN (e.g. x10)") from None
    if factor != int(factor) or factor < 1:
        raise DflError(f"zoom '{name}': factor {factor} is not a whole number >= 1 (relative to x20)")
    ZOOMS[name] = int(factor)
    return int(factor)


@dataclass(frozen=True)
class View:
    zoom: str
    colour: str

    def __str__(self) -> str:
        return f"{self.zoom}:{self.colour}"

    @property
    def factor(self) -> int:
        """Field side relative to the x20 patch field."""
        return ZOOMS[self.zoom]


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
            known = ", ".join(f"{z}:{c}" for z in ZOOMS for c in COLOURS)
            raise DflError(f"unknown view '{item}' (views are {known})")
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
    """Whether a view needs a field wider than the x20 patch."""
    return any(v.factor > 1 for v in views)


def check_fit(fit: str) -> str:
    if fit not in FITS:
        raise DflError(f"unknown fit '{fit}' (choose from {', '.join(FITS)})")
    return fit


@dataclass(frozen=True)
class ReadPlan:
    """How pixels are read and fitted: views, fit, slide read, precision; bound to a source by
    :meth:`bind` (``source_kind`` and below). See the module docstring."""

    views: tuple[View, ...]
    input_size: int | None = None
    fit: str = "scale"
    pad_to: int | None = None
    mpp: float = 0.5
    patch_size: int = 256
    slide_mpp: float | None = None
    precision: str = "float32"
    x5_from_image: bool = False
    allow_mixed_geometry: bool = False
    stain: Mapping[str, Any] | None = None  # issue 31: {"normalize": fitted target}; None = raw pixels
    # -- bound to a source (bind / from_artefact) --
    source_kind: str | None = None
    context: str | None = None  # none | separate | centre-crop
    field_pads: tuple[tuple[int, int | None], ...] = ()  # (factor, pad-scale square side) per field
    mpps: tuple[float, ...] = ()
    patch_sizes: tuple[int, ...] = ()
    slide_mpp_source: Any = None
    decoder: str | None = None

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Any, input_size: int | None = None, precision: str | None = None) -> "ReadPlan":
        """The plan of an :class:`~dfl_tf.options.ExtractOptions` (validated there); ``input_size``
        and ``precision``: the backbone's (default: the options')."""
        from dfl_tf.stain.target import stain_record  # the target is fitted here, once per plan (NumPy)

        views = tuple(View(*v.split(":")) for v in options.views)  # parsed and normalised by the options
        return cls(views=views, input_size=input_size or options.input_size,
                   fit=options.fit, pad_to=options.pad_to, mpp=float(options.mpp),
                   patch_size=int(options.patch_size), slide_mpp=options.slide_mpp,
                   precision=precision or options.precision, x5_from_image=options.x5_from_image,
                   allow_mixed_geometry=options.allow_mixed_geometry,
                   stain=stain_record(options.stain_norm, options.stain_target))

    def replace(self, **changes: Any) -> "ReadPlan":
        return dataclasses.replace(self, **changes)

    def bind(self, samples: Any) -> "ReadPlan":
        """This plan for ``samples`` (a :class:`dfl_tf.data.sources.SampleSet`): where each field
        comes from, the per-sample slide geometry. Refuses what the source cannot give (see the
        module docstring)."""
        from dfl_tf.data.decode import DECODER

        kind = samples.kind
        context = "none"
        if needs_context(self.views):
            context = "separate" if kind == "slides" else _image_context(samples)
        if kind != "slides":
            _check_image_zooms(self.views, str(samples.root))
        plan = self.replace(source_kind=kind, context=context,
                            decoder=DECODER if kind != "slides" else SLIDE_DECODER)
        plan = plan.replace(field_pads=tuple((f, plan._pad_for(f)) for f in plan.factors))
        _check_x5_fit(plan, str(samples.root))
        if kind == "slides":
            plan = plan._bind_slides(samples)
        return plan

    def _bind_slides(self, samples: Any) -> "ReadPlan":
        mpps = sorted({float(s.mpp or self.mpp) for s in samples.samples})
        sizes = sorted({int(s.patch_size or self.patch_size) for s in samples.samples})
        for name, values, flag in (("mpp", mpps, "mpp"), ("patch size", sizes, "size")):
            if len(values) > 1 and not self.allow_mixed_geometry:
                raise DflError(f"{samples.root}: the '{flag}' column holds {len(values)} different {name}s "
                               f"{values[:6]}: one extraction reads one geometry (split the CSV, or pass "
                               f"--allow-mixed-geometry to record them all)")
        sources = sorted({"slide_mpp column" if s.slide_mpp else "--slide-mpp" if self.slide_mpp else "metadata"
                          for s in samples.samples})
        return self.replace(mpps=tuple(mpps), patch_sizes=tuple(sizes),
                            slide_mpp_source=sources[0] if len(sources) == 1 else sources)

    def _pad_for(self, factor: int) -> int | None:
        """pad-scale's square for a field: ``pad_to`` scaled by the factor where the field is at the
        image's um/px (image sources), ``pad_to`` on slides (every field read at the patch size)."""
        if not self.pad_to or factor == 1 or self.source_kind == "slides":
            return self.pad_to
        return int(self.pad_to * factor)

    # -- what the plan reads ---------------------------------------------------------------
    @property
    def factors(self) -> tuple[int, ...]:
        """The distinct fields the views use, narrowest first."""
        return tuple(sorted({v.factor for v in self.views}))

    @property
    def wide_source(self) -> str | None:
        """Where the fields wider than x20 come from: ``slide`` (read at the patch size),
        ``context image``, ``image`` (the centre-crop rule) or None (recorded as ``x5_source``)."""
        if self.context in (None, "none"):
            return None
        if self.source_kind == "slides":
            return "slide"
        return "context image" if self.context == "separate" else "image"

    @property
    def loaded_fields(self) -> tuple[int, ...]:
        """The fields a source gives per sample, in the order of the serving inputs (images,
        context): slides read every field; images give (1,), (1, 4) with a context image, or the
        image as the widest field under the centre-crop rule (narrower ones are its centre crops)."""
        if self.source_kind == "slides":
            return self.factors
        return self.serving_fields

    @property
    def serving_fields(self) -> tuple[int, ...]:
        """The fields the exported signatures take (``images``, then ``context``): (1, widest) with
        a separate context (slides or context images), the widest alone under the centre-crop rule."""
        wide = max(self.factors)
        if self.context == "separate":
            return (1, wide)
        return (wide,)

    def pads(self) -> dict[int, int | None]:
        return dict(self.field_pads) or {f: self.pad_to for f in self.factors}

    def min_side(self) -> int | None:
        """Smallest image side of the centre-crop rule (narrowest field not upsampled), when it is
        enforced (not ``x5_from_image``); None otherwise."""
        if self.context != "centre-crop" or self.x5_from_image:
            return None
        side = self.pad_to if (self.fit == "pad-scale" and self.pad_to) else self.input_size
        return max(self.factors) * int(side)

    def slide_read_record(self) -> dict[str, Any]:
        return {"mpp": self.mpp, "patch_size": self.patch_size, "slide_mpp": self.slide_mpp}

    # -- the record -------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """The manifest's ``geometry`` (the layout older stores have; zooms and stain only when used)."""
        source = self.wide_source
        pads = self.pads()
        geo: dict[str, Any] = {
            "source_kind": self.source_kind,
            "input_size": int(self.input_size) if self.input_size else None,
            "fit": self.fit,
            "pad_to": self.pad_to,
            "context": self.context,
            "x5_source": source,
            "x5_pad_to": pads.get(max(self.factors), self.pad_to) if source else self.pad_to,
            "x5_from_image": bool(self.x5_from_image) if source == "image" else None,
            "mpp": None, "patch_size": None, "mpps": [], "patch_sizes": [], "slide_mpp_source": None,
            "precision": self.precision,
            "decoder": self.decoder,
        }
        if self.source_kind == "slides":
            geo.update(mpp=self.mpps[0] if len(self.mpps) == 1 else None,
                       patch_size=self.patch_sizes[0] if len(self.patch_sizes) == 1 else None,
                       mpps=list(self.mpps), patch_sizes=list(self.patch_sizes),
                       slide_mpp_source=self.slide_mpp_source)
        extra = {v.zoom: v.factor for v in self.views if DEFAULT_ZOOMS.get(v.zoom) != v.factor}
        if extra:
            geo["zooms"] = extra
        if self.stain is not None:
            geo["stain"] = dict(self.stain)
        return geo

    @classmethod
    def from_record(cls, geo: Mapping[str, Any] | None, views: Sequence[str],
                    legacy: Mapping[str, Any] | None = None) -> "ReadPlan":
        """The plan a ``geometry`` record describes (``views``: the artefact's). Without a record
        (artefacts older than it), ``legacy`` settings give fit/pad_to/context as they were."""
        if geo is None:
            legacy = dict(legacy or {})
            pad_to = legacy.get("pad_to")
            plan = cls(views=_record_views(views, {}), fit=legacy.get("fit", "scale"), pad_to=pad_to,
                       precision=legacy.get("precision") or "float32", context=legacy.get("context"),
                       x5_from_image=True)  # the centre-crop size rule came with the record: not enforced
            return plan.replace(field_pads=tuple((f, pad_to) for f in plan.factors))
        view_list = _record_views(views, geo.get("zooms") or {})
        pad_to = geo.get("pad_to")
        wide = max(v.factor for v in view_list)
        pads = tuple((f, geo.get("x5_pad_to", pad_to) if f == wide and f > 1 else pad_to)
                     for f in sorted({v.factor for v in view_list}))
        mpps = tuple(geo.get("mpps") or ([geo["mpp"]] if geo.get("mpp") is not None else []))
        sizes = tuple(geo.get("patch_sizes") or ([geo["patch_size"]] if geo.get("patch_size") is not None else []))
        return cls(views=view_list, input_size=geo.get("input_size"), fit=geo.get("fit", "scale"), pad_to=pad_to,
                   mpp=mpps[0] if len(mpps) == 1 else 0.5, patch_size=sizes[0] if len(sizes) == 1 else 256,
                   precision=geo.get("precision") or "float32", x5_from_image=bool(geo.get("x5_from_image")),
                   stain=geo.get("stain"), source_kind=geo.get("source_kind"), context=geo.get("context"),
                   field_pads=pads, mpps=mpps, patch_sizes=sizes, slide_mpp_source=geo.get("slide_mpp_source"),
                   decoder=geo.get("decoder"))

    @classmethod
    def from_artefact(cls, artefact: Mapping[str, Any]) -> "ReadPlan":
        """The plan of a manifest, head.json or export.json (see :func:`dfl_tf.provenance.geometry_of`)."""
        geo = artefact["geometry"] if "geometry" in artefact else artefact.get("extraction", {}).get("geometry")
        settings = artefact.get("settings") or artefact.get("extraction", {}).get("settings") or {}
        plan = cls.from_record(geo, artefact.get("views") or ["x20:rgb"], settings if isinstance(settings, dict) else {})
        if plan.input_size is None and (artefact.get("backbone") or {}).get("input_size"):
            plan = plan.replace(input_size=int(artefact["backbone"]["input_size"]))
        return plan


def _record_views(views: Sequence[str], zooms: Mapping[str, int]) -> tuple[View, ...]:
    """Views of a record; a zoom it names that this process does not know is registered from it."""
    for name, factor in zooms.items():
        if ZOOMS.get(name) != factor:
            register_zoom(name, int(factor))
    return parse_views(views)


def _image_context(samples: Any) -> str:
    """How an image source gives its wider field: ``separate`` (a context image per row) or
    ``centre-crop`` (the image is the wide field); rows with and without one are refused."""
    with_context = sum(1 for s in samples.samples if s.context)
    if 0 < with_context < len(samples.samples):
        first = next(s for s in samples.samples if not s.context)
        raise DflError(f"{samples.root}: {with_context} of {len(samples.samples)} rows have a context_path, "
                       f"{first.id} has none: give every row a context image or none (x5 from the centre crop)")
    return "separate" if with_context else "centre-crop"


def _check_image_zooms(views: Sequence[View], where: str) -> None:
    bad = next((v for v in views if v.factor not in IMAGE_FACTORS), None)
    if bad is not None:
        raise DflError(f"{where}: view {bad} needs a slide source (image sources give the x20 field and one x5 "
                       f"field, the image or its context image; read {bad.zoom} from slide coordinates)")


def _check_x5_fit(plan: ReadPlan, where: str) -> None:
    """``pad`` keeps the pixel scale: a wide field at the image's um/px cannot fit the input."""
    source = plan.wide_source
    if plan.fit == "pad" and source in ("context image", "image"):
        field = "the context image" if source == "context image" else "the whole image"
        raise DflError(f"{where + ': ' if where else ''}--fit pad keeps the pixel scale, so the x5 view "
                       f"({field}, 4x the x20 field) cannot fit the input: use --fit scale or pad-scale, or "
                       f"drop the x5 views")
