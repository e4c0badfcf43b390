"""Vision Transformer throughput (img/s, % of the float32 matmul roofline) and dfl_tf vs PyTorch.

dfl_tf: the registry's ViT backbones (``load_backbone(name, weights="none", precision=...)``,
through a tf.function as extraction calls them), float32 and bfloat16. PyTorch: the same
architecture in plain torch (benchmarks/torch_vit.py: fused qkv, ``scaled_dot_product_attention``)
under ``torch.inference_mode``, float32 and ``torch.autocast("cpu", torch.bfloat16)``, with as many
threads as TensorFlow. All configurations of one model are timed round-robin. FLOP per image
(torch_vit.vit_gflop): patch embedding + 12 d^2 per token and block (qkv, projection, MLP x4)
+ 2 N^2 d per block (attention), 2 FLOP per multiply-add; % of roofline = achieved GFLOP/s /
measured float32 matmul GFLOP/s (bfloat16 can exceed 100 %); bfloat16 rows also against the
measured bfloat16 matmul rate.
"""
from __future__ import annotations

from common import Section, bf16_matmul_gflops, fmt, log, matmul_gflops, pct, table, tf_threads

TITLE = "Vision Transformers: throughput and dfl_tf vs PyTorch"

#: benchmark label -> registry names that build that architecture (first registered one wins)
DFL_NAMES = {
    "ViT-S/16": ("dino_vits16", "vit_s16", "vit_small_patch16_224"),
    "ViT-B/16": ("vit_b16_imagenet", "dino_vitb16", "vit_b16", "vit_base_patch16_224"),
    "ViT-L/14": ("dinov2_vitl14", "vit_l14", "vit_large_patch14_224"),
}
HEADLINE = {"ViT-B/16": "vit_b16", "ViT-S/16": "vit_s16", "ViT-L/14": "vit_l14"}


def dfl_name(label: str) -> str | None:
    """The registry name of ``label``'s architecture, or None when no ViT of that shape is registered."""
    from dfl_tf.backbones.registry import list_specs

    known = {s.name for s in list_specs()}
    return next((n for n in DFL_NAMES[label] if n in known), None)


def dfl_fn(label: str, size: int, precision: str, batch: int, jit: bool = False):
    """(implementation label, callable) for dfl_tf's ``label`` ViT: the registry entry when one is
    registered, else :func:`dfl_tf.backbones.vit.model.build_vit` with the same shape (random weights);
    (None, None) when this checkout has no Keras ViT."""
    from bench_backbone import backbone_fn

    name = dfl_name(label)
    if name is not None:
        return f"dfl_tf {name}", backbone_fn(name, size, precision, batch, jit)
    try:
        from dfl_tf.backbones.vit.model import ViTConfig, build_vit
    except ImportError:
        return None, None
    import keras
    import numpy as np
    import tensorflow as tf

    from torch_vit import VIT_CONFIGS

    patch, dim, depth, heads = VIT_CONFIGS[label]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        model = build_vit(ViTConfig(patch=patch, dim=dim, depth=depth, heads=heads, mlp_hidden=4 * dim,
                                    grid=size // patch), size)
    finally:
        keras.config.set_dtype_policy(previous)
    model.trainable = False
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    f = tf.function(lambda t: model(t, training=False), jit_compile=jit)
    call = lambda: f(x).numpy()  # noqa: E731
    call()  # trace + warm-up
    return "dfl_tf build_vit" + (" (XLA)" if jit else ""), call


def torch_fn(label: str, size: int, batch: int, bf16: bool):
    import numpy as np
    import torch

    from torch_vit import random_vit

    model = random_vit(label, size)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32))

    def call():
        with torch.inference_mode():
            if bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(x)
            else:
                model(x)
    call()  # warm-up
    return call


def run(cfg: dict) -> Section:
    import torch

    from bench_backbone import interleaved_rates
    from torch_vit import vit_gflop

    size, repeats = cfg["size"], cfg["repeats"]
    threads = tf_threads()
    peak = matmul_gflops(cfg["matmul_n"], repeats=3)
    peak_bf16 = bf16_matmul_gflops(cfg)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows, data, headline, missing = [], [], {}, []
    try:
        for label, batch in cfg["models"].items():
            gf = vit_gflop(label, size)
            configs = []  # (implementation, precision, fn)
            for precision in cfg["precisions"]:
                impl, fn = dfl_fn(label, size, precision, batch)
                if fn is None:
                    missing += [] if label in missing else [label]
                else:
                    configs.append((impl, precision, fn))
                if label in cfg["torch"]:
                    configs.append(("PyTorch (SDPA)", precision, torch_fn(label, size, batch, precision == "bfloat16")))
            rates = interleaved_rates([fn for _, _, fn in configs], batch, repeats)
            ours = {p: r for (impl, p, _), r in zip(configs, rates) if impl.startswith("dfl_tf")}
            for (impl, precision, _), r in zip(configs, rates):
                ratio = ours[precision] / r if precision in ours else None
                bf16 = r * gf / peak_bf16 if precision == "bfloat16" and peak_bf16 else None
                rows.append([label, impl, precision, batch, fmt(r), fmt(r * gf), pct(r * gf / peak),
                             "-" if bf16 is None else pct(bf16), "-" if ratio is None else f"{ratio:.2f}"])
                data.append({"model": label, "implementation": impl, "precision": precision, "batch": batch,
                             "img_per_s": r, "gflop_per_image": gf, "roofline_fraction": r * gf / peak,
                             "roofline_fraction_bf16": bf16})
                log(f"[vit] {label} {impl} {precision}: {r:.2f} img/s ({r * gf / peak:.0%} of roofline)")
                if ratio is not None and not impl.startswith("dfl_tf"):
                    headline[f"{HEADLINE[label]}_vs_torch_{precision}"] = ratio  # unrounded, as the table
            del configs
    finally:
        torch.set_num_threads(saved)
    note = ""
    if missing:
        note = f"\n\nThis checkout has no Keras ViT (dfl_tf.backbones.vit): PyTorch rows only for {', '.join(missing)}."
    note += ("\n\n``dfl_tf build_vit``: no registry entry of that shape in this checkout, so the same "
             "Keras architecture is built directly (``dfl_tf.backbones.vit.build_vit``, random weights)."
             if any(d["implementation"].startswith("dfl_tf build_vit") for d in data) else "")
    body = (f"{__doc__.strip()}\n\n{size} px, {threads} threads, median of {repeats} round-robin runs after a "
            f"warm-up; measured float32 matmul ({cfg['matmul_n']} x {cfg['matmul_n']}): **{peak:.1f} GFLOP/s**"
            + (f", bfloat16: **{peak_bf16:.1f} GFLOP/s**." if peak_bf16 else ".")
            + "\n\n" + table(["model", "implementation", "precision", "batch", "img/s", "GFLOP/s", "% of roofline",
                               "% of bfloat16 matmul", "dfl_tf / this"], rows) + note)
    return Section(TITLE, body, headline, {"rows": data, "size": size, "matmul_gflops": peak,
                                           "matmul_gflops_bf16": peak_bf16})
