"""Shard integrity on read: every shard is checked against the sha256 in ``manifest.json`` when a
stage opens it, and the check is cached so that a second read of an unchanged shard costs nothing.

The cache is keyed on the shard's name, size, modification time (ns) and expected sha256: kept
in memory for the process and in ``EMB_DIR/.verified.json`` for the next one (skipped where the
directory is read-only). Rewriting a shard (re-extraction) changes its mtime, so it is hashed
again; silent corruption that keeps size and mtime after a successful check is not seen again.
"""
from __future__ import annotations

import json
import os
import shlex
import threading
from pathlib import Path
from typing import Any

from dfl_tf.runtime.files import atomic_write_json, sha256_file
from dfl_tf.errors import DflError

CACHE_FILE = ".verified.json"
_memory: set[tuple] = set()
_lock = threading.Lock()


def _key(path: Path, expected: str) -> tuple[str, int, int, str] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, expected)


def _load_cache(emb_dir: Path) -> dict[str, list]:
    try:
        data = json.loads((emb_dir / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def shard_problems(emb_dir: str | Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(file, reason) for each shard that is missing or whose sha256 disagrees with the manifest."""
    emb_dir = Path(emb_dir)
    disk = _load_cache(emb_dir)
    problems: list[tuple[str, str]] = []
    changed = False
    for shard in manifest["shards"]:
        path = emb_dir / shard["file"]
        key = _key(path, shard["sha256"])
        if key is None:
            problems.append((shard["file"], "missing"))
            continue
        with _lock:
            if key in _memory:
                continue
        if disk.get(shard["file"]) == list(key[1:]):
            with _lock:
                _memory.add(key)
            continue
        actual = sha256_file(path)
        if actual != shard["sha256"]:
            problems.append((shard["file"], f"sha256 {actual[:12]} is not the manifest's {shard['sha256'][:12]}"))
            disk.pop(shard["file"], None)
            continue
        with _lock:
            _memory.add(key)
        disk[shard["file"]] = list(key[1:])
        changed = True
    if changed:
        try:
            atomic_write_json(emb_dir / CACHE_FILE, disk)
        except (OSError, DflError):
            pass  # a read-only store: the in-memory cache still spares this process
    return problems


def reextract_command(emb_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The ``dfl extract`` command line that rewrites missing shards of ``emb_dir`` (best effort:
    the options recorded in the manifest that differ from the defaults)."""
    if manifest.get("parts"):  # a fused store: fused again from its parts
        stores = list(dict.fromkeys(str(p.get("store", "STORE")) for p in manifest["parts"]))
        return " ".join(["dfl", "fuse", *stores, "--out", str(emb_dir), "--overwrite"])
    source = manifest.get("source") or {}
    backbone = manifest.get("backbone") or {}
    settings = manifest.get("settings") or {}
    args = ["dfl", "extract", str(source.get("path", "SOURCE")), "--out", str(emb_dir)]
    if source.get("split"):
        args += ["--split", str(source["split"])]
    args += ["--backbone", str(backbone.get("name", "?")).removeprefix("savedmodel:")]
    if backbone.get("weights") and not str(backbone.get("name", "")).startswith("savedmodel:"):
        args += ["--weights", str(backbone["weights"])]
    args += ["--views", ",".join(manifest.get("views", []))]
    if backbone.get("input_size"):
        args += ["--input-size", str(backbone["input_size"])]
    defaults = {"fit": "scale", "pad_to": None, "shard_size": 1024, "precision": "float32"}
    for key, default in defaults.items():
        if settings.get(key, default) != default:
            args += [f"--{key.replace('_', '-')}", str(settings[key])]
    if manifest.get("dtype", "float16") != "float16":
        args += ["--dtype", str(manifest["dtype"])]
    slide_read = settings.get("slide_read") or {}
    for key, flag in (("mpp", "--mpp"), ("patch_size", "--patch-size"), ("slide_mpp", "--slide-mpp")):
        if slide_read.get(key) is not None and slide_read[key] != {"mpp": 0.5, "patch_size": 256}.get(key):
            args += [flag, str(slide_read[key])]
    if manifest.get("skipped"):
        args.append("--skip-bad")
    return shlex.join(args)


def check_shards(emb_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Raise a one-line DflError naming the first bad shard and how to rewrite it."""
    if os.environ.get("DFL_TF_VERIFY_SHARDS", "1").lower() in ("0", "off", "false", "no"):
        return
    problems = shard_problems(emb_dir, manifest)
    if not problems:
        return
    file, reason = problems[0]
    path = Path(emb_dir) / file
    more = f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else ""
    state = "is missing" if reason == "missing" else f"is corrupt ({reason})"
    remove = "" if reason == "missing" else f"rm {shlex.quote(str(path))} && "
    raise DflError(f"shard {path} {state}{more}; to re-extract just that shard run: "
                   f"{remove}{reextract_command(emb_dir, manifest)}")


def shard_done(part_file: str | Path, shard_file: str | Path) -> bool:
    """Resume: a shard counts as done when its ``.parts`` record exists and the file on disk still
    has the sha256 recorded there (cached as on read), so a corrupt shard is simply redone."""
    part_file, shard_file = Path(part_file), Path(shard_file)
    try:
        expected = json.loads(part_file.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    key = _key(shard_file, expected)
    if key is None:
        return False
    with _lock:
        if key in _memory:
            return True
    if _load_cache(shard_file.parent).get(shard_file.name) != list(key[1:]) and sha256_file(shard_file) != expected:
        return False
    with _lock:
        _memory.add(key)
    return True
