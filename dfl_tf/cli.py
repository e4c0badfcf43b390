"""The ``dfl`` command line: thin click wrappers, one per public function."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from dfl_tf.errors import DflError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Group(click.Group):
    """Turns DflError into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DflError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="dfl_tf")
def main() -> None:
    """dfl: deep feature learning for histopathology (one frozen backbone, many small heads)."""


def _given(ctx: click.Context, **kwargs: Any) -> dict[str, Any]:
    """The options the user actually set (so config-file values are not overridden by defaults)."""
    return {k: v for k, v in kwargs.items()
            if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)}


def _run(func, ctx: click.Context, command: str, config: str | None, fixed: dict[str, Any], **options: Any):
    from dfl_tf.config import merge

    kwargs = merge(func, config, command, _given(ctx, **options))
    kwargs.update(fixed)
    return func(**kwargs)


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones_cmd(as_json: bool) -> None:
    """List the registered backbones, their weights, licences and offline availability."""
    from dfl_tf.backbones.registry import describe_backbones

    rows = describe_backbones()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<18} {'input':>5} {'dim':>5}  {'weights (offline now: yes/no)':<44} licence")
    for row in rows:
        sources = ", ".join(f"{k}({'yes' if v else 'no'})" for k, v in row["offline"].items())
        licences = "; ".join(f"{k}: {v}" for k, v in row["licences"].items()) or "-"
        click.echo(f"{row['name']:<18} {row['input_size']:>5} {row['dim']:>5}  {sources:<44} {licences}")
    click.echo("Any SavedModel directory also works as --backbone PATH (keras.layers.TFSMLayer).")


@main.command("extract")
@click.argument("source", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output directory (shards + manifest.json).")
@click.option("--backbone", default="resnet50", show_default=True, help="Registry name or SavedModel directory.")
@click.option("--weights", default="default", show_default=True, help="imagenet | none | a source name | a local file.")
@click.option("--views", default="x20:rgb", show_default=True, help="Comma-separated: x20:rgb,x20:gray,x5:rgb,x5:gray.")
@click.option("--input-size", type=int, default=None, help="Backbone input side in px (default: the backbone's).")
@click.option("--fit", type=click.Choice(["scale", "pad", "pad-scale"]), default="scale", show_default=True)
@click.option("--pad-to", type=int, default=None, help="Square side to pad to before scaling (pad-scale).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "mixed_float16"]), default="float32",
              show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the embeddings.")
@click.option("--shard-size", type=int, default=1024, show_default=True, help="Records per shard.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable samples and list them in the manifest.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming.")
@click.option("--split", default=None, help="Only CSV rows whose 'split' column equals this.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Slides: um/px of the x20 patch.")
@click.option("--patch-size", type=int, default=256, show_default=True, help="Slides: patch side in px at --mpp.")
@click.option("--slide-mpp", type=float, default=None, help="Slides: level-0 um/px for slides without metadata.")
@click.option("--workers", type=int, default=None, help="Parallel decode/read calls (default: auto).")
@click.option("--jit", is_flag=True, help="Compile the backbone with XLA.")
@click.option("--progress/--no-progress", default=True)
@click.option("--config", type=click.Path(), default=None, help="YAML file of these options (flags win).")
@click.pass_context
def extract_cmd(ctx: click.Context, source: str, out: str, config: str | None, **options: Any) -> None:
    """Embed every sample of SOURCE (image folder, CSV manifest or slide coordinates CSV)."""
    from dfl_tf.extraction import extract

    manifest = _run(extract, ctx, "extract", config, {"source": source, "out": out}, **options)
    click.echo(f"{manifest['num_records']} records, dim {manifest['dim']}, {len(manifest['shards'])} shards, "
               f"{len(manifest['skipped'])} skipped -> {out}")
