"""Head training speed-ups (issue 17) that must not change the result: several steps per compiled call,
the vectorised Gaussian noise sampler, the fused Adam(W) update."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.emb_utils import blobs, make_embedding_dir

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


def test_gaussian_noise_sampler_is_gaussian_and_seeded():
    """The Box-Muller sampler behind the feature noise: N(0, std) per element, a function of the seed."""
    import tensorflow as tf
    from scipy import stats

    from dfl_tf.heads.augment import gaussian_noise

    z = gaussian_noise([200, 1001], tf.constant([3, 4]), 0.1).numpy()
    assert z.shape == (200, 1001) and z.dtype == np.float32
    flat = z.ravel() / 0.1
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert abs(stats.skew(flat)) < 0.02 and abs(stats.kurtosis(flat)) < 0.05
    assert stats.kstest(flat, "norm").pvalue > 0.01
    half = flat.size // 2  # Box-Muller partners (cos / sin of one pair) and neighbours are uncorrelated
    assert abs(np.corrcoef(flat[:half], flat[half:2 * half])[0, 1]) < 0.01
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01
    np.testing.assert_array_equal(z, gaussian_noise([200, 1001], tf.constant([3, 4]), 0.1).numpy())
    assert not np.allclose(z, gaussian_noise([200, 1001], tf.constant([3, 5]), 0.1).numpy())
    assert gaussian_noise([3, 5], tf.constant([1, 2])).shape == (3, 5)  # odd element count


def test_table_noise_is_gaussian_seeded_and_read_from_the_table():
    """The default noise sampler: a batch's vectors are consecutive windows of the flattened N(0, 1)
    table from one 64-byte-aligned offset with one sign per batch (rolled table rows, signed one by one,
    when the draw is larger than the table), times std; Gaussian per element, uncorrelated between the
    vectors of a batch and between features, a function of the seed; a std per model broadcasts; the
    noise layer's one-pass draw (add_table_noise) adds the same numbers."""
    import tensorflow as tf
    from scipy import stats

    from dfl_tf.heads.augment import add_table_noise, noise_table, table_noise

    dim = 1001
    z = table_noise([400, dim], tf.constant([3, 4]), 0.1, dim=dim).numpy()
    assert z.shape == (400, dim) and z.dtype == np.float32
    flat = z.ravel() / 0.1
    assert abs(flat.mean()) < 0.01 and abs(flat.std() - 1) < 0.01
    assert abs(stats.skew(flat)) < 0.02 and abs(stats.kurtosis(flat)) < 0.05
    assert stats.kstest(flat, "norm").pvalue > 0.01
    assert abs(np.corrcoef(z[:200].ravel(), z[200:].ravel())[0, 1]) < 0.01  # vectors of one batch
    assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01  # neighbouring features
    table = noise_table(dim).numpy()
    assert table.shape == (4190, dim)  # 2^22 numbers
    table_flat = table.ravel()
    offsets, signs = set(), set()
    for seed in ([3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14]):
        v = table_noise([5, dim], tf.constant(seed), 1.0, dim=dim).numpy()
        start = [c for c in np.flatnonzero(np.abs(table_flat) == abs(v[0, 0]))  # (values can repeat)
                 if np.array_equal(np.abs(table_flat[c:c + dim]), np.abs(v[0]))]
        assert len(start) == 1 and start[0] % 16 == 0, "not a 64-byte-aligned window of the table"
        window = table_flat[start[0]:start[0] + 5 * dim].reshape(5, dim)
        sign = np.sign(v[0, 0] / window[0, 0])
        np.testing.assert_array_equal(v, sign * window)  # consecutive windows, one sign for the batch
        offsets.add(int(start[0]))
        signs.add(float(sign))
    assert len(offsets) == 6 and signs == {-1.0, 1.0}  # offset and sign depend on the seed
    x = np.random.default_rng(0).normal(size=(5, dim)).astype(np.float32)
    np.testing.assert_allclose(add_table_noise(tf.constant(x), tf.constant([3, 4]), 0.1, dim).numpy(),
                               x + table_noise([5, dim], tf.constant([3, 4]), 0.1, dim=dim).numpy(), atol=1e-6)
    np.testing.assert_array_equal(z, table_noise([400, dim], tf.constant([3, 4]), 0.1, dim=dim).numpy())
    assert not np.allclose(z, table_noise([400, dim], tf.constant([3, 5]), 0.1, dim=dim).numpy())
    per_model = table_noise([2, 300, 8], tf.constant([1, 2]), tf.constant([[[0.0]], [[2.0]]]), dim=8).numpy()
    assert per_model.shape == (2, 300, 8) and not per_model[0].any() and abs(per_model[1].std() - 2) < 0.15
    # more numbers than the table holds: one random table row per vector, all rolled by one offset
    small = noise_table(8).numpy()
    big = table_noise([2, len(small), 8], tf.constant([1, 2]), tf.constant([[[1.0]], [[3.0]]]), dim=8).numpy()
    assert abs(big[0].std() - 1) < 0.01 and abs(big[1].std() - 3) < 0.03
    lookup = {tuple(np.abs(row)): i for i, row in enumerate(small)}
    shifts = {k for k in range(8) if tuple(np.abs(np.roll(big[0, 0], -k))) in lookup}
    assert len(shifts) == 1
    k, = shifts
    assert all(tuple(np.abs(np.roll(v, -k))) in lookup for v in big[0, :50])
    rows = [np.roll(v, -k) for v in big[0, :50]]
    row_signs = {float(np.sign(r[0] / small[lookup[tuple(np.abs(r))], 0])) for r in rows}
    assert row_signs == {-1.0, 1.0}  # rows can repeat: signed one by one
    xb = np.zeros((len(small), 8), np.float32)  # the one-pass draw falls back the same way
    for std in (1.0, 0.5):  # the base table and a pre-multiplied one
        np.testing.assert_allclose(add_table_noise(tf.constant(xb), tf.constant([1, 2]), std, 8).numpy(),
                                   table_noise([len(small), 8], tf.constant([1, 2]), std, dim=8).numpy(), atol=1e-6)


def test_noise_layer_fast_sampler_is_seeded_fresh_and_saves_plain(tmp_path):
    """augment_layers' noise layer draws with the fast sampler: reproducible under the global seed, fresh
    every call, identity at inference, saved as a plain keras.layers.GaussianNoise."""
    import json
    import zipfile

    import keras

    from dfl_tf.heads.augment import augment_layers, resolve_augment

    x = np.zeros((64, 512), np.float32)
    draws = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        _, (layer,) = augment_layers(resolve_augment(None, 0.1), 512)
        draws.append([layer(x, training=True).numpy() for _ in range(2)])
    np.testing.assert_array_equal(draws[0][0], draws[1][0])  # same seed, same noise
    np.testing.assert_array_equal(draws[0][1], draws[1][1])
    assert not np.allclose(draws[0][0], draws[0][1])  # fresh noise every step
    assert abs(draws[0][0].std() - 0.1) < 0.005
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x)
    model = keras.Sequential([keras.Input((512,)), layer, keras.layers.Dense(2)])
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        config = json.loads(z.read("config.json"))
    (noise,) = [entry for entry in config["config"]["layers"] if entry["config"]["name"] == layer.name]
    assert (noise["module"], noise["class_name"]) == ("keras.layers", "GaussianNoise")
    assert isinstance(keras.saving.load_model(tmp_path / "m.keras").layers[0], keras.layers.GaussianNoise)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_fused_adam_takes_the_keras_steps(weight_decay):
    """make_optimizer's fused Adam(W) update equals Keras' own Adam(W) update."""
    import keras

    from dfl_tf.heads.tuning import make_optimizer

    rng = np.random.default_rng(0)
    start = [rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in start] for _ in range(5)]
    plain = (keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=weight_decay) if weight_decay
             else keras.optimizers.Adam(learning_rate=1e-2))
    if weight_decay:
        plain.exclude_from_weight_decay(var_names=["bias"])
    fused = make_optimizer(1e-2, weight_decay)
    assert type(fused) is type(plain) and "update_step" in vars(fused)  # the instance's step is the fused one
    results = []
    for opt in (plain, fused):
        variables = [keras.Variable(start[0], name="kernel"), keras.Variable(start[1], name="bias")]
        for g in grads:
            opt.apply_gradients(zip([keras.ops.convert_to_tensor(a) for a in g], variables))
        results.append([v.numpy() for v in variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.allclose(results[1][0], start[0])


@pytest.mark.parametrize("cache_gb", [2.0, 0.0])  # in memory, streamed from the shards
def test_training_on_standardised_view_equals_training_the_whole_head(tmp_path, monkeypatch, cache_gb):
    """train_head fits the head's layers after its standardisation on embeddings standardised once
    (training_view): the saved head is the one that training the whole head on raw embeddings gives
    (float32 store, same seed), and without a validation set its metrics come from the raw records."""
    import json

    import keras

    import dfl_tf.heads.train as train_mod
    from dfl_tf import train_head
    from dfl_tf.heads.model import build_head, standardize_values, training_view
    from tests.helpers.emb_utils import blobs, make_embedding_dir

    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=12).astype(np.float32) * 5, rng.uniform(0.1, 4, 12).astype(np.float32)
    head = build_head(12, 3, 8, mean=mean, std=std)
    view = training_view(head)
    assert [w.path for w in view.weights] == [w.path for w in head.trainable_weights]
    x = rng.normal(size=(6, 12)).astype(np.float32) * 3 + 1
    mu, denominator = standardize_values(mean, std)
    np.testing.assert_array_equal(view((x - mu) / denominator).numpy(), head(x).numpy())

    X, y = blobs(400, 12, 2, sep=4.0, seed=0)
    X = X * 7 + 30  # far from standardised
    make_embedding_dir(tmp_path / "train", X, y, ["a", "b"], dtype="float32")
    fit = dict(hidden=16, epochs=6, batch_size=64, select="never", probe=False, seed=4, progress=False,
               cache_gb=cache_gb)
    train_head(tmp_path / "train", tmp_path / "view", **fit)
    monkeypatch.setattr(train_mod, "training_view", lambda model: None)  # the whole head, as before
    train_head(tmp_path / "train", tmp_path / "whole", **fit)
    heads = [keras.saving.load_model(tmp_path / name / "head.keras") for name in ("view", "whole")]
    for a, b in zip(*(h.get_weights() for h in heads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(heads[0].get_layer("hidden").get_weights()[0],
                           build_head(12, 2, 16).get_layer("hidden").get_weights()[0])  # it did train
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("view", "whole")]
    assert metrics[0]["split"] == "train" and metrics[0]["balanced_accuracy"] > 0.8
    assert metrics[0]["balanced_accuracy"] == pytest.approx(metrics[1]["balanced_accuracy"], abs=1e-6)


def test_index_batches_are_a_fresh_permutation_per_epoch():
    """In-memory training batches: each epoch covers every record once (batches of B, the last one
    partial), in a new order each epoch, reproducible from the seed."""
    from dfl_tf.errors import DflError
    from dfl_tf.heads.inputs import index_batches

    def epochs(seed, n=3):
        it = iter(index_batches(10, 4, seed))
        return [[next(it).numpy() for _ in range(3)] for _ in range(n)]

    first = epochs(7)
    for batches in first:
        assert [len(b) for b in batches] == [4, 4, 2] and batches[0].dtype == np.int64
        assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    orders = [np.concatenate(b).tolist() for b in first]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    assert [np.concatenate(b).tolist() for b in epochs(7)] == orders
    assert [np.concatenate(b).tolist() for b in epochs(8)] != orders
    exact = iter(index_batches(8, 4, 0))  # no empty batch when B divides num; one short batch when num < B
    assert [len(next(exact)) for _ in range(4)] == [4, 4, 4, 4]
    short = iter(index_batches(3, 4, 0))
    assert [sorted(next(short).numpy().tolist()) for _ in range(2)] == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(DflError, match="num >= 1"):
        index_batches(0, 4, 0)
