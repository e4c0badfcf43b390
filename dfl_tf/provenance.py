"""The read geometry an extraction used, and the one compatibility check between artefacts.

Extraction records in ``manifest.json`` under ``geometry`` exactly how pixels became backbone
inputs (the read plan's record, :meth:`dfl_tf.data.plan.ReadPlan.to_record`); heads carry it in ``head.json`` (``extraction.geometry``) and
exports in ``export.json`` (``geometry``). Every later stage takes its defaults from it, and
:func:`check_compatible` refuses to combine artefacts that disagree on any field of
:data:`FIELDS`: train (train vs val), evaluate (head vs test), export (head vs head), the parity
check (head vs its embeddings) and predict/heatmap (model vs source).
"""
from __future__ import annotations

from typing import Any, Sequence

from dfl_tf.errors import DflError

#: Fields two artefacts must agree on, in the order they are checked.
FIELDS = ("backbone fingerprint", "views", "dim", "input size", "fit", "pad_to", "context", "mpp", "patch size",
          "precision", "decoder", "stain")


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
        "stain": geo.get("stain"),  # the read plan's stain handling (issue 31); None: raw pixels
    })
    return record


def _show_stain(value: Any) -> str:
    """A stain record in a few words: ``none (raw pixels)`` or the method and a digest of its fit."""
    if not value:
        return "none (raw pixels)"
    import hashlib
    import json

    norm = value.get("normalize") if isinstance(value, dict) else None
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return f"{norm['method'] if norm else 'stain'} normalisation (fit {digest})"


def _show(key: str, value: Any, artefact: dict[str, Any]) -> str:
    if key == "stain":
        return _show_stain(value)
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
