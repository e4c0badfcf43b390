"""What a command may write at its ``--out``: one rule for every command.

:func:`prepare_out` runs before a command writes anything (before its lock, too):

* ``--out`` must not be one of the command's inputs, hold one (an ancestor folder of an input)
  or lie inside an input folder: refused, with or without ``--overwrite``.
* A file where a folder is written (or a folder where a file is written, or a file among the
  parent folders) is refused.
* An existing output of the command's own kind (recognised by the files dfl writes there: a head
  directory by ``head.json``, an embedding store by ``manifest.json`` or ``.parts/``, ...) is
  refused unless ``overwrite``; an unfinished one is resumed where the command resumes (extract,
  select), and an export directory takes a new version. ``overwrite`` replaces only that kind:
  a command that replaces its output whole (train, finetune) also refuses an output holding
  entries it did not write, so that nothing but its own files is deleted.
* Any other existing file or non-empty folder is refused, ``overwrite`` or not.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dfl_tf.errors import DflError

#: Entries that never make a folder "not empty" (locks and dfl's own verification cache).
_IGNORED = (".dfl.lock", ".verified.json")


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: how dfl recognises it and what it writes there."""

    what: str  #: how messages name it
    markers: tuple[str, ...]  #: name patterns: any of them present marks a folder (a file: its header) as this kind
    own: tuple[str, ...] = ()  #: name patterns of the entries the command writes (what --overwrite may remove)
    keep: tuple[str, ...] = ()  #: own entries that --overwrite keeps (select's extraction cache)
    done: tuple[str, ...] | None = None  #: patterns of a finished output (None: the markers); () = never finished
    whole: bool = False  #: replaced whole (temporary folder + rename): entries not in ``own`` are refused
    file: bool = False  #: the output is a file (CSV), not a folder
    #: an existing output of this kind: "replace" (only with --overwrite), "resume" (extract: a rerun goes on,
    #: --overwrite restarts) or "append" (export: a new version beside the others)
    existing: str = "replace"
    flag: bool = True  #: the command has --overwrite


def _header_starts(path: Path, prefix: str) -> bool:
    """Whether the first line of the CSV ``path`` starts with ``prefix`` (how dfl tells its own CSVs)."""
    try:
        with open(path, "rb") as fh:
            return fh.readline(4096).decode("utf-8", "replace").lstrip("\ufeff").startswith(prefix)
    except OSError:
        return False


KINDS: dict[str, OutputKind] = {
    "embeddings": OutputKind("embedding store", ("manifest.json", ".parts", "shard-*.tfrecord"), done=(),
                             existing="resume"),
    "head": OutputKind("head directory", ("head.json",),
                       own=("head.json", "head.keras", "history.csv", "metrics.json", "probe.npz", "logs"),
                       whole=True),
    "report": OutputKind("evaluation report", ("report.md",),
                         own=("metrics.json", "report.md", "confusion_matrix.png", "pr_curves.png",
                              "predictions.csv")),
    "export": OutputKind("model directory (saved_models/NAME, one folder per version)",  # 1, 2, ... or a leftover
                         tuple("[0-9]" * n for n in range(1, 10)) + (".tmp-*",), done=(),
                         existing="append", flag=False),
    "predictions": OutputKind("predictions CSV", ("id,source,",), file=True),
    "tiles": OutputKind("tile coordinates CSV", ("slide,x,y,mpp,size,tissue",), file=True),
    "heatmap": OutputKind("heatmap folder", ("heatmap.json", "tiles.csv"),  # + what heatmap.json lists
                          own=("heatmap.json", "tiles.csv", "tiles_*_tiles.png", "predictions.csv",
                               "predictions.skipped.csv")),
    "select": OutputKind("backbone selection folder", ("results.json", "table.md", "cache"),
                         own=("table.md", "results.csv", "results.json", "maps.png", "projector", "cache"),
                         keep=("cache",), done=("results.json", "table.md")),
    "finetune": OutputKind("fine-tuning folder", ("finetune.json",),
                           own=("finetune.json", "model.keras", "history.csv", "metrics.json", "logs"), whole=True),
}


def _a(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _check_inputs(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    real_out = _real(out)
    for given in inputs:
        if not isinstance(given, (str, os.PathLike)) or not str(given) or not os.path.lexists(given):
            continue  # not a path (a registry name), or missing: the command names it
        real_in = _real(given)
        if real_out == real_in:
            raise DflError(f"--out {out} is the command's input {given}: choose another --out (dfl never "
                           "writes over its inputs)")
        if real_out in real_in.parents:
            raise DflError(f"--out {out} holds the command's input {given}: choose an --out outside the inputs")
        if real_in.is_dir() and real_in in real_out.parents:
            raise DflError(f"--out {out} is inside the command's input {given}: choose an --out outside the "
                           "inputs (dfl does not write into them)")


def _check_parents(out: Path) -> None:
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise DflError(f"--out {out}: {parent} is a file, not a folder")
            return


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in _IGNORED)


def _refuse_existing(out: Path, kind: OutputKind) -> str:
    hint = "pass --overwrite to replace it, or choose another --out" if kind.flag else "choose another --out"
    return f"--out {out} already holds {_a(kind.what)} from an earlier run; {hint}"


def prepare_out(out: str | os.PathLike, kind: str, inputs: Iterable[str | os.PathLike | None] = (),
                overwrite: bool = False) -> str:
    """Check ``out`` for a command writing a ``kind`` output (a key of :data:`KINDS`) from ``inputs``.

    Returns ``"new"`` (nothing there, or an empty folder), ``"resume"`` (an unfinished output of
    this kind), ``"append"`` (an export directory), or ``"replace"`` (a finished output of this
    kind, with ``overwrite``); raises :class:`DflError` naming the path otherwise (see the module
    docstring). Writes nothing.
    """
    spec = KINDS[kind]
    out = Path(out)
    _check_inputs(out, inputs)
    _check_parents(out)
    if not out.exists() and not out.is_symlink():
        return "new"
    if spec.file:
        if out.is_dir():
            raise DflError(f"--out {out} is a folder; it names the {spec.what} to write (a file)")
        if not any(_header_starts(out, m) for m in spec.markers):
            raise DflError(f"--out {out} exists and is not {_a(spec.what)} dfl wrote; dfl does not replace it "
                           "(choose another --out)")
        if not overwrite:
            raise DflError(_refuse_existing(out, spec))
        return "replace"
    if not out.is_dir():
        raise DflError(f"--out {out} is a file, not a folder; it names the {spec.what} to write")
    entries = _entries(out)
    if not entries:
        return "new"
    if not any(_matches(name, spec.markers) for name in entries):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise DflError(f"--out {out} is a non-empty folder that is not {_a(spec.what)} (it holds {shown}); dfl "
                       f"does not overwrite it{', even with --overwrite' if overwrite else ''}: choose a new "
                       "or empty --out")
    done = spec.markers if spec.done is None else spec.done
    finished = any(_matches(name, done) for name in entries)
    foreign = [name for name in entries if spec.own and not _matches(name, spec.own)]
    if not finished:
        if foreign:  # e.g. a project folder that happens to hold a cache/: not an unfinished selection
            raise DflError(f"--out {out} is a non-empty folder that is not {_a(spec.what)} (it holds "
                           f"{', '.join(foreign[:3])}); choose a new or empty --out")
        return spec.existing if spec.existing != "replace" else "resume"
    if spec.existing == "append":
        return "append"
    if not overwrite:
        raise DflError(_refuse_existing(out, spec))
    if spec.whole and foreign:
        raise DflError(f"--out {out} is {_a(spec.what)} that also holds {', '.join(foreign[:3])}, which dfl did "
                       "not write; --overwrite replaces the folder whole: move those out or choose another --out")
    return "replace"


def clear_out(out: str | os.PathLike, kind: str) -> list[str]:
    """Remove an earlier ``kind`` output's own entries from the folder ``out`` (its fixed names, and
    for a heatmap folder the files its ``heatmap.json`` lists), so that no stale file of the earlier
    run stays beside the new ones; other entries stay. Call after :func:`prepare_out` said
    ``"replace"``. Returns the names removed."""
    spec, out = KINDS[kind], Path(out)
    names = set()
    if kind == "heatmap":
        try:
            listed = json.loads((out / "heatmap.json").read_text()).get("outputs", [])
            names = {Path(p).name for p in listed if isinstance(p, str)}
        except (OSError, ValueError, AttributeError):
            pass
    removed = []
    for path in sorted(out.iterdir()):
        if _matches(path.name, spec.keep) or not (_matches(path.name, spec.own) or path.name in names):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed
