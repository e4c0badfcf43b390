"""Extraction as an Apache Beam pipeline (``dfl extract --runner beam``).

One Beam element per pending shard: ``Create(shard indices) -> Reshuffle -> ParDo(_ExtractShard)``.
Each worker rebuilds the frozen backbone once in ``DoFn.setup`` from the same settings as the
driver (and checks its fingerprint), re-reads the source (and checks its fingerprint), runs the
local extraction code (:class:`dfl_tf.extraction.core.ShardRunner`) on the shard's sample range and
writes the shard file and its ``.parts/`` sidecar through a temporary name and a rename. The
driver then writes ``manifest.json`` from the sidecars exactly as a local run does. A shard is
therefore byte-for-byte the shard a local run writes, a run resumes where any earlier run (local
or Beam) stopped, and a retried element rewrites the same bytes.

Limits: ``--out`` and the sample files must be a filesystem path that the driver and every worker
see at the same path (local disk for the DirectRunner; NFS, Filestore or a GCS FUSE mount on a
cluster). ``gs://`` / ``s3://`` output is refused: the shard writer and sidecars use local file
operations (``os.replace``), not ``tf.io.gfile``.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from dfl_tf.runtime.locks import URL
from dfl_tf.errors import DflError
from dfl_tf.options import ExtractOptions, takes_options

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _quiet_import():
    """Import Beam without letting its import-time ``logging.warning`` (about optional BigQuery
    clients) install a stderr handler on the root logger."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        import apache_beam
    finally:
        if guard is not None:
            root.removeHandler(guard)
    return apache_beam


try:
    beam = _quiet_import()
    _IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - depends on the environment
    beam, _IMPORT_ERROR = None, _exc


def _import_beam():
    if beam is None:
        raise DflError(f"--runner beam needs Apache Beam: pip install 'dfl_tf[beam]' ({_IMPORT_ERROR})")
    return beam


def parse_beam_options(beam_options: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """``KEY=VALUE`` pairs (or a mapping, from a YAML config) -> ``--KEY=VALUE`` Beam flags.

    Keys are checked against every standard Beam pipeline option (runner, project, region,
    temp_location, flink_master, environment_type, direct_num_workers, ...) and values against
    their types, so a typo is a one-line :class:`DflError` instead of a silently ignored flag.
    """
    if beam_options is None:
        return []
    if isinstance(beam_options, str):
        beam_options = [beam_options]
    if isinstance(beam_options, Mapping):
        pairs = [(str(k), v) for k, v in beam_options.items()]
    else:
        pairs = []
        for item in beam_options:
            item = str(item)
            key, sep, value = item.partition("=")
            if not sep:
                raise DflError(f"--beam-option '{item}': expected KEY=VALUE (e.g. runner=DataflowRunner)")
            pairs.append((key, value))
    parser = _beam_parser()
    flags = []
    for key, value in pairs:
        key = key.strip()
        key = key[2:] if key.startswith("--") else key
        if not _KEY.match(key):
            raise DflError(f"--beam-option '{key}={value}': '{key}' is not an option name (letters, digits, _)")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        action = _action(parser, key)
        if action is not None and action.nargs == 0:  # on/off flags: save_main_session=true, streaming=false
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise DflError(f"--beam-option {key}: an on/off flag takes true or false (got '{text}')")
            if text.lower() in ("true", "1", "yes"):
                flags.append(f"--{key}")
            continue
        flags.append(f"--{key}={text}")
    _check_flags(parser, flags)
    return flags


def _beam_parser() -> argparse.ArgumentParser | None:
    """A parser holding every standard Beam pipeline option (None where Beam's internals moved)."""
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    try:
        from apache_beam.options.pipeline_options import _BeamArgumentParser

        parser = _BeamArgumentParser(allow_abbrev=False, exit_on_error=False, add_help=False)
        for cls in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
            cls._add_argparse_args(parser)  # noqa: SLF001 - how Beam itself collects its options
    except Exception:  # pragma: no cover - skip the checks, Beam then warns about unknown flags itself
        return None
    return parser


def _action(parser: argparse.ArgumentParser | None, key: str) -> argparse.Action | None:
    if parser is None:
        return None
    return next((a for a in parser._actions if f"--{key}" in a.option_strings), None)  # noqa: SLF001


def _check_flags(parser: argparse.ArgumentParser | None, flags: list[str]) -> None:
    if parser is None:
        return
    known = sorted(o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--"))  # noqa: SLF001
    try:
        _, unknown = parser.parse_known_args(flags)
    except argparse.ArgumentError as exc:
        raise DflError(f"--beam-option: {exc}") from None
    except SystemExit:
        raise DflError(f"--beam-option: invalid value in {' '.join(flags)}") from None
    for flag in unknown:
        key = flag[2:].partition("=")[0]
        close = difflib.get_close_matches(key, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DflError(f"--beam-option: unknown Beam pipeline option '{key}'{hint}")


_WORKER_LOGGERS = ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker")


class _DropDflErrors(logging.Filter):
    """In-process runners log a failing DoFn's traceback before re-raising it; a DflError (bad
    input, mismatched worker) is re-raised to the caller as its one-line message instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DflError))


class _NoBar:
    def update(self, n: int) -> None:
        pass


class _ExtractShard(beam.DoFn if beam is not None else object):
    """Embeds one shard per element; the backbone is built once per DoFn instance (``setup``)."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        self.runner = None

    def setup(self) -> None:
        from dfl_tf.data.sources import load_source
        from dfl_tf.runtime.devices import resolve_strategy
        from dfl_tf.runtime.devices import scope as strategy_scope
        from dfl_tf.extraction.core import ShardRunner, build_backbone
        from dfl_tf.options import ExtractOptions

        job = self.job
        options = ExtractOptions(**job["options"])
        samples = load_source(job["source"], split=job["split"], classes=job["classes"])
        strategy = resolve_strategy(options.devices)
        with strategy_scope(strategy):  # load_backbone seeds and isolates its own build
            bb = build_backbone(options)
        if bb.fingerprint != job["fingerprint"]:
            raise DflError(f"worker built backbone {bb.name} with fingerprint {bb.fingerprint[:12]}, "
                           f"not the driver's {job['fingerprint'][:12]} (weights file differs on the worker?)")
        if samples.fingerprint() != job["source_fingerprint"]:
            raise DflError(f"worker read source {job['source']} differently from the driver "
                           "(paths must be the same on every worker)")
        self.n, self.size = len(samples.samples), options.shard_size
        self.runner = ShardRunner(bb, options, samples, strategy, plan=job["plan"])
        self.counter = beam.metrics.Metrics.counter("dfl_extract", "samples")

    def process(self, index: int):
        from dfl_tf.extraction.core import write_part

        start, stop = index * self.size, min(self.n, (index + 1) * self.size)
        records, labels, skipped, passed = self.runner.run(range(start, stop), _NoBar())
        write_part(Path(self.job["out"]), index, self.job["names"][index], records, labels, skipped, passed)
        self.counter.inc(stop - start)
        yield index


@takes_options()
def extract_beam(source: str | Path, out: str | Path, *, options: ExtractOptions | None = None,
                 beam_options: Sequence[str] | Mapping[str, Any] | None = None, overwrite: bool = False,
                 split: str | None = None, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`dfl_tf.extract` as a Beam pipeline: same arguments, same shards and manifest.

    ``options`` (or its fields as keyword arguments), ``overwrite``, ``split``, ``classes``: as
    for :func:`dfl_tf.extract`; every worker builds the backbone itself (no pre-built model).
    ``beam_options``: ``KEY=VALUE`` pipeline options (``runner=DataflowRunner``,
    ``direct_num_workers=2``, ...); without ``runner`` Beam's DirectRunner runs locally.
    Progress is Beam's ``dfl_extract/samples`` counter.
    """
    import dataclasses

    from dfl_tf.data.sources import load_source, refuse_unreadable
    from dfl_tf.extraction.core import build_backbone, open_run, part_path

    flags = parse_beam_options(beam_options)
    if URL.match(str(out)):
        raise DflError(f"--runner beam writes --out through the local filesystem; {out} is not supported "
                       "(use a path every worker mounts, e.g. an NFS or GCS FUSE mount)")
    samples = load_source(source, split=split, classes=classes)
    refuse_unreadable(samples, options.skip_bad)  # before anything is written
    bb = build_backbone(options)
    run = open_run(out, options, bb, samples, split, overwrite)
    if run.pending:
        job = {
            "source": str(source), "split": split, "classes": list(classes) if classes is not None else None,
            "options": dataclasses.asdict(options), "fingerprint": bb.fingerprint,
            "source_fingerprint": samples.fingerprint(), "out": str(run.out.resolve()), "names": run.names,
            "plan": run.plan,  # the driver's read plan, bound to the source: built once
        }
        del bb  # the driver only needed its fingerprint and description
        _run_pipeline(job, run.pending, flags)
    missing = [name for i, name in enumerate(run.names) if not part_path(run.out, i).exists()]
    if missing:
        raise DflError(f"the Beam pipeline finished without writing {len(missing)} shard(s), e.g. {missing[0]} "
                       f"(is {out} shared with the workers?)")
    return run.finish()


def _run_pipeline(job: dict[str, Any], pending: list[int], flags: list[str]) -> None:
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(flags)
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "shard indices" >> beam.Create(pending)
         | "spread" >> beam.Reshuffle()
         | "extract shards" >> beam.ParDo(_ExtractShard(job)))
    quiet = _DropDflErrors()
    loggers = [logging.getLogger(name) for name in _WORKER_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise DflError(f"the Beam pipeline ended in state {state}")
