"""Stain ops on real tissue: time per 224 px tile (TF, CPU) for HED jitter, Macenko and Reinhard,
beside an efficientnet_lite0 forward pass, plus what the ops do to the tiles (pass-through rate,
mean RGB change, TF vs NumPy reference).

    PYTHONPATH=$PWD python benchmarks/stain_study.py --tiles /work/shared/data/lc25000-colon --n 64

Report only (prints a table and a JSON line); issue 31's speed target is normalisation <= 10% of
efficientnet_lite0 extraction time per tile.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from dfl_tf import stain  # noqa: E402
from dfl_tf.stain.normalize import fit_macenko, fit_reinhard, normalize_numpy  # noqa: E402


def load_tiles(folder: Path, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` tiles (both classes, shuffled) resized to ``size``; uint8 [n, size, size, 3] and their paths."""
    with open(folder / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    rows = [rows[i] for i in rng.permutation(len(rows))[:n]]
    tiles = [np.asarray(Image.open(folder / r["path"]).convert("RGB").resize((size, size), Image.BILINEAR))
             for r in rows]
    return np.stack(tiles), [r["path"] for r in rows]


def timed(fn, batch, repeats: int) -> float:
    """Median seconds per call of ``fn(batch)`` after one warm-up call."""
    fn(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(batch)
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, default=Path("/work/shared/data/lc25000-colon"))
    ap.add_argument("--n", type=int, default=64, help="tiles to load")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="'' skips the backbone timing")
    args = ap.parse_args()

    tiles, paths = load_tiles(args.tiles, args.n, args.size)
    target_params = {"macenko": fit_macenko(tiles[0], paths[0]), "reinhard": fit_reinhard(tiles[0], paths[0])}
    batch = tf.constant(tiles[: args.batch])
    ids = tf.constant([f"tile-{i}" for i in range(args.batch)])
    spec = tf.TensorSpec([None, None, None, 3], tf.uint8)

    ops = {
        "hed_jitter_light": tf.function(lambda x: stain.hed_jitter(x, ids, 1, 0, 0.05), input_signature=[spec]),
        "macenko": tf.function(lambda x: stain.normalize_batch(x, target_params["macenko"]), input_signature=[spec]),
        "reinhard": tf.function(lambda x: stain.normalize_batch(x, target_params["reinhard"]), input_signature=[spec]),
    }
    for method in ("macenko", "reinhard"):  # the same ops compiled by XLA (fuses the per-pixel passes)
        ops[f"{method}_xla"] = tf.function(lambda x, m=method: stain.normalize_batch(x, target_params[m]),
                                           jit_compile=True)
    if args.backbone:
        from dfl_tf.backbones import load_backbone

        backbone = load_backbone(args.backbone, input_size=args.size)
        model = backbone.compiled()
        ops[args.backbone] = lambda x: model(tf.cast(x, tf.float32))

    ms_per_tile = {name: 1000 * timed(fn, batch, args.repeats) / args.batch for name, fn in ops.items()}

    # what the ops do on these tiles
    effects = {}
    for sigma_name, sigma in stain.JITTER_STRENGTHS.items():
        jittered = stain.hed_jitter(tf.constant(tiles), [f"t{i}" for i in range(len(tiles))], 1, 0, sigma)
        effects[f"jitter_{sigma_name}_mean_abs_rgb"] = float(np.mean(np.abs(jittered.numpy().astype(float) - tiles)))
    for method, params in target_params.items():
        out, passed = stain.normalize_batch(tf.constant(tiles.astype(np.float32)), params)
        ref = [normalize_numpy(t, params) for t in tiles]
        effects[f"{method}_passed_through"] = int(np.sum(passed.numpy()))
        effects[f"{method}_tf_vs_numpy_max_abs"] = float(max(np.abs(out.numpy()[i] - r[0]).max()
                                                             for i, r in enumerate(ref)))
        effects[f"{method}_mean_abs_rgb"] = float(np.mean(np.abs(out.numpy() - tiles)))

    print(f"{'op':<22}{'ms / tile':>10}{'% of backbone':>15}")
    base = ms_per_tile.get(args.backbone)
    for name, ms in ms_per_tile.items():
        share = f"{100 * ms / base:.1f}%" if base else "-"
        print(f"{name:<22}{ms:>10.2f}{share:>15}")
    for key, value in effects.items():
        print(f"{key}: {value:.4g}")
    print(json.dumps({"ms_per_tile": ms_per_tile, "effects": effects, "batch": args.batch, "size": args.size,
                      "tiles": len(tiles), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
