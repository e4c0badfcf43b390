"""Where a ViT's time goes, and the A/B of dfl_tf's ViT kernels against the previous ones.

Run by hand (about 4 min on 2 cores)::

    python benchmarks/vit_kernels.py --json benchmarks/vit_kernels.json

1. **Per op** at ViT-S/16 shapes (batch 32 x 197 tokens, width 384, 6 heads), in bfloat16 (the
   ``mixed_bfloat16`` policy's dtypes), each through a tf.function, median of several runs:
   LayerNorm as Keras' ``LayerNormalization`` (float32 inside, eleven ops), as
   ``dfl_tf.backbones.vit.model.LayerNorm`` (float32, five ops) and as torch's ``layer_norm`` under
   autocast; attention (from the fused qkv output to the head-merged output, scaling and softmax
   included) as before (q/k/v strided slices, float32 einsums and softmax), as now (one
   transpose, matmuls in bfloat16, float32 softmax) and as torch's
   ``scaled_dot_product_attention`` in bfloat16.
2. **Whole model A/B**: the registry's ViT-S/16 and ViT-B/16 (weights "none", the same weights in
   every variant), ``previous`` (Keras' LayerNormalization and the float32 attention, patched in
   here) against ``current``, float32 and bfloat16, timed round-robin, plus each variant's relative
   L2 distance to the float32 ``previous`` model's embeddings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import _measure_matmul, cpu_bf16, cpu_model, median, tf_threads  # noqa: E402


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def previous_attention(self, x, tokens):
    """The attention dfl_tf ran before 2026-11-28 (session 10): strided q/k/v, float32 einsums."""
    import tensorflow as tf
    from keras import ops

    head_dim = self.dim // self.heads
    qkv = ops.cast(ops.reshape(self._dense(self.qkv, x), (-1, tokens, 3, self.heads, head_dim)), "float32")
    q, k, v = qkv[:, :, 0] * head_dim ** -0.5, qkv[:, :, 1], qkv[:, :, 2]
    weights = tf.nn.softmax(tf.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    out = tf.reshape(tf.einsum("bhqk,bkhd->bqhd", weights, v), (-1, self.dim))
    return self._dense(self.proj, ops.cast(out, self.compute_dtype))


def per_op(repeats: int) -> dict[str, float]:
    import keras
    import numpy as np
    import tensorflow as tf
    import torch

    from dfl_tf.backbones.vit.model import LayerNorm, ViTBlock

    batch, tokens, dim, heads = 32, 197, 384, 6
    rng = np.random.default_rng(0)
    x = tf.cast(rng.standard_normal((batch * tokens, dim)).astype("float32"), tf.bfloat16)
    qkv_out = tf.cast(rng.standard_normal((batch * tokens, 3 * dim)).astype("float32"), tf.bfloat16)
    out = {}
    for label, cls in (("LayerNorm: Keras LayerNormalization", keras.layers.LayerNormalization),
                       ("LayerNorm: dfl_tf LayerNorm", LayerNorm)):
        layer = cls(epsilon=1e-6, dtype="mixed_bfloat16")
        layer.build((None, dim))
        f = tf.function(layer)
        out[label] = _ms(lambda f=f: f(x).numpy(), repeats)

    class Attention:  # the block's attention with its projections taken out (identity qkv, no proj)
        def __init__(self, method, compute_dtype):
            self.dim, self.heads, self.compute_dtype, self.method = dim, heads, compute_dtype, method
            self.qkv = self.proj = None

        def _dense(self, layer, h):
            return h

        def __call__(self, h):
            return self.method(self, h, tokens)

    for label, method in (("attention: previous (strided q/k/v, float32 einsums)", previous_attention),
                          ("attention: current (one transpose, bfloat16 matmuls, float32 softmax)",
                           ViTBlock._attention)):
        f = tf.function(Attention(method, "bfloat16"))
        out[label] = _ms(lambda f=f: f(qkv_out).numpy(), repeats)

    saved = torch.get_num_threads()
    torch.set_num_threads(tf_threads())  # as many as TensorFlow's intra-op pool
    try:
        tx = torch.from_numpy(rng.standard_normal((batch * tokens, dim)).astype("float32")).bfloat16()
        tq = torch.from_numpy(rng.standard_normal((batch, heads, tokens, dim // heads)).astype("float32")).bfloat16()
        norm = torch.nn.LayerNorm(dim, eps=1e-6)

        def autocast(fn):
            def call():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    fn()
            return call

        out["LayerNorm: torch layer_norm (autocast)"] = _ms(autocast(lambda: norm(tx)), repeats)
        out["attention: torch scaled_dot_product_attention (bfloat16)"] = _ms(
            autocast(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tq, tq)), repeats)
    finally:
        torch.set_num_threads(saved)
    return out


def whole_model(names: dict[str, int], repeats: int) -> list[dict]:
    import keras
    import numpy as np
    import tensorflow as tf

    from dfl_tf.backbones.vit import model as vit
    from dfl_tf.backbones.registry import load_backbone

    current = (vit.ViTBlock._attention, vit.LayerNorm.call)
    previous = (previous_attention, keras.layers.LayerNormalization.call)
    rows = []
    for name, batch in names.items():
        x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype("float32"))
        fns, outs, weights, reference = {}, {}, None, None
        try:
            for precision in ("float32", "bfloat16"):
                for variant, (attention, norm) in (("previous", previous), ("current", current)):
                    vit.ViTBlock._attention, vit.LayerNorm.call = attention, norm
                    bb = load_backbone(name, weights="none", input_size=224, precision=precision)
                    if weights is None:
                        weights = bb.model.get_weights()
                    bb.model.set_weights(weights)
                    f = tf.function(lambda t, m=bb.model: m(t, training=False))
                    outs[precision, variant] = f(x).numpy()  # traced with this variant's methods
                    fns[precision, variant] = lambda f=f: f(x).numpy()
            reference = outs["float32", "previous"]
        finally:
            vit.ViTBlock._attention, vit.LayerNorm.call = current
        times = {key: [] for key in fns}
        for _ in range(repeats):
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        for (precision, variant), t in times.items():
            diff = np.linalg.norm(outs[precision, variant] - reference) / np.linalg.norm(reference)
            rows.append({"model": name, "precision": precision, "variant": variant, "batch": batch,
                         "img_per_s": batch / median(t), "rel_l2_vs_float32_previous": float(diff)})
            print(f"[vit_kernels] {name} {precision} {variant}: {rows[-1]['img_per_s']:.2f} img/s, "
                  f"relative L2 {diff:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["dino_vits16:32", "vit_b16_imagenet:16"],
                        help="registry name:batch")
    args = parser.parse_args()
    import tensorflow as tf

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = _measure_matmul(2048, 3)
    ops = per_op(args.repeats)
    for label, ms in ops.items():
        print(f"[vit_kernels] {label}: {ms:.2f} ms", flush=True)
    models = whole_model({m.split(":")[0]: int(m.split(":")[1]) for m in args.models}, args.repeats)
    result = {"date": started, "cpu": cpu_model(), "cpu_bf16": cpu_bf16(), "tensorflow": tf.__version__,
              "matmul_gflops_2048_before_after": [before, _measure_matmul(2048, 3)],
              "per_op_ms_vits16_bfloat16": ops, "whole_model": models}
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
