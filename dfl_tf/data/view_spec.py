"""View specs (``x20:rgb``, ``x5:gray``, ...) and fit names: parsing and checks, no TensorFlow.

:mod:`dfl_tf.data.views` composes views in TensorFlow ops (and re-exports these names);
:mod:`dfl_tf.options` validates its ``views`` and ``fit`` fields here without importing TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dfl_tf.errors import DflError

ZOOMS = ("x20", "x5")
COLOURS = ("rgb", "gray")
FITS = ("scale", "pad", "pad-scale")


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
