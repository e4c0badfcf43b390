"""Advisory locks on output directories, so that two runs never write the same output.

``extract`` locks ``OUT/.dfl.lock``, ``export`` locks ``saved_models/NAME/.dfl.lock`` (so two
exports never take the same version), ``train`` locks ``.HEAD_DIR.lock`` beside its output
(the head directory itself is replaced at the end). The lock is ``fcntl.flock`` on that file,
which holds the owner's pid, host, command and start time. The kernel drops a flock when its
process dies, however it dies, so a lock left by a killed run is stale by construction: the next
run takes it over (and says so). A second live run gets a one-line DflError naming the holder.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from dfl_tf.errors import DflError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs unguarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".dfl.lock"
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # gs://, s3://, hdfs://, ...
log = logging.getLogger(__name__)


def lock_path(out: str | os.PathLike, inside: bool = True) -> Path:
    """The lock file of output ``out``: inside it, or beside it as ``.NAME.lock``."""
    out = Path(out)
    return out / LOCK_NAME if inside else out.parent / f".{out.name}.lock"


def lock_info(path: Path) -> dict[str, Any]:
    """What a lock file says (pid, host, command, started); empty when unreadable."""
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_info(path: Path, wait: float = 2.0) -> dict[str, Any]:
    """What the live holder of ``path`` wrote. It writes just after taking the lock, so a second
    run arriving in between would read nothing, or the dead previous owner's lines: wait briefly."""
    deadline = time.monotonic() + wait
    while True:
        held = lock_info(path)
        if _written_by_live_process(held) or time.monotonic() > deadline:
            return held
        time.sleep(0.02)


def _written_by_live_process(held: dict[str, Any]) -> bool:
    pid = held.get("pid")
    if not isinstance(pid, int):
        return False
    if held.get("host") != socket.gethostname():
        return True  # cannot check another host's processes
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, command: str, inside: bool = True) -> Iterator[dict[str, Any]]:
    """Hold the lock of output ``out`` for the ``with`` block; yields what the lock file says
    (``took_over`` holds the previous owner when a stale lock was taken over)."""
    if URL.match(str(out)):  # Path() would turn gs://b/x into the local folders gs:/b/x
        raise DflError(f"{out} is not supported as an output: dfl writes through the local filesystem "
                       "(use a path every machine mounts, e.g. an NFS or GCS FUSE mount)")
    path = lock_path(out, inside)
    folder = path.parent
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield {"pid": os.getpid(), "command": command}
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            held = _holder_info(path)
            who = f"dfl {held.get('command', '?')} (pid {held.get('pid', '?')} on {held.get('host', '?')}, " \
                  f"started {held.get('started', '?')})"
            raise DflError(f"{Path(out)} is in use by another {who}; wait for it to finish or choose another "
                           f"--out (lock file {path})") from None
        except OSError as exc:  # a filesystem without flock: go on unguarded, but say so
            os.close(fd)
            log.warning("cannot lock %s (%s); running without a lock", path, exc.strerror)
            yield {"pid": os.getpid(), "command": command, "unlocked": True}
            return
        try:  # the file may have been unlinked by its previous owner between open and flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = lock_info(path)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[:8]}
    if previous.get("pid") and previous.get("pid") != os.getpid():
        info["took_over"] = previous
        log.warning("taking over the stale lock %s of pid %s (%s, no longer running)", path,
                    previous.get("pid"), previous.get("command"))
    data = (json.dumps(info) + "\n").encode()
    os.pwrite(fd, data, 0)  # then cut: the file is never empty while held
    os.ftruncate(fd, len(data))
    try:
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        for made in created:  # the folders this lock made, as long as the run left them empty
            try:
                made.rmdir()
            except OSError:
                break


def locks_output(command: str, arg: str = "out", inside: bool = True,
                 prepare: Callable[[dict[str, Any]], Any] | None = None) -> Callable:
    """Decorator: hold :func:`output_lock` on the function's ``arg`` argument while it runs.
    ``prepare`` (e.g. :func:`dfl_tf.runtime.outputs.prepare_out`'s checks) is called first with the bound
    arguments (defaults applied), before the lock makes any folder."""
    def wrap(func: Callable) -> Callable:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = bound.arguments.get(arg)
            if out is None:
                return func(*args, **kwargs)
            if prepare is not None and not URL.match(str(out)):
                prepare(dict(bound.arguments))
            with output_lock(out, command, inside):
                return func(*args, **kwargs)
        return locked
    return wrap
