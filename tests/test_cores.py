"""Each stage's torch threads, fixed by the run's DAG (pipeline_lib/cores.py)."""

from __future__ import annotations

import torch

from pipeline_lib import cores
from pipeline_lib.config import load_config
from pipeline_lib.plan import make_plan


def threads_of(plan) -> dict[str, int]:
    return {stage.name: stage.threads for stage in plan.stages}


def test_the_stages_of_a_wave_split_the_cores_and_a_stage_alone_in_its_wave_takes_them_all(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    dag = {"data_prep": [], "sft": ["data_prep"], "reward": ["sft"], "dpo": ["sft"], "ppo": ["reward"], "grpo": ["reward"],
           "evaluate": ["sft", "reward", "dpo", "ppo", "grpo"]}
    assert cores.waves(dag) == {"data_prep": 0, "sft": 1, "reward": 2, "dpo": 2, "ppo": 3, "grpo": 3, "evaluate": 4}
    assert cores.planned_threads(cores.waves(dag), cores=16) == {"data_prep": 16, "sft": 16, "reward": 8, "dpo": 8, "ppo": 8, "grpo": 8,
                                                    "evaluate": 16}
    without_grpo = {name: [dep for dep in deps if dep != "grpo"] for name, deps in dag.items() if name != "grpo"}
    assert cores.planned_threads(cores.waves(without_grpo), cores=2) == {"data_prep": 2, "sft": 2, "reward": 1, "dpo": 1, "ppo": 2, "evaluate": 2}
    assert cores.planned_threads({"a": 0, "b": 0, "c": 0}, cores=2) == {"a": 1, "b": 1, "c": 1}  # never below one


def test_omp_num_threads_caps_each_stage(monkeypatch) -> None:
    dag = {"sft": [], "reward": ["sft"], "dpo": ["sft"]}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.planned_threads(cores.waves(dag), cores=16) == {"sft": 3, "reward": 3, "dpo": 3}
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert cores.planned_threads(cores.waves(dag), cores=16) == {"sft": 16, "reward": 8, "dpo": 8}


def test_a_stages_threads_do_not_depend_on_the_stages_selected_or_the_store(monkeypatch, tmp_path) -> None:
    """A stage resumed or run alone trains with the threads it has inside the whole run."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 2)
    config = load_config("default", overrides=[f"output_root={tmp_path}"], env_file=None)
    whole = threads_of(make_plan(config))
    assert whole == {"data_prep": 2, "sft": 2, "reward": 1, "dpo": 1, "ppo": 2, "evaluate": 2}
    assert threads_of(make_plan(config, stages="dpo")) == {name: whole[name] for name in ("data_prep", "sft", "dpo")}
    assert threads_of(make_plan(config, stages="ppo")) == {name: whole[name] for name in ("data_prep", "sft", "reward", "ppo")}


def test_granted_sets_torch_threads_and_none_leaves_them() -> None:
    before = torch.get_num_threads()
    try:
        with cores.granted(1) as threads:
            assert threads == 1 and torch.get_num_threads() == 1
        with cores.granted(None) as threads:
            assert threads == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

