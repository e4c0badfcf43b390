"""Backbone throughput (img/s) against this machine's measured float32 matmul roofline.

For each (input size, precision, jit) the frozen backbone (weights "none": speed does not
depend on the values) is called on a fixed float32 batch through a tf.function, as extraction
does; img/s is the median over runs. % of roofline = achieved GFLOP/s / float32 matmul GFLOP/s,
with ResNet-50 at ~8.2 GFLOP per 224 px image (4.1 G multiply-adds x 2), scaled by (size/224)^2;
bfloat16 rows also against the measured bfloat16 matmul rate (the same n x n matmul in bfloat16).
"""
from __future__ import annotations

from common import Section, bf16_matmul_gflops, ensure_backbone, fmt, log, matmul_gflops, pct, rate, \
    resnet50_gflop, table, time_runs

TITLE = "Backbone throughput vs matmul roofline"
NOTE = 'The roofline is the float32 matmul rate, so bfloat16 (on CPUs with native bf16 instructions, AVX512-BF16/AMX) and XLA-fused runs (jit on) can exceed 100 %: for bfloat16 the last column is the fair one; a value above 100 % for float32 also means the single-call matmul measurement underestimates the peak (it was taken on a shared, loaded machine).'


def backbone_fn(name: str, size: int, precision: str, batch: int, jit: bool = False):
    """A no-argument callable running one batch through the backbone (built and traced here)."""
    import numpy as np
    import tensorflow as tf

    from dfl_tf.backbones.registry import load_backbone

    bb = load_backbone(name, weights="none", input_size=size, precision=precision)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    f = tf.function(lambda t: bb.model(t, training=False), jit_compile=jit)
    call = lambda: f(x).numpy()  # noqa: E731
    call()  # trace + warm-up
    return call


def interleaved_rates(fns: list, batch: int, repeats: int) -> list[float]:
    """Median img/s of each callable, timed round-robin (run r of every config, then run r+1) so
    that a change of machine load hits all configs alike."""
    times = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for k, fn in enumerate(fns):
            times[k] += time_runs(fn, 1, warmup=0)
    return [rate(batch, t) for t in times]


def backbone_rate(name: str, size: int, precision: str, batch: int, repeats: int, jit: bool = False) -> float:
    return interleaved_rates([backbone_fn(name, size, precision, batch, jit)], batch, repeats)[0]


def run(cfg: dict) -> Section:
    name, batch, repeats = cfg["backbone"], cfg["batch"], cfg["repeats"]
    ensure_backbone(name)
    peak = matmul_gflops(cfg["matmul_n"], repeats=3)
    log(f"[backbone] matmul float32 {cfg['matmul_n']}^2: {peak:.1f} GFLOP/s")
    peak_bf16 = bf16_matmul_gflops(cfg)
    if peak_bf16:
        log(f"[backbone] matmul bfloat16 {cfg['matmul_n']}^2: {peak_bf16:.1f} GFLOP/s")
    rows, data = [], []
    configs = [(s, p, False) for s in cfg["sizes"] for p in cfg["precisions"]]
    if cfg.get("jit"):
        configs.append((cfg["sizes"][0], "float32", True))
    rates = interleaved_rates([backbone_fn(name, s, p, batch, j) for s, p, j in configs], batch, repeats)
    for (size, precision, jit), r in zip(configs, rates):
        gf = resnet50_gflop(size) if name == "resnet50" else None
        achieved = r * gf if gf else None
        bf16 = achieved / peak_bf16 if gf and precision == "bfloat16" and peak_bf16 else None
        rows.append([name, size, precision, "on" if jit else "off", batch, fmt(r),
                     fmt(achieved) if gf else "-", pct(achieved / peak) if gf else "-",
                     "-" if bf16 is None else pct(bf16)])
        data.append({"backbone": name, "size": size, "precision": precision, "jit": jit, "batch": batch,
                     "img_per_s": r, "roofline_fraction": achieved / peak if gf else None,
                     "roofline_fraction_bf16": bf16})
        log(f"[backbone] {name} {size}px {precision} jit={jit}: {r:.1f} img/s")
    bf16_note = f"; bfloat16: **{peak_bf16:.1f} GFLOP/s**" if peak_bf16 else ""
    body = (f"{__doc__.strip()}\n\nMeasured float32 matmul ({cfg['matmul_n']} x {cfg['matmul_n']}): "
            f"**{peak:.1f} GFLOP/s**{bf16_note}. Batch {batch}, median of {repeats} runs after a warm-up, "
            f"configurations timed round-robin.\n\n"
            + table(["backbone", "size", "precision", "jit", "batch", "img/s", "GFLOP/s", "% of roofline",
                     "% of bfloat16 matmul"], rows)
            + "\n\n" + NOTE)
    return Section(TITLE, body, data={"rows": data, "matmul_gflops": peak, "matmul_gflops_bf16": peak_bf16})
