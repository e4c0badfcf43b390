"""TensorFlow's logging for the command line: quiet unless ``dfl --verbose``.

TensorFlow writes start-up lines to stderr while it is imported (absl's "All log messages before
absl::InitializeLog() is called...", the oneDNN notice, CPU feature notes), once per native
library that logs, so they arrive twice. ``TF_CPP_MIN_LOG_LEVEL`` hides the later C++ logs
(:func:`set_log_env`) but not these, because they are written before TensorFlow reads it. :func:`import_tensorflow`
imports TensorFlow once, up front, with the process's stderr (file descriptor 2) captured, and
replays the capture only when the import fails; afterwards TensorFlow's and absl's Python
loggers are set to errors only. Stderr then carries dfl's own messages, progress and errors.
This module imports nothing heavy itself.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

#: The user's own setting, read before :mod:`dfl_tf.cli` sets a default.
_USER_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")


def set_log_env(verbose: bool) -> None:
    """The C++ log level TensorFlow reads when it is imported: the user's own setting, else 3
    (fatal only: TensorFlow's run-time "E" lines, e.g. oneDNN's float16 fallback note, are not
    errors of the command; real failures reach dfl as exceptions), or 0 (all) with ``verbose``."""
    if _USER_LEVEL is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[None]:
    """Send file descriptor 2 (C++ and Python writes alike) to a temporary file; replay it to
    stderr if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def import_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow once, silently unless ``verbose`` (see the module docstring)."""
    set_log_env(verbose)
    if "tensorflow" in sys.modules or verbose:
        import tensorflow  # noqa: F401
    else:
        with _captured_stderr():
            import tensorflow  # noqa: F401
    if not verbose:
        import logging

        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
