"""``execution.runner: ray``: the tiny flow's stages placed by Ray on a two-node local cluster.

One cluster for the module (``ray.cluster_utils.Cluster``: a head and one more node, one
CPU each, so two stages whose inputs are ready run side by side, one on each node) and
one run of the whole tiny flow on it, which the tests below reuse: its cached re-run,
the manifests' record of where each stage ran, and a Ray worker killed while DPO trains,
whose re-run resumes DPO from its trainer checkpoint. Then the checks that fail before
work: a Ray address that does not answer (exit status 2, nothing in the store) and a
worker that does not see the output root.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from flows.rlhf import RunParameters, main, rlhf
from pipeline_lib import registry
from pipeline_lib.config import load_config
from pipeline_lib.errors import ConfigError, StoreError
from pipeline_lib.execution import check_execution, check_store_visible, mark_store, ray_remote_options
from pipeline_lib.plan import make_plan

pytestmark = pytest.mark.flow
ALL_STAGES = set(registry.stage_names())


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def on_ray(cluster, *overrides: str) -> list[str]:
    return ["execution.runner=ray", f"execution.ray_address={cluster.address}", *overrides]


def run_flow(output_root: Path, cluster, overrides: tuple[str, ...] = (), **fields):
    params = RunParameters(preset="tiny", output_root=str(output_root), overrides=on_ray(cluster, *overrides), **fields)
    return rlhf(params, return_state=True)


def published(output_root: Path) -> dict[str, str]:
    return {
        f"{manifest.parent.parent.name}/{manifest.parent.name}": json.loads(manifest.read_text())["published_at"]
        for manifest in (output_root / "store").glob("*/*/manifest.json")
    }


@pytest.fixture(scope="module")
def first_run(harness, ray_cluster, tmp_path_factory):
    """The whole tiny flow once on the cluster: (output root, final state)."""
    root = tmp_path_factory.mktemp("ray-run")
    return root, run_flow(root, ray_cluster)


def test_tiny_flow_on_ray_then_everything_cached(first_run, ray_cluster):
    root, state = first_run
    assert state.is_completed(), state.message
    summary = state.result()
    assert set(summary["stages"]) == ALL_STAGES
    assert not any(stage["cached"] for stage in summary["stages"].values())
    assert summary["evaluation"]["policies"].keys() >= {"base", "sft", "dpo", "ppo"}

    before = published(root)
    again = run_flow(root, ray_cluster)
    assert again.is_completed(), again.message
    assert all(stage["cached"] for stage in again.result()["stages"].values())
    assert published(root) == before


def test_every_manifest_records_the_host_and_ray_node_it_ran_on(first_run, ray_cluster):
    root, state = first_run
    assert state.is_completed(), state.message
    nodes = {node.node_id for node in ray_cluster.list_all_nodes()}
    for name, stage in state.result()["stages"].items():
        where = json.loads((Path(stage["path"]) / "manifest.json").read_text())["placement"]
        assert where["host"] == socket.gethostname(), name
        assert where["ray_node_id"] in nodes, (name, where)
        # The CPUs Ray granted: the tiny preset asks for the default, one per stage.
        assert where["ray_resources"].get("CPU") == 1.0, (name, where)


def ray_worker_running(task_name: str) -> int | None:
    """Pid of the Ray worker executing the task named ``task_name`` (its title is ``ray::<name>``)."""
    import psutil

    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(f"ray::{task_name}"):
                return process.pid
        except psutil.Error:
            continue
    return None


def test_a_ray_worker_killed_mid_stage_then_the_rerun_resumes_it(first_run, ray_cluster):
    """The Ray worker running DPO is killed once DPO has written a checkpoint (as a lost
    node or an out-of-memory kill would); the run fails naming DPO, publishes nothing for
    it, and its re-run reuses data prep and SFT and resumes DPO from the checkpoint."""
    root, state = first_run
    assert state.is_completed(), state.message
    long_dpo = ("dpo.max_steps=40", "dpo.save_steps=2")
    killed: list[int] = []

    def kill_dpo_worker_after_a_checkpoint() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if any((root / "store" / "dpo").glob("*.partial/checkpoints/checkpoint-*/trainer_state.json")):
                pid = ray_worker_running("dpo")
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_dpo_worker_after_a_checkpoint, daemon=True)
    killer.start()
    interrupted = run_flow(root, ray_cluster, long_dpo, stages=["dpo"])
    killer.join()
    assert killed, "DPO wrote no checkpoint, or its Ray worker was not found"
    assert interrupted.is_failed()
    assert "stage dpo failed" in str(interrupted.message), interrupted.message
    # The lost task run ends Crashed in the API, not Running forever.
    assert task_states(interrupted)["dpo"] == "CRASHED"
    dpo_outputs = list((root / "store" / "dpo").glob("*/manifest.json"))

    resumed = run_flow(root, ray_cluster, long_dpo, stages=["dpo"])
    assert resumed.is_completed(), resumed.message
    summary = resumed.result()
    assert {name: stage["cached"] for name, stage in summary["stages"].items()} == {"data_prep": True, "sft": True, "dpo": False}
    manifest = json.loads((Path(summary["stages"]["dpo"]["path"]) / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_checkpoint"] is True
    assert len(list((root / "store" / "dpo").glob("*/manifest.json"))) == len(dpo_outputs) + 1


def task_states(state) -> dict[str, str]:
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            runs = await client.read_task_runs(flow_run_filter=this_run)
            return {run.name.split("-")[0]: run.state.type.value for run in runs}

    return asyncio.run(read())


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "address, says",
    [
        (f"127.0.0.1:{closed_port()}", "refused"),  # nothing listens there
        ("192.0.2.1:6379", "192.0.2.1:6379"),  # TEST-NET-1: no answer (or no route) within the timeout
    ],
    ids=["refused", "silent"],
)
def test_a_ray_address_that_does_not_answer_fails_before_any_work(tmp_path, capsys, address, says):
    started = time.monotonic()
    code = main([
        "--preset", "tiny", "--output-root", str(tmp_path),
        "--set", "execution.runner=ray", "--set", f"execution.ray_address={address}", "--set", "execution.connect_timeout=1",
    ])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert f"the Ray cluster at '{address}' does not answer" in captured.err
    assert says in captured.err.lower()
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == "invalid"
    assert time.monotonic() - started < 30
    assert not (tmp_path / "store").exists() and not (tmp_path / "models").exists()


def test_a_worker_that_does_not_see_the_output_root_fails_naming_it_and_the_host(tmp_path, tiny_config):
    identity = mark_store(tmp_path / "shared")
    check_store_visible(tmp_path / "shared", identity)  # the flow's own view
    assert mark_store(tmp_path / "shared") == identity  # kept: runs side by side agree on it
    with pytest.raises(StoreError) as missing:
        check_store_visible(tmp_path / "not-mounted", identity)
    assert str((tmp_path / "not-mounted").resolve()) in str(missing.value)
    assert f"host {socket.gethostname()}" in str(missing.value)
    assert "storage every worker sees" in str(missing.value)

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "store-id").write_text("another run's identity")
    with pytest.raises(StoreError, match="another directory than the one the flow wrote to"):
        check_store_visible(tmp_path / "local", identity)

    # The stage task checks first: nothing is read or written on a worker that cannot see the root.
    from tasks.stages import run_stage

    tiny_config.output_root = tmp_path / "not-mounted"
    with pytest.raises(StoreError, match="is not visible from host"):
        run_stage.fn("data_prep", "0" * 64, False, tiny_config, str(tmp_path / "model"), {}, store_id=identity)
    assert not (tmp_path / "not-mounted").exists()


def test_a_stage_on_a_ray_worker_that_sees_another_output_root_fails_before_work(harness, ray_cluster, tmp_path, monkeypatch):
    """As a node whose output root is a local directory of its own would: the identity the
    flow hands its stages is not the one the worker finds; the stage fails on the worker,
    naming the output root, the host and the Ray node, and publishes nothing."""
    import flows.rlhf

    monkeypatch.setattr(flows.rlhf, "mark_store", lambda root: "an identity this output root never had")
    state = run_flow(tmp_path, ray_cluster, stages=["data_prep"])
    assert state.is_failed()
    message = str(state.message)
    assert f"output root {tmp_path.resolve()} is not visible from host {socket.gethostname()} (Ray node " in message, message
    assert not list((tmp_path / "store").glob("*/*"))


# --- The execution section, no cluster ----------------------------------------------------


def test_execution_settings_change_no_stage_key(tmp_path):
    """Where a stage runs does not change its output: no execution setting is in any key."""
    base = load_config("tiny", env_file=None, overrides=[f"output_root={tmp_path}"])
    elsewhere = load_config(
        "tiny",
        env_file=None,
        overrides=[
            f"output_root={tmp_path}", "execution.runner=ray", "execution.ray_address=head:6379",
            "execution.resources.cpus=4", "execution.stage_resources.ppo.gpus=1",
        ],
    )
    assert [stage.key for stage in make_plan(base).stages] == [stage.key for stage in make_plan(elsewhere).stages]
    for name in registry.stage_names():
        assert "execution" not in registry.stage(name).config_sections


def test_per_stage_resources_override_the_defaults_and_become_ray_options():
    config = load_config(
        "tiny",
        env_file=None,
        overrides=["execution.resources.cpus=2", "execution.resources.memory_gb=3", "execution.stage_resources.ppo.gpus=1"],
    )
    assert ray_remote_options(config, "ppo") == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 3 * 2**30, "max_retries": 0}
    assert ray_remote_options(config, "dpo") == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 3 * 2**30, "max_retries": 0}


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["execution.stage_resources.kto.gpus=1"], "execution.stage_resources: unknown stage(s) ['kto']"),
        (["execution.runner=ray", "execution.ray_address=no-port-here"], "needs a port"),
        (["execution.runner=ray", "execution.ray_address=http://head:6379"], "is not host:port"),
    ],
)
def test_bad_execution_settings_are_rejected_naming_them(overrides, named):
    with pytest.raises(ConfigError) as raised:
        check_execution(load_config("tiny", env_file=None, overrides=overrides), registry.stage_names(), connect=False)
    assert named in str(raised.value)


def test_bad_resource_values_are_rejected_by_the_config():
    with pytest.raises(ConfigError, match="execution.resources.cpus"):
        load_config("tiny", env_file=None, overrides=["execution.resources.cpus=0"])
    with pytest.raises(ConfigError, match="execution.runner"):
        load_config("tiny", env_file=None, overrides=["execution.runner=slurm"])


def test_fp16_under_ray_needs_every_training_stage_to_ask_for_a_gpu():
    """Under Ray the flow's machine has no say on precision: the stages' GPU requests do."""
    from pipeline_lib.plan import check_precision_here

    on_cluster = ["execution.runner=ray", "precision=fp16"]
    with pytest.raises(ConfigError, match=r"precision: 'fp16' needs a CUDA GPU, and under Ray stage\(s\) \[.*'dpo'.*\] ask for none"):
        check_precision_here(load_config("tiny", env_file=None, overrides=on_cluster))
    check_precision_here(load_config("tiny", env_file=None, overrides=[*on_cluster, "execution.resources.gpus=1"]))
