"""SIGTERM and Ctrl-C turned into one exception, so that an interrupted command cleans up before it exits.

By default SIGTERM ends Python at once: no ``finally`` runs, temporary files and locks stay
behind and the user sees nothing. Inside :func:`interruptible` SIGTERM, and SIGINT where Python's
own Ctrl-C handler is installed, raise :class:`Interrupted` (a KeyboardInterrupt) in the main
thread instead, so every temporary-name-then-rename writer removes its temporary file, the
output lock is released and the CLI prints one line (exit 143; 130 for SIGINT).

A signal that lands while TensorFlow may be running Python callbacks from C++ (the gradient
functions of ``tape.gradient``; anything while a ``tf.function`` is traced) is not raised there:
an exception thrown through that C++ was seen to crash the process (SIGSEGV, in CI), to come back
as ``SystemError: bad argument to internal function`` or to be swallowed into an unrelated
``ValueError``. The handler defers it instead and sends the signal again every ``REDELIVER_S``
seconds until it lands outside those calls: a Ctrl-C during a trace takes effect when the trace
ends (seconds for a large model).

Every handled signal is also recorded in the block's list, so that one swallowed on its way up
anyway is not lost: :func:`masked_interruption` still names it, and :func:`raise_if_interrupted`
(called by the long training loops) raises it again.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
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


@contextlib.contextmanager
def interruptible(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Turn ``signums`` into :class:`Interrupted` for the ``with`` block (main thread only); yields
    the block's record of the signals handled, in order (a nested block shares its outer one's).

    SIGINT is taken over only where Python's own Ctrl-C handler is installed: a SIGINT ignored on
    entry (a background job of a shell script) stays ignored, as POSIX asks.
    """
    global _record
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    outer = _record is None
    record: list[int] = [] if outer else _record

    redeliveries: list[threading.Timer] = []
    raised = threading.Event()  # once set, deferred signals are not sent again (no second unwind)

    def redeliver(signum: int) -> None:
        if not raised.is_set():
            os.kill(os.getpid(), signum)

    def handler(signum: int, frame: FrameType | None) -> None:
        record.append(signum)
        if _inside_cpp_callback(frame):  # not here: send it again once TensorFlow is back in Python
            timer = threading.Timer(REDELIVER_S, redeliver, (signum,))
            timer.daemon = True
            redeliveries.append(timer)
            timer.start()
            return
        raised.set()
        raise Interrupted(signum)

    previous: dict[int, object] = {}
    try:
        if outer:
            _record = record
        for s in signums:
            if s != signal.SIGINT or signal.getsignal(s) is signal.default_int_handler:
                previous[s] = signal.signal(s, handler)
        yield record
    finally:
        for timer in redeliveries:  # none may land after the handler is gone
            timer.cancel()
        for s, old in previous.items():
            signal.signal(s, old)
        if outer:
            _record = None


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
        raise Interrupted(_record[-1])


def interrupted(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The CLI's one-line message and exit status for an interruption."""
    name = getattr(exc, "name", "SIGINT")
    code = 128 + getattr(exc, "signum", signal.SIGINT)
    return (f"interrupted by {name}; nothing was left half-written: rerun the same command "
            "(dfl extract resumes from its completed shards)"), code
