"""Cores shared between stages running side by side in separate processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from pipeline_lib import cores


def test_a_stage_alone_takes_every_core_and_neighbours_split_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with cores.running(tmp_path, "dpo", cores=2) as threads:
            assert threads == 2 and torch.get_num_threads() == 2
            assert cores.running_stages(tmp_path) == ["dpo"]
            # A neighbour starts in another (live) process: this stage drops to its share ...
            neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            try:
                (tmp_path / f"reward.{neighbour.pid}").touch()
                assert cores.apply_share() == 1 and torch.get_num_threads() == 1
            finally:
                neighbour.kill()
                neighbour.wait()
            # ... and takes the core back once the neighbour's process is gone, marker or not.
            assert cores.running_stages(tmp_path) == ["dpo"]
            assert cores.apply_share() == 2 and torch.get_num_threads() == 2
        assert not list(tmp_path.glob("dpo.*"))  # the marker goes with the stage
        assert cores.apply_share() is None  # outside a running stage nothing is changed
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_caps_each_stage(tmp_path: Path, monkeypatch) -> None:
    """The user's cap on threads per process holds (and makes runs repeatable whatever overlaps)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cores.share(tmp_path, cores=8) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.share(tmp_path, cores=8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert cores.share(tmp_path, cores=8) == 8
