"""Run all benchmarks (``make bench``): rewrite benchmarks/results.md and benchmarks/results.json.

    .venv/bin/python benchmarks/run_all.py            # moderate sizes (~15-20 min on 2 idle cores)
    .venv/bin/python benchmarks/run_all.py --quick    # small sizes (~3-5 min)
    .venv/bin/python benchmarks/run_all.py --only torch vit reader extract heads --out r.md --json r.json

``--tiny`` (smoke test only) uses a 2-conv backbone and minimal sizes: tables, not speed.
Sections already in the results file that this run does not produce (e.g. the heads study's)
are kept. The JSON holds the machine info, each section's measurements and a ``headline``
object of ratios (``resnet50_vs_torch_float32``, ..., ``head_train_roofline_fraction``); with
``--only``, headline entries and sections of the previous JSON that this run did not produce are kept.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, Section, _measure_matmul, load_avg, log, machine_info, update_readme,  # noqa: E402
                    write_json, write_results)

BENCHES = ("backbone", "vit", "torch", "extract", "reader", "heads", "finetune", "shards", "memory", "serving")
DEFAULT_OUT = ROOT / "benchmarks" / "results.md"
VIT_FULL = {"ViT-S/16": 32, "ViT-B/16": 16, "ViT-L/14": 4}  # model -> batch


def configs(mode: str, repeats: int | None) -> dict[str, dict]:
    if mode == "full":
        c = {
            "backbone": dict(backbone="resnet50", sizes=[224, 256], precisions=["float32", "bfloat16"], batch=32,
                             repeats=3, matmul_n=4096, jit=True),
            "extract": dict(backbone="resnet50", size=224, batch=32, n=160, repeats=3),
            "torch": dict(size=224, batch=32, repeats=3),
            "vit": dict(size=224, models=VIT_FULL, torch=["ViT-S/16", "ViT-B/16"], precisions=["float32", "bfloat16"],
                        repeats=3, matmul_n=4096),
            "reader": dict(size=224, n=200, repeats=3, slide_side=4096),
            "heads": dict(n=100_000, dims=[2048], batch=256, hidden=256, matmul_n=4096, noise=[None, 0.0],
                          extra_batches=[1024], levers=7),
            "finetune": dict(backbone="resnet50", size=224, n=64, batch=16, n_large=20000, steady=True),
            "shards": dict(dims=[2048], n=20000, repeats=3),
            "memory": dict(backbone="resnet50", size=32, counts=[1000, 10000]),
            "serving": dict(backbone="resnet50", size=224, batches=[1, 16], repeats=3),
        }
    elif mode == "quick":
        c = {
            "backbone": dict(backbone="resnet50", sizes=[128], precisions=["float32", "bfloat16"], batch=16,
                             repeats=2, matmul_n=1024, jit=True),
            "extract": dict(backbone="resnet50", size=96, batch=16, n=32, repeats=2),
            "torch": dict(size=128, batch=16, repeats=2),
            "vit": dict(size=224, models={"ViT-S/16": 16, "ViT-B/16": 8}, torch=["ViT-S/16", "ViT-B/16"],
                        precisions=["float32", "bfloat16"], repeats=2, matmul_n=1024),
            "reader": dict(size=224, n=60, repeats=2, slide_side=2048),
            "heads": dict(n=20_000, dims=[2048], batch=256, hidden=256, matmul_n=1024, noise=[None, 0.0],
                          extra_batches=[1024], levers=3),
            "finetune": dict(backbone="resnet50", size=64, n=32, batch=8, n_large=5000),
            "shards": dict(dims=[2048], n=5000, repeats=2),
            "memory": dict(backbone="resnet50", size=32, counts=[200, 2000]),
            "serving": dict(backbone="resnet50", size=96, batches=[1, 8], repeats=2),
        }
    else:  # tiny: structure only
        c = {
            "backbone": dict(backbone="bench_tiny", sizes=[32], precisions=["float32", "bfloat16"], batch=4, repeats=1,
                             matmul_n=128, jit=False),
            "extract": dict(backbone="bench_tiny", size=32, batch=4, n=8, repeats=1),
            "torch": dict(backbone="bench_tiny", size=32, batch=2, repeats=1),
            "vit": dict(size=32, models={"ViT-S/16": 2}, torch=["ViT-S/16"], precisions=["float32", "bfloat16"], repeats=1,
                        matmul_n=128),
            "reader": dict(size=32, n=4, repeats=1, slide_side=512, svs=False),
            "heads": dict(n=512, dims=[16], batch=64, hidden=8, matmul_n=128, extra_batches=[128], levers=1),
            "finetune": dict(backbone="bench_tiny", size=32, n=8, batch=4, n_large=256),
            "shards": dict(dims=[16], n=100, repeats=1),
            "memory": dict(backbone="bench_tiny", size=32, counts=[10, 20], parallel=True),
            "serving": dict(backbone="bench_tiny", size=32, batches=[2], repeats=1),
        }
    if repeats:
        for v in c.values():
            if "repeats" in v:
                v["repeats"] = repeats
    return c


#: Relative change of the matmul rate across a section above which results.md flags the section.
SPEED_DRIFT = 0.10


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--tiny", action="store_true", help="minimal sizes and a toy backbone (smoke test)")
    parser.add_argument("--only", nargs="+", choices=BENCHES, help="run only these benchmarks")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results file (the default, benchmarks/results.md, also updates README's summary)")
    parser.add_argument("--json", type=Path, help="machine-readable results (default: --out with .json)")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = configs(mode, args.repeats)
    info = machine_info()
    log(f"machine: {info}")
    sections: list[Section] = []
    t_all = time.perf_counter()
    probe_n = {"full": 2048, "quick": 1024}.get(mode, 128)
    for name in args.only or BENCHES:
        module = __import__({"finetune": "bench_finetune_vs_heads"}.get(name, f"bench_{name}"))
        speed0 = _measure_matmul(probe_n, 3)
        t0 = time.perf_counter()
        try:
            section = module.run(cfg[name])
        except Exception:  # one failing benchmark should not lose the others
            if mode == "tiny":
                raise
            section = Section(module.TITLE, f"**Failed:**\n\n```\n{traceback.format_exc()[-3000:]}\n```")
        section.body += (f"\n\n_Measured by this run ({info['date']}); section time {time.perf_counter() - t0:.0f} s; "
                         f"load average (1/5/15 min) after: {load_avg()}._")
        section.data["seconds"] = round(time.perf_counter() - t0, 1)
        section.data["load_after"] = load_avg()
        speed1 = _measure_matmul(probe_n, 3)
        section.data["matmul_gflops_before_after"] = [round(speed0, 1), round(speed1, 1)]
        if mode != "tiny" and abs(speed1 / speed0 - 1) > SPEED_DRIFT:  # tiny: too small a matmul to tell
            section.body += (f"\n\n**The machine's speed changed during this section** (float32 matmul "
                             f"{speed0:.0f} GFLOP/s before, {speed1:.0f} after, {probe_n}^2): its ratios are less "
                             "reliable than usual (another tenant or CPU throttling); rerun it on a quiet machine.")
            log(f"!! {name}: machine speed changed during the section ({speed0:.0f} -> {speed1:.0f} GFLOP/s)")
        sections.append(section)
        log(f"== {name}: {time.perf_counter() - t0:.0f}s")
    info["load_end"] = load_avg()
    flags = [a for a in (argv if argv is not None else sys.argv[1:])]
    for flag in ("--out", "--json"):
        if flag in flags:
            i = flags.index(flag)
            del flags[i:i + 2]
    command = (f"`{' '.join(['benchmarks/run_all.py', *flags])}` (mode {mode}, "
               f"total {time.perf_counter() - t_all:.0f} s)")
    path = write_results(args.out, info, sections, command)
    json_path = args.json or args.out.with_suffix(".json")
    result = write_json(json_path, info, sections, command, keep_old=bool(args.only))
    log(f"wrote {path} and {json_path}")
    if mode != "tiny" and args.out.resolve() == DEFAULT_OUT.resolve() and update_readme(ROOT / "README.md", result):
        log("updated the benchmark summary in README.md")
    return path


if __name__ == "__main__":
    main()
