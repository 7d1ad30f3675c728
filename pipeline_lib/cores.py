"""Share the machine's cores between stages that run side by side in separate processes.

Reward, DPO, PPO and GRPO may run at the same time (each stage trains in a process of its
own, pipeline_lib/launch.py).
torch's thread pool is per process and neither torch nor Prefect knows of the other
stages, so we keep a small registry: each running stage holds a marker file
``<directory>/<stage>.<pid>``, and its torch thread count is ``cores // live markers``.
Training stages re-check after every optimizer step (``ShareCores``), so a stage whose
neighbour has finished takes the freed cores instead of leaving them idle. A marker whose
process died (killed run) is ignored.

Under Ray (``execution.runner: ray``) none of this is used: Ray places each stage where
the CPUs it asked for are free, and the stage takes those CPUs as its threads (``granted``).

Outside ``running`` (a stage called directly, the tests) nothing changes torch's threads.
A thread count can change the last bits of CPU reductions, so two runs whose stages
overlapped differently may differ in those bits; a stage run alone is repeatable, and so
is every run when ``OMP_NUM_THREADS`` caps each stage at one thread (the tests do).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


_active: tuple[Path, int] | None = None


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that id is running (signal 0 probes it; a
    zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): trust the probe
        return True
    return state not in ("Z", "X")


def running_stages(directory: Path) -> list[str]:
    """Names of the stages whose process is alive, from their markers."""
    names = []
    for marker in Path(directory).glob("*.*"):
        stage, _, pid = marker.name.rpartition(".")
        if pid.isdigit() and process_alive(int(pid)):
            names.append(stage)
    return sorted(names)


def share(directory: Path, cores: int) -> int:
    """This process's share: all the cores split evenly between the live stages, at most
    ``OMP_NUM_THREADS`` when the user set it (their cap on threads per process)."""
    threads = max(1, cores // max(1, len(running_stages(directory))))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def apply_share() -> int | None:
    """Set torch's threads to this stage's current share; None outside ``running``."""
    import torch

    if _active is None:
        return None
    threads = share(*_active)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


@contextmanager
def running(directory: Path, stage: str, cores: int | None = None) -> Iterator[int]:
    """Register this process as running ``stage`` and take its share of ``cores``."""
    global _active
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / f"{stage}.{os.getpid()}"
    marker.touch()
    _active = (directory, cores or os.cpu_count() or 1)
    try:
        yield apply_share()
    finally:
        _active = None
        marker.unlink(missing_ok=True)


@contextmanager
def granted(threads: int) -> Iterator[int]:
    """Run with the ``threads`` a scheduler granted this stage (Ray's CPUs for its task):
    the scheduler already keeps stages from oversubscribing a node, so no markers."""
    import torch

    torch.set_num_threads(threads)
    yield threads
