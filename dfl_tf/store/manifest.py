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
    if not isinstance(manifest, dict):
        raise DflError(f"{path}: not a manifest (a JSON object is expected)")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise DflError(f"{path}: missing fields {missing}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and isinstance(sh.get("file"), str) and isinstance(sh.get("sha256"), str)
            and Path(sh["file"]).name == sh["file"] and sh["file"] not in ("", ".", "..") for sh in shards):
        raise DflError(f"{path}: 'shards' must list {{file, records, sha256}} with plain file names")
    if not isinstance(manifest["format_version"], int) or manifest["format_version"] > FORMAT_VERSION:
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
    """Raise a clear DflError when two artefacts disagree on backbone fingerprint, views, dim or read
    geometry: the one shared check, :func:`dfl_tf.provenance.check_compatible`."""
    from dfl_tf.provenance import check_compatible as _check

    _check(a, b, what_a, what_b)
