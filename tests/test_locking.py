"""Stage-key locks: held while their process lives; no state a killed run leaves wedges a rerun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.locking import UNFINISHED_LOCK_GRACE_SECONDS, ProcessBoundLockManager

KEY = "dpo-" + "a" * 64


def lock_file(manager: ProcessBoundLockManager) -> Path:
    return Path(manager._lock_path_for_key(KEY))


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_acquiring_records_this_process_and_blocks_others(tmp_path: Path) -> None:
    manager = ProcessBoundLockManager(tmp_path)
    assert manager.acquire_lock(KEY, holder="run-1")
    record = json.loads(lock_file(manager).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["holder"] == "run-1"
    other = ProcessBoundLockManager(tmp_path)
    assert other.is_locked(KEY)
    assert not other.acquire_lock(KEY, holder="run-2", acquire_timeout=0.3)
    manager.release_lock(KEY, holder="run-1")
    assert not other.is_locked(KEY)


def test_a_lock_whose_process_died_is_released(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manager = ProcessBoundLockManager(tmp_path)
    manager._ensure_lock_files_directory_exists()
    lock_file(manager).write_text(json.dumps({"holder": "x", "expiration": None, "pid": dead.pid, "host": socket.gethostname()}))
    assert not manager.is_locked(KEY)
    assert manager.acquire_lock(KEY, holder="rerun", acquire_timeout=1)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"null", b"[1, 2]", json.dumps({"holder": "x", "expiration": None}).encode()],
    ids=["empty", "truncated", "null", "list", "no-pid"],
)
def test_an_unfinished_lock_is_held_briefly_then_treated_as_stale(tmp_path: Path, content: bytes) -> None:
    """What a kill between Prefect creating the lock file and the pid being added leaves."""
    manager = ProcessBoundLockManager(tmp_path)
    manager._ensure_lock_files_directory_exists()
    path = lock_file(manager)
    path.write_bytes(content)
    assert manager.is_locked(KEY), "a lock being written this instant must still count"
    age(path, UNFINISHED_LOCK_GRACE_SECONDS + 5)
    assert not manager.is_locked(KEY)
    assert manager.acquire_lock(KEY, holder="rerun", acquire_timeout=1)
    assert json.loads(path.read_text())["pid"] == os.getpid()
