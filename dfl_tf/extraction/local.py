"""Embedding extraction: samples -> views -> frozen backbone -> TFRecord shards + manifest.

The pipeline streams (tf.data: parallel decode and view composition, batched backbone calls,
prefetch), so memory stays flat in the number of samples. Shards, resume and the manifest are
:mod:`dfl_tf.extraction.core` (shared with the Beam runner, :mod:`dfl_tf.extraction.beam`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from dfl_tf.backbones.registry import Backbone
from dfl_tf.data.sources import load_source, refuse_unreadable
from dfl_tf.runtime.devices import resolve_strategy
from dfl_tf.runtime.devices import scope as strategy_scope
from dfl_tf.runtime.locks import locks_output
from dfl_tf.runtime.outputs import prepare_out
from dfl_tf.errors import DflError
from dfl_tf.extraction.core import PARTS, ShardRunner, build_backbone, open_run, part_path
from dfl_tf.options import ExtractOptions, takes_options


@takes_options()
@locks_output("extract",  # OUT/.dfl.lock: one run per output directory
              prepare=lambda a: prepare_out(a["out"], "embeddings", (a["source"],), a["overwrite"]))
def extract(
    source: str | Path,
    out: str | Path,
    *,
    options: ExtractOptions | None = None,
    overwrite: bool = False,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    progress: bool = True,
    model: Backbone | None = None,
    runner: str = "local",
    beam_options: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Embed every sample of ``source`` into ``out`` and return the manifest.

    ``source`` is an image folder, an image CSV manifest or a slide coordinates CSV (see
    :mod:`dfl_tf.data.sources`). ``options``: an :class:`~dfl_tf.options.ExtractOptions`
    (backbone, weights, views, input size, fit, batch size, precision, storage dtype, slide
    read, ...: its fields, listed in the signature); they may also be passed as keyword
    arguments (``extract(src, out, backbone="resnet50")``), which override those of ``options``.
    ``split``: only CSV rows of that split; ``classes``: the class list to use. ``model``
    passes an already built backbone (then ``backbone``, ``weights``, ``input_size`` and
    ``precision`` are ignored). ``devices``: mirror the backbone over several devices (see
    :mod:`dfl_tf.runtime.devices`). ``runner="beam"`` runs the same
    extraction as an Apache Beam pipeline with ``beam_options`` (``KEY=VALUE``; see
    :mod:`dfl_tf.extraction.beam`): same shards, same manifest.
    """
    assert options is not None  # resolved by @takes_options
    if runner == "beam":
        from dfl_tf.extraction.beam import extract_beam

        if model is not None:
            raise DflError("--runner beam rebuilds the backbone on every worker: pass backbone/weights/input_size/"
                           "precision instead of a built model")
        return extract_beam(source, out, options=options, beam_options=beam_options, overwrite=overwrite,
                            split=split, classes=classes)
    if runner != "local":
        raise DflError(f"unknown runner '{runner}' (local or beam)")
    if beam_options:
        raise DflError("beam options given without runner='beam' (--runner beam)")
    samples = load_source(source, split=split, classes=classes)
    refuse_unreadable(samples, options.skip_bad)  # before anything is written
    strategy = resolve_strategy(options.devices)
    with strategy_scope(strategy):
        bb = model or build_backbone(options)
    fresh = not (Path(out) / PARTS / "run.json").exists()
    run = open_run(out, options, bb, samples, split, overwrite)
    shard_runner = ShardRunner(bb, options, samples, strategy, plan=run.plan)
    done = run.num_samples - sum(len(run.shard_range(i)) for i in run.pending)
    bar = tqdm(total=run.num_samples, unit="patch", desc="extract", disable=not progress, dynamic_ncols=True,
               initial=done)
    try:
        for i in run.pending:
            run.write(i, *shard_runner.run(run.shard_range(i), bar))
    except BaseException:  # a run that completed no shard leaves no .parts/ behind (nothing to resume)
        if fresh and not any(part_path(run.out, i).exists() for i in range(len(run.names))):
            shutil.rmtree(run.out / PARTS, ignore_errors=True)
        raise
    finally:
        bar.close()
    return run.finish()
