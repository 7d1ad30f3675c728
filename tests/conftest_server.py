"""A real Prefect server and the served ``rlhf/retrain`` deployment, for test_deployments and test_ui.

Everything runs as the user would run it: ``prefect server start`` on a free port of
127.0.0.1 (its own PREFECT_HOME and SQLite database under a temporary folder, analytics
off), then ``python deployments/serve.py`` from the repository root with PREFECT_API_URL
pointing at it, the tiny preset, an output root in the temporary folder and a local
jsonl preference file as ``data.source``. Tests talk to the server through the Prefect
client, the ``prefect`` CLI and (test_ui) a browser. The session fixtures that start
both live at the end of ``tests/conftest.py``; the helpers are here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "rlhf/retrain"
# Not the default, so the test proves the option reaches the schedule.
TEST_CRON = "17 4 * * 1"
# A fresh tiny run on a busy 2-core machine takes one to three minutes.
RUN_TIMEOUT = 600
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The test process's environment without the user's PREFECT_* settings, plus ours."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def tail(path: Path, characters: int = 4000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.exists() else f"({path} is empty)"


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process this module started, then whatever it started that is still running."""
    import psutil

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Flow runs start in their own session, so they outlive the serve process unless stopped.
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@dataclass
class PrefectServer:
    url: str  # the UI
    api_url: str
    home: Path
    log: Path

    def client(self):
        """A synchronous client bound to this server, whatever PREFECT_API_URL the test process has."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def env(self, **extra: str) -> dict[str, str]:
        return prefect_env(self.home, self.api_url, **extra)

    def cli(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
        """Run ``prefect ARGS`` against this server; returns its output, fails the test on error."""
        result = subprocess.run(
            [sys.executable, "-m", "prefect", *args], cwd=cwd, env=env or self.env(), capture_output=True, text=True,
            timeout=timeout,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}:\n{output[-4000:]}"
        return output


@contextmanager
def running_server(root: Path, startup_timeout: float = 180) -> Iterator[PrefectServer]:
    """``prefect server start --host 127.0.0.1 --port FREE_PORT`` until the context ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(url=url, api_url=f"{url}/api", home=home, log=root / "server.log")
    env = prefect_env(
        home,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        # The UI asks the API at this URL; without it the browser calls the default port 4200.
        PREFECT_UI_API_URL=server.api_url,
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        # Serve polling, flow runs and the UI share one SQLite file on a busy 2-core machine:
        # give writers longer than the default 10 s before "database is locked".
        PREFECT_SERVER_DATABASE_TIMEOUT="60",
    )
    with open(server.log, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {process.returncode}:\n{tail(server.log)}")
            try:
                with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {startup_timeout}s:\n{tail(server.log)}")
            time.sleep(0.5)
        yield server
    finally:
        stop(process)


@dataclass
class ServedDeployment:
    server: PrefectServer
    output_root: Path
    data_file: Path
    cron: str
    log: Path
    process: subprocess.Popen

    def deployment(self):
        with self.server.client() as client:
            return client.read_deployment_by_name(DEPLOYMENT)

    def check_alive(self) -> None:
        assert self.process.poll() is None, f"serve.py exited with {self.process.returncode}:\n{tail(self.log)}"


@contextmanager
def served_retrain(server: PrefectServer, root: Path, startup_timeout: float = 300) -> Iterator[ServedDeployment]:
    """``python deployments/serve.py`` for the tiny preset and a local jsonl file, until the context ends."""
    data_file = root / "pairs.jsonl"
    write_preference_pairs(data_file, variant=0)
    output_root = root / "out"
    log = root / "serve.log"
    command = [
        sys.executable, str(REPO / "deployments" / "serve.py"),
        "--cron", TEST_CRON,
        "--preset", "tiny",
        "--output-root", str(output_root),
        "--set", f"data.source={data_file}",
    ]
    # Poll every 2 s instead of 10 so a Quick run starts promptly.
    env = server.env(PREFECT_RUNNER_POLL_FREQUENCY="2")
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    served = ServedDeployment(server, output_root, data_file, TEST_CRON, log, process)
    try:
        deadline = time.monotonic() + startup_timeout
        while "being served" not in log.read_text(errors="replace"):
            served.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve.py did not start serving within {startup_timeout}s:\n{tail(log)}")
            time.sleep(0.5)
        yield served
    finally:
        stop(process)


def write_preference_pairs(path: Path, variant: int) -> None:
    """A jsonl file of template preference pairs; each ``variant`` is different data (new content)."""
    from pipeline_lib.data import sentiment_task

    train, held_out, _ = sentiment_task.build_prompts(32 + 4 * variant, 8, seed=variant)
    rows = sentiment_task.template_pairs(train + held_out, seed=variant)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_id_from_cli(output: str) -> UUID:
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, f"no flow run id in:\n{output}"
    return UUID(match.group(1))


def wait_for_terminal(served: ServedDeployment, flow_run_id: UUID, timeout: float = RUN_TIMEOUT, after_attempt: int = 0):
    """Poll until the flow run is in a terminal state (of an attempt later than ``after_attempt``)."""
    deadline = time.monotonic() + timeout
    with served.server.client() as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state and flow_run.state.type.value in TERMINAL and flow_run.run_count > after_attempt:
                return flow_run
            served.check_alive()
            if time.monotonic() > deadline:
                state = flow_run.state.name if flow_run.state else None
                raise AssertionError(f"flow run {flow_run_id} still {state} after {timeout}s; serve log:\n{tail(served.log)}")
            time.sleep(1)


def task_states(served: ServedDeployment, flow_run_id: UUID, attempt: int | None = None) -> dict[str, str]:
    """``{stage: state name}`` of a flow run's task runs in one attempt (default: the latest)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with served.server.client() as client:
        if attempt is None:
            attempt = client.read_flow_run(flow_run_id).run_count
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # Task runs are named "<stage>-<key prefix>" (tasks/stages.py).
    return {run.name.rsplit("-", 1)[0]: run.state_name for run in task_runs if run.flow_run_run_count == attempt}


def artifacts_of(served: ServedDeployment, flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with served.server.client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found if artifact.key}
