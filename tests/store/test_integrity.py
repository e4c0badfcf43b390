"""Shards verified against the manifest on read, cached; a bad shard is named with the command
that rewrites it (issue 16, item 3)."""
from __future__ import annotations

import os
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers.tiny import TINY_FAST
from dfl_tf import extract, load_embeddings
from dfl_tf.cli import main
from dfl_tf.errors import DflError
from dfl_tf.store import integrity
from dfl_tf.store.shards import verify_shards
from tests.helpers.emb_utils import blobs, make_embedding_dir


@pytest.fixture
def emb(tmp_path):
    X, y = blobs(40, 8, seed=1)
    make_embedding_dir(tmp_path / "emb", X, y, ["a", "b"], shard_size=10)
    integrity._memory.clear()
    return tmp_path / "emb"


def _zero(path, at=200, n=64):
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(n)
    path.write_bytes(bytes(data))


def test_corrupt_shard_named_with_reextract_command(emb):
    _zero(emb / "shard-00002.tfrecord")
    with pytest.raises(DflError) as err:
        load_embeddings(emb)
    message = str(err.value)
    assert "\n" not in message and "shard-00002.tfrecord is corrupt" in message
    assert f"rm {emb / 'shard-00002.tfrecord'} && dfl extract" in message
    assert verify_shards(emb) == ["shard-00002.tfrecord"]
    (emb / "shard-00001.tfrecord").unlink()
    with pytest.raises(DflError, match=r"shard-00001.tfrecord is missing \(and 1 more shards\)"):
        load_embeddings(emb)


def test_train_cli_on_corrupt_shard_exit_2(emb, tmp_path):
    _zero(emb / "shard-00000.tfrecord")
    result = CliRunner().invoke(main, ["train", str(emb), "--out", str(tmp_path / "head"), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "shard-00000.tfrecord is corrupt" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "head").exists()


def test_verification_is_cached(emb, monkeypatch):
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(p) or real(p))
    load_embeddings(emb)
    assert len(calls) == 4
    load_embeddings(emb)  # same process: memory cache
    integrity._memory.clear()
    load_embeddings(emb)  # "next process": the .verified.json sidecar
    assert len(calls) == 4
    shard = emb / "shard-00003.tfrecord"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    load_embeddings(emb)  # a touched shard is hashed again
    assert len(calls) == 5


def test_fuzz_shard_flips_and_truncations_never_load(emb):
    shard = emb / "shard-00001.tfrecord"
    data = shard.read_bytes()
    rng = np.random.default_rng(3)
    for trial in range(40):
        mutated = bytearray(data)
        if trial % 2:
            mutated = mutated[: int(rng.integers(0, len(data)))]
        else:
            mutated[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        shard.write_bytes(bytes(mutated))
        with pytest.raises(DflError, match="shard-00001.tfrecord is corrupt"):
            load_embeddings(emb)
    shard.write_bytes(data)
    assert load_embeddings(emb).X.shape == (40, 8)


def test_hostile_manifest_shard_names_refused(emb):
    text = (emb / "manifest.json").read_text().replace('"shard-00000.tfrecord"', '"../../etc/passwd"')
    (emb / "manifest.json").write_text(text)
    with pytest.raises(DflError, match="plain file names"):
        load_embeddings(emb)


def test_deleting_bad_shard_and_rerunning_rewrites_just_it(image_folder, tmp_path):
    out = tmp_path / "emb"
    first = extract(image_folder, out, shard_size=5, **TINY_FAST)
    _zero(out / first["shards"][1]["file"], at=40, n=64)
    integrity._memory.clear()
    with pytest.raises(DflError) as err:
        load_embeddings(out)
    command = str(err.value).split("run: ", 1)[1]
    rm, dfl = command.split(" && ")
    assert shlex.split(dfl)[:4] == ["dfl", "extract", str(image_folder), "--out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    os.remove(shlex.split(rm)[1])
    result = CliRunner().invoke(main, shlex.split(dfl)[1:])  # the command as printed
    assert result.exit_code == 0, result.output
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    changed = [name for name in after if after[name] != before.get(name)]
    assert changed == [first["shards"][1]["file"]]
    assert verify_shards(out) == [] and load_embeddings(out).X.shape[0] == 12


def test_rerun_redoes_a_corrupt_shard_without_deleting_it(image_folder, tmp_path):
    out = tmp_path / "emb"
    first = extract(image_folder, out, shard_size=5, **TINY_FAST)
    bad = out / first["shards"][2]["file"]
    _zero(bad, at=10, n=16)
    integrity._memory.clear()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    again = extract(image_folder, out, shard_size=5, **TINY_FAST)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert [name for name in after if after[name] != before[name]] == [bad.name]
    assert again["shards"] == first["shards"] and verify_shards(out) == []


def test_corruption_after_the_cached_check_is_one_line(emb):
    """Bit rot that keeps size and mtime slips past the cache; TF's record CRC still stops it."""
    load_embeddings(emb)  # verified and cached
    shard = emb / "shard-00001.tfrecord"
    stat = shard.stat()
    _zero(shard, at=100, n=64)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    integrity._memory.clear()
    import click

    from dfl_tf.store.shards import record_dataset

    @click.command()
    def read() -> None:  # any stage reading the shards, under the real CLI group
        for _ in record_dataset(emb, batch_size=8):
            pass

    main.add_command(read, "read-shards-test")
    try:
        result = CliRunner().invoke(main, ["read-shards-test"])
    finally:
        main.commands.pop("read-shards-test")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: corrupt data in a shard" in result.output and ".verified.json" in result.output
