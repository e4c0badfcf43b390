"""Advisory locks on outputs: a second live run is refused with the holder named, a lock left by
a killed process is taken over, concurrent extracts leave a store that verifies (issue 16, item 4)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.tiny import TINY_FAST
from dfl_tf import export_model, extract, train_head
from dfl_tf.runtime.locks import lock_info, lock_path, output_lock
from dfl_tf.errors import DflError
from dfl_tf.store.shards import verify_shards

_HOLD = """
import sys, time
from dfl_tf.runtime.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2], inside=sys.argv[3] == "1"):
    time.sleep(120)
"""


def _hold(out: Path, command: str, inside: bool = True) -> subprocess.Popen:
    """A process that holds ``out``'s lock until killed (returns once the lock names it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), command, "1" if inside else "0"])
    deadline = time.time() + 60
    while lock_info(lock_path(out, inside)).get("pid") != proc.pid:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    assert lock_info(lock_path(out, inside))["command"] == command
    return proc


def test_second_holder_refused_then_released(tmp_path):
    out = tmp_path / "emb"
    with output_lock(out, "extract") as info:
        assert info["pid"] == os.getpid() and lock_path(out).exists()
        with pytest.raises(DflError, match=rf"{out} is in use by another dfl extract \(pid {os.getpid()}"):
            with output_lock(out, "extract"):
                pass
    assert not lock_path(out).exists() and not out.exists()  # nothing left behind


def test_refused_run_leaves_no_folders_and_urls_are_refused(tmp_path, monkeypatch):
    """A run refused after taking its lock removes every folder the lock made (not just the last);
    a URL output (gs://...) is refused before anything is made (Path() would make gs:/ locally)."""
    from click.testing import CliRunner

    from dfl_tf.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "no_such_emb", "--out", "a/b/c/head"])
    assert result.exit_code == 2 and "no_such_emb" in result.output
    assert not (tmp_path / "a").exists()
    result = CliRunner().invoke(main, ["train", "no_such_emb", "--out", "gs://bucket/heads/h"])
    assert result.exit_code == 2 and "gs://bucket/heads/h is not supported as an output" in result.output
    with pytest.raises(DflError, match="s3://b/emb is not supported as an output"):
        with output_lock("s3://b/emb", "extract"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_refusal_names_the_new_holder_not_the_dead_one_it_replaced(tmp_path):
    """A second run arriving between the winner's flock and its write of the lock file (which still
    holds a killed run's lines) waits for the winner's lines instead of naming the dead pid."""
    import fcntl

    out = tmp_path / "emb"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = lock_path(out)
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "extract",
                                "started": "then"}))
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the winner holds the lock, not yet rewritten
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": "extract", "started": "now"}
    writer = threading.Timer(0.3, lambda: path.write_text(json.dumps(mine)))
    writer.start()
    try:
        with pytest.raises(DflError, match=rf"dfl extract \(pid {os.getpid()} on .*, started now\)"):
            with output_lock(out, "extract"):
                pass
    finally:
        writer.join()
        os.close(fd)


def test_live_lock_refuses_extract_train_and_export(tmp_path, image_folder):
    out = tmp_path / "busy"
    proc = _hold(out, "extract")
    try:
        with pytest.raises(DflError, match=rf"in use by another dfl extract \(pid {proc.pid}"):
            extract(image_folder, out, **TINY_FAST)
        with pytest.raises(DflError, match=rf"in use by another dfl extract \(pid {proc.pid}"):
            export_model(["nothing"], out)
    finally:
        proc.kill()
        proc.wait()
    head = tmp_path / "heads" / "h"
    proc = _hold(head, "train", inside=False)
    try:
        with pytest.raises(DflError, match=rf"{head} is in use by another dfl train \(pid {proc.pid}"):
            train_head(tmp_path / "emb", head)
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_killed_process_is_taken_over(tmp_path):
    out = tmp_path / "emb"
    proc = _hold(out, "extract")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(out).exists()  # the file stays, the kernel dropped the flock
    with output_lock(out, "extract") as info:
        assert info["took_over"]["pid"] == proc.pid


def test_two_concurrent_extracts_leave_a_store_that_verifies(tmp_path, image_folder):
    out = tmp_path / "emb"
    outcomes: list = []
    start = threading.Barrier(2)

    def run():
        start.wait()
        try:
            outcomes.append(extract(image_folder, out, shard_size=5, **TINY_FAST)["num_records"])
        except DflError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 12 in outcomes
    assert all(o == 12 or "is in use by another dfl extract" in str(o) for o in outcomes)
    assert verify_shards(out) == [] and not lock_path(out).exists()


_EXTRACT_AT_GO = """
import sys, time
from pathlib import Path
from dfl_tf.runtime.tflog import import_tensorflow
import_tensorflow()
from dfl_tf.backbones.toy import register_toy
from dfl_tf.data import sources
register_toy("tiny_test")
read = sources.read_image
sources.read_image = lambda path: (time.sleep(0.05), read(path))[1]  # a run outlasts the other's start
from dfl_tf.cli import main
ready, go = Path(sys.argv.pop(1)), Path(sys.argv.pop(1))
ready.touch()
while not go.exists():  # both processes are past their imports: they call `dfl extract` together
    time.sleep(0.005)
main()
"""


def test_two_extract_processes_into_one_directory(tmp_path):
    """Two `dfl extract` processes started together on one --out: one extracts, the other exits 2 naming
    it; the store verifies against the manifest's sha256 and a rerun completes without redoing a shard."""
    from click.testing import CliRunner

    from tests.helpers.tiny import write_images
    from dfl_tf.cli import main

    images = write_images(tmp_path / "imgs", per_class=8, seed=5)
    out = tmp_path / "emb"
    flags = ["extract", str(images), "--out", str(out), "--backbone", "tiny_test", "--weights", "none",
             "--input-size", "32", "--batch-size", "2", "--shard-size", "3", "--no-progress"]
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _EXTRACT_AT_GO, str(tmp_path / f"ready{i}"), str(go), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 300
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.02)
        go.touch()
        results = [(p.pid, *p.communicate(timeout=180)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r, p in zip(results, procs) if p.returncode == 0]
    (_, _, refused), = [r for r, p in zip(results, procs) if p.returncode == 2]
    assert refused.strip().splitlines() == [
        f"error: {out} is in use by another dfl extract (pid {winner} on {socket.gethostname()}, "
        f"started {refused.split('started ')[1].split(')')[0]}); wait for it to finish or choose another --out "
        f"(lock file {out / '.dfl.lock'})"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_records"] == 16 and verify_shards(out) == []
    assert not lock_path(out).exists() and not list(out.rglob(".*tmp*"))  # no lock, no temporary file
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    rerun = CliRunner().invoke(main, flags)
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before  # nothing redone
