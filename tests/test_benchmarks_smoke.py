"""Smoke test of the benchmark suite: run_all --tiny (toy backbone, minimal sizes) into a tmp
results file and check every section's table is there. Structure only, not speed."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_tiny_writes_every_table(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    out = tmp_path / "results.md"
    out.write_text("# Benchmarks\n\n## Heads: training throughput vs read speed\n\nkept table\n")
    run_all.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    for title in ("Machine", "Backbone throughput vs matmul roofline",
                  "Extraction pipeline efficiency (extract vs backbone-only)", "dfl_tf vs PyTorch ResNet-50",
                  "Head training vs fine-tuning (one epoch)", "Shards: write and read speed",
                  "Peak memory of extraction", "Serving latency: exported model vs Python"):
        assert f"## {title}\n" in text, title
    assert "## Heads: training throughput vs read speed\n\nkept table" in text  # other sections kept
    assert "Failed" not in text
    for needle in ("| CPU |", "| TensorFlow |", "| torch |", "load average", "% of roofline", "efficiency",
                   "dfl_tf / this", "speed-up vs fine-tune", "read records/s", "peak RSS (MiB)", "2nd head extra"):
        assert needle in text, needle
    tables = [line for line in text.splitlines() if line.startswith("| ---")]
    assert len(tables) >= 8
