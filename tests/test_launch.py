"""Stage processes (pipeline_lib/launch.py): the malloc settings a CPU run's stages start with."""

from __future__ import annotations

import os

from pipeline_lib import launch

# The environment as the test session found it, before any stage process was started.
ENVIRONMENT_AT_START = dict(os.environ)


def test_cpu_stages_run_with_malloc_mmap_off_and_a_users_own_malloc_settings_stand() -> None:
    assert launch.cpu_malloc_env({}, cuda=False) == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
    assert launch.cpu_malloc_env({}, cuda=True) == {}  # a GPU run keeps glibc's defaults
    assert launch.cpu_malloc_env({"MALLOC_ARENA_MAX": "2"}, cuda=False) == {}
    assert launch.cpu_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, cuda=False) == {}


def test_a_stage_process_starts_with_the_runs_malloc_settings() -> None:
    import torch

    expected = launch.cpu_malloc_env(ENVIRONMENT_AT_START, torch.cuda.is_available())
    with launch._fork_server().Pool(1) as pool:  # forked from the stages' fork server, as a stage is
        seen = {name: pool.apply(os.getenv, (name,)) for name in launch.CPU_MALLOC_ENV}
    for name, value in seen.items():
        assert value == expected.get(name, ENVIRONMENT_AT_START.get(name)), name
