"""SIGTERM handled like SIGINT, so that an interrupted command cleans up before it exits.

By default SIGTERM ends Python at once: no ``finally`` runs, temporary files and locks stay
behind and the user sees nothing. Inside :func:`interruptible` SIGTERM raises
:class:`Interrupted` (a KeyboardInterrupt) in the main thread instead, so every
temporary-name-then-rename writer removes its temporary file, the output lock is released and
the CLI prints one line (exit 143; 130 for SIGINT).

Every handled signal is also recorded, because a signal that lands inside a C extension's
callback (TensorFlow's gradient functions run from C++) can be swallowed there and resurface as
an unrelated error with no KeyboardInterrupt in its context: :func:`masked_interruption` still
names it.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a handled signal arrives."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_received: list[int] = []  # signals handled by the latest interruptible() block, in order
_active: list[bool] = []  # one entry per interruptible() block now open


@contextlib.contextmanager
def interruptible(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn ``signums`` into :class:`Interrupted` for the ``with`` block (main thread only).

    SIGINT is taken over only where Python's own Ctrl-C handler is installed: a SIGINT ignored on
    entry (a background job of a shell script) stays ignored, as POSIX asks.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        _received.append(signum)
        raise Interrupted(signum)

    if not _active:
        _received.clear()
    previous = {s: signal.signal(s, handler) for s in signums
                if s != signal.SIGINT or signal.getsignal(s) is signal.default_int_handler}
    _active.append(True)
    try:
        yield
    finally:
        _active.pop()
        for s, old in previous.items():
            signal.signal(s, old)


def masked_interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The interruption behind ``exc``, when ``exc`` was raised while one unwound (a library's
    cleanup can fail when a signal lands mid-way, e.g. TensorFlow's tracing raising
    ``AssertionError: Concurrent access?``), or when a handled signal arrived before ``exc`` and
    was swallowed on the way (a ``ValueError`` out of TensorFlow's gradient code, seen in CI);
    None otherwise."""
    seen: set[int] = set()
    cause = exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return Interrupted(_received[-1]) if _received else None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a handled signal was swallowed on its way up.

    Long loops (the batched cross-validation fits, each Keras epoch) call this, so a Ctrl-C that a
    C extension caught and dropped cannot leave the command running on.
    """
    if _active and _received:
        raise Interrupted(_received[-1])


def interrupted(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The CLI's one-line message and exit status for an interruption."""
    name = getattr(exc, "name", "SIGINT")
    code = 128 + getattr(exc, "signum", signal.SIGINT)
    return (f"interrupted by {name}; nothing was left half-written: rerun the same command "
            "(dfl extract resumes from its completed shards)"), code
