"""head.keras as the README promises: loads with plain Keras (no dfl_tf import) and is called on raw
embeddings; the binary threshold is tuned on validation only."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers.emb_utils import make_embedding_dir

LOAD_WITH_KERAS_ONLY = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    model = keras.saving.load_model(sys.argv[1], compile=False)
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
    assert not any(name == "dfl_tf" or name.startswith("dfl_tf.") for name in sys.modules), "dfl_tf imported"
""")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 24)
    X = rng.normal(size=(48, 8)) * 3 + y[:, None] * 2.0 + 10.0  # far from 0 mean / unit std
    make_embedding_dir(root / "train", X[::2], y[::2], ["neg", "pos"])
    make_embedding_dir(root / "val", X[1::2], y[1::2], ["neg", "pos"])
    return root, X[1::2].astype(np.float16).astype(np.float32)


def test_head_keras_loads_with_plain_keras(tmp_path, embeddings):
    """Every augmentation but scaled-noise (the README says so) plus dropout: Keras built-ins only."""
    from dfl_tf import train_head

    root, X_val = embeddings
    head = tmp_path / "head"
    augment = [{"name": "noise", "std": 0.2}, {"name": "feature-dropout", "rate": 0.1}, {"name": "mixup", "alpha": 0.2}]
    train_head(root / "train", head, val=root / "val", hidden=4, dropout=0.1, epochs=3, augment=augment,
               probe=False, progress=False)
    import keras

    expected = keras.saving.load_model(head / "head.keras", compile=False).predict(X_val, verbose=0)
    np.save(tmp_path / "x.npy", X_val)
    run = subprocess.run([sys.executable, "-c", LOAD_WITH_KERAS_ONLY, str(head / "head.keras"),
                          str(tmp_path / "x.npy"), str(tmp_path / "p.npy")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "p.npy")
    assert got.shape == (len(X_val), 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_threshold_tuned_on_validation_only(tmp_path, embeddings):
    from dfl_tf import train_head

    root, _ = embeddings
    train_head(root / "train", tmp_path / "noval", hidden=0, epochs=2, probe=False, progress=False)
    info = json.loads((tmp_path / "noval" / "head.json").read_text())
    assert info["threshold"] == 0.5 and info["threshold_tuned"] is False
    train_head(root / "train", tmp_path / "val", val=root / "val", hidden=0, epochs=2, probe=False, progress=False)
    info = json.loads((tmp_path / "val" / "head.json").read_text())
    assert info["threshold_tuned"] is True and "validation" in info["threshold_chosen_by"]
