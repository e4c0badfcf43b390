"""Shard write and read speed (float16 TFRecord shards, as extraction writes them).

Write: ``make_example`` + ``write_shard`` of N synthetic records (bench_heads.write_synthetic);
read: one pass of ``record_dataset`` (parse + float16 -> float32) after a warm-up pass (page
cache). MB/s counts the shard bytes on disk. See also the "Heads" section (bench_heads.py).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from common import Section, fmt, log, median, table

TITLE = "Shards: write and read speed"


def run(cfg: dict) -> Section:
    from bench_heads import read_speed, write_synthetic

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        for dim in cfg["dims"]:
            n, writes, reads = cfg["n"], [], []
            for k in range(cfg["repeats"]):
                d = tmp / f"e{dim}_{k}"
                t0 = time.perf_counter()
                write_synthetic(d, n, dim)
                writes.append(time.perf_counter() - t0)
                reads.append(n / read_speed(d, 256))
                size = sum(p.stat().st_size for p in d.glob("*.tfrecord"))
                shutil.rmtree(d)
            w, r = median(writes), median(reads)
            rows.append([dim, f"{n:,}", f"{size / 2**20:.1f}", fmt(n / w), fmt(size / w / 2**20),
                         fmt(n / r), fmt(size / r / 2**20)])
            log(f"[shards] dim {dim}: write {n / w:.0f} rec/s, read {n / r:.0f} rec/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    body = (f"{__doc__.strip()}\n\nMedian of {cfg['repeats']} runs (write includes generating the random "
            "vectors and float16 conversion).\n\n"
            + table(["dim", "records", "MiB on disk", "write records/s", "write MiB/s", "read records/s",
                     "read MiB/s"], rows))
    return Section(TITLE, body)
