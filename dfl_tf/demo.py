"""The main job on embedded default data: synthetic slide -> tiles -> x20+x5 embeddings ->
head -> evaluation -> SavedModel -> heatmap, with a summary of metrics, times and outputs."""
from __future__ import annotations

import csv
import io
import shlex
import time
from pathlib import Path
from typing import Any

from dfl_tf.runtime.files import atomic_write_json, atomic_write_text
from dfl_tf.config import load_yaml
from dfl_tf.errors import DflError


def make_demo_data(out_dir: str | Path, width: int = 4096, height: int = 3072, mpp: float = 0.5, seed: int = 0
                   ) -> dict[str, Any]:
    """Write ``demo_slide.tiff`` (pyramidal, with mpp) and ``regions.json`` into ``out_dir``."""
    from dfl_tf.data.synthetic import demo_slide_image, make_pyramid_tiff

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, regions = demo_slide_image(width, height, seed=seed)
    slide = make_pyramid_tiff(out_dir / "demo_slide.tiff", image, mpp=mpp, levels=4)
    info = {"slide": str(slide), "mpp": mpp, "width": width, "height": height, "seed": seed, "regions": regions}
    atomic_write_json(out_dir / "regions.json", info)
    return info


def label_tiles(tiles_csv: str | Path, regions: list[dict], out_csv: str | Path, val_fraction: float) -> dict[str, int]:
    """Add label, group and split columns: a region's bottom ``val_fraction`` is the validation set."""
    from dfl_tf.data.synthetic import region_of

    with open(tiles_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out_rows, counts = [], {"train": 0, "val": 0}
    for row in rows:
        region = region_of(regions, float(row["x"]), float(row["y"]))
        if region is None:
            continue
        cut = region["y1"] - val_fraction * (region["y1"] - region["y0"])
        split = "val" if float(row["y"]) >= cut else "train"
        counts[split] += 1
        out_rows.append({**row, "label": region["class"], "group": f"{region['class']}-{split}", "split": split})
    if not counts["train"] or not counts["val"]:
        raise DflError(f"{tiles_csv}: the tiling left no {'train' if not counts['train'] else 'val'} tiles")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(out_rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(out_rows)
    atomic_write_text(out_csv, buffer.getvalue())
    return counts


def _cmd(*parts: Any, **options: Any) -> str:
    words = ["dfl", *map(str, parts)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        words.append(f"--{key.replace('_', '-')}")
        if value is not True:
            words.append(str(value))
    return " ".join(shlex.quote(w) for w in words)


def demo(config: str | Path = "configs/demo.yaml", out: str | Path | None = None,
         export_dir: str | Path | None = None, overrides: dict[str, dict] | None = None,
         progress: bool = True) -> dict[str, Any]:
    """Run the demo pipeline described by ``config``; returns the summary (also in summary.json)."""
    from dfl_tf.heads.evaluate import evaluate
    from dfl_tf.serve.export import export_model
    from dfl_tf.extraction.local import extract
    from dfl_tf.heads.train import train_head
    from dfl_tf.serve.heatmap import heatmap
    from dfl_tf.data.tissue import tile

    cfg = load_yaml(config)
    for section, values in (overrides or {}).items():
        cfg.setdefault(section, {}).update(values)
    out = Path(out or cfg.get("out", "demo_out"))
    export_dir = Path(export_dir or cfg.get("export_dir", "saved_models/demo"))
    data_cfg, tile_cfg = dict(cfg.get("data", {})), dict(cfg.get("tile", {}))
    val_fraction = float(data_cfg.pop("val_fraction", 0.34))
    times, commands = {}, []

    def stage(name: str, fn, *args, **kwargs):
        t = time.time()
        result = fn(*args, **kwargs)
        times[name] = round(time.time() - t, 1)
        if progress:
            print(f"[demo] {name}: {times[name]} s", flush=True)
        return result

    data = stage("data", make_demo_data, out / "data", **data_cfg)
    slide = data["slide"]
    stage("tile", tile, [slide], out / "tiles.csv", overwrite=True, **tile_cfg)  # a rerun replaces its outputs
    commands.append(_cmd("tile", slide, out=out / "tiles.csv", overwrite=True, **tile_cfg))
    counts = label_tiles(out / "tiles.csv", data["regions"], out / "labelled.csv", val_fraction)
    ex_cfg = {"progress": progress, **cfg.get("extract", {})}
    for split in ("train", "val"):
        stage(f"extract {split}", extract, out / "labelled.csv", out / "emb" / split, split=split, **ex_cfg)
        commands.append(_cmd("extract", out / "labelled.csv", out=out / "emb" / split, split=split,
                             **{k: v for k, v in ex_cfg.items() if k != "progress"}))
    tr_cfg = {"progress": progress, **cfg.get("train", {})}
    trained = stage("train", train_head, out / "emb" / "train", out / "head", val=out / "emb" / "val",
                    overwrite=True, **tr_cfg)
    commands.append(_cmd("train", out / "emb" / "train", val=out / "emb" / "val", out=out / "head", overwrite=True,
                         **{k: v for k, v in tr_cfg.items() if k != "progress"}))
    metrics = stage("evaluate", evaluate, out / "head", out / "emb" / "val", out / "report", overwrite=True)
    commands.append(_cmd("evaluate", out / "head", out / "emb" / "val", out=out / "report", overwrite=True))
    exported = stage("export", export_model, [out / "head"], export_dir)
    commands.append(_cmd("export", out / "head", out=export_dir))
    hm = stage("heatmap", heatmap, exported["path"], slide, out / "heatmap", progress=progress, overwrite=True,
               **cfg.get("heatmap", {}))
    commands.append(_cmd("heatmap", export_dir, slide, out=out / "heatmap", overwrite=True, **cfg.get("heatmap", {})))
    summary = {
        "tiles": counts,
        "heatmap_tiles": hm["tiles"],
        "heatmap_geometry": {"mpp": hm["mpp"], "size": hm["size"]},  # = the trained geometry (export.json)
        "metrics": {k: metrics.get(k) for k in ("balanced_accuracy", "cohen_kappa", "f1_macro", "f1_weighted")
                    if k in metrics},
        "best_epoch": trained.get("best_epoch"),
        "parity": exported["parity"],
        "seconds": times,
        "total_seconds": round(sum(times.values()), 1),
        "outputs": {"slide": slide, "tiles": str(out / "tiles.csv"), "embeddings": str(out / "emb"),
                    "head": str(out / "head"), "report": str(out / "report" / "report.md"),
                    "model": exported["path"], "heatmap": str(out / "heatmap"),
                    "tensorboard": str(out / "head" / "logs")},
        "commands": commands,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("\n== dfl_tf demo summary ==")
    print(f"tiles: {summary['tiles']['train']} train, {summary['tiles']['val']} held-out (val)")
    if "heatmap_geometry" in summary:
        geo = summary["heatmap_geometry"]
        print(f"heatmap: {summary['heatmap_tiles']} tiles of {geo['size']} px at {geo['mpp']:g} um/px "
              f"(the geometry the head was trained at)")
    for key, value in summary["metrics"].items():
        print(f"  {key:<18} {value:.3f}" if isinstance(value, float) else f"  {key:<18} {value}")
    print("time per stage (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items())
          + f"; total {summary['total_seconds']}")
    print("outputs:")
    for key, value in summary["outputs"].items():
        print(f"  {key:<12} {value}")
    print("each stage by hand:")
    for command in summary["commands"]:
        print(f"  {command}")
