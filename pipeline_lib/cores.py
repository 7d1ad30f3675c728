"""How many torch threads each stage trains with, fixed by the run's DAG, and when it starts.

Reward, DPO, PPO and GRPO may each train at the same time, in processes of their own
(pipeline_lib/launch.py), and torch's thread pool is per process. On this machine
(``execution.runner: process``) the stages run in waves (``waves``): a stage's wave is one
more than the latest wave of the stages it reads, and it starts once every stage of the
waves before its own has finished (failed ones too). The stages of a wave split the cores
evenly (``planned_threads``). The default run's waves: data prep; SFT; reward and DPO (one
thread each on two cores); PPO (both); evaluate (both). PPO waits for DPO, which it does
not read: on the default preset DPO ends 50-70 s after the reward model (its 8 samples per
prompt and two KL checks), and PPO then trains on both cores instead of one.

Why fixed rather than re-balanced as stages come and go: the number of threads changes the
last bits of torch's CPU reductions (the weight gradients of every layer; a forward's
logits were the same), so a stage that took the cores a finished neighbour left trained on
other bits whenever the timing differed, and at temperature 1 other bits draw other
tokens. DPO's figures moved by up to 0.1 between two runs of one config that way. A count
from the DAG depends on the config and the machine only, never on timing or on what the
store already holds: the same config gives the same numbers on the same machine, and a
stage resumed or run alone trains as it did inside the whole run. The waves keep the
stages of one wave from sharing the cores with a later wave's, which would oversubscribe
them (OpenMP threads that wait on each other spin).

Under Ray (``execution.runner: ray``) a stage takes the CPUs Ray granted it instead, and
Ray, not the waves, decides when it starts. ``OMP_NUM_THREADS`` caps each stage (the
user's cap on threads per process).
"""

from __future__ import annotations

import os
from collections import Counter
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


def waves(upstream: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each stage's wave (``name -> the stages it reads``): 0 for a stage that reads none,
    else one more than the latest wave among the stages it reads."""
    found: dict[str, int] = {}

    def wave(name: str) -> int:
        if name not in found:
            found[name] = 1 + max((wave(dep) for dep in upstream.get(name, ()) if dep in upstream), default=-1)
        return found[name]

    return {name: wave(name) for name in upstream}


def cap(threads: int) -> int:
    """``threads``, at most ``OMP_NUM_THREADS`` when the user set it."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def planned_threads(wave_of: Mapping[str, int], cores: int | None = None) -> dict[str, int]:
    """Each stage's torch threads, from its wave (``waves``): ``cores`` (this machine's)
    split evenly between the stages of its wave, at least one, at most ``OMP_NUM_THREADS``."""
    cores = cores or os.cpu_count() or 1
    sizes = Counter(wave_of.values())
    return {name: cap(max(1, cores // sizes[wave])) for name, wave in wave_of.items()}


@contextmanager
def granted(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch threads: the plan's count for the stage, or the CPUs a
    scheduler (Ray) granted its task; torch's own default when None (a stage run directly)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    yield torch.get_num_threads()
