"""SIGTERM and Ctrl-C turned into one exception, so that an interrupted command cleans up before it exits.

By default SIGTERM ends Python at once: no ``finally`` runs, temporary files and locks stay
behind and the user sees nothing. Inside :func:`interruptible` SIGTERM, and SIGINT where Python's
own Ctrl-C handler is installed, raise :class:`Interrupted` (a KeyboardInterrupt) in the main
thread instead, so every temporary-name-then-rename writer removes its temporary file, the
output lock is released and the CLI prints one line (exit 143; 130 for SIGINT).

A signal that lands beneath the TensorFlow functions where its C++ calls Python back and where
raising was seen to break it (the gradient functions of ``tape.gradient``; the tracing of a
``tf.function``: CI saw SIGSEGV, ``SystemError: bad argument to internal function`` and an
unrelated ``ValueError``) is held instead: a helper thread sends it again every ``REDELIVER_S``
seconds until it lands outside them, so a Ctrl-C during a trace takes effect when the trace ends.
It is raised anyway after ``HOLD_MAX_S`` seconds (a trace that never ends) and when the block ends.
Other places where TensorFlow's C++ calls Python (``tf.nest``'s C++ flattening, for one) are not
covered: a signal landing there is raised as before.

Every handled signal is also recorded in the block's list, so that one swallowed on its way up
anyway is not lost: :func:`masked_interruption` still names it, and :func:`raise_if_interrupted`
(called by the long training loops) raises it again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from types import FrameType
from typing import Iterator

REDELIVER_S = 0.05  # how soon a signal deferred out of TensorFlow's C++ callbacks is sent again

# Python functions of TensorFlow beneath which its C++ calls Python back: an exception raised in
# such a callback corrupts TensorFlow's C++ state. (file name ending, function name)
_CPP_CALLBACK_ENTRIES = (
    ("eager/imperative_grad.py", "imperative_grad"),  # tape.gradient: gradient functions, vspace
    ("eager/forwardprop.py", "_jvp_dispatch"),  # forward-mode autodiff
    # tracing a tf.function (or a tf.data function): graph building calls Python from C++ all the
    # time, e.g. Tensor.consumers() (CI: "SystemError: Objects/listobject.c:338: bad argument")
    ("eager/polymorphic_function/tracing_compilation.py", "trace_function"),
    ("framework/func_graph.py", "func_graph_from_py_func"),
)


def _inside_cpp_callback(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs beneath one of :data:`_CPP_CALLBACK_ENTRIES`."""
    while frame is not None:
        code = frame.f_code
        for suffix, name in _CPP_CALLBACK_ENTRIES:
            if code.co_name == name and code.co_filename.replace(os.sep, "/").endswith(suffix):
                return True
        frame = frame.f_back
    return False


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a handled signal arrives."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_record: list[int] | None = None  # the signals of the interruptible() block now open; None outside one
HOLD_MAX_S = 10.0  # a signal held longer than this (a trace that does not end) is raised anyway


class _Held:
    """A signal held back by the handler (see the module docstring), shared by nested blocks, and
    the thread that sends it again every ``REDELIVER_S`` seconds (started with the outer block:
    starting a thread inside a signal handler could deadlock on threading's own locks)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.signum: int | None = None  # the signal held, None when none is
        self.since = 0.0
        self.resent = False  # the next delivery is our own resend, not a new signal
        self.closing = False
        self.wake, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._resend, name="dfl-signal-resend", daemon=True)
        self.thread.start()

    def hold(self, signum: int) -> None:
        if self.signum is None:
            self.since = time.monotonic()
        self.signum = signum
        self.wake.set()

    def _resend(self) -> None:
        while True:
            self.wake.wait()
            if self.stop.wait(REDELIVER_S):
                return
            with self.lock:
                if self.closing:
                    return
                self.wake.clear()
                if self.signum is not None:
                    self.resent = True
                    os.kill(os.getpid(), self.signum)

    def close(self) -> None:
        """No resend after this returns (one in flight has, in practice, reached the handler)."""
        with self.lock:
            self.closing = True
        self.stop.set()
        self.wake.set()
        self.thread.join()


_held: _Held | None = None


@contextlib.contextmanager
def interruptible(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Turn ``signums`` into :class:`Interrupted` for the ``with`` block (main thread only); yields
    the block's record of the signals handled, in order (a nested block shares its outer one's).

    A signal that lands inside TensorFlow's C++ callbacks is held and raised once TensorFlow is out
    of them, or after ``HOLD_MAX_S`` seconds, or when the block ends, whichever comes first: the
    block never ends normally with a signal still held.

    SIGINT is taken over only where Python's own Ctrl-C handler is installed: a SIGINT ignored on
    entry (a background job of a shell script) stays ignored, as POSIX asks.
    """
    global _record, _held
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    outer = _record is None
    record: list[int] = [] if outer else _record
    held = _Held() if outer else _held  # _held is set whenever _record is

    def handler(signum: int, frame: FrameType | None) -> None:
        if held.resent:  # our own resend: already in the record
            held.resent = False
            if held.signum is None:
                return  # raised meanwhile (a new signal came first): no second unwind
        else:
            record.append(signum)
        if held.closing:
            held.signum = held.signum or signum  # raised after the handlers are restored
            return
        if _inside_cpp_callback(frame) and (held.signum is None or time.monotonic() - held.since < HOLD_MAX_S):
            held.hold(signum)  # not here: sent again once TensorFlow is back in plain Python
            return
        held.signum = None
        raise Interrupted(signum)

    previous: dict[int, object] = {}
    try:
        if outer:
            _record, _held = record, held
        for s in signums:
            if s != signal.SIGINT or signal.getsignal(s) is signal.default_int_handler:
                previous[s] = signal.signal(s, handler)
        yield record
    finally:
        if outer:
            held.closing = True  # first: from here a signal is only recorded, never raised mid-cleanup
        try:
            if outer:
                held.close()  # no resend lands after the handlers are gone
        finally:
            for s, old in previous.items():
                signal.signal(s, old)
            if outer:
                _record, _held = None, None
    if held.signum is not None:  # the block ended normally with a signal still held
        signum, held.signum = held.signum, None
        raise Interrupted(signum)


def masked_interruption(exc: BaseException, record: list[int] | tuple[int, ...] = ()) -> KeyboardInterrupt | None:
    """The interruption behind ``exc``, when ``exc`` was raised while one unwound (a library's
    cleanup can fail when a signal lands mid-way, e.g. TensorFlow's tracing raising
    ``AssertionError: Concurrent access?``), or when ``record`` (an :func:`interruptible` block's)
    holds a signal that was swallowed on the way (a ``ValueError`` out of TensorFlow's gradient
    code, seen in CI); None otherwise."""
    seen: set[int] = set()
    cause = exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return Interrupted(record[-1]) if record else None


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when the open :func:`interruptible` block handled a signal
    that was swallowed on its way up (no-op outside a block).

    The long loops (the batched cross-validation fits, each epoch of ``train`` and ``finetune``)
    call this, so a Ctrl-C that a C extension caught and dropped cannot leave the command running on.
    """
    if _record:
        if _held is not None:
            _held.signum = None  # raised now: a resend still due must not unwind a second time
        raise Interrupted(_record[-1])


def interrupted(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The CLI's one-line message and exit status for an interruption."""
    name = getattr(exc, "name", "SIGINT")
    code = 128 + getattr(exc, "signum", signal.SIGINT)
    return (f"interrupted by {name}; nothing was left half-written: rerun the same command "
            "(dfl extract resumes from its completed shards)"), code
