"""Small file helpers shared by every stage: atomic writes and hashing."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from dfl_tf.errors import DflError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # disk full, I/O error, a signal: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from exc
        raise


#: errno values that mean "the disk, not the data": reported as one-line DflErrors.
WRITE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def write_error(path: str | os.PathLike, exc: BaseException) -> DflError:
    """A one-line error for a failed write to ``path`` (what failed, and that a rerun resumes)."""
    code = getattr(exc, "errno", None)
    reason = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else str(exc).splitlines()[0][:160]
    return DflError(f"cannot write {path}: {reason}; nothing was left half-written: fix the disk and rerun "
                    "the same command to resume")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished directory ``tmp`` to ``out``, replacing an old ``out`` only at the end."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def atomic_save_weights(model: Any, path: str | os.PathLike) -> Path:
    """``model.save_weights`` to ``path`` (``*.weights.h5``) through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[:-len(".weights.h5")] if path.name.endswith(".weights.h5") else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}-{threading.get_ident()}.weights.h5")
    try:
        model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
