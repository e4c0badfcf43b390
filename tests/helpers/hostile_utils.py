"""Helpers for hostile-input tests through the CLI: run a command, assert one clean line, and check that
nothing outside the command's own output changed."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from click.testing import CliRunner


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest), skipping the trees in ``exclude``
    (the command's own output) and dfl's lock/verification caches."""
    root = Path(root)
    skip = [Path(p).resolve() for p in exclude]
    digests: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        resolved = path.resolve()
        if any(resolved == s or s in resolved.parents for s in skip):
            continue
        if path.name in (".dfl.lock", ".verified.json") or path.name.endswith(".lock"):
            continue
        if path.is_file() and not path.is_symlink():
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            digests[str(path.relative_to(root)) + "/"] = "dir"
    return digests


def run_dfl(args: Sequence[str]):
    """Invoke ``dfl ARGS`` in-process; returns click's result (exit_code, stdout, stderr)."""
    from dfl_tf.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *culprits: str, code: int = 2) -> str:
    """The command failed with ``code`` and a single ``error: ...`` line naming every culprit; no traceback."""
    err = result.stderr if result.stderr_bytes is not None else result.output
    lines = [line for line in err.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, err, result.exception)
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    for culprit in culprits:
        assert culprit in errors[0], (culprit, errors[0])
    return errors[0]
