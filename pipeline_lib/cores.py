"""How many torch threads each stage trains with: a number fixed by the run's DAG.

Reward, DPO, PPO and GRPO may run at the same time, each in a process of its own
(pipeline_lib/launch.py), and torch's thread pool is per process. A stage's threads are
this machine's cores split by the widest set of stages of the run that can be running
beside it (``planned_threads``): with the default stages on two cores, reward, DPO and PPO
get one thread each (any two of them can overlap) and data prep, SFT and evaluate, which
nothing runs beside, get both.

Why fixed rather than re-balanced as neighbours come and go: the number of threads changes
the last bits of torch's CPU reductions (the weight gradients of every layer, measured), so
a stage that took the cores a neighbour freed trained on other bits each time the timing
differed, and at temperature 1 other bits draw other tokens. DPO's figures moved by up to
0.1 between two runs of one config that way. A count from the DAG depends on the config
and the machine only, never on timing or on what the store already holds, so the same
config gives the same numbers on the same machine, and a stage resumed or re-run alone
gives what it gave inside the whole run. The price is the cores a stage leaves idle when
it runs alone where it could have had a neighbour.

Under Ray (``execution.runner: ray``) the stage takes the CPUs Ray granted it instead.
``OMP_NUM_THREADS`` caps each stage (the user's cap on threads per process).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager


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
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): trust the probe
        return True
    return state not in ("Z", "X")


def _ancestors(name: str, upstream: Mapping[str, Sequence[str]]) -> set[str]:
    found: set[str] = set()
    pending = list(upstream.get(name, ()))
    while pending:
        stage = pending.pop()
        if stage not in found:
            found.add(stage)
            pending.extend(upstream.get(stage, ()))
    return found


def widths(upstream: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """For each stage of the DAG (``name -> the stages it reads``), the size of the largest
    set of stages, itself included, that can run at the same time: stages none of which
    reads another's output, directly or not. A run has at most a handful of stages, so
    every subset is tried."""
    names = list(upstream)
    ancestors = {name: _ancestors(name, upstream) for name in names}

    def independent(a: str, b: str) -> bool:
        return a not in ancestors[b] and b not in ancestors[a]

    result = {}
    for name in names:
        beside = [other for other in names if other != name and independent(name, other)]
        widest = 0
        for size in range(len(beside), 0, -1):
            if any(all(independent(a, b) for a, b in itertools.combinations(group, 2))
                   for group in itertools.combinations(beside, size)):
                widest = size
                break
        result[name] = 1 + widest
    return result


def cap(threads: int) -> int:
    """``threads``, at most ``OMP_NUM_THREADS`` when the user set it."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def planned_threads(upstream: Mapping[str, Sequence[str]], cores: int | None = None) -> dict[str, int]:
    """Each stage's torch threads: ``cores`` (this machine's) split evenly between the
    widest set of stages that can run beside it, at least one, at most ``OMP_NUM_THREADS``."""
    cores = cores or os.cpu_count() or 1
    return {name: cap(max(1, cores // width)) for name, width in widths(upstream).items()}


@contextmanager
def granted(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch threads: the plan's count for the stage, or the CPUs a
    scheduler (Ray) granted its task; torch's own default when None (a stage run directly)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    yield torch.get_num_threads()
