"""Extraction as an Apache Beam pipeline (``dfl extract --runner beam``).

One Beam element per pending shard: ``Create(shard indices) -> Reshuffle -> ParDo(_ExtractShard)``.
Each worker rebuilds the frozen backbone once in ``DoFn.setup`` from the same settings as the
driver (and checks its fingerprint), re-reads the source (and checks its fingerprint), runs the
local extraction code (:class:`dfl_tf.extraction._ShardRunner`) on the shard's sample range and
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
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from dfl_tf.errors import DflError

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
        from dfl_tf.backbones.registry import load_backbone
        from dfl_tf.data.sources import SlideRead, load_source
        from dfl_tf.data.views import parse_views
        from dfl_tf.distribute import resolve_strategy
        from dfl_tf.distribute import scope as strategy_scope
        from dfl_tf.extraction import _ShardRunner

        job = self.job
        samples = load_source(job["source"], split=job["split"], classes=job["classes"])
        strategy = resolve_strategy(job["devices"])
        with strategy_scope(strategy):  # load_backbone seeds and isolates its own build
            bb = load_backbone(job["backbone"], weights=job["weights"], input_size=job["input_size"],
                               precision=job["precision"])
        if bb.fingerprint != job["fingerprint"]:
            raise DflError(f"worker built backbone {bb.name} with fingerprint {bb.fingerprint[:12]}, "
                           f"not the driver's {job['fingerprint'][:12]} (weights file differs on the worker?)")
        if samples.fingerprint() != job["source_fingerprint"]:
            raise DflError(f"worker read source {job['source']} differently from the driver "
                           "(paths must be the same on every worker)")
        self.n = len(samples.samples)
        self.runner = _ShardRunner(bb, parse_views(job["views"]), samples, job["fit"], job["pad_to"],
                                   job["batch_size"], SlideRead(**job["slide_read"]), job["workers"], job["jit"],
                                   job["skip_bad"], strategy)
        self.counter = beam.metrics.Metrics.counter("dfl_extract", "samples")

    def process(self, index: int):
        from dfl_tf._io import atomic_write_json
        from dfl_tf.extraction import _part_path
        from dfl_tf.store.shards import write_shard

        job, out = self.job, Path(self.job["out"])
        size = job["shard_size"]
        start, stop = index * size, min(self.n, (index + 1) * size)
        records, labels, skipped = self.runner.run(range(start, stop), job["dtype"], _NoBar())
        name = job["names"][index]
        count, digest = write_shard(out / name, records)
        atomic_write_json(_part_path(out, index), {"file": name, "records": count, "sha256": digest,
                                                   "labels": labels, "skipped": skipped})
        self.counter.inc(stop - start)
        yield index


def extract_beam(
    source: str | Path,
    out: str | Path,
    backbone: str = "resnet50",
    weights: str | None = "default",
    views: str | Sequence[str] = "x20:rgb",
    input_size: int | None = None,
    fit: str = "scale",
    pad_to: int | None = None,
    batch_size: int = 32,
    precision: str = "float32",
    dtype: str = "float16",
    shard_size: int = 1024,
    skip_bad: bool = False,
    overwrite: bool = False,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    mpp: float = 0.5,
    patch_size: int = 256,
    slide_mpp: float | None = None,
    workers: int | None = None,
    jit: bool = False,
    progress: bool = True,
    model: Any = None,
    devices: str | Sequence[str] | None = None,
    beam_options: Sequence[str] | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`dfl_tf.extract` as a Beam pipeline: same arguments, same shards and manifest.

    ``beam_options``: ``KEY=VALUE`` pipeline options (``runner=DataflowRunner``,
    ``direct_num_workers=2``, ...); without ``runner`` Beam's DirectRunner runs locally.
    ``progress`` is ignored (Beam reports a ``dfl_extract/samples`` counter instead).
    """
    from dfl_tf._io import atomic_write_json
    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.data.slides import parse_magnification
    from dfl_tf.data.sources import SlideRead, load_source
    from dfl_tf.data.views import views_to_strings
    from dfl_tf.extraction import _manifest, _part_path, _prepare_out, _settings, check_options
    from dfl_tf.store.manifest import MANIFEST

    flags = parse_beam_options(beam_options)
    if model is not None:
        raise DflError("--runner beam rebuilds the backbone on every worker: pass backbone/weights/input_size/"
                       "precision instead of a built model")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(out)):
        raise DflError(f"--runner beam writes --out through the local filesystem; {out} is not supported "
                       "(use a path every worker mounts, e.g. an NFS or GCS FUSE mount)")
    view_list = check_options(views, fit, dtype, batch_size, shard_size)
    samples = load_source(source, split=split, classes=classes)
    bb = load_backbone(backbone, weights=weights, input_size=input_size, precision=precision)
    slide_read = SlideRead(mpp=parse_magnification(mpp), patch_size=int(patch_size), slide_mpp=slide_mpp)

    out = Path(out)
    settings = _settings(bb, view_list, dtype, fit, pad_to, shard_size, samples, split, slide_read)
    run = _prepare_out(out, settings, overwrite)

    n = len(samples.samples)
    n_shards = math.ceil(n / shard_size)
    names = [f"shard-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
    pending = [i for i in range(n_shards) if not (_part_path(out, i).exists() and (out / names[i]).exists())]
    if pending:
        job = {
            "source": str(source), "split": split, "classes": list(classes) if classes is not None else None,
            "backbone": str(backbone), "weights": weights, "input_size": input_size, "precision": precision,
            "devices": devices, "fingerprint": bb.fingerprint, "source_fingerprint": samples.fingerprint(),
            "views": views_to_strings(view_list), "fit": fit, "pad_to": pad_to, "batch_size": batch_size,
            "dtype": dtype, "shard_size": shard_size, "skip_bad": skip_bad, "workers": workers, "jit": jit,
            "slide_read": {"mpp": slide_read.mpp, "patch_size": slide_read.patch_size,
                           "slide_mpp": slide_read.slide_mpp},
            "out": str(out.resolve()), "names": names,
        }
        del bb  # the driver only needed its fingerprint and description
        _run_pipeline(job, pending, flags)
    missing = [names[i] for i in range(n_shards) if not _part_path(out, i).exists()]
    if missing:
        raise DflError(f"the Beam pipeline finished without writing {len(missing)} shard(s), e.g. {missing[0]} "
                       f"(is {out} shared with the workers?)")
    manifest = _manifest(out, n_shards, run, settings, samples)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


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
