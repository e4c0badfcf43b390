"""Figures and facts the README states, checked against the file or code they come from."""
from __future__ import annotations

import json
import re

import yaml

from tests.helpers import REPO as ROOT

README = (ROOT / "README.md").read_text()
BENCH = ROOT / "benchmarks"


def _flat(text: str) -> str:
    return " ".join(text.split())


FLAT = _flat(README)


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def test_sampler_figures_quote_their_results_file():
    """'exact sampler: A vs B' (emb/s with and without noise) are the two train emb/s of the file named."""
    m = re.search(r"the (\d{4}-\d\d-\d\d) (\d\d):(\d\d) run on the \w+, exact sampler: ([\d,]+) vs ([\d,]+), "
                  r"`(benchmarks/[\w./-]+\.md)`", FLAT)
    assert m, "the heads section quotes the exact-sampler run with its results file"
    text = (ROOT / m.group(6)).read_text()
    assert f"{m.group(1)}-{m.group(2)}{m.group(3)}" in m.group(6)
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 2048 | 256 | 256 |")]
    emb_s = {cells[4].strip(): cells[7].strip() for cells in rows}  # feature noise -> train emb/s
    assert (emb_s["0.1 (default)"], emb_s["0"]) == (m.group(4), m.group(5))


def test_xla_step_ratio_is_the_levers_table_s():
    m = re.search(r"An XLA-compiled step without noise is not faster \(([\d.]+)x the step time in that run: "
                  r"([\d.]+) against ([\d.]+) ms", FLAT)
    assert m
    results = (BENCH / "results.md").read_text()
    row = re.search(r"\| train step, XLA \(no noise, determinism off\) \| [^|]+\| ([\d.]+) \| ([\d.]+)x \|", results)
    base = re.search(r"\| train step, no XLA \(no noise, determinism off\) \| [^|]+\| ([\d.]+) \|", results)
    assert (m.group(1), m.group(2), m.group(3)) == (row.group(2), row.group(1), base.group(1))


def test_reader_scaling_figures_match_the_h200_json():
    rows = json.loads((BENCH / "reader_scaling_h200.json").read_text())["rows"]
    rate = {(r["reader"], r["workers"], r["kind"]): round(r["tiles_per_s"]) for r in rows}
    m = re.search(r"with x5 views they trail from (\d+) workers on \(([\d,]+) vs ([\d,]+);", FLAT)
    assert m
    workers = int(m.group(1))
    assert (rate[("dfl x20 + x5", workers, "threads")], rate[("dfl x20 + x5", workers, "processes")]) == (
        _num(m.group(2)), _num(m.group(3)))
    first = min(w for (reader, w, kind) in rate if reader == "dfl x20 + x5" and kind == "processes"
                and rate[(reader, w, "threads")] < rate[(reader, w, kind)])
    assert first == workers


def test_make_bench_time_is_the_quoted_runs():
    m = re.search(r"`make bench` \(= [^)]*?(\d+)-(\d+) min on 2 CPU cores: (\d+) s in the (\d{4}-\d\d-\d\d) "
                  r"(\d\d):(\d\d) run on the AMD host, (\d+) s in the (\d{4}-\d\d-\d\d) (\d\d):(\d\d) run", FLAT)
    assert m
    low, high, a, b = int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(7))
    assert f"total {a} s" in (BENCH / "results.md").read_text()
    assert f"total {b} s" in (BENCH / "history" / f"results-{m.group(8)}-{m.group(9)}{m.group(10)}.md").read_text()
    assert (low, high) == (a // 60, round(b / 60))


def test_vit_module_line_count():
    m = re.search(r"`dfl_tf/backbones/vit/model.py` \(about (\d+) lines\)", FLAT)
    lines = len((ROOT / "dfl_tf" / "backbones" / "vit" / "model.py").read_text().splitlines())
    assert m and abs(int(m.group(1)) - lines) <= 10, (m and m.group(1), lines)


def test_bfloat16_vit_distance_is_measured_and_its_test_bound_named():
    m = re.search(r"relative L2 ([\d.]+) on a random-weight ViT-S/16 in `benchmarks/vit_kernels.json`; "
                  r"`tests/backbones/test_vit.py` checks it stays under ([\d.]+)", FLAT)
    assert m
    rows = json.loads((BENCH / "vit_kernels.json").read_text())["whole_model"]
    current = next(r for r in rows if r["model"] == "dino_vits16" and r["precision"] == "bfloat16"
                   and r["variant"] == "current")
    assert round(current["rel_l2_vs_float32_previous"], 4) == float(m.group(1))
    assert f"rel.max() < {m.group(2)}" in (ROOT / "tests" / "backbones" / "test_vit.py").read_text()


def test_config_sections_are_as_described():
    sections = {p.stem: {k for k, v in yaml.safe_load(p.read_text()).items() if isinstance(v, dict)}
                for p in (ROOT / "configs").glob("*.yaml")}
    m = re.search(r"the paper's tasks \(([^)]*)\) each with an `extract:` and a `train:` section", FLAT)
    tasks = set(re.findall(r"`(\w+)\.yaml`", m.group(1)))
    assert tasks == {name for name, keys in sections.items() if keys == {"extract", "train"}}
    assert {"data", "tile", "extract", "train", "heatmap"} <= sections["demo"]
    assert {"select", "finetune"} <= sections["backbone_selection"]
    assert "`backbone_selection.yaml` with `select:` and `finetune:` sections" in FLAT


def test_head_dir_listing_names_the_probe():
    row = next(line for line in README.splitlines() if line.startswith("| **head** |"))
    bullet = next(line for line in README.splitlines() if line.startswith("* **HEAD_DIR**"))
    files = {"head.keras", "head.json", "history.csv", "metrics.json", "probe.npz", "logs/"}
    assert all(f"`{f}`" in row for f in files), row
    assert all(f"`{f}`" in bullet for f in files), bullet


def test_extras_are_documented():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    install = FLAT.split("## Install", 1)[1].split("## Concepts", 1)[0]
    assert all(f"`[{e}]`" in install for e in extras), extras
    dev = cfg["options.extras_require"]["dev"]
    for need in ("transformers", "efficientnet-lite-pytorch"):  # the parity tests need them beyond torch
        assert need in dev and need in install


def test_tensorboard_projector_path_is_where_select_writes():
    m = re.search(r"tensorboard --logdir (\S+)/projector +# Embedding Projector of `dfl select --out (\S+)`", README)
    assert m and m.group(1) == m.group(2)
    assert re.search(rf"dfl select \S+ --backbones \S+ --out {re.escape(m.group(2))}\b", README)
    assert 'export_projector(sets, out / "projector")' in (ROOT / "dfl_tf" / "select" / "maps.py").read_text()


def test_what_changed_heading_covers_its_bullets():
    section = README.split("\n## What changed for users", 1)[1].split("\n## ", 1)[0]
    heading = section.splitlines()[0]
    first, last = re.fullmatch(r" \((\d{4}-\d\d-\d\d) to (\d{4}-\d\d-\d\d)\)", heading).groups()
    dates = re.findall(r"\d{4}-\d\d-\d\d", "\n".join(section.splitlines()[1:]))
    assert dates and all(first <= d <= last for d in dates) and last == max(dates)
