"""Peak memory (VmHWM, peak resident set) of extraction at two sample counts.

Each count runs in its own subprocess (so the peaks are separate): write n small PNGs, then
``extract`` them with the backbone at a small input size. Flat memory = the larger run's peak
within ~10-20 % of the smaller one's (the pipeline streams; only one shard of records
is held at a time).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

from common import ROOT, Section, log, table

TITLE = "Peak memory of extraction"

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from common import ensure_backbone, write_images
from pathlib import Path
name, n, size, tmp = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
ensure_backbone(name)
from dfl_tf.extraction.local import extract

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
write_images(tmp / "imgs", n, size)
before = hwm()
t0 = time.perf_counter()
extract(tmp / "imgs", tmp / "emb", backbone=name, weights="none", input_size=size, batch_size=64,
        shard_size=1024, progress=False)
print(json.dumps({"n": n, "before_mib": before, "peak_mib": hwm(), "seconds": time.perf_counter() - t0}))
"""


def run(cfg: dict) -> Section:
    rows, peaks = [], []
    tmps = [tempfile.mkdtemp(prefix="bench_mem_") for _ in cfg["counts"]]

    def start(n, tmp):
        return subprocess.Popen([sys.executable, "-c", CHILD, str(ROOT / "benchmarks"), cfg["backbone"], str(n),
                                 str(cfg["size"]), tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(n, t) for n, t in zip(cfg["counts"], tmps)] if cfg.get("parallel") else []
    results = []
    for k, (n, tmp) in enumerate(zip(cfg["counts"], tmps)):
        proc = procs[k] if procs else start(n, tmp)
        out, err = proc.communicate()
        shutil.rmtree(tmp, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(err[-2000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    for n, r in zip(cfg["counts"], results):
        peaks.append(r["peak_mib"])
        rows.append([f"{n:,}", cfg["size"], f"{r['before_mib']:.0f}", f"{r['peak_mib']:.0f}",
                     f"{n / r['seconds']:.0f}", f"{r['peak_mib'] / peaks[0]:.2f}"])
        log(f"[memory] n={n}: peak {r['peak_mib']:.0f} MiB")
    flat = peaks[-1] <= 1.2 * peaks[0]
    body = (f"{__doc__.strip()}\n\n{cfg['backbone']}, input {cfg['size']} px, batch 64, shard size 1024.\n\n"
            + table(["samples", "size", "RSS before extract (MiB)", "peak RSS (MiB)", "img/s", "peak / first"],
                    rows)
            + f"\n\nFlat (largest peak within 20 % of the smallest): **{'yes' if flat else 'no'}**.")
    return Section(TITLE, body)
