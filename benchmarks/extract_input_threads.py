"""Does the input pipeline slow the backbone down on a small CPU box?

On this 2-core VM ``extract`` from an image folder ran at 94 % of backbone-only speed in one full
benchmark run and 57 % in another (README, "two states"). The suspicion: tf.data's decode/read
threads take one of the backbone's two compute threads. This times, in one process and in
alternated order per round, ``extract`` with

* ``auto``: the default (``--workers`` unset: tf.data AUTOTUNE);
* ``workers 1`` and ``workers 2``: a fixed number of parallel decode/read calls;
* ``nice 10``: AUTOTUNE, with every thread that runs the decode/read call lowered to nice 10
  (patched in here, not a dfl option),

against backbone-only on the same pixels, and a 2048^2 float32 matmul rate per round, so that a
round in which the machine changed speed can be told apart. Run by hand (about 4 min per source)::

    python benchmarks/extract_input_threads.py --json benchmarks/extract_input_threads.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import _measure_matmul, cpu_model, ensure_backbone, load_folder_array, make_slide_tiles, median, \
    time_runs, write_images  # noqa: E402

MODES = {"auto": None, "workers 1": 1, "workers 2": 2, "nice 10": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the per-round results")
    parser.add_argument("--sources", nargs="+", default=["image folder", "slide tiles"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=160, help="images per run")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backbone", default="resnet50", help="registry name (weights none)")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    import dfl_tf.extraction.core as extract_core
    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.data.sources import SlideRead, load_sample, load_source
    from dfl_tf.extraction.local import extract

    nice = {"value": 0, "denied": 0}
    plain_load = extract_core.ShardRunner._load

    def load(self, index):  # runs on tf.data's threads
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) != nice["value"]:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice["value"])
            except PermissionError:  # back to nice 0 needs CAP_SYS_NICE (root) or a raised RLIMIT_NICE
                nice["denied"] += 1
        return plain_load(self, index)

    extract_core.ShardRunner._load = load
    ensure_backbone(args.backbone)
    bb = load_backbone(args.backbone, weights="none", input_size=args.size)
    f = tf.function(lambda t: bb.model(t, training=False), reduce_retracing=True,
                    input_signature=[tf.TensorSpec([None, args.size, args.size, 3], tf.float32)])
    out = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "backbone": args.backbone, "n": args.n, "size": args.size, "batch": args.batch, "sources": {}}
    tmp = Path(tempfile.mkdtemp(prefix="extract_threads_"))
    try:
        for label in args.sources:
            if label == "image folder":
                src = write_images(tmp / "imgs", args.n, args.size)
                x = load_folder_array(src)
            else:
                src = make_slide_tiles(tmp, args.n, args.size)
                read = SlideRead(mpp=0.5, patch_size=args.size)
                x = np.stack([load_sample(s, False, read)[0] for s in load_source(src).samples]).astype(np.float32)
            runs = [0]

            def backbone_only():
                for i in range(0, len(x), args.batch):
                    f(tf.constant(x[i:i + args.batch])).numpy()

            def run(mode: str) -> None:
                runs[0] += 1
                nice["value"] = 10 if mode == "nice 10" else 0
                extract(src, tmp / f"emb_{runs[0]}", model=bb, workers=MODES[mode], batch_size=args.batch,
                        shard_size=1024, progress=False, patch_size=args.size, mpp=0.5)
                shutil.rmtree(tmp / f"emb_{runs[0]}")

            backbone_only()
            run("auto")  # warm-ups
            rounds = []
            for r in range(args.rounds):
                order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
                row = {"matmul_gflops": _measure_matmul(2048, 3)}
                row["backbone_img_per_s"] = len(x) / time_runs(backbone_only, 1, 0)[0]
                for mode in order:
                    row[mode] = len(x) / time_runs(lambda: run(mode), 1, 0)[0] / row["backbone_img_per_s"]
                rounds.append(row)
                print(f"{label} round {r}: matmul {row['matmul_gflops']:.0f} GFLOP/s, backbone "
                      f"{row['backbone_img_per_s']:.1f} img/s, " + ", ".join(f"{m} {row[m]:.0%}" for m in MODES),
                      flush=True)
            summary = {m: median([row[m] for row in rounds]) for m in MODES}
            wins = {m: sum(row[m] > row["auto"] for row in rounds) for m in MODES if m != "auto"}
            out["sources"][label] = {"rounds": rounds, "median_efficiency": summary, "rounds_beating_auto": wins}
            print(f"{label}: median efficiency " + ", ".join(f"{m} {v:.0%}" for m, v in summary.items())
                  + "; rounds beating auto: " + ", ".join(f"{m} {v}/{len(rounds)}" for m, v in wins.items()),
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # threads left at nice 10 after a "nice 10" run: the other modes' rounds after it are not clean
    out["nice_reset_denied"] = nice["denied"]
    if nice["denied"]:
        print(f"warning: {nice['denied']} decode/read calls could not go back to nice 0 (run as root for clean "
              "rounds)", file=sys.stderr)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
