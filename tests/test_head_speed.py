"""Head training runs several steps per compiled call (speed, issue 17) without changing the result."""
from __future__ import annotations

from emb_utils import blobs, make_embedding_dir

from dfl_tf.heads import train as train_mod


def test_steps_per_execution_divides_the_epoch():
    assert train_mod.steps_per_execution(196) == 28
    assert train_mod.steps_per_execution(64) == 32
    assert train_mod.steps_per_execution(5) == 5
    assert train_mod.steps_per_execution(197) == 1  # prime: one step per call, epochs stay exact
    assert train_mod.steps_per_execution(1) == 1


def test_multi_step_training_equals_single_step(tmp_path, monkeypatch):
    X, y = blobs(96, 8, 2, sep=3.0, seed=0)
    make_embedding_dir(tmp_path / "train", X, y, ["neg", "pos"])
    kwargs = dict(hidden=8, epochs=2, batch_size=16, patience=0, progress=False, seed=3, select="never", probe=False)
    many = train_mod.train_head(tmp_path / "train", tmp_path / "many", **kwargs)  # 6 steps per call
    monkeypatch.setattr(train_mod, "steps_per_execution", lambda steps, cap=32: 1)
    one = train_mod.train_head(tmp_path / "train", tmp_path / "one", **kwargs)
    assert many["epochs_run"] == one["epochs_run"] == 2
    history = (tmp_path / "many" / "history.csv").read_text()
    assert history.count("\n") == 3 and history == (tmp_path / "one" / "history.csv").read_text()  # same losses
    assert many["metrics"] == one["metrics"]
