"""Head training throughput vs raw TFRecord read speed (not run by the tests).

Writes synthetic float16 shards of N records (default 200k) at each dim (default 2048 and 4096)
into a temporary directory, then measures in the same run:

* read: records/s of one full pass of ``record_dataset(emb_dir, batch_size=B)`` (parse +
  float16 -> float32), after one warm-up pass (so both sides read from the page cache);
* train (in memory): embeddings/s of the second epoch of ``train_head(hidden=256)`` with the
  records held in memory (the default when they fit in ``cache_gb``);
* train (streamed): the same with ``cache_gb=0`` (records re-read from the shards every epoch).

Prints a markdown table and appends/updates a section in benchmarks/results.md.

    .venv/bin/python benchmarks/bench_heads.py                     # 200k records, dims 2048 4096
    .venv/bin/python benchmarks/bench_heads.py --n 50000 --dims 2048
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Heads: training throughput vs read speed"
NOTE = ("Target (issue 3): training >= 80 % of read speed. Training a hidden-256 head costs about "
            "6 x dim x 256 FLOP per embedding (forward + backward), so on a few CPU cores it is compute-bound "
            "well below the TFRecord parse rate; the streamed run also pays per-record shuffling.")


def machine_info() -> str:
    import tensorflow as tf

    from common import cpu_model

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU: {cpu}, {cores} cores available (os.cpu_count {os.cpu_count()}); "
            f"Python {platform.python_version()}; TensorFlow {tf.__version__}")


def write_synthetic(path: Path, n: int, dim: int, shard_size: int = 8192, seed: int = 0) -> None:
    from dfl_tf.runtime.files import atomic_write_json
    from dfl_tf.store.manifest import FORMAT_VERSION, MANIFEST
    from dfl_tf.store.shards import make_example, write_shard

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, dim)).astype(np.float32)
    path.mkdir(parents=True)
    shards, counts = [], [0, 0]
    for k, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        y = rng.integers(0, 2, m)
        X = (centres[y] + rng.normal(size=(m, dim)).astype(np.float32)).astype(np.float16)
        counts[0] += int((y == 0).sum())
        counts[1] += int((y == 1).sum())
        name = f"shard-{k:05d}.tfrecord"
        count, digest = write_shard(path / name, (make_example(X[i], int(y[i]), f"r{start + i}", "synthetic")
                                                  for i in range(m)))
        shards.append({"file": name, "records": count, "sha256": digest})
    atomic_write_json(path / MANIFEST, {
        "format_version": FORMAT_VERSION,
        "backbone": {"name": "synthetic", "weights": "none", "fingerprint": "b" * 64, "input_size": 0, "dim": dim},
        "views": ["x20:rgb"], "dim": dim, "dtype": "float16", "classes": ["a", "b"],
        "counts": {"a": counts[0], "b": counts[1]}, "num_records": n, "shards": shards, "skipped": [],
        "created": "", "dfl_tf_version": "bench"})


def read_speed(emb_dir: Path, batch_size: int) -> float:
    from dfl_tf.store.shards import record_dataset

    ds = record_dataset(emb_dir, batch_size=batch_size)
    for _ in ds:  # warm-up pass (page cache, tf.data)
        pass
    n, t0 = 0, time.perf_counter()
    for batch in ds:
        n += int(batch["label"].shape[0])
    return n / (time.perf_counter() - t0)


def epoch_timer():
    """A Keras callback keeping the seconds of the last epoch (``last``), from its start to its end
    (Keras imported only when called)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.last = time.perf_counter() - self.t0

    return EpochTimer()


def train_speed(emb_dir: Path, out: Path, batch_size: int, cache_gb: float, hidden: int = 256,
                noise: float | None = None) -> tuple[float, dict]:
    from dfl_tf.heads.train import train_head

    timer = epoch_timer()
    summary = train_head(emb_dir, out, hidden=hidden, noise=noise, select="never", probe=False, epochs=2, batch_size=batch_size, patience=0,
                         cache_gb=cache_gb, progress=False, callbacks=[timer])
    return summary["train_records"] / timer.last, summary


TITLE = SECTION[3:]
RUN_DOC = """Head training throughput (``train_head``, hidden layer, in memory, second epoch) against the
raw TFRecord read speed and against this machine's float32 matmul roofline.

Synthetic float16 shards of N two-class records are written, read once as a warm-up and timed
once (``record_dataset``: parse + float16 -> float32). Training: ``train_head(hidden=H, epochs=2,
batch_size=B)`` with the records held in memory (float16, cast per batch); embeddings/s of the
second epoch (Keras callback). FLOP per embedding and step, as the step computes them: 4 x dim x H
for the hidden layer (forward 2, weight gradient 2; its input is data, so TensorFlow computes no
input gradient for it) plus 6 x H x classes for the output layer; % of roofline = achieved GFLOP/s
/ measured float32 matmul GFLOP/s (``matmul_n`` square). "% of head matmuls" uses instead the rate
of the step's own two matmuls at the same batch (forward ``[B, dim] x [dim, H]``, weight gradient
``[dim, B] x [B, H]``), i.e. what the step would reach if it were nothing but its matmuls. The
matmuls and the training are timed alternately (matmuls, train, matmuls) and the mean of the two
figures is used, so both see the same load."""


NOISE_NOTE = ("The default feature-noise augmentation (std 0.1) adds a dim-long N(0, 0.01 I) vector per embedding "
              "and step. By default the batch's vectors are consecutive windows of a fixed 16 MB table of Gaussian "
              "numbers from one random 64-byte-aligned offset per batch (a slice that shares the table's memory), "
              "with one random sign per batch; the noise layer reads a copy of the table pre-multiplied by its std "
              "(``dfl_tf.heads.augment.add_table_noise``, ``sampler: table``), so the draw is one add or subtract "
              "over the batch. Drawing dim fresh numbers instead (``sampler: exact``, a vectorised Box-Muller sampler, "
              "already half the cost of TensorFlow's normal kernel) costs about as much as the head's two matmuls "
              "(levers table below); the heads study compares the accuracy of the two. The Adam(W) update is "
              "TensorFlow's fused kernel, and training runs several steps per compiled call "
              "(``steps_per_execution``, a divisor of the epoch's steps). The issue's convention of 6 x dim x H FLOP "
              "per embedding counts an input gradient that is never computed; it gives about 1.5x the fractions "
              "above (``roofline_fraction_6n`` in the JSON).")


def head_flop(dim: int, hidden: int, classes: int = 2) -> float:
    """Training FLOP per embedding and step of a dim -> hidden -> classes head, as computed: hidden layer
    forward and weight gradient (no input gradient: its input is data), output layer forward and both
    gradients."""
    return 4.0 * dim * hidden + 6.0 * hidden * classes


def head_flop_6n(dim: int, hidden: int, classes: int = 2) -> float:
    """The issue's convention (6 FLOP per weight): counts the hidden layer's input gradient, never computed."""
    return 6.0 * dim * hidden + 6.0 * hidden * classes


def head_matmul_gflops(batch: int, dim: int, hidden: int, repeats: int = 3, steps: int = 10) -> float:
    """GFLOP/s of the head step's own matmuls at this batch: forward ``[B, dim] x [dim, H]`` and weight
    gradient ``[dim, B] x [B, H]`` (float32, one compiled call of ``steps`` pairs, median of ``repeats``)."""
    import tensorflow as tf

    from common import median, time_runs

    x = tf.random.normal([batch, dim], seed=1)
    w = tf.random.normal([dim, hidden], seed=2)
    d = tf.random.normal([batch, hidden], seed=3)

    @tf.function
    def pairs():
        total = tf.constant(0.0)
        for i in range(steps):  # distinct inputs per pair, so no common subexpression is shared
            xi = x + float(i)
            total += tf.reduce_sum(tf.matmul(xi, w)[:1]) + tf.reduce_sum(tf.matmul(xi, d + float(i), transpose_a=True)[:1])
        return total

    secs = time_runs(lambda: pairs().numpy(), repeats, warmup=1)
    return 4.0 * batch * dim * hidden * steps / median(secs) / 1e9


def levers_doc(repeats: int) -> str:
    return f"""Levers for the training step, timed alone at the default batch; ratios > 1 are slower than
what dfl_tf uses. Noise samplers: a ``[batch, dim]`` batch plus N(0, 0.01 I) noise (the noise
layer's work; the last row draws uniforms only, for scale), one compiled ``tf.function`` each,
median of {repeats} runs of 20 calls (2 for XLA). Train step: the default head
without noise, one epoch of 128 steps of ``keras.Model.fit`` (``steps_per_execution`` 32, data in
memory, after a warm-up fit; timed from the epoch's start to its end by a callback, so the setting up
and tearing down of the fit's data iterator is left out), with ``jit_compile`` False and True
alternately, median of {repeats} fits each, op
determinism off for both (under it Keras silently turns XLA off; dfl_tf trains with it on). The
larger-batch row above and the heads study's batch-size section give the other lever, a larger batch,
and what it costs in accuracy."""


def r3(x: float) -> float:
    """3 significant digits (the smoke test's toy head trains at about 0.001 of the roofline)."""
    return float(f"{x:.3g}")


def lever_timings(batch: int, dim: int, hidden: int, repeats: int = 7) -> list[dict]:
    """ms per batch of the samplers TensorFlow offers vs dfl_tf's, and of an XLA-compiled train step."""
    import keras
    import tensorflow as tf
    # no public API for these in TF 2.21
    from tensorflow.python.framework.config import disable_op_determinism, is_op_determinism_enabled

    from common import median
    from dfl_tf.heads.augment import add_table_noise, gaussian_noise, table_noise
    from dfl_tf.heads.model import build_head
    from dfl_tf.heads.tuning import make_optimizer

    def ms(fn, inner=20):
        fn().numpy()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            out.numpy()
            runs.append((time.perf_counter() - t0) / inner * 1e3)
        return median(runs)

    seed = tf.constant([1, 2], tf.int64)
    shape = [batch, dim]
    xb = tf.constant(np.random.default_rng(1).normal(size=shape).astype(np.float32))
    default = "noise sampler: table (default)"
    samplers = [  # each adds std 0.1 noise to a batch, as the noise layer does
        (default, "batch +- a window of the table times std, made once (the noise layer)",
         tf.function(lambda: add_table_noise(xb, seed, 0.1, dim))),
        ("noise sampler: table, std applied per draw", "batch + signed windows of the table x std (batched fits)",
         tf.function(lambda: xb + table_noise(shape, seed, 0.1, dim=dim))),
        ("noise sampler: exact", "batch + Box-Muller on philox uniforms, as tensor ops",
         tf.function(lambda: xb + gaussian_noise(shape, seed, 0.1))),
        ("noise sampler: TensorFlow's normal kernel", "batch + tf.random.stateless_normal",
         tf.function(lambda: xb + tf.random.stateless_normal(shape, seed, stddev=0.1))),
        ("noise sampler: inverse CDF", "batch + tf.math.ndtri of philox uniforms",
         tf.function(lambda: xb + 0.1 * tf.math.ndtri(tf.random.stateless_uniform(shape, seed, 2.0 ** -24, 1.0)))),
        ("noise sampler: exact, XLA", "the exact sampler, jit_compile=True",
         tf.function(lambda: xb + gaussian_noise(shape, seed, 0.1), jit_compile=True)),
        ("(for scale) philox uniforms only", "tf.random.stateless_uniform, no add",
         tf.function(lambda: tf.random.stateless_uniform(shape, seed))),
    ]
    rows = [{"lever": name, "what": what, "ms": ms(fn, inner=20 if "XLA" not in name else 2)}
            for name, what, fn in samplers]
    x = np.random.default_rng(0).normal(size=(32, batch, dim)).astype(np.float32)  # 32 batches, one element each
    y = keras.utils.to_categorical(np.arange(32 * batch) % 2, 2).reshape(32, batch, 2)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat()
    determinism = is_op_determinism_enabled()
    disable_op_determinism()
    try:
        models = {}
        for jit in (False, True):
            model = build_head(dim, 2, hidden)
            model.compile(optimizer=make_optimizer(1e-3, 1e-4), loss=keras.losses.CategoricalFocalCrossentropy(),
                          jit_compile=jit, steps_per_execution=32)
            if bool(model.jit_compile) != jit:
                raise RuntimeError(f"Keras set jit_compile={model.jit_compile} (asked {jit})")
            model.fit(ds, epochs=1, steps_per_epoch=32, verbose=0)  # warm-up: trace (and XLA compile)
            models[jit] = model
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for jit, model in models.items():
                timer = epoch_timer()
                model.fit(ds, epochs=1, steps_per_epoch=128, verbose=0, callbacks=[timer])
                times[jit].append(timer.last / 128 * 1e3)
    finally:
        if determinism:
            tf.config.experimental.enable_op_determinism()
    plain = "train step, no XLA (no noise, determinism off)"
    rows.append({"lever": plain, "what": "keras fit, jit_compile=False", "ms": median(times[False])})
    rows.append({"lever": "train step, XLA (no noise, determinism off)", "what": "keras fit, jit_compile=True",
                 "ms": median(times[True])})
    base = {r["lever"]: r["ms"] for r in rows}
    for r in rows:
        r["ratio"] = r["ms"] / base[plain if r["lever"].startswith("train step") else default]
    return rows


def run(cfg: dict):
    """The run_all section: read speed, train speed and % of the matmul roofline per dim."""
    from common import Section, _measure_matmul, fmt, log, pct, table

    n, batch, hidden = cfg["n"], cfg["batch"], cfg["hidden"]
    rows, data = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_heads_"))
    try:
        for dim in cfg["dims"]:
            emb = tmp / f"emb{dim}"
            write_synthetic(emb, n, dim)
            read = read_speed(emb, batch)
            runs = [(batch, noise) for noise in cfg.get("noise", [None])]
            runs += [(b, None) for b in cfg.get("extra_batches", [])]
            for b, noise in runs:
                peak0, own0 = _measure_matmul(cfg["matmul_n"], 3), head_matmul_gflops(b, dim, hidden)
                train, _ = train_speed(emb, tmp / f"head{dim}_{b}_{noise}", b, cache_gb=2.0, hidden=hidden,
                                       noise=noise)
                peak = (peak0 + _measure_matmul(cfg["matmul_n"], 3)) / 2
                own = (own0 + head_matmul_gflops(b, dim, hidden)) / 2
                gflops = train * head_flop(dim, hidden) / 1e9
                frac = gflops / peak
                label = "0.1 (default)" if noise is None else f"{noise:g}"
                rows.append([dim, hidden, b if b == batch else f"{b} (not default)", label, f"{n:,}", fmt(read, 0),
                             fmt(train, 0), pct(train / read), fmt(gflops), fmt(peak), pct(frac),
                             pct(train * head_flop_6n(dim, hidden) / 1e9 / peak), fmt(own), pct(gflops / own)])
                data.append({"dim": dim, "hidden": hidden, "batch": b, "default_batch": b == batch, "noise": noise,
                             "records": n, "read_per_s": read, "train_per_s": train, "train_gflops": gflops, "matmul_gflops": peak,
                             "roofline_fraction": frac, "head_matmul_gflops": own,
                             "head_matmul_fraction": gflops / own,
                             "roofline_fraction_6n": train * head_flop_6n(dim, hidden) / 1e9 / peak})
                log(f"[heads] dim {dim} noise {label}: read {read:.0f}/s, train {train:.0f} emb/s, "
                    f"{frac:.0%} of roofline")
            shutil.rmtree(emb, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    default = [d for d in data if d["noise"] is None and d["batch"] == batch]
    plain = [d for d in data if d["noise"] == 0]
    body = (RUN_DOC + "\n\n" + table(["dim", "hidden", "batch", "feature noise", "records", "read records/s",
                                        "train emb/s", "train / read", "train GFLOP/s", "matmul GFLOP/s",
                                        "% of roofline", "% of roofline, 6 x dim x H count", "head matmuls GFLOP/s",
                                        "% of head matmuls"], rows) + "\n\n" + NOISE_NOTE)
    levers = None
    if cfg.get("levers"):
        levers = lever_timings(batch, cfg["dims"][0], hidden, cfg["levers"])
        body += "\n\n" + levers_doc(cfg["levers"]) + "\n\n" + table(["lever", "what is timed", "ms per batch", "vs dfl_tf's default"],
                                                      [[r["lever"], r["what"], fmt(r["ms"], 2), f"{r['ratio']:.2f}x"]
                                                       for r in levers])
    headline = {"head_train_roofline_fraction": r3(min(d["roofline_fraction"] for d in default)),
                "head_train_roofline_fraction_6n": r3(min(d["roofline_fraction_6n"] for d in default))}
    if plain:
        headline["head_train_roofline_fraction_no_noise"] = r3(min(d["roofline_fraction"] for d in plain))
    big = [d for d in data if d["noise"] is None and d["batch"] != batch]
    if big:
        headline["head_train_roofline_fraction_batch_%d" % big[0]["batch"]] = r3(big[0]["roofline_fraction"])
    return Section(TITLE, body, headline, {"rows": data, "levers": levers})


def update_results(table: str, info: str, args) -> Path:
    path = ROOT / "benchmarks" / "results.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers from `benchmarks/bench_*.py`.\n"
    body = (f"{SECTION}\n\n`benchmarks/bench_heads.py --n {args.n} --dims {' '.join(map(str, args.dims))} "
            f"--batch-size {args.batch_size}` ({time.strftime('%Y-%m-%d')})\n\n{info}\n\n{table}\n\n"
            f"{NOTE}\n")
    pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
    text = pattern.sub(body.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    path.write_text(text.rstrip("\n") + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-stream", action="store_true", help="Skip the streamed (cache_gb=0) training run.")
    parser.add_argument("--no-write", action="store_true", help="Do not update benchmarks/results.md.")
    args = parser.parse_args()

    info = machine_info()
    print(info, flush=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_heads_"))
    try:
        for dim in args.dims:
            emb = tmp / f"emb{dim}"
            t0 = time.perf_counter()
            write_synthetic(emb, args.n, dim)
            print(f"dim {dim}: wrote {args.n} records in {time.perf_counter() - t0:.0f}s", flush=True)
            read = read_speed(emb, args.batch_size)
            print(f"  read      {read:10.0f} records/s", flush=True)
            mem, _ = train_speed(emb, tmp / f"head{dim}", args.batch_size, cache_gb=2.0)
            print(f"  train mem {mem:10.0f} embeddings/s ({mem / read:.0%} of read)", flush=True)
            stream = None
            if not args.no_stream:
                stream, _ = train_speed(emb, tmp / f"head{dim}s", args.batch_size, cache_gb=0.0)
                print(f"  train str {stream:10.0f} embeddings/s ({stream / read:.0%} of read)", flush=True)
            rows.append((dim, read, mem, stream))
            shutil.rmtree(emb, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ["| dim | records | read (records/s) | train in memory (emb/s) | % of read | "
             "train streamed (emb/s) | % of read |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for dim, read, mem, stream in rows:
        s = ("-", "-") if stream is None else (f"{stream:,.0f}", f"{stream / read:.0%}")
        lines.append(f"| {dim} | {args.n:,} | {read:,.0f} | {mem:,.0f} | {mem / read:.0%} | {s[0]} | {s[1]} |")
    table = "\n".join(lines)
    print()
    print(table)
    if not args.no_write:
        print(f"\nupdated {update_results(table, info, args)}")


if __name__ == "__main__":
    main()
