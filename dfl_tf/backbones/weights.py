"""Download, verify and cache pretrained weight files; cache their Keras conversions.

Layout of the cache (``$DFL_TF_CACHE``, default ``~/.cache/dfl_tf``)::

    downloads/<filename>                      the original file, sha256 checked
    converted/<backbone>-<source>.weights.h5  the Keras weights, what later loads read

Every file lands through a temporary name and an atomic rename, so an interrupted
download or a concurrent conversion never leaves a half-written file under the final name.

Families declare their sources with :func:`url_source` (a direct URL, through this cache) or
:func:`hub_source` (a Hugging Face repository, through ``huggingface_hub``'s own cache).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from dfl_tf.backbones.registry import WeightSource
from dfl_tf.errors import DflError
from dfl_tf.runtime.files import sha256_file


def cache_dir() -> Path:
    """``$DFL_TF_CACHE`` or ``~/.cache/dfl_tf``."""
    env = os.environ.get("DFL_TF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dfl_tf"


def download_path(source: WeightSource) -> Path:
    filename = source.filename or (source.url or "weights").rsplit("/", 1)[-1]
    return cache_dir() / "downloads" / filename


def converted_path(backbone: str, key: str) -> Path:
    return cache_dir() / "converted" / f"{backbone}-{key}.weights.h5"


def hash_matches(actual: str, expected: str | None) -> bool:
    """Full sha256 comparison, or a prefix check where only a prefix is published."""
    if not expected:
        return True
    return actual.lower().startswith(expected.lower())


def fetch(source: WeightSource) -> Path:
    """Return the local path of ``source``'s file, downloading it once into the cache.

    The sha256 (or the published prefix of it) is checked before the file is renamed
    into place; a cached file that fails the check is downloaded again.
    """
    if not source.url:
        raise DflError(f"weights '{source.name}' have no download URL; pass a local file with --weights")
    dest = download_path(source)
    if dest.exists():
        if hash_matches(sha256_file(dest), source.sha256):
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response, open(tmp, "wb") as fh:
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    digest.update(block)
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DflError(
                f"cannot download {source.url} ({reason}); if this machine is offline, fetch the file "
                f"elsewhere and pass it with --weights PATH (or convert it with `dfl import-weights`)"
            ) from None
        actual = digest.hexdigest()
        if not hash_matches(actual, source.sha256):
            raise DflError(f"{source.url} downloaded with sha256 {actual}, expected {source.sha256}: "
                           f"corrupt download or the file changed upstream")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def converted(backbone: str, key: str, source: WeightSource, convert: Callable[[Path, Path], object],
              local_file: Callable[[], str | None] | None = None) -> Path:
    """The cached Keras weights for ``backbone``/``key``, converting them on first use.

    ``convert(raw_path, out_path)`` writes ``out_path`` (atomically); the raw file comes from
    ``local_file()`` when that returns a path (a file shipped in a package), else ``fetch``.
    """
    out = converted_path(backbone, key)
    if out.exists():
        return out
    raw = local_file() if local_file is not None else None
    raw_path = Path(raw) if raw else fetch(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(raw_path, out)
    return out


def offline_checker(backbone: str, key: str,
                    local_file: Callable[[], str | None] | None = None) -> Callable[[], str | None]:
    """A ``WeightSource.offline_path``: the converted file, else a raw file that needs no network."""

    def check() -> str | None:
        out = converted_path(backbone, key)
        if out.exists():
            return str(out)
        raw = local_file() if local_file is not None else None
        return str(raw) if raw else None

    return check


def clear(backbone: str | None = None) -> None:
    """Remove converted files (of one backbone, or all); downloads are kept."""
    folder = cache_dir() / "converted"
    if backbone is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for path in folder.glob(f"{backbone}-*.weights.h5"):
        path.unlink()


def downloaded(source: WeightSource) -> Callable[[], str | None]:
    """``local_file`` for :func:`converted`: the raw download when it is already in the cache."""

    def local() -> str | None:
        path = download_path(source)
        return str(path) if path.exists() else None

    return local


def url_source(backbone: str, key: str, url: str, license: str, note: str = "",
               sha256: str | None = None) -> WeightSource:
    """A downloadable checkpoint of ``backbone`` (file name: the URL's last part), offline once
    downloaded or converted."""
    source = WeightSource(key, url=url, sha256=sha256, license=license, filename=url.rsplit("/", 1)[-1], note=note)
    return replace(source, offline_path=offline_checker(backbone, key, downloaded(source)))


@dataclass(frozen=True)
class HubSource(WeightSource):
    """Weights in a Hugging Face repository (``repo``/``filename``), fetched with huggingface_hub."""

    repo: str = ""


def hub_source(backbone: str, key: str, repo: str, filename: str, license: str, gated: bool = False,
               note: str = "") -> HubSource:
    """A file of a Hugging Face repository, offline once in the hub cache or converted."""
    source = HubSource(key, url=f"https://huggingface.co/{repo}/resolve/main/{filename}", license=license,
                       filename=filename, note=note, gated=gated, repo=repo)
    return replace(source, offline_path=offline_checker(backbone, key, lambda: _hub_cached(source)))


def _hub_cached(source: HubSource) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(source.repo, source.filename)
    return path if isinstance(path, str) else None


def hub_download(source: HubSource) -> Path:
    """The local file of ``source``: the Hugging Face cache, else a download (token from ``HF_TOKEN``)."""
    where = (f"get {source.filename} from https://huggingface.co/{source.repo}"
             f"{' (accept its licence there, then set HF_TOKEN)' if source.gated else ''}; licence: "
             f"{source.license}; then pass it with --weights PATH")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DflError(f"huggingface_hub is not installed (pip install 'dfl_tf[hub]'), or {where}") from None
    try:
        return Path(hf_hub_download(source.repo, source.filename, token=os.environ.get("HF_TOKEN") or None))
    except Exception as exc:  # noqa: BLE001 - offline, 401/403 (gated), 404: one line either way
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise DflError(f"cannot download {source.repo}/{source.filename} ({type(exc).__name__}: {reason}); "
                       f"{where}") from None


def raw_file(source: WeightSource) -> Path:
    """The original file of ``source``: from the hub for a :class:`HubSource`, else :func:`fetch`."""
    return hub_download(source) if isinstance(source, HubSource) else fetch(source)
