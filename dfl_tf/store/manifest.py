"""manifest.json: what an embedding directory holds, and compatibility checks between stages."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfl_tf.errors import DflError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format_version", "backbone", "views", "dim", "dtype", "classes", "num_records", "shards")


def load_manifest(emb_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``EMB_DIR/manifest.json``."""
    path = Path(emb_dir) / MANIFEST
    if not path.exists():
        raise DflError(f"{emb_dir}: no {MANIFEST} (not an embedding directory, or extraction unfinished)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DflError(f"{path}: not valid JSON ({exc})") from exc
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise DflError(f"{path}: missing fields {missing}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise DflError(f"{path}: format version {manifest['format_version']} is newer than this dfl_tf reads")
    return manifest


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields that must agree for embeddings to be interchangeable."""
    return {
        "backbone fingerprint": manifest["backbone"]["fingerprint"],
        "views": list(manifest["views"]),
        "dim": int(manifest["dim"]),
        "input size": manifest["backbone"].get("input_size"),
    }


def check_compatible(a: dict[str, Any], b: dict[str, Any], what_a: str, what_b: str) -> None:
    """Raise a clear DflError when two artefacts disagree on backbone fingerprint, views or dim."""
    pa, pb = provenance(a), provenance(b)
    for key in pa:
        if pa[key] != pb[key]:
            va, vb = pa[key], pb[key]
            if key == "backbone fingerprint":
                va = f"{a['backbone'].get('name')} {str(va)[:12]}"
                vb = f"{b['backbone'].get('name')} {str(vb)[:12]}"
            raise DflError(f"{what_a} and {what_b} disagree on {key}: {va} vs {vb}")
