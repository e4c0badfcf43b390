"""dfl_tf ResNet-50 vs the same ResNet-50 in plain PyTorch (CPU).

PyTorch: tests/torch_resnet.py (torchvision layout, random weights, eval mode,
torch.inference_mode, NCHW float32), ``features()`` (pooled 2048-d, like the dfl_tf backbone).
dfl_tf: ``load_backbone("resnet50", weights="none")`` through a tf.function. Same input size,
batch and number of runs; ratio = dfl_tf img/s / torch img/s (target >= 1.0). PyTorch is
measured with its default thread count and with threads = TensorFlow's intra-op threads.
"""
from __future__ import annotations

from common import Section, ensure_backbone, fmt, log, table, tf_threads

TITLE = "dfl_tf vs PyTorch ResNet-50"


def run(cfg: dict) -> Section:
    import numpy as np
    import torch

    from bench_backbone import backbone_fn, interleaved_rates
    from torch_resnet import random_resnet50

    size, batch, repeats = cfg["size"], cfg["batch"], cfg["repeats"]
    name = cfg.get("backbone", "resnet50")  # bench_tiny only in the smoke test (no meaningful ratio)
    ensure_backbone(name)
    tf_call = backbone_fn(name, size, "float32", batch)
    model = random_resnet50().eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32))

    def call():
        with torch.inference_mode():
            model.features(x)

    default_threads = torch.get_num_threads()

    def with_threads(threads):
        def run_torch():
            torch.set_num_threads(threads)
            call()
        return run_torch

    thread_counts = list(dict.fromkeys([default_threads, tf_threads()]))
    fns = [with_threads(t) for t in thread_counts]
    for fn in fns:
        fn()  # warm-up
    tf_rate, *torch_rates = interleaved_rates([tf_call, *fns], batch, repeats)  # round-robin
    torch.set_num_threads(default_threads)
    rows = [[f"dfl_tf {name} (TensorFlow)", tf_threads(), fmt(tf_rate), "1.00"]]
    for threads, r in zip(thread_counts, torch_rates):
        rows.append([f"PyTorch {torch.__version__}" + (" (default threads)" if threads == default_threads else ""),
                     threads, fmt(r), f"{tf_rate / r:.2f}"])
        log(f"[torch] threads {threads}: {r:.1f} img/s, dfl_tf {tf_rate:.1f} img/s")
    body = (f"{__doc__.strip()}\n\n{size} px, batch {batch}, median of {repeats} runs after a warm-up, TensorFlow and PyTorch timed round-robin.\n\n"
            + table(["implementation", "threads", "img/s", "dfl_tf / this"], rows))
    return Section(TITLE, body)
