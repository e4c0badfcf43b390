"""How many slide-reader cores one GPU needs: backbone img/s on a GPU and raw OpenSlide tiles/s per
process on that GPU box's own CPUs.

Run by hand on a GPU machine (not part of ``make bench``, which runs on the CPU box). The GPU side
uses PyTorch/torchvision as the stand-in for the backbone, because the lent GPU machines carry
PyTorch but no TensorFlow (a TensorFlow GPU wheel is far over what can be carried there); on the
CPU box, dfl_tf runs ResNet-50 at >= 1.0x the same PyTorch model (see results.md), so these rates
are what a dfl_tf backbone has to be fed at, not a claim about dfl_tf on a GPU.

* GPU: torchvision ResNet-50 and ViT-B/16 (random weights: speed does not depend on them) at
  224 px, ``channels_last`` + ``inference_mode``, float32 (TF32 allowed, the PyTorch default for
  cuDNN convolutions) and bfloat16 autocast, batch 256, after warm-up.
* CPU: raw ``openslide.read_region`` of 224 px level-0 tiles + ``convert("RGB")`` + ``np.asarray``
  with 1..N worker processes, each with its own handle, over the same grid of tiles; tiles/s total
  and per process. The slide is the one given (``--slide``): bench_reader.py's synthetic JPEG
  pyramid, written on the CPU box and carried.

Output: a JSON file (``--json``) and a printed summary.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

from common import cpu_model


def gpu_rates(batch: int, seconds: float) -> list[dict]:
    """img/s of torchvision ResNet-50 and ViT-B/16 on the first GPU."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name, build in (("resnet50", torchvision.models.resnet50), ("vit_b_16", torchvision.models.vit_b_16)):
        model = build(weights=None).cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        for precision in ("float32", "bfloat16"):
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bfloat16"):
                for _ in range(5):
                    model(x)
                torch.cuda.synchronize()
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    model(x)
                    done += batch
                torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            rows.append({"model": name, "precision": precision, "batch": batch, "img_per_s": done / elapsed})
            print(f"gpu {name} {precision}: {done / elapsed:.0f} img/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def read_tiles(args: tuple[str, list[tuple[int, int]], int]) -> int:
    import numpy as np
    import openslide

    path, coords, size = args
    slide = openslide.OpenSlide(path)
    for x, y in coords:
        np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
    slide.close()
    return len(coords)


def reader_rates(path: str, size: int, workers: list[int], per_worker: int) -> list[dict]:
    """Raw OpenSlide tiles/s with k processes, each reading ``per_worker`` distinct tiles."""
    import openslide

    width, height = openslide.OpenSlide(path).dimensions
    grid = [(x, y) for y in range(0, height - size, size) for x in range(0, width - size, size)]
    rows = []
    ctx = mp.get_context("spawn")
    for k in workers:
        # each worker gets its own strip of the grid (cycled when the slide is small): no shared cache
        jobs = [(path, [grid[(w * per_worker + i) % len(grid)] for i in range(per_worker)], size) for w in range(k)]
        with ctx.Pool(k) as pool:
            pool.map(read_tiles, [(path, job[1][:8], size) for job in jobs])  # warm-up, imports
            start = time.perf_counter()
            total = sum(pool.map(read_tiles, jobs))
            elapsed = time.perf_counter() - start
        rows.append({"processes": k, "tiles_per_s": total / elapsed, "tiles_per_s_per_process": total / elapsed / k})
        print(f"reader {k} proc: {total / elapsed:.0f} tiles/s ({total / elapsed / k:.0f} per process)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", required=True, help="pyramidal TIFF/SVS to read")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per GPU row")
    parser.add_argument("--per-worker", type=int, default=600, help="tiles each reader process reads")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers = sorted({k for k in (1, 2, 4, 8, cores) if k <= cores})
    result = {"machine": {"cpu": cpu_model(), "cores": cores,
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    try:
        import torch
        result["machine"].update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    except Exception as exc:  # noqa: BLE001 - record, do not fail the reader half
        result["machine"]["gpu"] = f"unavailable: {exc}"
    result["slide"] = os.path.basename(args.slide)
    result["reader"] = reader_rates(args.slide, args.size, workers, args.per_worker)
    result["gpu"] = gpu_rates(args.batch, args.seconds)
    per_core = result["reader"][0]["tiles_per_s_per_process"]
    result["cores_needed"] = {f"{r['model']}_{r['precision']}": round(r["img_per_s"] / per_core, 1)
                              for r in result["gpu"]}
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result["cores_needed"]))


if __name__ == "__main__":
    main()
