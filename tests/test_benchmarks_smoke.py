"""Smoke test of the benchmark suite: run_all --tiny (toy backbone, minimal sizes) into a tmp
results file and check every section's table and the JSON headline are there. Structure only, not speed."""
from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import REPO as ROOT, import_script


def test_run_all_tiny_writes_every_table(tmp_path):
    run_all = import_script("benchmarks", "run_all")

    out = tmp_path / "results.md"
    out.write_text("# Benchmarks\n\n## Heads study\n\nkept table\n")
    run_all.main(["--tiny", "--out", str(out), "--json", str(tmp_path / "r.json")])
    text = out.read_text()
    for title in ("Machine", "Backbone throughput vs matmul roofline",
                  "Extraction pipeline efficiency (extract vs backbone-only)", "dfl_tf vs PyTorch ResNet-50",
                  "Head training vs fine-tuning (one epoch)", "Shards: write and read speed",
                  "Peak memory of extraction", "Serving latency: exported model vs Python",
                  "Vision Transformers: throughput and dfl_tf vs PyTorch", "Slide reader vs raw OpenSlide",
                  "Heads: training throughput vs read speed"):
        assert f"## {title}\n" in text, title
    assert "## Heads study\n\nkept table" in text  # other sections kept
    assert "Failed" not in text
    for needle in ("| CPU |", "| TensorFlow |", "| torch |", "load average", "% of roofline", "efficiency",
                   "dfl_tf / this", "speed-up vs fine-tune", "read records/s", "peak RSS (MiB)", "2nd head extra"):
        assert needle in text, needle
    tables = [line for line in text.splitlines() if line.startswith("| ---")]
    assert len(tables) >= 11
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["machine"]["cores"] >= 1 and result["machine"]["date"]
    headline = result["headline"]
    for key in ("resnet50_vs_torch_float32", "resnet50_vs_torch_bfloat16", "vit_b16_vs_torch_float32",
                "vit_b16_vs_torch_bfloat16", "slide_extract_efficiency", "reader_vs_openslide",
                "head_train_roofline_fraction"):
        assert key in headline, key
    # measured in the tiny run (the ResNet/ViT-B ratios need the full-size models: None there)
    for key in ("slide_extract_efficiency", "reader_vs_openslide", "head_train_roofline_fraction"):
        assert isinstance(headline[key], float) and headline[key] > 0, key
    assert result["sections"]["Slide reader vs raw OpenSlide"]["data"]["rows"]
    # the README summary block is rebuilt from the JSON, between its markers only
    common = import_script("benchmarks", "common")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{common.README_START}\nold\n{common.README_END}\nrest\n")
    assert common.update_readme(readme, result)
    summary = readme.read_text()
    assert summary.startswith("intro\n") and summary.endswith("rest\n") and "\nold\n" not in summary
    assert "| slide reader vs raw `openslide.read_region` loop" in summary and "| head training" in summary
    # bfloat16 rows are also measured against the bfloat16 matmul rate, in the table and the summary
    vit_rows = result["sections"]["Vision Transformers: throughput and dfl_tf vs PyTorch"]["data"]["rows"]
    assert all((r["roofline_fraction_bf16"] is None) == (r["precision"] != "bfloat16") for r in vit_rows)
    assert "| % of bfloat16 matmul |" in text and "of bfloat16 matmul)" in summary
    # ...and quotes each figure as results.md prints it (what tests/test_docs.py checks on the real files)
    from tests.test_docs import summary_mismatches

    assert not summary_mismatches(summary, text)


def test_extract_input_threads_writes_every_mode(tmp_path):
    """The hand-run input-threads A/B (benchmarks/extract_input_threads.py) on the toy backbone."""
    import subprocess

    out = tmp_path / "threads.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "extract_input_threads.py"), "--json", str(out),
                           "--backbone", "bench_tiny", "--n", "8", "--size", "32", "--batch", "4", "--rounds", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for source in ("image folder", "slide tiles"):
        entry = result["sources"][source]
        assert len(entry["rounds"]) == 2
        for mode in ("auto", "workers 1", "workers 2", "nice 10"):
            assert entry["median_efficiency"][mode] > 0, (source, mode)
        assert set(entry["rounds_beating_auto"]) == {"workers 1", "workers 2", "nice 10"}


@pytest.mark.parametrize("worst, x20, both", [(0.9149, 9490.5, 5999.47), (1.0049, 415.96, 286.2)])
def test_reader_headline_reads_as_the_section_prints_it(worst, x20, both):
    """The reader headline, as the README summary formats it (ratio "{:.2f}", tiles/s "{:.0f}"),
    reads as the section body prints it: no double rounding (5,999.47 stored as 5,999.5 read "6000"
    beside a printed "5,999" and failed test_docs' summary check)."""
    headline = import_script("benchmarks", "bench_reader").headline
    fmt = import_script("benchmarks", "common").fmt

    h = headline(worst, x20, both)
    assert f"{h['reader_vs_openslide']:.2f}" == f"{worst:.2f}"
    for key, value in (("reader_tiles_per_s_per_core_x20", x20), ("reader_tiles_per_s_per_core_x20_x5", both)):
        assert f"{h[key]:.0f}" == fmt(value, 0).replace(",", ""), key
