"""Heads study (issue 15): is the default head at least as good as a linear probe at every n?

On synthetic embedding sets that mimic frozen-backbone features (n from 50 to 50,000, dim
768-2,560, 4-20 classes, class imbalance, a few informative directions in which every class is
a mixture of two clusters, strong uninformative directions, isotropic noise, ReLU-like
non-negative values) and on the demo slide's tiles (EfficientNet-Lite0, x20 + x5), per seed:

* ``probe``: scikit-learn LogisticRegression, C tuned as ``dfl train`` does (dfl_tf.heads.probe);
* ``default``: what ``dfl train`` does with no options: focal loss, zero-initialised output
  layer; on small training sets (< 2,000 records or < 50 in a class) hidden size (256 or 0),
  weight decay and noise std chosen by grouped stratified 5-fold cross-validation over
  ``selection_cv.DEFAULT_GRID``, or the probe's weights when the probe wins that
  cross-validation; else hidden 256, noise 0.1 and weight decay 1e-4;
* ``linear``: the same with ``--hidden 0``;
* ``no noise`` / ``no weight decay``: the default without feature noise (the rest still
  selected, no probe fallback) / with weight decay 0;
* ``before``: the heads as they were before issue 15: noise 0.1, Adam, random output init.

All heads are trained by :func:`dfl_tf.heads.batched.fit_predict`, the same model, loss and
optimiser as ``dfl train`` (tests/heads/test_heads_selection.py checks it against ``train_head``),
several models in one compiled step. Scores: balanced accuracy on a held-out test set.

    .venv/bin/python benchmarks/bench_heads_study.py            # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/bench_heads_study.py --quick    # small sets only (smoke)
    .venv/bin/python benchmarks/bench_heads_study.py --batch-sizes   # batch 256 vs 512 / 1024, scaled lr (~2-4 min)
    .venv/bin/python benchmarks/bench_heads_study.py --samplers      # table vs exact noise (~2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Heads study: default head vs linear head vs linear probe (issue 15)"
METHODS = ("probe", "default", "linear", "no noise", "no weight decay", "before")
#: name, n_train, dim, classes, imbalance (largest/smallest class ratio 10**imbalance), seeds, epochs
SETS = [
    ("n200 d2560 c8 imb", 200, 2560, 8, 1.0, 2, 50),
    ("n50000 d768 c4 imb", 50000, 768, 4, 0.5, 2, 4),
    ("n50 d1280 c4", 50, 1280, 4, 0.0, 2, 50),
    ("n1000 d768 c20 imb", 1000, 768, 20, 1.0, 2, 50),
    ("n5000 d768 c8 imb", 5000, 768, 8, 0.5, 2, 20),
    ("n20000 d768 c8 imb hard", 20000, 768, 8, 0.5, 2, 10),  # less separated clusters: room for the MLP
]
#: class-centre separation per set (default 4.0)
SEP = {"n20000 d768 c8 imb hard": 2.0}
QUICK = [SETS[0], ("n200 d768 c8 imb", 200, 768, 8, 1.0, 2, 50)]


def synthetic(n: int, dim: int, classes: int, imbalance: float, seed: int, informative: int = 16,
              nuisance: int = 32, sep: float = 4.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings of one task (fixed by dim/classes), samples drawn with ``seed``; groups of 10."""
    rng = np.random.default_rng(seed)
    task = np.random.default_rng(1000 + dim * 7 + classes)
    Q, _ = np.linalg.qr(task.normal(size=(dim, informative + nuisance)))
    centres = task.normal(size=(classes, 2, informative)) * sep / np.sqrt(2)  # two clusters per class
    p = 10.0 ** (-imbalance * np.linspace(0, 1, classes))
    y = rng.choice(classes, size=n, p=p / p.sum())
    mode = rng.integers(0, 2, size=n)
    Z = centres[y, mode] + rng.normal(size=(n, informative))
    X = Z @ Q[:, :informative].T + (3.0 * rng.normal(size=(n, nuisance))) @ Q[:, informative:].T
    X += rng.normal(size=(n, dim))
    X = np.maximum(0.5 * X + 0.3, 0.0) + 0.01 * rng.random((n, dim))
    groups = [f"s{seed}-g{i // 10}" for i in range(n)]
    return X.astype(np.float32), y.astype(np.int64), groups


def demo_embeddings(cache: Path):
    """(train X, y, groups, test X, y) of the demo slide's tiles (demo_out/emb or built once in ``cache``)."""
    from dfl_tf.store.shards import load_embeddings

    for root in (ROOT / "demo_out" / "emb", cache / "emb"):
        if (root / "train" / "manifest.json").exists() and (root / "val" / "manifest.json").exists():
            break
    else:
        import yaml

        from dfl_tf.data.tissue import tile
        from dfl_tf.demo import label_tiles, make_demo_data
        from dfl_tf.extraction.local import extract

        cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        data_cfg = dict(cfg["data"])
        val_fraction = float(data_cfg.pop("val_fraction"))
        data = make_demo_data(cache / "data", **data_cfg)
        tile([data["slide"]], cache / "tiles.csv", overwrite=True, **cfg["tile"])
        label_tiles(cache / "tiles.csv", data["regions"], cache / "labelled.csv", val_fraction)
        for split in ("train", "val"):
            extract(cache / "labelled.csv", cache / "emb" / split, split=split, progress=False, **cfg["extract"])
        root = cache / "emb"
    tr, te = load_embeddings(root / "train"), load_embeddings(root / "val")
    return tr.X, tr.y, tr.groups, te.X, te.y, len(tr.classes)


def run_set(X, y, groups, Xt, yt, C: int, seed: int, epochs: int) -> dict[str, float]:
    """Balanced accuracy of every method on one (train, test) draw."""
    from sklearn.metrics import balanced_accuracy_score

    from dfl_tf.heads.batched import fit_predict
    from dfl_tf.heads.model import standardisation
    from dfl_tf.heads.probe import fit_probe
    from dfl_tf.heads.tuning import (DEFAULT_GRID, DEFAULT_WEIGHT_DECAY, cross_validate, cv_folds,
                                           grid_candidates, is_small)

    fit = dict(lr=1e-3, epochs=epochs, batch_size=256, loss="focal", gamma=2.0, alpha=0.25, dropout=0.0)
    XA = np.concatenate([X, Xt])
    tr, te = np.arange(len(y)), np.arange(len(y), len(y) + len(yt))
    yA = np.concatenate([y, yt])
    scores: dict[str, float] = {}

    def bacc(p):
        return float(balanced_accuracy_score(yt, p.argmax(axis=1)))

    small = is_small(np.bincount(y, minlength=C))
    folds = cv_folds(y, groups, 5, seed)[0] if small else None
    mean, std = standardisation(X)
    probe, probe_info = fit_probe(X, y, C, mean, std, folds=folds, seed=seed)
    scores["probe"] = bacc(probe.predict_proba(Xt))
    if small:  # the selection dfl train runs, and the ablations' own selections, from one grid
        grid = dict(DEFAULT_GRID, noise=[0.0] + list(DEFAULT_GRID["noise"]))
        cv = cross_validate(X, y, C, folds, grid_candidates(grid), [], hidden=256,
                            weight_decay=DEFAULT_WEIGHT_DECAY, seed=seed, **fit)
        means = {(c["hidden"], c["weight_decay"], c["noise"]): c["mean"] for c in cv["scores"]}

        def best(keep):
            return max((k for k in means if keep(*k)), key=lambda k: means[k])

        default = best(lambda h, wd, nz: nz > 0)
        if max(c["mean"] for c in probe_info["scores"]) > means[default]:
            default = "probe"  # as SmallData.select: the head takes the probe's weights
        runs = {"default": default, "linear": best(lambda h, wd, nz: h == 0 and nz > 0),
                "no noise": best(lambda h, wd, nz: nz == 0),
                "no weight decay": best(lambda h, wd, nz: nz > 0 and wd == DEFAULT_GRID["weight_decay"][0])}
        runs["no weight decay"] = (*runs["no weight decay"][:1], 0.0, runs["no weight decay"][2])
    else:
        runs = {"default": (256, DEFAULT_WEIGHT_DECAY, 0.1), "linear": (0, DEFAULT_WEIGHT_DECAY, 0.1),
                "no noise": (256, DEFAULT_WEIGHT_DECAY, 0.0), "no weight decay": (256, 0.0, 0.1)}
    runs["before"] = (256, 0.0, 0.1)
    if runs["default"] == "probe":
        scores["default"] = scores["probe"]
    for h in (256, 0):
        names = [k for k, v in runs.items() if v != "probe" and v[0] == h]
        if not names:
            continue
        probs = fit_predict(XA, yA, C, [tr] * len(names), [te] * len(names), hidden=h,
                            noise=[runs[k][2] for k in names], weight_decay=[runs[k][1] for k in names],
                            zero_output=[k != "before" for k in names], seed=seed, **fit)
        scores.update({k: bacc(p) for k, p in zip(names, probs)})
    scores["choice"] = {"default": runs["default"], "selected": small}
    return scores


def write(rows, raw, t_all, args, done: bool) -> bool:
    """Print the table and (unless --no-write) update results.md; True when default >= probe - 0.01 everywhere."""
    header = "| set | n | " + " | ".join(METHODS) + " | default - probe | default's choice (hidden, wd, noise) | s |"
    lines = [header, "|" + "---|" * (len(METHODS) + 5)]
    ok = True
    for name, n, per, secs in rows:
        mean = {m: float(np.mean([p[m] for p in per])) for m in METHODS}
        std = {m: float(np.std([p[m] for p in per])) for m in METHODS}
        delta = mean["default"] - mean["probe"]
        ok &= delta >= -0.01
        chosen = "; ".join("probe" if p["choice"]["default"] == "probe" else
                           "{}, {:g}, {:g}".format(*p["choice"]["default"]) for p in per
                           ) if per[0]["choice"]["selected"] else "defaults (256, 1e-4, 0.1)"
        lines.append(f"| {name} | {n} | " + " | ".join(f"{mean[m]:.3f} ± {std[m]:.3f}" for m in METHODS)
                     + f" | {delta:+.3f} | {chosen} | {secs:.0f} |")
    total = time.time() - t_all
    verdict = ("default >= probe - 0.01 on every set" if ok else "default below probe - 0.01 on some set")
    if not done:
        verdict += f" (partial: {len(rows)} sets done when this was written)"
    print("\n".join(lines))
    print(f"{verdict}; {total:.0f} s", flush=True)
    if args.no_write:
        return ok
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    subset = (f" --sets {' '.join(repr(x) for x in args.sets)}` (the other rows are kept from earlier runs of the "
              "same day, `benchmarks/heads_study.json`; column s is each set's own time)") if args.sets else "`"
    body = (f"{SECTION}\n\n`benchmarks/bench_heads_study.py{' --quick' if args.quick else ''}{subset}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total:.0f} s for this run (load average at end "
            f"{load} on {os.cpu_count()} cores: times are only indicative). Balanced accuracy on held-out test "
            "data, mean ± std over seeds (synthetic sets: test n 2,000, 5,000 for n 50,000; demo: the "
            "validation tiles). Methods as in the script's docstring; `before` = the heads before issue 15 "
            "(noise 0.1, Adam, random output init). To bound the run time, n 5,000 runs 20 epochs and n 50,000 "
            "4 (the others 50, the demo 40 as configs/demo.yaml).\n\n" + "\n".join(lines) + f"\n\nResult: {verdict}.\n")
    path = ROOT / "benchmarks" / "results.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda _: body.rstrip("\n"), old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new if new.endswith("\n") else new + "\n")
    (ROOT / "benchmarks" / "heads_study.json").write_text(json.dumps(raw, indent=1))
    return ok


BATCH_SECTION = "## Heads study: batch size (issue 17)"
#: (batch size, learning rate); the first is dfl train's default
BATCH_CONFIGS = [(256, 1e-3), (512, 1e-3), (512, 1.4e-3), (512, 2e-3), (1024, 2e-3)]
SAMPLER_SECTION = "## Heads study: noise sampler (issue 17)"
#: the small sets of the sampler study (fixed settings, no selection): noise matters most there
SAMPLER_SMALL = [("n200 d2560 c8 imb", 200, 2560, 8, 1.0, 4, 50), ("n50 d1280 c4", 50, 1280, 4, 0.0, 4, 50),
                 ("n1000 d768 c20 imb", 1000, 768, 20, 1.0, 4, 50)]


def config_study(args, section: str, configs: dict[str, dict], sets: list, intro: str, json_name: str) -> int:
    """Balanced accuracy of the default head (hidden 256, noise 0.1, weight decay 1e-4, batch 256,
    lr 1e-3) with each of ``configs`` (name -> fit_predict overrides; the first is the baseline) on
    ``sets``, same epochs as the heads study; writes ``section`` of results.md and ``json_name``."""
    from sklearn.metrics import balanced_accuracy_score

    from dfl_tf.heads.batched import fit_predict
    from dfl_tf.heads.tuning import DEFAULT_WEIGHT_DECAY

    t_all = time.time()
    names = list(configs)
    lines = ["| set | seeds | epochs | " + " | ".join(names) + " | s |", "|---|---:|---:|" + "---:|" * (len(names) + 1)]
    raw: dict[str, dict[str, list[float]]] = {}
    worst = 0.0
    for name, n, dim, C, imb, seeds, epochs in sets:
        seeds = args.seeds or seeds
        t0 = time.time()
        scores: dict[str, list[float]] = {k: [] for k in names}
        for seed in range(seeds):
            sep = SEP.get(name, 4.0)
            X, y, _ = synthetic(n, dim, C, imb, seed, sep=sep)
            Xt, yt, _ = synthetic(2000 if n <= 5000 else 5000, dim, C, imb, 10_000 + seed, sep=sep)
            XA, yA = np.concatenate([X, Xt]), np.concatenate([y, yt])
            tr, te = np.arange(len(y)), np.arange(len(y), len(yA))
            for key, overrides in configs.items():
                fit = {**dict(hidden=256, noise=[0.1], weight_decay=[DEFAULT_WEIGHT_DECAY], lr=1e-3, epochs=epochs,
                              batch_size=256, seed=seed), **overrides}
                p = fit_predict(XA, yA, C, [tr], [te], **fit)[0]
                scores[key].append(float(balanced_accuracy_score(yt, p.argmax(axis=1))))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), flush=True)
        raw[name] = scores
        base = float(np.mean(scores[names[0]]))
        worst = min([worst] + [float(np.mean(v)) - base for v in scores.values()])
        lines.append(f"| {name} | {seeds} | {epochs} | " + " | ".join(
            f"{np.mean(v):.4f} ± {np.std(v):.4f}" + ("" if k == names[0] else f" ({np.mean(v) - base:+.4f})")
            for k, v in scores.items()) + f" | {time.time() - t0:.0f} |")
    total = time.time() - t_all
    verdict = (f"the largest mean loss against {names[0]} is {-worst:.4f} balanced accuracy"
               if worst < 0 else f"no setting loses accuracy against {names[0]} on these sets")
    print("\n".join(lines) + f"\n{verdict}; {total:.0f} s", flush=True)
    if args.no_write:
        return 0
    flag = "--batch-sizes" if section == BATCH_SECTION else "--samplers"
    body = (f"{section}\n\n`benchmarks/bench_heads_study.py {flag}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total:.0f} s. {intro} Balanced accuracy on "
            "held-out data, mean ± std over seeds (differences under about 2 std are within seed noise); in "
            f"brackets the difference from {names[0]}.\n\n" + "\n".join(lines) + f"\n\nResult: {verdict}.\n")
    path = ROOT / "benchmarks" / "results.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(section) + r".*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda _: body.rstrip("\n"), old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    path.write_text(new if new.endswith("\n") else new + "\n")
    (ROOT / "benchmarks" / json_name).write_text(json.dumps(raw, indent=1) + "\n")
    return 0


def batch_study(args) -> int:
    """The default head at each of ``BATCH_CONFIGS`` on the sets large enough to skip selection."""
    configs = {f"batch {b}, lr {lr:g}": {"batch_size": b, "lr": lr} for b, lr in BATCH_CONFIGS}
    intro = ("Does a larger default batch (faster training: see the heads throughput section) cost accuracy? "
             "The default head (hidden 256, noise 0.1, weight decay 1e-4, focal loss, Adam) on the synthetic sets "
             "with n >= 5,000 (smaller sets go through cross-validated selection), the same epochs as the heads "
             "study. At equal epochs batch 512 and 1024 also take 2x and 4x fewer optimiser steps; the larger learning rates try to make up for that.")
    return config_study(args, BATCH_SECTION, configs, [s_ for s_ in SETS if s_[1] >= 5000], intro,
                        "heads_batch_study.json")


def sampler_study(args) -> int:
    """The default head with fresh Gaussian noise vs the table noise sampler (the default)."""
    configs = {"exact": {"noise_sampler": "exact"}, "table (default)": {"noise_sampler": "table"}}
    intro = ("Does drawing the feature noise from the fixed table (``sampler: table``, the default: signed "
             "windows of 2^22 Gaussian numbers from one random offset per batch) cost accuracy against fresh Gaussian numbers (``sampler: "
             "exact``)? The default head (hidden 256, noise 0.1, weight decay 1e-4, focal loss, Adam, batch 256) "
             "with fixed settings on small sets (where noise matters most; 4 seeds) and on the sets with "
             "n >= 5,000, the same epochs as the heads study.")
    return config_study(args, SAMPLER_SECTION, configs, SAMPLER_SMALL + [s_ for s_ in SETS if s_[1] >= 5000],
                        intro, "heads_sampler_study.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Two small sets, fewer seeds (smoke run).")
    parser.add_argument("--no-demo", action="store_true", help="Skip the demo slide's tiles.")
    parser.add_argument("--no-write", action="store_true", help="Do not update benchmarks/results.md.")
    parser.add_argument("--sets", nargs="+", default=None,
                        help="Run only these sets (names as in SETS, e.g. 'n50 d1280 c4'; 'demo' for the demo "
                             "tiles); the other sets' results are kept from benchmarks/heads_study.json.")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "bench_heads_study"),
                        help="Where the demo tiles' embeddings are built once.")
    parser.add_argument("--batch-sizes", action="store_true",
                        help="Instead: the default head at batch 256 vs 512 and 1024 (some with scaled learning rates) on the "
                             "sets with n >= 5,000 (~2-4 min).")
    parser.add_argument("--seeds", type=int, default=None,
                        help="With --batch-sizes / --samplers: seeds per set (default: each set's own).")
    parser.add_argument("--samplers", action="store_true",
                        help="Instead: the default head with the table vs the exact noise sampler (~2 min).")
    args = parser.parse_args(argv)
    if args.batch_sizes or args.samplers:
        if args.quick or args.sets:
            parser.error("--batch-sizes / --samplers run their own fixed sets: drop --quick / --sets")
        return batch_study(args) if args.batch_sizes else sampler_study(args)
    t_all = time.time()
    rows, raw = [], {}
    sets = QUICK if args.quick else SETS
    if args.sets:
        known = json.loads((ROOT / "benchmarks" / "heads_study.json").read_text()) if (
            ROOT / "benchmarks" / "heads_study.json").exists() else {}
        for name, _n, *_ in SETS:
            if name not in args.sets and name in known:
                raw[name] = known[name]
                rows.append((name, known[name]["n"], known[name]["runs"], known[name]["seconds"]))
        sets = [s_ for s_ in SETS if s_[0] in args.sets]
    for name, n, dim, C, imb, seeds, epochs in sets:
        t0 = time.time()
        per = []
        for seed in range(seeds):
            sep = SEP.get(name, 4.0)
            X, y, g = synthetic(n, dim, C, imb, seed, sep=sep)
            Xt, yt, _ = synthetic(2000 if n <= 5000 else 5000, dim, C, imb, 10_000 + seed, sep=sep)
            per.append(run_set(X, y, g, Xt, yt, C, seed, epochs))
            print(f"{name} seed {seed}: " + ", ".join(f"{m} {per[-1][m]:.3f}" for m in METHODS), flush=True)
        raw[name] = {"n": n, "seconds": round(time.time() - t0), "runs": per}
        rows.append((name, n, per, time.time() - t0))
        write(rows, raw, t_all, args, done=False)  # partial results land even if the run is cut short
    if not args.no_demo and not args.quick and (not args.sets or "demo" in args.sets):
        t0 = time.time()
        X, y, g, Xt, yt, C = demo_embeddings(Path(args.cache))
        per = [run_set(X, y, g, Xt, yt, C, seed, 40) for seed in range(2)]
        raw["demo tiles"] = {"n": len(y), "seconds": round(time.time() - t0), "runs": per}
        rows.append((f"demo tiles (n{len(y)} d{X.shape[1]} c{C})", len(y), per, time.time() - t0))
        print("demo: " + ", ".join(f"{m} {np.mean([p[m] for p in per]):.3f}" for m in METHODS), flush=True)
        write(rows, raw, t_all, args, done=False)

    ok = write(rows, raw, t_all, args, done=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
