"""Advisory locks on outputs: a second live run is refused with the holder named, a lock left by
a killed process is taken over, concurrent extracts leave a store that verifies (issue 16, item 4)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY_FAST
from dfl_tf import export_model, extract, train_head
from dfl_tf._lock import lock_info, lock_path, output_lock
from dfl_tf.errors import DflError
from dfl_tf.store.shards import verify_shards

_HOLD = """
import sys, time
from dfl_tf._lock import output_lock
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
