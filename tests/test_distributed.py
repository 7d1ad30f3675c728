"""Training stages on several processes under ``accelerate launch`` (CPU, gloo backend).

One flow run of SFT, reward and DPO with ``launch.num_processes=2`` is shared by the
tests of this file; a rank killed mid-way and a rank that raises are tried on top of it.
The settings of engines this machine cannot run (FSDP, DeepSpeed) are checked here, and
their shipped config files are read with accelerate's own config class.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flows.rlhf import RunParameters, main, rlhf
from pipeline_lib import registry
from pipeline_lib.config import ACCELERATE_CONFIGS, load_config
from pipeline_lib.distributed import CONFIG_DIR, check_launch, run_stage_distributed
from pipeline_lib.errors import ConfigError, StageFailed
from pipeline_lib.plan import make_plan

pytestmark = pytest.mark.flow
TWO = ["launch.num_processes=2"]


@pytest.fixture(scope="module")
def two_process_run(harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-processes")
    state = rlhf(RunParameters(preset="tiny", output_root=str(root), stages=["reward", "dpo"], overrides=TWO), return_state=True)
    assert state.is_completed(), state.message
    return root, state.result()


def logged_losses(output: Path, key: str) -> list[float]:
    history = json.loads((output / "log_history.json").read_text())
    return [entry[key] for entry in history if key in entry]


def test_sft_reward_and_dpo_on_two_processes_publish_a_trained_stage_with_its_world_size(two_process_run):
    root, summary = two_process_run
    assert set(summary["stages"]) == {"data_prep", "sft", "reward", "dpo"}
    for name in ("sft", "reward", "dpo"):
        output = Path(summary["stages"][name]["path"])
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["metrics"]["world_size"] == 2, name
        assert manifest["metrics"]["accelerate_config"] == "ddp"
        assert manifest["config"]["launch"] == {"num_processes": 2, "accelerate_config": "ddp"}
        losses = logged_losses(output, "loss")
        assert len(losses) >= 3 and losses[-1] < losses[0], (name, losses)
        assert not (output / "launch").exists() and not (output / "checkpoints").exists()  # scratch is not published
    data_prep = json.loads((Path(summary["stages"]["data_prep"]["path"]) / "manifest.json").read_text())
    assert "world_size" not in data_prep["metrics"]  # not a training stage: one process
    assert summary["stages"]["reward"]["path"] and (Path(summary["stages"]["reward"]["path"]) / "model.safetensors").is_file()


def test_the_launch_settings_are_part_of_the_training_stages_keys_only():
    one, two = (make_plan(load_config("tiny", overrides=overrides, env_file=None)) for overrides in ([], TWO))
    changed = {stage.name for stage, other in zip(one.stages, two.stages) if stage.key != other.key}
    # The stages that train under accelerate, and those downstream of them (their inputs changed).
    assert {"sft", "reward", "dpo", "grpo"} <= changed and all(registry.stage(name).distributed for name in ("sft", "reward", "dpo", "grpo"))
    assert "data_prep" not in changed and not registry.stage("data_prep").distributed


def test_a_rank_killed_mid_stage_fails_the_stage_naming_it_and_the_rerun_resumes(two_process_run, tiny_base_model, tmp_path):
    root, summary = two_process_run
    config = load_config("tiny", overrides=[f"output_root={tmp_path}", *TWO, "sft.max_steps=12", "sft.save_steps=2"], env_file=None)
    inputs = {"base_model": tiny_base_model, "data_prep": Path(summary["stages"]["data_prep"]["path"])}
    out_dir, running_dir = tmp_path / "sft", tmp_path / "running"
    outcome: dict = {}

    def first_attempt() -> None:
        try:
            outcome["metrics"] = run_stage_distributed("sft", config.model_dump(mode="json"), inputs, out_dir, running_dir)
        except StageFailed as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=first_attempt)
    thread.start()
    deadline = time.time() + 180
    while not list((out_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.1)
    markers = list(running_dir.glob("sft-rank1.*"))
    assert markers, "rank 1 never registered"
    os.kill(int(markers[0].name.rpartition(".")[2]), signal.SIGKILL)
    thread.join(timeout=120)
    assert "metrics" not in outcome, "the stage finished before its rank was killed"
    assert "rank 1 of 2 was killed by SIGKILL" in outcome["error"], outcome["error"]

    metrics = run_stage_distributed("sft", config.model_dump(mode="json"), inputs, out_dir, running_dir)
    assert metrics["resumed_from_checkpoint"] is True
    assert metrics["world_size"] == 2
    assert (out_dir / "model.safetensors").is_file()


def test_an_error_on_a_rank_fails_the_stage_with_its_message_and_publishes_nothing(two_process_run):
    root, _ = two_process_run
    state = rlhf(
        RunParameters(preset="tiny", output_root=str(root), stages=["dpo"], overrides=[*TWO, "dpo.max_length=8"]),
        return_state=True,
    )
    assert not state.is_completed()
    error = state.result(raise_on_failure=False).summary["stages"]["dpo"]["error"]
    assert "stage dpo failed on rank" in error and "of 2: no training example fits dpo.max_length=8" in error, error
    plan = make_plan(load_config("tiny", overrides=[f"output_root={root}", *TWO, "dpo.max_length=8"], env_file=None))
    assert not next(stage for stage in plan.stages if stage.name == "dpo").cached


@pytest.mark.parametrize(
    "setting, machine, named",
    [
        ({"num_processes": 3}, (0, 2, False), "launch.num_processes: 3 is more than the 2 CPU cores"),
        ({"num_processes": 9}, (8, 64, False), "launch.num_processes: 9 is more than the 8 CUDA GPUs"),
        ({"num_processes": 2, "accelerate_config": "zero4"}, (0, 2, False), "'zero4' is neither one of ddp, fsdp, zero2, zero3"),
        ({"num_processes": 2, "accelerate_config": "fsdp"}, (0, 2, False), "'fsdp' (FSDP) needs CUDA GPUs"),
        ({"num_processes": 2, "accelerate_config": "zero2"}, (2, 8, False), "needs DeepSpeed: pip install deepspeed"),
    ],
)
def test_launch_settings_a_machine_cannot_run_are_named(setting, machine, named):
    overrides = [f"launch.{name}={value}" for name, value in setting.items()]
    with pytest.raises(ConfigError, match="launch\\.") as error:
        check_launch(load_config("tiny", overrides=overrides, env_file=None), *machine)
    assert named in str(error.value)


def test_sharded_engines_with_lora_and_a_config_file_that_is_not_accelerates_are_named(tmp_path):
    config = load_config("tiny", overrides=[*TWO, "launch.accelerate_config=zero3", "adapter=lora"], env_file=None)
    with pytest.raises(ConfigError, match="shards the weights"):
        check_launch(config, 2, 8, True)
    check_launch(load_config("tiny", overrides=[*TWO, "launch.accelerate_config=zero3"], env_file=None), 2, 8, True)
    mine = tmp_path / "mine.yaml"
    mine.write_text("num_processes: 2\n")
    with pytest.raises(ConfigError, match="not an accelerate config"):
        check_launch(load_config("tiny", overrides=[*TWO, f"launch.accelerate_config={mine}"], env_file=None), 0, 2, False)


def test_the_shipped_accelerate_configs_are_valid_for_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {name: ClusterConfig.from_yaml_file(str(CONFIG_DIR / f"{name}.yaml")).distributed_type for name in ACCELERATE_CONFIGS}
    assert {name: str(kind.value) for name, kind in kinds.items()} == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
    }  # fmt: skip


@pytest.mark.parametrize(
    "override, named",
    [("launch.num_processes=999", "launch.num_processes: 999 is more than"), ("launch.accelerate_config=nope", "'nope' is neither")],
)
def test_bad_launch_settings_exit_2_before_any_work(tmp_path, capsys, override, named):
    assert main(["--preset", "tiny", "--output-root", str(tmp_path), "--set", override]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
