"""The ``rlhf`` flow on the tiny preset, under one Prefect test harness for the session.

Each test gets its own output root, so its store, Prefect results and locks are its own.
Stages run in worker processes, so "nothing trained" is checked the way a user would:
every stage reports Cached and no output in the store was published again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flows.rlhf import RunParameters, main, rlhf
from pipeline_lib import registry
from pipeline_lib.cores import process_alive

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = set(registry.stage_names())


def run_flow(output_root: Path, **fields):
    params = RunParameters(preset="tiny", output_root=str(output_root), **fields)
    return rlhf(params, return_state=True)


def published(output_root: Path) -> dict[str, str]:
    """stage/key -> publication time of every output in the store."""
    return {
        f"{manifest.parent.parent.name}/{manifest.parent.name}": json.loads(manifest.read_text())["published_at"]
        for manifest in (output_root / "store").glob("*/*/manifest.json")
    }


def cached_by_stage(state) -> dict[str, bool]:
    return {name: stage["cached"] for name, stage in state.result()["stages"].items()}


def cli(output_root: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PREFECT_API_URL", None)  # each CLI run starts its own temporary server
    command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", "tiny", "--output-root", str(output_root), *args]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_full_flow_then_everything_cached(harness, tmp_path):
    state = run_flow(tmp_path)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["status"] == "completed"
    assert set(summary["stages"]) == ALL_STAGES
    assert not any(cached_by_stage(state).values())
    for stage in summary["stages"].values():
        assert (Path(stage["path"]) / "manifest.json").is_file()
    evaluation = summary["evaluation"]
    assert set(evaluation["policies"]) == {"base", *registry.policy_names()} >= {"base", "sft", "dpo", "ppo", "grpo"}
    assert 0.0 <= evaluation["reward_model_pairwise_accuracy"] <= 1.0

    # The artifacts the UI shows: report (lineage + table), metrics table, output links.
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            )

    found = asyncio.run(artifacts())
    by_key = {artifact.key: artifact for artifact in found if artifact.key}
    assert "Lineage" in by_key["rlhf-report"].data and "reward_model_mean" in by_key["rlhf-report"].data
    assert "rlhf-metrics" in by_key
    links = [artifact.data for artifact in found if "](file://" in str(artifact.data)]
    assert len(links) == len(ALL_STAGES)
    # Progress a person can watch: every training stage's steps and evaluation, each finished at 100%.
    progress = {
        artifact.description.rpartition(":")[0]: artifact.data for artifact in found if artifact.type == "progress" and not artifact.key
    }
    trained = {f"{name} training" for name in ALL_STAGES if name not in ("data_prep", "evaluate")}
    assert {"evaluate sft: generating", "evaluate dpo: reward scores", *trained} <= set(progress), progress
    assert all(value == 100.0 for value in progress.values()), progress

    before = published(tmp_path)
    again = run_flow(tmp_path)
    assert again.is_completed()
    assert all(cached_by_stage(again).values())
    assert published(tmp_path) == before


def test_failed_middle_stage_then_fixed(harness, tmp_path):
    """DPO fails (no pair fits its max_length); after the fix only DPO runs."""
    failed = run_flow(tmp_path, stages=["dpo"], overrides=["dpo.max_length=8"])
    assert failed.is_failed()
    assert "stage dpo failed" in str(failed.message) and "dpo.max_length" in str(failed.message)
    store = tmp_path / "store"
    assert not list((store / "dpo").glob("*/manifest.json"))
    good = published(tmp_path)
    assert set(key.split("/")[0] for key in good) == {"data_prep", "sft"}

    state = run_flow(tmp_path, stages=["dpo"])
    assert state.is_completed(), state.message
    assert cached_by_stage(state) == {"data_prep": True, "sft": True, "dpo": False}
    assert all(published(tmp_path)[key] == when for key, when in good.items())


def test_kill_during_dpo_then_resume_from_checkpoint(tmp_path):
    """Kill the whole run once DPO has written a checkpoint; the re-run resumes DPO from it."""
    long_dpo = ["--stages", "dpo", "--set", "dpo.max_steps=100", "--set", "dpo.save_steps=2"]
    process = cli(tmp_path, *long_dpo, start_new_session=True)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        checkpoint = next(iter((tmp_path / "store" / "dpo").glob("*.partial/checkpoints/checkpoint-*/trainer_state.json")), None)
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.5)
    assert checkpoint is not None, "DPO wrote no checkpoint within 5 minutes"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    rerun = cli(tmp_path, *long_dpo)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-3000:]
    summary = last_json_line(out)
    assert {name: stage["cached"] for name, stage in summary["stages"].items()} == {"data_prep": True, "sft": True, "dpo": False}
    manifest = json.loads((Path(summary["stages"]["dpo"]["path"]) / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_checkpoint"] is True


def test_a_killed_stage_fails_alone_naming_itself_and_its_neighbour_finishes(harness, tmp_path):
    """As an out-of-memory kill would: the reward stage's process dies mid-training; DPO,
    training beside it, still publishes; the run fails naming reward and the signal, and
    reward's task run ends Failed, not Running forever."""
    import asyncio
    import threading

    from prefect import get_client

    running, killed = tmp_path / "prefect" / "running", []

    def kill_reward_once_it_trains() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for marker in running.glob("reward.*"):
                time.sleep(1.0)  # let it get into training
                os.kill(int(marker.name.split(".")[1]), signal.SIGKILL)
                killed.append(marker.name)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_reward_once_it_trains, daemon=True)
    killer.start()
    state = run_flow(tmp_path, stages=["reward", "dpo"], overrides=["reward.max_steps=400", "reward.save_steps=1000"])
    killer.join()
    assert killed, "the reward stage never started"
    assert state.is_failed()
    assert "stage reward" in str(state.message) and "SIGKILL" in str(state.message), state.message
    assert set(key.split("/")[0] for key in published(tmp_path)) == {"data_prep", "sft", "dpo"}

    async def task_states():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            runs = await client.read_task_runs(flow_run_filter=this_run)
            return {run.name.split("-")[0]: run.state.type.value for run in runs}

    states = asyncio.run(task_states())
    assert states["reward"] == "FAILED" and states["dpo"] == "COMPLETED", states


def test_a_stage_starts_once_the_waves_before_its_own_have_ended(harness, tmp_path):
    """Stages run in waves (pipeline_lib/cores.py): PPO reads the reward model, not DPO, yet
    starts only once DPO, in the wave before its own, has ended; here DPO trains for longer
    than the reward model, so PPO has to wait for it."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = run_flow(tmp_path, stages=["ppo", "dpo"], overrides=["dpo.max_steps=150", "reward.max_steps=2"])
    assert state.is_completed(), state.message

    async def task_runs():
        async with get_client() as client:
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return {run.name.split("-")[0]: run for run in await client.read_task_runs(flow_run_filter=this_run)}

    runs = asyncio.run(task_runs())
    assert runs["reward"].end_time < runs["dpo"].end_time <= runs["ppo"].start_time, {
        name: (run.start_time, run.end_time) for name, run in runs.items()
    }


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["terminated", "killed"])
def test_a_stopped_run_leaves_no_stage_training(tmp_path, signum):
    """The flow's process alone is stopped (a cancel from the UI sends SIGTERM; the OOM
    killer SIGKILL): the stage process it started ends too, within seconds."""
    import psutil

    log = tmp_path / "run.log"
    with open(log, "w") as output:
        process = cli(tmp_path, "--stages", "dpo", "--set", "dpo.max_steps=400", stdout=output, stderr=output)
    deadline, marker = time.time() + 300, None
    while time.time() < deadline and marker is None:
        marker = next(iter((tmp_path / "prefect" / "running").glob("dpo.*")), None)
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    assert marker is not None, "the DPO stage never started"
    stage_pid = int(marker.name.split(".")[1])
    started_by_the_run = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signum)
    try:
        process.wait(timeout=60)
        deadline = time.time() + 15
        while time.time() < deadline and process_alive(stage_pid):
            time.sleep(0.2)
        assert not process_alive(stage_pid), f"the DPO stage process {stage_pid} outlived its run"
    finally:
        # Prefect's temporary server outlives a run stopped by a signal: stop it here.
        for child in started_by_the_run:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def test_kill_trials_across_every_stage_then_the_evaluation_equals_an_uninterrupted_runs(harness, tmp_path):
    """Every stage's process is killed once, at a random point of its first 0.3 seconds
    (model loading or training, as the OOM killer would), in DAG order: each trial runs
    that stage and what it needs, so what finished is reused and what was killed resumes.
    The final run's evaluation must equal that of a run never interrupted (each stage's
    threads come from the plan, pipeline_lib/cores.py, whatever overlaps it)."""
    import random
    import threading

    seed = int(os.environ.get("KILL_TRIAL_SEED", time.time_ns() % 10_000))
    print(f"kill trial seed {seed} (KILL_TRIAL_SEED={seed} repeats these kill points)")
    rng = random.Random(seed)
    uninterrupted = run_flow(tmp_path / "uninterrupted")
    assert uninterrupted.is_completed(), uninterrupted.message

    root, killed, interrupted = tmp_path / "interrupted", [], []
    for stage in registry.stage_names():
        delay, run_over = rng.uniform(0.0, 0.3), threading.Event()

        def kill_once_running(stage=stage, delay=delay, run_over=run_over) -> None:
            while not run_over.is_set():
                for marker in (root / "prefect" / "running").glob(f"{stage}.*"):
                    time.sleep(delay)
                    pid = int(marker.name.split(".")[1])
                    if process_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(stage)
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_once_running, daemon=True)
        killer.start()
        state = run_flow(root, stages=[stage])
        run_over.set()
        killer.join()
        if not state.is_completed():
            assert f"stage {stage}" in str(state.message) and "SIGKILL" in str(state.message), state.message
            interrupted.append(stage)
    # A kill can land after a stage handed back its result (data prep on tiny takes
    # milliseconds): that run then completes. The training stages take seconds.
    assert len(interrupted) >= 3, f"too few kills interrupted a stage (killed: {killed}, interrupted: {interrupted})"
    final = run_flow(root)
    assert final.is_completed(), final.message
    print(f"killed: {killed}; runs interrupted: {interrupted}")
    expected, got = uninterrupted.result()["evaluation"], final.result()["evaluation"]
    assert got["policies"].keys() == expected["policies"].keys()
    for policy, row in expected["policies"].items():
        for metric, value in row.items():
            assert got["policies"][policy][metric] == pytest.approx(value, abs=1e-6), (policy, metric, killed)
    assert got["reward_model_pairwise_accuracy"] == expected["reward_model_pairwise_accuracy"]


def test_config_change_reruns_only_descendants(harness, tmp_path):
    assert run_flow(tmp_path).is_completed()
    before = published(tmp_path)
    state = run_flow(tmp_path, overrides=["dpo.beta=0.3"])
    assert state.is_completed()
    assert cached_by_stage(state) == {name: name not in ("dpo", "evaluate") for name in ALL_STAGES}
    after = published(tmp_path)
    assert all(after[key] == when for key, when in before.items())
    assert sorted(key.split("/")[0] for key in set(after) - set(before)) == ["dpo", "evaluate"]


def test_corrupted_or_deleted_output_is_retrained(harness, tmp_path):
    first = run_flow(tmp_path, stages=["reward"])
    assert first.is_completed()
    reward_dir = Path(first.result()["stages"]["reward"]["path"])
    good_weights = load_file(reward_dir / "model.safetensors")
    (reward_dir / "model.safetensors").write_bytes(b"corrupted")
    sft_dir = Path(first.result()["stages"]["sft"]["path"])
    (sft_dir / "manifest.json").unlink()

    state = run_flow(tmp_path, stages=["reward"])
    assert state.is_completed()
    assert cached_by_stage(state) == {"data_prep": True, "sft": False, "reward": False}
    rebuilt = load_file(reward_dir / "model.safetensors")
    assert rebuilt.keys() == good_weights.keys()


def test_force_reruns_stage_and_descendants(harness, tmp_path):
    assert run_flow(tmp_path, stages=["reward"]).is_completed()
    state = run_flow(tmp_path, stages=["reward"], force=["sft"])
    assert state.is_completed()
    assert cached_by_stage(state) == {"data_prep": True, "sft": False, "reward": False}


def test_dry_run_trains_nothing(tmp_path, capsys):
    code = main(["--preset", "tiny", "--output-root", str(tmp_path), "--dry-run", "--stages", "dpo"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["status"] == "dry-run"
    assert set(summary["stages"]) == {"data_prep", "sft", "dpo"}
    assert not (tmp_path / "store").exists()
    assert all("will run" in line for line in lines[:-1])


@pytest.mark.parametrize(
    "selection, planned",
    [
        (["--stages", "grpo"], ["data_prep", "sft", "reward", "grpo"]),
        (["--stages", "all", "--set", "stages=[dpo]"], registry.stage_names()),
        # The preset's own stage list applies when --stages is not given.
        (["--set", "stages=[dpo]"], ["data_prep", "sft", "dpo"]),
        (["--set", "stages=[dpo]", "--stages", "ppo"], ["data_prep", "sft", "reward", "ppo"]),
    ],
)
def test_dry_run_plans_the_selected_stages_and_what_they_need(tmp_path, capsys, selection, planned):
    assert main(["--preset", "tiny", "--output-root", str(tmp_path), "--dry-run", *selection]) == 0
    assert list(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]) == planned


def test_unknown_stage_in_the_config_fails_before_any_work(tmp_path, capsys):
    assert main(["--preset", "tiny", "--output-root", str(tmp_path), "--set", "stages=[dpo, kto]"]) == 2
    captured = capsys.readouterr()
    assert "stages: unknown stage(s) ['kto']" in captured.err
    assert not (tmp_path / "store").exists()


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    code = main(["--preset", "tiny", "--output-root", str(tmp_path), "--set", "dpo.beta=-1"])
    captured = capsys.readouterr()
    assert code == 2
    assert "dpo.beta" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "invalid"
    assert not (tmp_path / "store").exists()


def test_two_concurrent_runs_train_each_stage_once(tmp_path):
    """Two processes, same inputs: one trains each stage, the other waits and reuses it."""
    processes = [cli(tmp_path, "--stages", "reward") for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    summaries = [last_json_line(out) for out, _ in outputs]
    for stage in ("data_prep", "sft", "reward"):
        trained_by = [not summary["stages"][stage]["cached"] for summary in summaries]
        assert trained_by.count(True) == 1, (stage, trained_by)
