"""The read geometry an extraction used, and the one compatibility check between artefacts.

Extraction records in ``manifest.json`` under ``geometry`` exactly how pixels became backbone
inputs (:func:`read_geometry`); heads carry it in ``head.json`` (``extraction.geometry``) and
exports in ``export.json`` (``geometry``). Every later stage takes its defaults from it, and
:func:`check_compatible` refuses to combine artefacts that disagree on any field of
:data:`FIELDS`: train (train vs val), evaluate (head vs test), export (head vs head), the parity
check (head vs its embeddings) and predict/heatmap (model vs source).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from dfl_tf.errors import DflError

if TYPE_CHECKING:
    from dfl_tf.data.sources import SampleSet

#: Fields two artefacts must agree on, in the order they are checked.
FIELDS = ("backbone fingerprint", "views", "dim", "input size", "fit", "pad_to", "context", "mpp", "patch size",
          "precision", "decoder")


def _geometry(artefact: dict[str, Any]) -> dict[str, Any] | None:
    """The geometry record of a manifest, head.json or export.json (None for older artefacts)."""
    if "geometry" in artefact:
        return artefact["geometry"]
    return artefact.get("extraction", {}).get("geometry")


def _legacy_settings(artefact: dict[str, Any]) -> dict[str, Any]:
    """fit/pad_to/context/precision as artefacts written before ``geometry`` recorded them."""
    settings = artefact.get("settings") or artefact.get("extraction", {}).get("settings") or {}
    return settings if isinstance(settings, dict) else {}


def _mpp_value(geo: dict[str, Any], single: str, many: str) -> Any:
    values = geo.get(many) or []
    if len(values) > 1:
        return sorted(values)
    return geo.get(single)


def compat_record(artefact: dict[str, Any]) -> dict[str, Any]:
    """The values of :data:`FIELDS` in a manifest, head.json or export.json; a field the artefact
    does not record (written by an older dfl_tf) is left out and not compared."""
    backbone = artefact.get("backbone") or {}
    record: dict[str, Any] = {
        "backbone fingerprint": backbone.get("fingerprint"),
        "views": list(artefact.get("views") or []),
        "dim": int(artefact["dim"]) if artefact.get("dim") is not None else None,
        "input size": backbone.get("input_size"),
    }
    geo = _geometry(artefact)
    if geo is None:
        legacy = _legacy_settings(artefact)
        for key in ("fit", "pad_to", "context", "precision"):
            if key in legacy:
                record[key] = legacy[key]
        return record
    record.update({
        "fit": geo.get("fit"),
        "pad_to": geo.get("pad_to"),
        "context": geo.get("context"),
        "mpp": _mpp_value(geo, "mpp", "mpps"),
        "patch size": _mpp_value(geo, "patch_size", "patch_sizes"),
        "precision": geo.get("precision"),
        "decoder": geo.get("decoder"),
    })
    return record


def _show(key: str, value: Any, artefact: dict[str, Any]) -> str:
    if key == "backbone fingerprint":
        return f"{(artefact.get('backbone') or {}).get('name')} {str(value)[:12]}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "[]"
    return str(value)


def check_compatible(a: dict[str, Any], b: dict[str, Any], what_a: str, what_b: str,
                     fields: Sequence[str] = FIELDS) -> None:
    """Raise a one-line DflError naming both sides and the first field of ``fields`` they disagree on.

    ``a`` and ``b`` are manifests, head.json or export.json contents (any mix).
    """
    ra, rb = compat_record(a), compat_record(b)
    for key in fields:
        if key in ra and key in rb and ra[key] != rb[key]:
            raise DflError(f"{what_a} and {what_b} disagree on {key}: {_show(key, ra[key], a)} vs "
                           f"{_show(key, rb[key], b)}")


def geometry_of(artefact: dict[str, Any]) -> dict[str, Any]:
    """The recorded geometry (empty for artefacts older than the record)."""
    return dict(_geometry(artefact) or {})


def view_fit(artefact: dict[str, Any], size: int) -> dict[str, Any]:
    """Keyword arguments of :func:`dfl_tf.data.views.compose_views` (fit, pad_to, x5_pad_to,
    min_side) that reproduce an artefact's extraction; older artefacts get their old behaviour."""
    from dfl_tf.data.views import min_x5_side

    geo = _geometry(artefact)
    if geo is None:
        legacy = _legacy_settings(artefact)
        fit, pad_to = legacy.get("fit", "scale"), legacy.get("pad_to")
        return {"fit": fit, "pad_to": pad_to, "x5_pad_to": pad_to, "min_side": None}
    fit, pad_to = geo.get("fit", "scale"), geo.get("pad_to")
    strict = geo.get("x5_source") == "image" and not geo.get("x5_from_image")
    return {"fit": fit, "pad_to": pad_to, "x5_pad_to": geo.get("x5_pad_to", pad_to),
            "min_side": min_x5_side(size, fit, pad_to) if strict else None}


def trained_read(geo: dict[str, Any], mpp: float | None, size: int | None, what: str
                 ) -> tuple[float | None, int | None]:
    """The (mpp, patch size) to read slides at for a model trained with geometry ``geo``.

    Defaults come from the record; a given value must be one the model was trained at (a model
    extracted from a mixed-geometry source needs the value given). ``what`` names the model in
    errors. Returns (None, None) for models trained on images when nothing is given.
    """
    result = []
    for key, many, given, flag in (("mpp", "mpps", mpp, "--mpp"), ("patch_size", "patch_sizes", size, "--size")):
        values = list(geo.get(many) or ([geo[key]] if geo.get(key) is not None else []))
        if given is None:
            if len(values) > 1:
                raise DflError(f"{what} was trained at several {key.replace('_', ' ')}s {values}: pass {flag}")
            result.append(values[0] if values else None)
            continue
        given = float(given) if key == "mpp" else int(given)
        if values and not any(abs(given - v) <= 1e-6 * max(1.0, abs(v)) for v in values):
            raise DflError(f"{what} was trained at {key.replace('_', ' ')} "
                           f"{values[0] if len(values) == 1 else values}, not {flag} {given}: the heads would "
                           f"see another scale")
        result.append(given)
    return result[0], result[1]


def read_geometry(*, input_size: int, fit: str, pad_to: int | None, context: str, views: Sequence[str],
                  precision: str, samples: "SampleSet", mpp: float, patch_size: int, slide_mpp: float | None,
                  allow_mixed_geometry: bool = False, x5_from_image: bool = False) -> dict[str, Any]:
    """The geometry record of an extraction (see the module docstring).

    ``samples`` is the :class:`dfl_tf.data.sources.SampleSet`. Slide sources: every distinct
    per-sample mpp and patch size (CSV columns, else ``mpp``/``patch_size``); more than one is
    refused unless ``allow_mixed_geometry``. ``x5_from_image``: the user accepts the centre-crop
    rule on images smaller than 4x the input side.
    """
    from dfl_tf.data.decode import DECODER
    from dfl_tf.data.views import CONTEXT_FACTOR, check_x5_fit, parse_views, x5_source

    view_list = parse_views(views)
    source = x5_source(view_list, context, samples.kind)
    check_x5_fit(view_list, fit, source, where=str(samples.root))
    geo: dict[str, Any] = {
        "source_kind": samples.kind,
        "input_size": int(input_size),
        "fit": fit,
        "pad_to": pad_to,
        "context": context,
        "x5_source": source,
        # pad-scale pads the x5 field to this side: 4 x pad_to where x5 is at the image's um/px
        "x5_pad_to": (int(pad_to * CONTEXT_FACTOR) if pad_to and source in ("context image", "image") else pad_to),
        "x5_from_image": bool(x5_from_image) if source == "image" else None,
        "mpp": None, "patch_size": None, "mpps": [], "patch_sizes": [], "slide_mpp_source": None,
        "precision": precision,
        "decoder": DECODER if samples.kind != "slides" else "slide reader (OpenSlide/tifffile, Lanczos resize)",
    }
    if samples.kind == "slides":
        mpps = sorted({float(s.mpp or mpp) for s in samples.samples})
        sizes = sorted({int(s.patch_size or patch_size) for s in samples.samples})
        for name, values, flag in (("mpp", mpps, "mpp"), ("patch size", sizes, "size")):
            if len(values) > 1 and not allow_mixed_geometry:
                raise DflError(f"{samples.root}: the '{flag}' column holds {len(values)} different {name}s "
                               f"{values[:6]}: one extraction reads one geometry (split the CSV, or pass "
                               f"--allow-mixed-geometry to record them all)")
        geo.update(mpp=mpps[0] if len(mpps) == 1 else None, patch_size=sizes[0] if len(sizes) == 1 else None,
                   mpps=mpps, patch_sizes=sizes)
        sources = sorted({"slide_mpp column" if s.slide_mpp else "--slide-mpp" if slide_mpp else "metadata"
                          for s in samples.samples})
        geo["slide_mpp_source"] = sources[0] if len(sources) == 1 else sources
    return geo
