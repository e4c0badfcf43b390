"""Head training on frozen embeddings vs end-to-end fine-tuning, one epoch each.

Same N images (random PNGs, two classes) at the same input size. Fine-tuning:
``dfl_tf.baselines.finetune.finetune(epochs=1)`` (its default 25 % validation split, augmentation on);
time = its recorded ``train_seconds`` (Keras fit of one epoch incl. graph tracing and the
validation pass). Heads: ``extract`` once, then ``train_head(epochs=1)`` on the same split;
time = the epoch (Keras callback). Because an epoch over N = a few dozen embeddings is all
fixed overhead, the per-sample rate of head training is also measured on a larger synthetic
set (``n_large`` embeddings of the backbone's dim), which is what the paper's ~1000x compares.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from common import Section, ensure_backbone, fmt, log, table, write_images

TITLE = "Head training vs fine-tuning (one epoch)"


def _head_epoch(emb: Path, out: Path, batch: int) -> tuple[float, int]:
    from bench_heads import train_speed

    r, summary = train_speed(emb, out, batch, cache_gb=2.0)  # 2 epochs, the 2nd timed
    return r, summary["train_records"]


def run(cfg: dict) -> Section:
    from bench_heads import write_synthetic
    from dfl_tf.backbones.registry import load_backbone
    from dfl_tf.extraction.local import extract
    from dfl_tf.baselines.finetune import finetune

    name, size, n, batch = cfg["backbone"], cfg["size"], cfg["n"], cfg["batch"]
    ensure_backbone(name)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ft_"))
    try:
        src = write_images(tmp / "imgs", n, size)
        metrics = finetune(src, tmp / "ft", backbone=name, weights="none", input_size=size, epochs=1,
                           batch_size=batch, progress=False)
        ft_train_n = n - round(n * 0.25)
        ft_s = metrics["train_seconds"]
        ft_rate = ft_train_n / ft_s
        log(f"[finetune] {ft_train_n} train images in {ft_s:.1f}s ({ft_rate:.1f} img/s)")
        steady_s = None
        if cfg.get("steady"):  # 2nd epoch alone = 2-epoch run minus the 1-epoch run (trace paid once)
            m2 = finetune(src, tmp / "ft2", backbone=name, weights="none", input_size=size, epochs=2,
                          batch_size=batch, progress=False)
            steady_s = max(1e-9, m2["train_seconds"] - ft_s)
            log(f"[finetune] steady epoch {steady_s:.1f}s")
        bb = load_backbone(name, weights="none", input_size=size)
        t0 = time.perf_counter()
        extract(src, tmp / "emb", model=bb, batch_size=batch, progress=False)
        ext_s = time.perf_counter() - t0
        head_rate, head_n = _head_epoch(tmp / "emb", tmp / "head", 256)
        head_s = head_n / head_rate
        write_synthetic(tmp / "big", cfg["n_large"], bb.dim)
        big_rate, _ = _head_epoch(tmp / "big", tmp / "head_big", 256)
        log(f"[heads] same-N epoch {head_s:.3f}s, large-N {big_rate:.0f} emb/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ["fine-tune, 1 epoch (incl. trace + val pass)", ft_train_n, f"{ft_s:.2f}", fmt(ft_rate), "1x"],
        *([["fine-tune, a later epoch (2-epoch run minus 1-epoch run)", ft_train_n, f"{steady_s:.2f}",
             fmt(ft_train_n / steady_s), "-"]] if steady_s else []),
        ["extract once (all N, incl. trace)", n, f"{ext_s:.2f}", fmt(n / ext_s), "-"],
        ["head, 1 epoch, same samples", head_n, f"{head_s:.3f}", fmt(head_rate), f"{ft_s / head_s:,.0f}x"
         + (f" ({steady_s / head_s:,.0f}x vs a later epoch)" if steady_s else "")],
        [f"head, 1 epoch, {cfg['n_large']:,} synthetic {bb.dim}-d embeddings", cfg["n_large"],
         f"{cfg['n_large'] / big_rate:.2f}", fmt(big_rate), f"{big_rate / ft_rate:,.0f}x per sample"
         + (f" ({big_rate * steady_s / ft_train_n:,.0f}x vs a later epoch)" if steady_s else "")],
    ]
    body = (f"{__doc__.strip()}\n\n{name} at {size} px, N = {n} images, batch {batch} "
            f"(fine-tuning) / 256 (heads).\n\n"
            + table(["run", "samples", "seconds", "samples/s", "speed-up vs fine-tune"], rows)
            + f"\n\nPer epoch including the one-time extraction, heads need {ext_s + head_s:.1f} s vs "
              f"{ft_s:.1f} s for one fine-tuning epoch; from the second epoch on only the head epoch counts.")
    return Section(TITLE, body)
