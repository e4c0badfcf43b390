"""Peak memory of a ViT-g (DINOv2 ViT-g/14, 1.1 B parameters): load a checkpoint, extract, export.

Run directly (not part of ``make bench``: it writes a 4.5 GB checkpoint and needs ~10 GB free)::

    python benchmarks/bench_vit_memory.py [--name dinov2_vitg14] [--images 16] [--export]

1. a child writes a random-weight checkpoint of the architecture in the facebookresearch hub
   layout as ``.safetensors``, tensor by tensor (the writer never holds the model);
2. a fresh child runs ``extract`` on ``--images`` 224 px PNGs with ``--weights`` that file and
   reports its peak resident set (VmHWM) and times; with ``--export`` a second fresh child
   exports the backbone with a linear head as one SavedModel and reports its peak too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRITE = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from dfl_tf.backbones.vit.presets import CONFIGS
cfg, path = CONFIGS[sys.argv[2]], sys.argv[3]
d, h = cfg.dim, cfg.mlp_hidden
shapes = {"cls_token": [1, 1, d], "pos_embed": [1, cfg.pos_prefix + cfg.grid ** 2, d],
          "patch_embed.proj.weight": [d, 3, cfg.patch, cfg.patch], "patch_embed.proj.bias": [d],
          "norm.weight": [d], "norm.bias": [d]}
if cfg.registers:
    shapes["register_tokens"] = [1, cfg.registers, d]
fc1, fc2 = ("w12", "w3") if cfg.mlp == "swiglu" else ("fc1", "fc2")
for i in range(cfg.depth):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": [d], b + "norm1.bias": [d], b + "attn.qkv.weight": [3 * d, d],
                   b + "attn.qkv.bias": [3 * d], b + "attn.proj.weight": [d, d], b + "attn.proj.bias": [d],
                   b + "ls1.gamma": [d], b + "norm2.weight": [d], b + "norm2.bias": [d],
                   b + f"mlp.{fc1}.weight": [(2 if cfg.mlp == "swiglu" else 1) * h, d],
                   b + f"mlp.{fc1}.bias": [(2 if cfg.mlp == "swiglu" else 1) * h],
                   b + f"mlp.{fc2}.weight": [d, h], b + f"mlp.{fc2}.bias": [d], b + "ls2.gamma": [d]})
header, offset = {}, 0
for key, shape in shapes.items():
    n = int(np.prod(shape)) * 4
    header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
    offset += n
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
rng = np.random.default_rng(0)
with open(path, "wb") as fh:
    fh.write(len(text).to_bytes(8, "little")); fh.write(text)
    for key, shape in shapes.items():
        scale = 1.0 if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.02
        value = rng.standard_normal(shape, dtype=np.float32) * 0.02 + (scale if scale == 1.0 else 0.0)
        fh.write(np.ascontiguousarray(value, "<f4").tobytes())
print(json.dumps({"params": sum(int(np.prod(s)) for s in shapes.values()), "bytes": offset}))
"""

EXTRACT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/benchmarks")
from pathlib import Path
from common import write_images
name, ckpt, n, tmp, precision = sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5]), sys.argv[6]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
write_images(tmp / "imgs", n, 224)
from dfl_tf.extraction.local import extract
t0 = time.perf_counter()
manifest = extract(tmp / "imgs", tmp / f"emb_{precision}", backbone=name, weights=ckpt, batch_size=8,
                   precision=precision, progress=False)
print(json.dumps({"precision": precision, "extract_s_with_load": time.perf_counter() - t0,
                  "records": manifest["num_records"], "dim": manifest["dim"], "peak_mib": hwm()}))
"""

EXPORT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
name, ckpt, tmp = sys.argv[2], sys.argv[3], Path(sys.argv[4])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
from dfl_tf import export_model, train_head
emb = tmp / "emb_float32"
if not (tmp / "head" / "head.json").exists():
    train_head(emb, tmp / "head", val=emb, epochs=1, hidden=0, progress=False)
t0 = time.perf_counter()
info = export_model([tmp / "head"], tmp / "export")
print(json.dumps({"export_s": time.perf_counter() - t0, "parity": info["parity"]["passed"], "peak_mib": hwm()}))
"""


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child exited with {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="dinov2_vitg14")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--tmp", default=None, help="working folder (default: a new temp folder)")
    args = parser.parse_args()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_vitg_"))
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = tmp / f"{args.name}.safetensors"
    if not ckpt.exists():
        print(json.dumps({"checkpoint": _child(WRITE, args.name, str(ckpt))}), flush=True)
    for precision in args.precisions.split(","):
        if (tmp / f"emb_{precision}" / "manifest.json").exists():
            continue  # measured by an earlier run into the same --tmp
        print(json.dumps(_child(EXTRACT, args.name, str(ckpt), str(args.images), str(tmp), precision)), flush=True)
    if args.export:
        print(json.dumps(_child(EXPORT, args.name, str(ckpt), str(tmp))), flush=True)


if __name__ == "__main__":
    main()
