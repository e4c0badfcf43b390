"""Shared helpers of the benchmarks: machine info, timing (median of runs), synthetic data,
a tiny test backbone (``bench_tiny``, for the smoke test) and results.md sections."""
from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):  # ROOT: dfl_tf and tests.helpers
    if p not in sys.path:
        sys.path.insert(0, p)

RESNET50_GFLOP_224 = 8.2  # ~4.1 G multiply-adds x 2


@dataclass
class Section:
    """One ``## title`` section of results.md; ``headline`` holds the section's summary ratios
    (headline key -> plain number) and ``data`` its measurements, both written to results.json."""

    title: str  # without the leading "## "
    body: str
    headline: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, flush=True)


def register_tiny() -> None:
    """A 2-conv backbone ``bench_tiny`` (dim 16) so the smoke test runs in seconds."""
    from dfl_tf.backbones.toy import register_toy

    register_toy("bench_tiny")


def ensure_backbone(name: str) -> None:
    if name == "bench_tiny":
        register_tiny()


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` field of /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    return cpuinfo_field("model name") or "unknown"


def cpu_bf16() -> str:
    """The CPU's bfloat16 instruction sets (AMX, AVX-512 BF16) from /proc/cpuinfo's flags, or "none":
    without them bfloat16 matmuls are emulated and slower than float32. Cloud VMs of one model name
    can land on hosts with and without them, so runs are comparable only where this matches."""
    flags = cpuinfo_field("flags")
    if flags is None:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()]
    return ", ".join(found) or "none (bfloat16 emulated)"


def machine_info() -> dict:
    import keras
    import tensorflow as tf

    cpu, ram = cpu_model(), "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import torch
        torch_v = torch.__version__
    except ImportError:
        torch_v = "not installed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cpu_bf16": cpu_bf16(), "cores": cores, "ram": ram, "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "torch": torch_v,
            "gpus": ", ".join(gpus) or "none", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "load": load_avg()}


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def tf_threads() -> int:
    import tensorflow as tf

    n = tf.config.threading.get_intra_op_parallelism_threads()
    return n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def rate(n: int, seconds: list[float]) -> float:
    """Median items/s over runs of ``n`` items each."""
    return n / median(seconds)


_MATMUL: dict[tuple[int, str], float] = {}


def matmul_gflops(n: int = 2048, repeats: int = 3, dtype: str = "float32") -> float:
    """Measured tf.linalg.matmul GFLOP/s of two n x n ``dtype`` matrices (2 n^3 FLOP); measured once
    per process, size and dtype, so every section of one run divides by the same roofline."""
    if (n, dtype) not in _MATMUL:
        _MATMUL[n, dtype] = _measure_matmul(n, repeats, dtype)
    return _MATMUL[n, dtype]


def bf16_matmul_gflops(cfg: dict) -> float | None:
    """The bfloat16 roofline (``cfg["matmul_n"]``) of a section that times bfloat16 rows, else None."""
    return matmul_gflops(cfg["matmul_n"], repeats=3, dtype="bfloat16") if "bfloat16" in cfg["precisions"] else None


def _measure_matmul(n: int, repeats: int, dtype: str = "float32") -> float:
    import tensorflow as tf

    a = tf.cast(tf.random.normal([n, n], seed=1), dtype)
    b = tf.cast(tf.random.normal([n, n], seed=2), dtype)
    f = tf.function(lambda: tf.reduce_sum(tf.cast(tf.linalg.matmul(a, b), "float32")))
    secs = time_runs(lambda: f().numpy(), repeats, warmup=1)
    return 2 * n ** 3 / median(secs) / 1e9


def resnet50_gflop(size: int) -> float:
    return RESNET50_GFLOP_224 * (size / 224) ** 2


def write_images(root: Path, n: int, size: int, classes=("a", "b"), seed: int = 0) -> Path:
    """``n`` random PNGs of size x size, spread over class folders (class b brighter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(classes)
        d = root / classes[c]
        d.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 200, (size, size, 3), dtype=np.uint8) + np.uint8(50 * c)
        Image.fromarray(img).save(d / f"{i:06d}.png", compress_level=1)
    return root


def load_folder_array(root: Path) -> np.ndarray:
    from dfl_tf.data.sources import load_source, read_image

    return np.stack([read_image(s.source) for s in load_source(root).samples]).astype(np.float32)


def make_slide_tiles(tmp: Path, n_tiles: int, size: int) -> Path:
    """A synthetic pyramidal slide tiled with ``tile()`` at its own mpp; CSV cut to ``n_tiles`` rows."""
    import math

    from dfl_tf.data.synthetic import demo_slide_image, make_pyramid_tiff
    from dfl_tf.data.tissue import tile

    side = int(math.ceil(math.sqrt(n_tiles * 1.6))) * size + 2 * 160
    image, _ = demo_slide_image(width=side, height=side)
    slide = make_pyramid_tiff(tmp / "slide.tiff", image, mpp=0.5, levels=2)
    csv = tmp / "tiles.csv"
    tile([slide], csv, mpp=0.5, size=size, min_tissue=0.5, thumbnails=False, overwrite=True)
    lines = csv.read_text().splitlines()
    if len(lines) - 1 < n_tiles:
        raise RuntimeError(f"only {len(lines) - 1} tiles on the synthetic slide (wanted {n_tiles})")
    csv.write_text("\n".join(lines[: n_tiles + 1]) + "\n")
    return csv


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def write_results(path: Path, info: dict, sections: list[Section], command: str) -> Path:
    """Rewrite ``path``: header, machine info, this run's sections, then any other ``## `` section
    already in the file that this run did not produce (e.g. bench_heads.py's), kept as is."""
    old = path.read_text() if path.exists() else ""
    produced = {s.title for s in sections}
    kept = []
    for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", old, re.S | re.M):
        title = m.group(1).strip()
        if title not in produced and title != "Machine":
            kept.append(f"## {title}\n{m.group(2).rstrip()}\n")
    machine = table(["", ""], [[k, v] for k, v in [
        ("CPU", info["cpu"]), ("bfloat16 instructions", info.get("cpu_bf16", "not recorded")),
        ("cores available", info["cores"]), ("RAM", info["ram"]), ("GPUs", info["gpus"]),
        ("Python", info["python"]), ("TensorFlow", info["tensorflow"]), ("Keras", info["keras"]),
        ("torch", info["torch"]), ("date", info["date"]),
        ("load average (1/5/15 min) at start", info["load"]),
        ("load average at end", info.get("load_end", "-"))]], "lr")
    text = ["# Benchmarks", "",
            f"Written by {command} on {info['date']}. Each number is the median of several timed runs after a "
            "warm-up run (see each section); every section this run produced ends with that run's date and "
            "the load average after it, and sections kept from other runs (e.g. the heads study) carry their "
            "own. A load average above the core count means other processes shared the CPU: absolute numbers "
            "are then low, while the ratios inside one section, timed round-robin, stay fair. Rerun with "
            "`make bench` on an idle machine for absolute figures.", "",
            "## Machine", "", machine, ""]
    for s in sections:
        text += [f"## {s.title}", "", s.body.strip(), ""]
    text += kept
    path.write_text("\n".join(text).rstrip("\n") + "\n")
    return path


HEADLINE_KEYS = ("resnet50_vs_torch_float32", "resnet50_vs_torch_bfloat16", "vit_b16_vs_torch_float32",
                 "vit_b16_vs_torch_bfloat16", "slide_extract_efficiency", "reader_vs_openslide",
                 "head_train_roofline_fraction")


def write_json(path: Path, info: dict, sections: list[Section], command: str, keep_old: bool = False) -> dict:
    """Write results.json: machine info, ``headline`` (ratios, plain numbers; None when not measured)
    and each section's ``data``. With ``keep_old`` (a ``--only`` run) the previous file's headline
    entries and sections that this run did not produce are kept, each section with its own date.
    Returns the written object."""
    import json

    old: dict = {}
    if keep_old and path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
    date = info["date"]
    headline = {k: None for k in HEADLINE_KEYS}
    old_sections = old.get("sections", {}) if isinstance(old.get("sections"), dict) else {}
    produced = {s.title for s in sections}
    for title, sec in old_sections.items():
        if title not in produced and isinstance(sec, dict):
            headline.update(sec.get("headline", {}))
    for s in sections:
        headline.update(s.headline)
    out = {
        "command": command,
        "date": date,
        "machine": info,
        "headline": headline,
        "sections": {**{t: v for t, v in old_sections.items() if t not in produced},
                     **{s.title: {"date": date, "headline": s.headline, "data": s.data} for s in sections}},
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return out


README_START = "<!-- bench-summary:start (written by benchmarks/run_all.py from results.json; do not edit) -->"
README_END = "<!-- bench-summary:end -->"


def _rows(result: dict, title: str) -> list[dict]:
    sec = result.get("sections", {}).get(title) or {}
    rows = (sec.get("data") or {}).get("rows") or []
    return list(rows.values()) if isinstance(rows, dict) else list(rows)


def readme_summary(result: dict) -> str:
    """The README's benchmark summary table: only figures present in ``result`` (results.json),
    each row with the date of the run that measured it."""
    secs = result.get("sections", {})

    def date(title: str) -> str:
        return str((secs.get(title) or {}).get("date", "-"))[:10]

    def r2(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    def bf16_share(row: dict) -> str:
        frac = row.get("roofline_fraction_bf16")
        return "" if frac is None else f"; {pct(frac)} of bfloat16 matmul"

    def r0(x) -> str:  # as results.md prints tiles/s (tests/test_docs.py checks the summary against it)
        return "-" if x is None else f"{x:.0f}"

    lines = ["| benchmark | result | target | run |", "|---|---|---|---|"]
    t = "Backbone throughput vs matmul roofline"
    bb = [r for r in _rows(result, t) if r.get("backbone") == "resnet50" and r.get("size") == 224 and not r.get("jit")]
    if bb:
        lines.append("| ResNet-50 224 px: " + " / ".join(r["precision"] for r in bb) + " | "
                     + " / ".join(f"{r['img_per_s']:.1f} img/s ({pct(r['roofline_fraction'])} of float32 matmul"
                                  f"{bf16_share(r)})" for r in bb) + f" | | {date(t)} |")
    h = result.get("headline", {})
    t = "dfl_tf vs PyTorch ResNet-50"
    if h.get("resnet50_vs_torch_float32") is not None:
        lines.append(f"| ResNet-50 vs the fastest PyTorch configuration (same threads; channels_last, BN folded or "
                     f"not; bfloat16: autocast): float32 / bfloat16 | {r2(h['resnet50_vs_torch_float32'])}x / "
                     f"{r2(h.get('resnet50_vs_torch_bfloat16'))}x | >= 1.0 | {date(t)} |")
    t = "Vision Transformers: throughput and dfl_tf vs PyTorch"
    vit = [r for r in _rows(result, t) if str(r.get("implementation", "")).startswith("dfl_tf")]
    for model in dict.fromkeys(r["model"] for r in vit):
        rs = [r for r in vit if r["model"] == model]
        lines.append(f"| {model} 224 px: " + " / ".join(r["precision"] for r in rs) + " | "
                     + " / ".join(f"{fmt(r['img_per_s'])} img/s ({pct(r['roofline_fraction'])}{bf16_share(r)})"
                                  for r in rs)
                     + f" | | {date(t)} |")
    for key, label in (("vit_s16", "ViT-S/16"), ("vit_b16", "ViT-B/16")):
        if h.get(f"{key}_vs_torch_float32") is not None:
            lines.append(f"| {label} vs PyTorch SDPA: float32 / bfloat16 | {r2(h.get(f'{key}_vs_torch_float32'))}x / "
                         f"{r2(h.get(f'{key}_vs_torch_bfloat16'))}x | >= 1.0 | {date(t)} |")
    t = "Extraction pipeline efficiency (extract vs backbone-only)"
    if h.get("slide_extract_efficiency") is not None:
        lines.append(f"| `extract` vs backbone-only: image folder / slide tiles | "
                     f"{pct(h.get('folder_extract_efficiency') or 0)} / {pct(h['slide_extract_efficiency'])} "
                     f"| 90 % / 95 % | {date(t)} |")
    t = "Slide reader vs raw OpenSlide"
    if h.get("reader_vs_openslide") is not None:
        lines.append(f"| slide reader vs raw `openslide.read_region` loop (worst row); tiles/s per core x20 / "
                     f"x20 + x5 | {r2(h['reader_vs_openslide'])}x; {r0(h.get('reader_tiles_per_s_per_core_x20'))} / "
                     f"{r0(h.get('reader_tiles_per_s_per_core_x20_x5'))} | >= 0.9 | {date(t)} |")
    t = "Heads: training throughput vs read speed"
    heads = _rows(result, t)
    if heads:
        lines.append("| head training (hidden 256, in memory), FLOP computed (4 x dim x hidden; the issue's "
                     "6 x dim x hidden count in brackets) vs float32 matmul | "
                     + " / ".join(f"{pct(r['roofline_fraction'])} [{pct(r['roofline_fraction_6n']) if r.get('roofline_fraction_6n') else '-'}] "
                                  f"({r['train_per_s']:,.0f} emb/s, {r['dim']}-d, "
                                  f"noise {'0.1' if r.get('noise') is None else format(r['noise'], 'g')}, "
                                  f"batch {r.get('batch', '?')}{'' if r.get('default_batch', True) else ', not default'})"
                                  for r in heads) + f" | >= 50 % | {date(t)} |")
    lines.append("| fine-tuning vs heads, shards, peak memory, serving latency | see `benchmarks/results.md` | | |")
    m = result.get("machine", {})
    head = (f"Summary of `benchmarks/results.json` (last run: {result.get('command', '')}, {result.get('date', '?')}; "
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, bfloat16 instructions: {m.get('cpu_bf16', 'not recorded')}; load average {m.get('load', '?')} at start, "
            f"{m.get('load_end', '?')} at end; each row dated by the run that measured it):")
    return "\n".join([README_START, head, "", *lines, README_END])


def update_readme(path: Path, result: dict) -> bool:
    """Replace the marked summary block in ``path`` (README.md); False when it has no markers."""
    text = path.read_text() if path.exists() else ""
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        return False
    new = text[:i] + readme_summary(result) + text[j + len(README_END):]
    if new != text:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(new)
        os.replace(tmp, path)
    return True
