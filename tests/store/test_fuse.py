"""dfl fuse: stores of the same samples joined into one store, the concatenation of the parts
(issue 33, item 1)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dfl_tf import extract, fuse_stores, load_embeddings
from dfl_tf.errors import DflError
from tests.helpers.emb_utils import blobs, make_embedding_dir
from tests.helpers.hostile_utils import assert_one_line_error, run_dfl
from tests.helpers.tiny import TINY_FAST, write_images


def _by_id(es):
    return {i: (es.X[k], int(es.y[k]), es.groups[k]) for k, i in enumerate(es.ids)}


@pytest.fixture
def stores(tmp_path):
    """A (6 dims, float16) and B (4 dims, float32, the same 30 samples in another order)."""
    X, y = blobs(30, 10, seed=3)
    ids = [f"s{i:03d}" for i in range(30)]
    groups = [f"g{i % 5}" for i in range(30)]
    make_embedding_dir(tmp_path / "a", X[:, :6], y, ["a", "b"], fingerprint="a" * 64, backbone="bb_a",
                       shard_size=8, ids=ids, groups=groups)
    perm = np.random.default_rng(0).permutation(30)
    make_embedding_dir(tmp_path / "b", X[perm, 6:], y[perm], ["a", "b"], fingerprint="b" * 64, backbone="bb_b",
                       dtype="float32", shard_size=7, ids=[ids[p] for p in perm], groups=[groups[p] for p in perm])
    return tmp_path / "a", tmp_path / "b"


def test_fused_is_the_concatenation_per_id(stores, tmp_path):
    a, b = stores
    result = run_dfl(["fuse", a, b, "--out", tmp_path / "ab"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"30 records, dim 10 = bb_a (6) + bb_b (4), 1 shards -> {tmp_path / 'ab'}"
    fused, ea, eb = (_by_id(load_embeddings(p)) for p in (tmp_path / "ab", a, b))
    assert sorted(fused) == sorted(ea) == sorted(eb)
    for i, (x, label, group) in fused.items():
        expected = np.concatenate([ea[i][0], eb[i][0]]).astype(np.float32)
        assert x.tobytes() == expected.tobytes() and (label, group) == ea[i][1:]  # bitwise
    manifest = json.loads((tmp_path / "ab" / "manifest.json").read_text())
    assert manifest["dim"] == 10 and manifest["dtype"] == "float32"  # one float32 part: no value changes
    assert [(p["backbone"], p["dim"], p["offset"]) for p in manifest["parts"]] == [("bb_a", 6, 0), ("bb_b", 4, 6)]
    assert manifest["backbone"]["name"] == "fused:bb_a+bb_b" and manifest["backbone"]["dim"] == 10
    assert load_embeddings(tmp_path / "ab").ids == load_embeddings(a).ids  # the first store's order
    again = run_dfl(["fuse", a, b, "--out", tmp_path / "ab"])
    assert_one_line_error(again, str(tmp_path / "ab"), "--overwrite")
    assert run_dfl(["fuse", a, b, "--out", tmp_path / "ab", "--overwrite"]).exit_code == 0


def test_mismatched_stores_refused(stores, tmp_path):
    a, b = stores
    X, y = blobs(30, 4, seed=4)
    ids = [f"s{i:03d}" for i in range(30)]
    ids[2], ids[7] = "other1", "other2"
    make_embedding_dir(tmp_path / "c", X, y, ["a", "b"], fingerprint="c" * 64, ids=ids,
                       groups=[f"g{i % 5}" for i in range(30)])
    err = assert_one_line_error(run_dfl(["fuse", a, tmp_path / "c", "--out", tmp_path / "x"]),
                                "2 ids only in", "s002", "s007", "other1", "other2")
    assert "hold different samples" in err and not (tmp_path / "x").exists()
    good = load_embeddings(a)
    flipped = good.y.copy()
    flipped[[4, 9]] = 1 - flipped[[4, 9]]
    make_embedding_dir(tmp_path / "d", good.X, flipped, ["a", "b"], fingerprint="d" * 64, ids=good.ids,
                       groups=good.groups)
    assert_one_line_error(run_dfl(["fuse", a, tmp_path / "d", "--out", tmp_path / "x"]),
                          "disagree on the labels of 2 records", "s004", "s009")
    make_embedding_dir(tmp_path / "e", good.X, good.y, ["a", "c"], fingerprint="e" * 64, ids=good.ids,
                       groups=good.groups)
    assert_one_line_error(run_dfl(["fuse", a, tmp_path / "e", "--out", tmp_path / "x"]), "disagree on classes: a,b vs a,c")
    make_embedding_dir(tmp_path / "f", good.X, good.y, ["a", "b"], fingerprint="f" * 64, ids=good.ids,
                       groups=["h"] * 30)
    assert_one_line_error(run_dfl(["fuse", a, tmp_path / "f", "--out", tmp_path / "x"]), "disagree on the groups")
    make_embedding_dir(tmp_path / "g", good.X, good.y, ["a", "b"], fingerprint="9" * 64, ids=good.ids,
                       groups=good.groups, views=("x20:rgb", "x5:rgb"))
    assert_one_line_error(run_dfl(["fuse", a, tmp_path / "g", "--out", tmp_path / "x"]), "disagree on views")
    assert_one_line_error(run_dfl(["fuse", a, "--out", tmp_path / "x"]), "at least two embedding stores (got 1)")
    assert_one_line_error(run_dfl(["fuse", a, a, "--out", tmp_path / "x"]), "given twice")
    assert_one_line_error(run_dfl(["fuse", a, b, "--out", a]), str(a))
    assert not (tmp_path / "x").exists()


def test_fused_store_trains_evaluates_and_is_told_apart(stores, tmp_path):
    a, b = stores
    fuse_stores([a, b], tmp_path / "ab")
    fuse_stores([b, a], tmp_path / "ba")
    head = tmp_path / "head"
    trained = run_dfl(["train", tmp_path / "ab", "--val", tmp_path / "ab", "--out", head, "--epochs", "2"])
    assert trained.exit_code == 0, trained.output
    assert json.loads((head / "head.json").read_text())["backbone"]["name"] == "fused:bb_a+bb_b"
    evaluated = run_dfl(["evaluate", head, tmp_path / "ab"])
    assert evaluated.exit_code == 0 and "balanced accuracy" in evaluated.output, evaluated.output
    assert_one_line_error(run_dfl(["evaluate", head, tmp_path / "ba"]), "backbone fingerprint", "fused:bb_a+bb_b",
                          "fused:bb_b+bb_a")
    assert_one_line_error(run_dfl(["evaluate", head, a]), "backbone fingerprint", "bb_a")
    assert_one_line_error(run_dfl(["export", head, "--out", tmp_path / "models" / "m"]),
                          "export of fused stores: not yet supported")
    assert not (tmp_path / "models").exists()


def test_real_extractions_fuse_at_two_input_sizes(tmp_path):
    images = write_images(tmp_path / "img", per_class=3)
    kw = {k: v for k, v in TINY_FAST.items() if k != "input_size"}
    extract(images, tmp_path / "e32", input_size=32, **kw)
    extract(images, tmp_path / "e24", input_size=24, **kw)
    result = run_dfl(["fuse", tmp_path / "e32", tmp_path / "e24", "--out", tmp_path / "f"])
    assert result.exit_code == 0 and " = tiny_test@32 (16) + tiny_test@24 (16), " in result.output, result.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert [p["input_size"] for p in manifest["parts"]] == [32, 24] and manifest["backbone"]["input_size"] is None
    assert manifest["backbone"]["name"] == "fused:tiny_test@32+tiny_test@24"
    fused, e32, e24 = (load_embeddings(tmp_path / p) for p in ("f", "e32", "e24"))
    assert fused.X.tobytes() == np.concatenate([e32.X, e24.X], axis=1).tobytes() and fused.ids == e32.ids
    extract(images, tmp_path / "crop", input_size=32, fit="pad", **kw)
    with pytest.raises(DflError, match="disagree on fit"):
        fuse_stores([tmp_path / "e32", tmp_path / "crop"], tmp_path / "g")


def test_corrupt_fused_shard_names_the_fuse_command(stores, tmp_path):
    a, b = stores
    fuse_stores([a, b], tmp_path / "ab")
    (tmp_path / "ab" / "shard-00000-of-00001.tfrecord").unlink()
    with pytest.raises(DflError, match=f"dfl fuse {a} {b} --out {tmp_path / 'ab'} --overwrite"):
        load_embeddings(tmp_path / "ab")
