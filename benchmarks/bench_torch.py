"""dfl_tf ResNet-50 vs the same ResNet-50 in plain PyTorch (CPU), as a PyTorch user would run it.

PyTorch: tests/helpers/torch_resnet.py (torchvision layout, random weights, eval mode), ``features()``
(pooled 2048-d, like the dfl_tf backbone), under ``torch.inference_mode``: NCHW float32 (the
naive baseline), ``channels_last`` float32 (the fast CPU layout for oneDNN convolutions) and
``channels_last`` + ``torch.autocast("cpu", torch.bfloat16)``, and both of those with every
convolution's BatchNorm folded into it (``torch.nn.utils.fusion.fuse_conv_bn_eval``, what
``torch.fx``'s and ``torch.ao``'s fusion passes do; dfl_tf folds its own, see
``dfl_tf/backbones/fold.py``). dfl_tf: ``load_backbone("resnet50",
weights="none", precision=...)`` through a tf.function, float32 and bfloat16. PyTorch runs with
as many threads as TensorFlow's intra-op pool; every configuration is timed round-robin (run r
of each, then run r + 1), so a change of machine load hits all alike. Ratio = dfl_tf img/s /
torch img/s at the same precision (target >= 1.0); the headline compares with the fastest
PyTorch configuration of each precision.
"""
from __future__ import annotations

from common import Section, ensure_backbone, fmt, log, table, tf_threads

TITLE = "dfl_tf vs PyTorch ResNet-50"


def torch_fns(model, x, channels_last: bool, bf16: bool):
    """A no-argument callable running ``model.features`` on ``x`` in the given layout/precision."""
    import torch

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def call():
        with torch.inference_mode():
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model.features(x)
            else:
                model.features(x)
    return call


def fold_conv_bn(model):
    """A copy of the torch_resnet model with each BatchNorm2d folded into the Conv2d before it."""
    import copy

    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for module in model.modules():
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            if isinstance(getattr(module, conv, None), nn.Conv2d) and isinstance(getattr(module, bn, None),
                                                                                nn.BatchNorm2d):
                setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
                setattr(module, bn, nn.Identity())
        if (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d)
                and isinstance(module[1], nn.BatchNorm2d)):  # downsample
            module[0], module[1] = fuse_conv_bn_eval(module[0], module[1]), nn.Identity()
    return model


def run(cfg: dict) -> Section:
    import copy

    import numpy as np
    import torch

    from bench_backbone import backbone_fn, interleaved_rates
    from tests.helpers.torch_resnet import random_resnet50

    size, batch, repeats = cfg["size"], cfg["batch"], cfg["repeats"]
    name = cfg.get("backbone", "resnet50")  # bench_tiny only in the smoke test (no meaningful ratio)
    ensure_backbone(name)
    threads = tf_threads()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32))
        base = random_resnet50().eval()
        configs = [  # (label, precision, callable)
            (f"dfl_tf {name} (TensorFlow)", "float32", backbone_fn(name, size, "float32", batch)),
            (f"dfl_tf {name} (TensorFlow)", "bfloat16", backbone_fn(name, size, "bfloat16", batch)),
            ("PyTorch NCHW", "float32", torch_fns(base, x, False, False)),
            ("PyTorch channels_last", "float32", torch_fns(copy.deepcopy(base), x, True, False)),
            ("PyTorch channels_last + bf16 autocast", "bfloat16", torch_fns(copy.deepcopy(base), x, True, True)),
            ("PyTorch channels_last, BN folded", "float32", torch_fns(fold_conv_bn(base), x, True, False)),
            ("PyTorch channels_last, BN folded + bf16 autocast", "bfloat16", torch_fns(fold_conv_bn(base), x, True,
                                                                                      True)),
        ]
        for _, _, fn in configs[2:]:
            fn()  # warm-up (oneDNN primitive creation); the TF ones were traced and warmed up
        rates = interleaved_rates([fn for _, _, fn in configs], batch, repeats)
    finally:
        torch.set_num_threads(saved_threads)
    ours = {"float32": rates[0], "bfloat16": rates[1]}
    rows, data = [], []
    for (label, precision, _), r in zip(configs, rates):
        ratio = ours[precision] / r
        rows.append([label, precision, threads, fmt(r), f"{ratio:.2f}"])
        data.append({"implementation": label, "precision": precision, "threads": threads, "img_per_s": r})
        log(f"[torch] {label} {precision}: {r:.1f} img/s (dfl_tf / this {ratio:.2f})")
    best = {p: max(r for (_, q, _), r in list(zip(configs, rates))[2:] if q == p) for p in ("float32", "bfloat16")}
    best_fp32, best_bf16 = best["float32"], best["bfloat16"]
    # unrounded: the README summary formats these as the body does (no double rounding)
    headline = {"resnet50_vs_torch_float32": rates[0] / best_fp32,
                "resnet50_vs_torch_bfloat16": rates[1] / best_bf16} if name == "resnet50" else {}
    body = (f"{__doc__.strip()}\n\n{size} px, batch {batch}, {threads} threads for both, median of {repeats} "
            f"round-robin runs after a warm-up.\n\n"
            + table(["implementation", "precision", "threads", "img/s", "dfl_tf / this"], rows)
            + f"\n\nHeadline: float32 **{rates[0] / best_fp32:.2f}x** the fastest PyTorch float32 configuration, "
              f"bfloat16 **{rates[1] / best_bf16:.2f}x** the fastest PyTorch bfloat16 one.")
    return Section(TITLE, body, headline, {"rows": data, "size": size, "batch": batch, "repeats": repeats})
