"""The ``dfl`` command line: thin click wrappers, one per public function."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from dfl_tf.runtime.tflog import import_tensorflow, set_log_env
from dfl_tf.backbones.converter import ArchChoice
from dfl_tf.errors import DflError
from dfl_tf.options import FINETUNE_FIELDS, SELECT_FIELDS, FinetuneOptions, SelectOptions, TrainOptions

set_log_env(verbose=False)  # before anything imports TensorFlow; `dfl --verbose` changes it
#: Commands that never touch TensorFlow (not imported for them).
_NO_TENSORFLOW = ("tile",)


class _Command(click.Command):
    """Imports TensorFlow once, before the command runs (after its options are parsed, so
    ``--help`` stays fast): its start-up lines reach stderr only with ``dfl --verbose``."""

    def invoke(self, ctx: click.Context) -> Any:
        verbose = bool(ctx.find_root().params.get("verbose"))
        if not verbose:  # tifffile logs what it finds wrong in a corrupt slide: dfl's one-line error says it
            import logging

            logging.getLogger("tifffile").setLevel(logging.CRITICAL)
        if self.name not in _NO_TENSORFLOW:
            import_tensorflow(verbose)
        return super().invoke(ctx)


class _Group(click.Group):
    command_class = _Command
    """Turns DflError into a one-line message and exit status 2; SIGINT/SIGTERM into one line and 130/143."""

    def invoke(self, ctx: click.Context) -> Any:
        from dfl_tf.runtime.signals import interruptible, interrupted, masked_interruption

        def exit_interrupted(exc: KeyboardInterrupt) -> None:
            message, code = interrupted(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(code)

        record: list[int] = []
        try:
            with interruptible() as record:  # SIGTERM and Ctrl-C clean up, then one line
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            exit_interrupted(exc)
        except Exception as exc:  # noqa: BLE001 - the kinds below are handled, the rest re-raised
            signal_exc = masked_interruption(exc, record)
            if signal_exc is not None:  # the signal came first; the error is its side effect
                exit_interrupted(signal_exc)
            if isinstance(exc, DflError):
                click.echo(f"error: {exc}", err=True)
                sys.exit(2)
            if isinstance(exc, OSError):  # a full or failing disk anywhere else: one line too, nothing half-written
                from dfl_tf.runtime.files import WRITE_ERRNOS, write_error

                if exc.errno not in WRITE_ERRNOS:
                    raise
                click.echo(f"error: {write_error(exc.filename or 'output', exc)}", err=True)
                sys.exit(2)
            if type(exc).__name__ != "DataLossError":
                raise
            detail = " ".join(str(getattr(exc, "message", exc)).split())[:200]
            click.echo(f"error: corrupt data in a shard ({detail}); it changed after its last check: delete the "
                       "embedding directory's .verified.json and rerun to have the shard named", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("--verbose", is_flag=True, help="Show TensorFlow's start-up lines and logs on stderr.")
@click.version_option(package_name="dfl_tf")
def main(verbose: bool) -> None:
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


def option_flags(fields: tuple[str, ...] | None = None, *, of: type | None = None,
                 exclude: tuple[str, ...] = (), **help: str):
    """Click options for the fields of the options dataclass ``of`` (default
    :class:`~dfl_tf.options.ExtractOptions`) that have a flag: ``fields`` (default: all) but
    ``exclude``, in declaration order, with the dataclass's defaults, types, choices and help texts
    (``help``: per-field replacements). The click default is only shown: :func:`_run` passes the
    flags the user set, so the function's (the dataclass's) defaults apply."""
    from dfl_tf.options import ExtractOptions, cli_fields

    chosen = [f for f in cli_fields(of or ExtractOptions, fields) if f.name not in exclude]

    def decorate(func):
        for f in reversed(chosen):
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            text = help.get(f.name, meta["help"])
            if meta["flag"] and meta["negatable"]:
                func = click.option(f"{flag}/--no-{flag[2:]}", default=f.default, show_default=True,
                                    help=text)(func)
                continue
            if meta["flag"]:
                func = click.option(flag, is_flag=True, help=text)(func)
                continue
            default = f.default if meta["shown"] is None else meta["shown"]
            default = ",".join(default) if isinstance(default, tuple) else default
            kind = click.Choice(list(meta["choices"])) if meta["choices"] else (meta["type"] or str)
            convert = meta["convert"]
            func = click.option(flag, type=kind, default=default, show_default=default is not None, help=text,
                                callback=None if convert is None else lambda c, p, v, f=convert: f(v))(func)
        return func

    return decorate


_PROGRESS = click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")


def _with_config(help: str = "YAML file of these options (flags win)."):
    """``--config FILE.yaml`` and the click context, for a command that runs through :func:`_run`."""

    def decorate(func):
        return click.option("--config", type=click.Path(), default=None, help=help)(click.pass_context(func))

    return decorate


@main.command("backbones")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones_cmd(as_json: bool) -> None:
    """List the registered backbones, their weights, licences and offline availability."""
    from dfl_tf.backbones.registry import describe_backbones

    rows = describe_backbones()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22} {'input':>5} {'dim':>5} {'params':>7}  {'weights (offline now: yes/no)':<30} licence")
    for row in rows:
        sources = ", ".join(f"{k}({'yes' if v else 'no'})" for k, v in row["offline"].items())
        licences = "; ".join(f"{k}: {'[gated] ' if row['gated'].get(k) else ''}{v}"
                             for k, v in row["licences"].items()) or "-"
        count = row.get("params")
        params = "-" if not count else f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count / 1e3:.1f}k"
        click.echo(f"{row['name']:<22} {row['input_size']:>5} {row['dim']:>5} {params:>7}  {sources:<30} {licences}")
        details = [f"embedding: {row['embedding']}", f"preprocessing: {row.get('preprocessing') or '-'}"]
        details += [f"{k}: {url}" for k, url in row["sources"].items() if url]
        click.echo("    " + "; ".join(details))
    click.echo("Any SavedModel directory also works as --backbone PATH (keras.layers.TFSMLayer).")


@main.command("extract")
@click.argument("source", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output directory (shards + manifest.json).")
@option_flags()
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming (replaces only an embedding store).")
@click.option("--split", default=None, help="Only CSV rows whose 'split' column equals this.")
@click.option("--runner", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="beam: run as an Apache Beam pipeline (pip install 'dfl_tf[beam]'), one element per shard.")
@click.option("--beam-option", "beam_options", multiple=True, metavar="KEY=VALUE",
              help="Beam pipeline option, repeatable: runner=DataflowRunner, project=..., direct_num_workers=2.")
@_PROGRESS
@_with_config()
def extract_cmd(ctx: click.Context, source: str, out: str, config: str | None, **options: Any) -> None:
    """Embed every sample of SOURCE (image folder, CSV manifest or slide coordinates CSV)."""
    from dfl_tf.extraction.local import extract

    manifest = _run(extract, ctx, "extract", config, {"source": source, "out": out}, **options)
    click.echo(f"{manifest['num_records']} records, dim {manifest['dim']}, {len(manifest['shards'])} shards, "
               f"{len(manifest['skipped'])} skipped -> {out}")
    if (stain := manifest.get("stain") or {}).get("passed_through"):
        click.echo("note: {passed_through} sample(s) passed through {method} stain normalisation unchanged (near-white"
                   " or near-black, e.g. {passed_through_ids[0]}; listed in manifest.json under stain)".format(**stain))


@main.command("fuse")
@click.argument("stores", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Fused embedding directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing embedding store at --out (never an input).")
def fuse_cmd(stores: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Join embedding stores of the same samples (one per backbone) into one store: each record's
    embedding is the concatenation of its parts, in the order given."""
    from dfl_tf.store.fuse import fuse_stores, part_labels

    m = fuse_stores(list(stores), out, overwrite=overwrite)
    parts = " + ".join(f"{label} ({p['dim']})" for label, p in zip(part_labels(m["parts"]), m["parts"]))
    click.echo(f"{m['num_records']} records, dim {m['dim']} = {parts}, {len(m['shards'])} shards -> {out}")


@main.command("import-weights")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", required=True, type=ArchChoice(),
              help="Registry name of the checkpoint's backbone (the registered entries with a converter; the "
                   "ResNet-50 names share one layout; ViT names read .safetensors too).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Destination, must end in .weights.h5.")
@click.option("--input-size", type=int, default=None, help="Side of the model built for the conversion.")
def import_weights_cmd(checkpoint: str, arch: str, out: str, input_size: int | None) -> None:
    """Convert a CHECKPOINT (torch or .safetensors: torchvision, DINO, SwAV, EfficientNet-Lite0, ViTs) to Keras.

    No torch needed. Use the result with --weights OUT.weights.h5.
    """
    from dfl_tf.backbones.converter import import_weights

    path = import_weights(checkpoint, arch, out, input_size=input_size)
    click.echo(f"wrote {path} (use --backbone {arch} --weights {path})")


@main.command("train")
@click.argument("emb_dir", type=click.Path())
@click.option("--val", default=None, type=click.Path(), help="Validation embedding directory (selection, early "
              "stopping, threshold, metrics.json).")
@click.option("--out", required=True, type=click.Path(), help="Head directory to write.")
@option_flags(of=TrainOptions, exclude=("devices",))
@click.option("--logdir", type=click.Path(), default=None, help="TensorBoard directory (default HEAD_DIR/logs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing head directory (never an input or another "
              "folder).")
@option_flags(("devices",), of=TrainOptions)
@_PROGRESS
@_with_config("YAML file of these options, may hold an 'augment:' list (flags win).")
def train_cmd(ctx: click.Context, emb_dir: str, out: str, config: str | None, **options: Any) -> None:
    """Train a head on the embeddings in EMB_DIR and write HEAD_DIR (--out)."""
    from dfl_tf.heads.train import train_head

    summary = _run(train_head, ctx, "train", config, {"train": emb_dir, "out": out}, **options)
    m = summary["metrics"]
    if summary.get("kind") == "slide":
        auc = "-" if m["roc_auc_macro_ovr"] is None else f"{m['roc_auc_macro_ovr']:.4f}"
        probe = m["linear_probe"]
        probe_auc = "-" if probe["roc_auc_macro_ovr"] is None else f"{probe['roc_auc_macro_ovr']:.4f}"
        click.echo(f"slide head ({summary['aggregator']}), {summary['train_slides']} training slides, best epoch "
                   f"{summary['best_epoch']}/{summary['epochs_run']}: {m['split']} balanced accuracy "
                   f"{m['balanced_accuracy']:.4f}, ROC-AUC {auc}; mean-pool linear probe {probe['balanced_accuracy']:.4f}, "
                   f"ROC-AUC {probe_auc} -> {summary['out']}")
        return
    line = (f"best epoch {summary['best_epoch']}/{summary['epochs_run']}: {m['split']} balanced accuracy "
            f"{m['balanced_accuracy']:.4f}")
    if summary["threshold"] is not None:
        line += f", threshold {summary['threshold']:.4f}"
    selection = summary.get("selection") or {}
    if selection.get("performed"):
        how = (f"selection on validation ({selection['validation_records']} records)"
               if selection.get("method") == "validation" else "cross-validation")
        line += f"; {how} chose {_describe_choice(selection['choice'])}"
    if (summary.get("linear_probe") or {}).get("C") is not None:
        line += f"; linear probe C {summary['linear_probe']['C']:g}"
    click.echo(f"{line} -> {summary['out']}")


def _value(v: Any) -> str:
    """A setting for a summary line: numbers as ``:g``, anything else (strings, None) as text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:g}"
    return "none" if v is None else str(v)


def _describe_choice(choice: dict[str, Any]) -> str:
    """``hidden 0, weight_decay 0.0001, noise 0.1`` or ``the linear probe (C 0.01)``."""
    if choice.get("model") == "linear probe":
        rest = ", ".join(f"{k} {_value(v)}" for k, v in choice.items() if k != "model")
        return f"the linear probe ({rest})" if rest else "the linear probe"
    return ", ".join(f"{k} {_value(v)}" for k, v in choice.items())


@main.command("evaluate")
@click.argument("head_dir", type=click.Path())
@click.argument("emb_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="Report directory (metrics.json, report.md, plots).")
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Prediction batch size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report directory (never the head's).")
@click.option("--slide-labels", type=click.Path(), default=None,
              help="Slide heads: slide label CSV slide,label (writes predictions.csv per slide and attention.csv).")
@_with_config()
def evaluate_cmd(ctx: click.Context, head_dir: str, emb_dir: str, config: str | None, **options: Any) -> None:
    """Evaluate the head in HEAD_DIR on the labeled records of EMB_DIR."""
    from dfl_tf.heads.evaluate import evaluate

    m = _run(evaluate, ctx, "evaluate", config, {"head": head_dir, "emb": emb_dir}, **options)
    if m.get("level") == "slide":
        auc = "-" if m["roc_auc_macro_ovr"] is None else f"{m['roc_auc_macro_ovr']:.4f}"
        click.echo(f"{m['num_records']} slides: balanced accuracy {m['balanced_accuracy']:.4f}, ROC-AUC {auc}"
                   + (f" -> {options['out']}" if options.get("out") else ""))
        return
    auc = "-" if m["roc_auc_macro_ovr"] is None else f"{m['roc_auc_macro_ovr']:.4f}"
    click.echo(f"{m['num_records']} records: balanced accuracy {m['balanced_accuracy']:.4f}, "
               f"macro F1 {m['f1_macro']:.4f}, kappa {m['cohen_kappa']:.4f}, ROC-AUC {auc}"
               + (f" -> {options['out']}" if options.get("out") else ""))


@main.command("tile")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", "out_csv", required=True, type=click.Path(), help="Coordinates CSV to write.")
@click.option("--mpp", default="0.5", show_default=True, help="Target um/px (0.5) or objective power (20x).")
@click.option("--size", type=int, default=256, show_default=True, help="Tile side in px at --mpp.")
@click.option("--min-tissue", type=float, default=0.5, show_default=True, help="Minimum tissue fraction per tile.")
@click.option("--overlap", type=float, default=0.0, show_default=True, help="Fraction of overlap between tiles.")
@click.option("--slide-mpp", default=None, help="Level-0 um/px (0.5) or objective power (20x) for slides without "
              "metadata.")
@click.option("--thumbnails/--no-thumbnails", default=True, help="Write a PNG per slide with mask and grid.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tile CSV.")
def tile_cmd(slides: tuple[str, ...], out_csv: str, mpp: str, **options: Any) -> None:
    """Detect tissue on SLIDES and write a grid of tile centres (a slide coordinates source)."""
    from dfl_tf.data.slides import parse_magnification
    from dfl_tf.data.tissue import tile

    summary = tile(list(slides), out_csv, mpp=parse_magnification(mpp), **options)
    for s in summary["slides"]:
        click.echo(f"{s['slide']}: {s['tiles']} tiles, tissue {s['tissue_fraction']:.0%}")
    click.echo(f"{summary['tiles']} tiles -> {summary['csv']}")


@main.command("export")
@click.argument("heads", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Model directory, e.g. saved_models/NAME.")
@click.option("--version", type=int, default=None, help="Version number (default: the next free one).")
@click.option("--name", "names", multiple=True, help="Task name per head, in order (default: folder names).")
@click.option("--backbone-weights", default=None, help="Backbone weights, if the recorded source moved.")
@click.option("--parity-data", type=click.Path(), default=None, help="Embedding dir for the parity check.")
@click.option("--parity-samples", type=int, default=4, show_default=True, help="0 skips the parity check.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs diff on probabilities in the parity check (default by the backbone's precision: "
              "1e-4 float32, 2e-3 mixed_float16, 2e-2 bfloat16).")
@click.option("--max-image-pixels", type=int, default=4096 * 4096, show_default=True,
              help="Serving refuses images whose header declares more pixels (width x height), before decoding.")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Serving refuses larger batches (batching.config's max_batch_size is 64).")
def export_cmd(heads: tuple[str, ...], out: str, names: tuple[str, ...], **options: Any) -> None:
    """Export HEADS with their backbone as one SavedModel (saved_models/NAME/VERSION)."""
    from dfl_tf.serve.export import export_model

    info = export_model(list(heads), out, names=list(names) or None, **options)
    parity = info["parity"]
    detail = "skipped" if parity.get("skipped") else (
        f"max |dp| {parity['max_abs_diff_probabilities']:.1e}, embeddings vs stored "
        f"{parity['max_rel_diff_embedding_vs_stored']:.1e} rel.")
    click.echo(f"exported {', '.join(h['task'] for h in info['heads'])} -> {info['path']} (parity: {detail})")


@main.command("predict")
@click.argument("model", type=click.Path())
@click.argument("input", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Predictions CSV.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per model call.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable samples (listed in OUT.skipped.csv).")
@click.option("--mpp", default=None,
              help="Slides: um/px (0.5) or 20x to read at (default: the mpp the heads were trained at; another "
              "value is refused).")
@click.option("--patch-size", type=int, default=None,
              help="Slides: patch side (default: the size the heads were trained at; another value is refused).")
@click.option("--slide-mpp", default=None, help="Slides: level-0 um/px (0.5) or objective power (20x) for slides "
              "without metadata.")
@click.option("--overwrite", is_flag=True, help="Replace an existing predictions CSV.")
@_PROGRESS
def predict_cmd(model: str, input: str, out: str, **options: Any) -> None:
    """Predict INPUT (image folder, CSV manifest or slide coordinates CSV) with an exported MODEL."""
    from dfl_tf.serve.predict import predict

    summary = predict(model, input, out, **options)
    click.echo(f"{summary['predicted']} predictions, {len(summary['skipped'])} skipped -> {summary['out']}")


@main.command("heatmap")
@click.argument("model", type=click.Path())
@click.argument("slide", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--mpp", default=None,
              help="um/px (0.5) or 20x to tile at (default: the mpp the heads were trained at; needed for models "
              "trained on image patches).")
@click.option("--size", type=int, default=None,
              help="Tile side in px (default: the patch size the heads were trained at).")
@click.option("--min-tissue", type=float, default=0.5, show_default=True, help="Minimum tissue fraction per tile.")
@click.option("--overlap", type=float, default=0.0, show_default=True, help="Fraction of overlap between tiles.")
@click.option("--slide-mpp", default=None, help="Level-0 um/px (0.5) or objective power (20x) for slides without "
              "metadata.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="GeoJSON: min probability.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Tiles per model call.")
@click.option("--overwrite", is_flag=True, help="Replace an existing heatmap folder.")
@_PROGRESS
def heatmap_cmd(model: str, slide: str, out: str, **options: Any) -> None:
    """Tile SLIDE, predict each tile with MODEL, write heatmaps, predictions and GeoJSON to OUT."""
    from dfl_tf.serve.heatmap import heatmap

    summary = heatmap(model, slide, out, **options)
    click.echo(f"{summary['tiles']} tiles -> {out} ({len(summary['outputs'])} files)")


#: select's flags before --cache-dir (the rest follow it)
_SELECT_HEAD = ("seeds", "weights", "val_fraction", "epochs", "noise", "lr", "head_batch_size", "loss", "seed",
                "split_seed", "control")


@main.command("select")
@click.argument("dataset", type=click.Path())
@click.option("--backbones", required=True, help="Comma-separated registry names or SavedModel directories.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (table.md, results.*, maps.png).")
@option_flags(_SELECT_HEAD, of=SelectOptions)
@click.option("--cache-dir", type=click.Path(), default=None, help="Extraction cache (default OUT/cache).")
@option_flags(of=SelectOptions, exclude=_SELECT_HEAD)
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier selection in OUT (its cache is "
              "kept).")
@option_flags(SELECT_FIELDS, input_size="Backbone input side in px (default: each backbone's).",
              batch_size="Extraction batch size.")
@_PROGRESS
@_with_config()
def select_cmd(ctx: click.Context, dataset: str, out: str, config: str | None, **options: Any) -> None:
    """Rank frozen backbones on DATASET with linear heads (extract once, cached; table.md, maps.png)."""
    from dfl_tf.select.protocol import select_backbones

    res = _run(select_backbones, ctx, "select", config, {"dataset": dataset, "out": out}, **options)
    for row in res["results"]:
        ba = row["balanced_accuracy"]
        score = "-" if ba["mean"] is None else f"{ba['mean']:.4f} +- {ba['std'] or 0:.4f}"
        click.echo(f"{row['rank']:>3}. {row['backbone']}: balanced accuracy {score}")
    click.echo(f"best: {res['best']} -> {out}/table.md")


#: finetune's flags before --val (the rest follow it)
_FINETUNE_HEAD = ("epochs", "lr", "batch_size", "seed")


@main.command("finetune")
@click.argument("dataset", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output directory (model.keras, metrics.json).")
@option_flags(FINETUNE_FIELDS, views="One view (multi-view is not supported).")
@option_flags(_FINETUNE_HEAD, of=FinetuneOptions)
@click.option("--val", default=None, type=click.Path(), help="Validation source (default: a split of DATASET).")
@option_flags(of=FinetuneOptions, exclude=_FINETUNE_HEAD)
@click.option("--overwrite", is_flag=True, help="Replace an existing fine-tuning folder (never an input or "
              "another folder).")
@_PROGRESS
@_with_config()
def finetune_cmd(ctx: click.Context, dataset: str, out: str, config: str | None, **options: Any) -> None:
    """Baseline: fine-tune the backbone end to end on DATASET (augmentation, focal loss)."""
    from dfl_tf.baselines.finetune import finetune

    m = _run(finetune, ctx, "finetune", config, {"dataset": dataset, "out": out}, **options)
    click.echo(f"best epoch {m['best_epoch']}/{m['epochs_run']}: balanced accuracy {m['balanced_accuracy']:.4f}, "
               f"kappa {m['cohen_kappa']:.4f}, wall {m['wall_seconds']:.1f} s -> {out}")
