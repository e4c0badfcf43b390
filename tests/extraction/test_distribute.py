"""Multi-device extraction (MirroredStrategy) on 2 logical CPUs, in a subprocess: logical
devices must be configured before TensorFlow initialises, which the test process has done."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import REPO as ROOT

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tests.helpers.tiny import write_images
    from pathlib import Path
    from dfl_tf.runtime.devices import resolve_devices, resolve_strategy
    from dfl_tf.extraction.local import extract
    from dfl_tf.store.shards import load_embeddings

    tmp = Path(sys.argv[1])
    src = write_images(tmp / "imgs", per_class=5, size=(40, 48))  # 10 samples: batch 4 -> 4, 4, 2
    kw = dict(backbone="resnet50", weights="none", input_size=32, batch_size=4, progress=False,
              dtype="float32", shard_size=6)
    extract(src, tmp / "single", devices="none", **kw)
    strategy = resolve_strategy(["/cpu:0", "/cpu:1"])
    extract(src, tmp / "multi", devices=["/cpu:0", "/cpu:1"], **kw)
    a, b = load_embeddings(tmp / "single"), load_embeddings(tmp / "multi")
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "auto": resolve_devices("auto"), "none": resolve_devices("none"),
        "all": resolve_devices("all"),
        "ids_equal": list(a.ids) == list(b.ids),
        "n": len(a.ids), "max_diff": float(np.abs(a.X - b.X).max()),
        "labels_equal": bool((a.y == b.y).all()),
    }))
""")


def _run_on_two_cpus(script: str, tmp_path: Path) -> dict:
    """Run ``script`` in a fresh interpreter (2 logical CPUs); its last stdout line is JSON."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    env.pop("DFL_TF_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_extraction_matches_single_device(tmp_path):
    result = _run_on_two_cpus(SCRIPT, tmp_path)
    assert result["replicas"] == 2
    assert result["auto"] is None and result["none"] is None  # no GPU: single device by default
    assert len(result["all"]) == 2
    assert result["n"] == 10 and result["ids_equal"] and result["labels_equal"]
    assert result["max_diff"] <= 1e-5


HEAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from pathlib import Path
    from tests.helpers.emb_utils import blobs, make_embedding_dir
    from dfl_tf.heads.train import train_head

    tmp = Path(sys.argv[1])
    X, y = blobs(400, 16, 2, seed=0)
    make_embedding_dir(tmp / "train", X[:300], y[:300], ["a", "b"])
    make_embedding_dir(tmp / "val", X[300:], y[300:], ["a", "b"])
    kw = dict(val=tmp / "val", hidden=16, epochs=8, batch_size=32, progress=False, seed=0)
    single = train_head(tmp / "train", tmp / "h1", devices="none", **kw)
    multi = train_head(tmp / "train", tmp / "h2", devices=["/cpu:0", "/cpu:1"], **kw)
    print(json.dumps({"replicas": [single["replicas"], multi["replicas"]],
                      "bacc": [single["metrics"]["balanced_accuracy"], multi["metrics"]["balanced_accuracy"]]}))
""")


def test_mirrored_head_training(tmp_path):
    result = _run_on_two_cpus(HEAD_SCRIPT, tmp_path)
    assert result["replicas"] == [1, 2]
    assert min(result["bacc"]) >= 0.9  # both learn the separable task
    assert (tmp_path / "h2" / "head.keras").exists()
