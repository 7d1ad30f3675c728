"""The ``rlhf/retrain`` deployment: deployments/serve.py against a real Prefect server, and
deployments/prefect.yaml on a process work pool and worker.

One server and one ``serve.py`` per session (fixtures at the end of tests/conftest.py),
tiny preset, a local jsonl file as ``data.source``. Runs are triggered the ways a user
triggers them (``prefect deployment run``, the client's ``create_flow_run_from_deployment``,
``prefect flow-run retry``) and checked through the API: states of the flow run and of
its task runs (``Cached`` means Prefect reused the stage's result), artifacts, schedule.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from conftest_server import (
    DEPLOYMENT,
    REPO,
    artifacts_of,
    run_id_from_cli,
    task_states,
    wait_for_terminal,
    write_preference_pairs,
)
from deployments.serve import CONCURRENCY_LIMIT, TAGS, RetrainSchedule, main as serve_main, parse
from flows.rlhf import RunParameters, rlhf
from pipeline_lib.registry import policy_names, stage_names

STAGES = stage_names()

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def retrain_spec(name: str = "retrain") -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(deployment for deployment in spec["deployments"] if deployment["name"] == name)


# --- Files and options, no server -------------------------------------------------------


def test_prefect_yaml_declares_the_served_deployment(monkeypatch):
    """Entrypoint resolves to the flow, parameters validate, and nothing drifted from serve.py."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    monkeypatch.chdir(REPO)  # prefect deploy reads entrypoints relative to the repository root
    for name in list(os.environ):
        if name.startswith("RLHF_RETRAIN_"):
            monkeypatch.delenv(name)
    spec = retrain_spec()
    flow = load_flow_from_entrypoint(spec["entrypoint"])
    assert flow.name == rlhf.name
    assert Path(flow.fn.__code__.co_filename).resolve() == Path(rlhf.fn.__code__.co_filename).resolve()
    # What the server enforces (enforce_parameter_schema) and what the flow parses.
    validate(spec["parameters"], parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)
    saved = RunParameters.model_validate(spec["parameters"]["params"])
    saved.config()
    assert set(spec["parameters"]["params"]) <= set(RunParameters.model_fields)

    assert spec["tags"] == TAGS
    assert spec["concurrency_limit"] == {"limit": CONCURRENCY_LIMIT.limit, "collision_strategy": CONCURRENCY_LIMIT.collision_strategy.value}
    defaults = RetrainSchedule(_env_file=None)
    assert spec["schedules"] == [{"cron": defaults.cron, "timezone": defaults.timezone, "active": True}]
    assert spec["work_pool"]["name"] == "rlhf-process"
    # Resolved on the worker at run time, so each machine names its own checkout.
    assert spec.get("pull") is None
    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RLHF_PIPELINE_DIR }}"}}]


def test_gpu_deployment_requests_gpus_in_job_variables_the_docker_worker_accepts(monkeypatch):
    """The GPU example: the flow and parameters as for retrain, and job variables valid
    against the Docker worker's own default base job template (its variables' JSON schema),
    with a device request docker-py turns into the container's GPU request."""
    import docker.types
    import jsonschema
    from prefect.flows import load_flow_from_entrypoint
    from prefect_docker.worker import DockerWorker

    monkeypatch.chdir(REPO)
    spec = retrain_spec("retrain-gpu")
    assert load_flow_from_entrypoint(spec["entrypoint"]).name == rlhf.name
    config = RunParameters.model_validate(spec["parameters"]["params"]).config()
    assert config.precision == "bf16"
    variables = DockerWorker.get_default_base_job_template()["variables"]
    job_variables = spec["work_pool"]["job_variables"]
    jsonschema.validate(job_variables, variables)
    assert set(job_variables) <= set(variables["properties"])  # none ignored by the worker
    requests = job_variables["container_create_kwargs"]["device_requests"]
    host_config = docker.types.HostConfig(version="1.44", device_requests=requests)
    assert host_config["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    # The output root is the mounted shared storage, at the same path inside and out.
    mounts = [volume.split(":")[:2] for volume in job_variables["volumes"]]
    assert any(str(config.output_root).startswith(inside) and inside == outside for outside, inside in mounts)


def test_schedule_from_option_then_setting_then_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("RLHF_RETRAIN_CRON", raising=False)
    monkeypatch.delenv("RLHF_RETRAIN_TIMEZONE", raising=False)
    params, schedule = parse(["--preset", "tiny"])
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "UTC")
    assert params.preset.value == "tiny"

    monkeypatch.setenv("RLHF_RETRAIN_CRON", "0 */6 * * *")
    monkeypatch.setenv("RLHF_RETRAIN_TIMEZONE", "Europe/Paris")
    assert parse([])[1].schedule().cron == "0 */6 * * *"
    assert parse(["--cron", "30 2 * * 0"])[1].schedule().model_dump() == {
        "cron": "30 2 * * 0", "timezone": "Europe/Paris", "day_or": True,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cron", "every day"], "Invalid cron"),
        (["--timezone", "Mars/Olympus"], "timezone"),
        (["--preset", "tiny", "--set", "dpo.beta=-1"], "dpo.beta"),
        (["--dry-run"], "--dry-run"),
    ],
)
def test_bad_options_fail_before_registering(argv, message, capsys):
    assert serve_main(argv) == 2
    assert message in capsys.readouterr().err


# --- The served deployment on a real server ---------------------------------------------

@pytest.mark.server
def test_served_deployment_has_schedule_parameters_tags_and_limit(retrain_service):
    deployment = retrain_service.deployment()
    assert [schedule.schedule.cron for schedule in deployment.schedules] == [retrain_service.cron]
    assert all(schedule.active for schedule in deployment.schedules) and not deployment.paused
    assert deployment.entrypoint == "flows/rlhf.py:rlhf"
    assert sorted(deployment.tags) == sorted(TAGS)
    assert deployment.global_concurrency_limit.limit == 1
    saved = RunParameters.model_validate(deployment.parameters["params"])
    assert saved.preset.value == "tiny" and saved.output_root == str(retrain_service.output_root)
    assert f"data.source={retrain_service.data_file}" in saved.overrides
    # The Custom run form: every field of RunParameters, with its description.
    form = deployment.parameter_openapi_schema["definitions"]["RunParameters"]["properties"]
    assert set(form) == set(RunParameters.model_fields)
    for name, field in RunParameters.model_fields.items():
        assert form[name]["description"] == field.description


@pytest.mark.server
def test_new_data_retrains_a_killed_run_resumes_when_retried_then_unchanged_data_is_cached(retrain_service):
    """Scheduled retraining, three runs: new rows arrive and retraining starts; its reward
    process is killed (as by the OOM killer) after a checkpoint; ``prefect flow-run retry``
    finishes it from there; the next run, with nothing new, is all Cached in seconds."""
    store = retrain_service.output_root / "store"
    partials_before = set(store.glob("reward/*.partial"))
    write_preference_pairs(retrain_service.data_file, variant=1)
    flow_run_id = run_id_from_cli(retrain_service.server.cli("deployment", "run", DEPLOYMENT))

    killed = kill_reward_training_after_first_checkpoint(retrain_service, partials_before, flow_run_id)
    failed = wait_for_terminal(retrain_service, flow_run_id)
    assert failed.state.type.value in {"FAILED", "CRASHED"}, failed.state
    first_attempt = task_states(retrain_service, flow_run_id, attempt=1)
    # New data changes every stage key: data prep and its descendants train, nothing is reused.
    assert first_attempt["data_prep"] == "Completed" and first_attempt["sft"] == "Completed", first_attempt
    assert "Cached" not in first_attempt.values(), first_attempt
    assert first_attempt.get("reward") != "Completed", first_attempt

    retry_output = retrain_service.server.cli("flow-run", "retry", str(flow_run_id))
    assert "scheduled for retry" in retry_output
    retried = wait_for_terminal(retrain_service, flow_run_id, after_attempt=failed.run_count)
    assert retried.state.is_completed(), retried.state.message
    second_attempt = task_states(retrain_service, flow_run_id, attempt=retried.run_count)
    assert second_attempt["data_prep"] == second_attempt["sft"] == "Cached", second_attempt
    assert all(second_attempt[stage] == "Completed" for stage in ("reward", "ppo", "grpo", "evaluate")), second_attempt
    # DPO runs beside reward: reused if it finished before the kill, trained otherwise.
    assert second_attempt["dpo"] == ("Cached" if first_attempt.get("dpo") == "Completed" else "Completed"), second_attempt
    manifest = json.loads((store / "reward" / killed / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_checkpoint"] is True
    artifacts = artifacts_of(retrain_service, flow_run_id)
    assert artifacts["rlhf-report"].type == "markdown" and "Lineage" in artifacts["rlhf-report"].data
    assert artifacts["rlhf-metrics"].type == "table"
    rows = artifacts["rlhf-metrics"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {row["policy"] for row in rows} == {"base", *policy_names()}

    # The next scheduled run: the plan fingerprints the file afresh and finds nothing new.
    started = time.monotonic()
    with retrain_service.server.client() as client:
        unchanged = client.create_flow_run_from_deployment(retrain_service.deployment().id)
    finished = wait_for_terminal(retrain_service, unchanged.id)
    elapsed = time.monotonic() - started
    assert finished.state.is_completed(), finished.state.message
    assert task_states(retrain_service, unchanged.id) == {stage: "Cached" for stage in STAGES}
    print(f"unchanged data: {finished.total_run_time.total_seconds():.1f}s running, {elapsed:.1f}s from trigger to Completed")
    assert finished.total_run_time.total_seconds() < 120


def kill_reward_training_after_first_checkpoint(served, partials_before: set[Path], flow_run_id, timeout: float = 600) -> str:
    """SIGKILL the process training reward once checkpoint-2 is complete; returns the stage key.

    The process is the stage's own (pipeline_lib/launch.py), the one an out-of-memory kill
    would hit; it registers as ``prefect/running/reward.<pid>`` (pipeline_lib/launch.py).
    The tiny reward stage trains for about a second after that checkpoint, so the store is
    polled in a tight loop and the run's state only every second. Nothing in the pipeline
    is patched.
    """
    store, running = served.output_root / "store", served.output_root / "prefect" / "running"
    deadline, next_state_check, reward_pid = time.monotonic() + timeout, 0.0, None
    while time.monotonic() < deadline:
        markers = list(running.glob("reward.*"))
        if markers:
            reward_pid = int(markers[0].name.split(".")[1])
        for partial in set(store.glob("reward/*.partial")) - partials_before:
            # The trainer writes trainer_state.json last; resume skips checkpoints without it.
            if reward_pid and (partial / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
                os.kill(reward_pid, signal.SIGKILL)
                return partial.name.removesuffix(".partial")
        if time.monotonic() > next_state_check:
            with served.server.client() as client:
                state = client.read_flow_run(flow_run_id).state
            assert not state.is_final(), f"the run ended ({state.name}) before reward wrote a checkpoint"
            served.check_alive()
            next_state_check = time.monotonic() + 1.0
        time.sleep(0.01)
    raise AssertionError(f"reward wrote no checkpoint within {timeout}s")


@pytest.mark.server
def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(retrain_service, tmp_path):
    """prefect.yaml as a user deploys it; a worker started elsewhere runs the flow from the checkout."""
    server = retrain_service.server
    server.cli("work-pool", "create", "rlhf-process", "--type", "process", "--overwrite")
    # The served deployment already owns rlhf/retrain on this server: deploy the same file under another name.
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    spec["deployments"] = [retrain_spec()]  # the GPU example needs a Docker pool and GPUs
    spec["deployments"][0]["name"] = "retrain-on-worker"
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(spec))
    server.cli("deploy", "--all", "--prefect-file", str(copy), timeout=300)
    with server.client() as client:
        deployment = client.read_deployment_by_name("rlhf/retrain-on-worker")
    assert deployment.work_pool_name == "rlhf-process"
    assert [schedule.schedule.cron for schedule in deployment.schedules] == [retrain_spec()["schedules"][0]["cron"]]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.pull_steps == spec["pull"]

    # The session's tiny parameters, data prep only: the worker's part is to run the flow from
    # the checkout; test_ui and the test above cover the whole pipeline.
    parameters = {"params": {**retrain_service.deployment().parameters["params"], "stages": ["data_prep"]}}
    flow_run_id = run_id_from_cli(
        server.cli("deployment", "run", "rlhf/retrain-on-worker", "--params", json.dumps(parameters))
    )
    # From another directory: the pull step must move the run into the checkout.
    server.cli("worker", "start", "--pool", "rlhf-process", "--run-once", cwd=tmp_path, timeout=600,
               env=server.env(RLHF_PIPELINE_DIR=str(REPO)))
    finished = wait_for_terminal(retrain_service, flow_run_id, timeout=60)
    assert finished.state.is_completed(), finished.state.message
    assert set(task_states(retrain_service, flow_run_id)) == {"data_prep"}

