"""View specs (``x20:rgb``, ``x5:gray``, ...) and fit names: now part of the read plan
(:mod:`dfl_tf.data.plan`, the one table of zooms); the names stay importable from here."""
from __future__ import annotations

from dfl_tf.data.plan import (  # noqa: F401
    COLOURS,
    FITS,
    ZOOMS,
    View,
    check_fit,
    needs_context,
    parse_views,
    views_to_strings,
)
