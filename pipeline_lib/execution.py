"""Where stages run: the checks and records that make ``execution.runner: ray`` safe.

No Prefect here (``tasks/runners.py`` builds the task runner), and no import of Ray: in a
Ray worker it is already loaded, and elsewhere it is not needed.

* ``check_execution``: before any work, the resources name known stages, Ray is
  installed, and the cluster at ``execution.ray_address`` answers within
  ``execution.connect_timeout`` seconds (a TCP connection to its head), so a wrong
  address fails in seconds with a message naming it instead of hanging in ``ray.init``.
* ``mark_store`` / ``check_store_visible``: the output root is the one storage every
  worker must see. It carries an identity file (written by the first run there, then
  kept), which the flow reads at the start of a run and every stage checks before it
  reads or writes anything there: a node where the path is missing, or where the same
  path is a different (local) directory, fails naming the output root and the host, not
  with a missing-file error deep in a stage.
* ``placement``: where this process runs (host, pid, and the Ray node and worker when
  under Ray), recorded in every manifest.
* ``granted_threads``: under Ray, the CPUs Ray granted this task are its torch threads;
  Ray's resource accounting replaces ``pipeline_lib.cores``' marker files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline_lib.config import PipelineConfig
from pipeline_lib.errors import ConfigError, StoreError

# Inside the output root; written once, read by every run and every stage.
STORE_ID_FILE = "store-id"
RAY_CLIENT_PORT = 10001


def check_execution(config: PipelineConfig, known_stages: list[str], connect: bool = True) -> None:
    """Everything about where stages run that can be checked before work; ``connect``:
    also that the Ray cluster answers (a dry run does not ask)."""
    execution = config.execution
    unknown = sorted(set(execution.stage_resources) - set(known_stages))
    if unknown:
        raise ConfigError(f"execution.stage_resources: unknown stage(s) {unknown}; choose from {', '.join(known_stages)}")
    if execution.runner != "ray":
        return
    # Looked up, not imported: importing Ray costs seconds, and prefect-ray is the tasks' business.
    missing = [name for name in ("ray", "prefect_ray") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"execution.runner: 'ray' needs the ray and prefect-ray packages ({', '.join(missing)} missing); pip install -e .")
    if execution.ray_address is not None:
        ray_head(execution.ray_address)  # a malformed address fails a dry run too
    if connect and execution.ray_address is not None:
        check_ray_answers(execution.ray_address, execution.connect_timeout)


def ray_head(address: str) -> tuple[str, int]:
    """(host, port) of the head a Ray address names: ``host:port`` (the GCS) or
    ``ray://host[:port]`` (Ray Client, port 10001 by default); ``auto`` means the cluster
    ``RAY_ADDRESS`` names or the one ``ray start`` last started on this machine."""
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS") or _current_local_cluster()
        if not found or found == "auto":
            raise ConfigError("execution.ray_address: 'auto' but no Ray cluster was started here (ray start) and RAY_ADDRESS is unset")
        address = found
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    if parts.scheme not in ("ray", "gcs") or not parts.hostname:
        raise ConfigError(f"execution.ray_address: {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"execution.ray_address: {address!r} has an invalid port") from None
    if port is None:
        if parts.scheme != "ray":
            raise ConfigError(f"execution.ray_address: {address!r} needs a port (the head's GCS port, 6379 by default)")
        port = RAY_CLIENT_PORT
    return parts.hostname, port


def _current_local_cluster() -> str | None:
    try:
        return Path("/tmp/ray/ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def check_ray_answers(address: str, timeout: float) -> None:
    """Fail with a ConfigError unless the Ray head at ``address`` accepts a connection
    within ``timeout`` seconds (``ray.init`` itself retries for a minute or more)."""
    host, port = ray_head(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        reason = f"no answer within {timeout:g}s" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        raise ConfigError(
            f"execution.ray_address: the Ray cluster at {address!r} does not answer ({host}:{port}: {reason}); "
            "start it (ray start --head) or fix the address, or unset it for a local Ray"
        ) from None


def ray_remote_options(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The ``ray.remote`` options of one stage's task: its resources, and no retry by Ray
    (a stage whose worker died fails alone; the flow's re-run resumes it from its last
    checkpoint, under Prefect's eyes, instead of Ray restarting it unseen)."""
    resources = config.execution.resources_for(stage)
    options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_retries": 0}
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 2**30)
    return options


def mark_store(output_root: Path) -> str:
    """The output root's identity, given by the first run that writes there and kept
    (runs side by side on one root must agree on it); returns it."""
    root = Path(output_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / STORE_ID_FILE
    try:
        with open(path, "x") as created:  # exclusive: of two runs starting at once, one writes
            identity = uuid.uuid4().hex
            created.write(identity)
            return identity
    except FileExistsError:
        pass
    for _ in range(50):  # the other run may be between creating the file and writing it
        identity = path.read_text().strip()
        if identity:
            return identity
        time.sleep(0.1)
    raise StoreError(f"{path} is empty: delete it (the next run writes a new one)")


def check_store_visible(output_root: Path, identity: str) -> None:
    """Fail naming the output root and this host unless the run's identity file is here."""
    root = Path(output_root).resolve()
    try:
        found = (root / STORE_ID_FILE).read_text().strip()
    except OSError as error:
        found, reason = None, f"{root / STORE_ID_FILE} cannot be read here ({error.strerror or type(error).__name__})"
    if found is not None and found != identity:
        reason = f"{root} here is another directory than the one the flow wrote to (its {STORE_ID_FILE} differs)"
    if found != identity:
        where = describe(placement())
        raise StoreError(
            f"output root {root} is not visible from {where}: {reason}. The output root must be storage every "
            "worker sees at the same path (a shared filesystem), see execution in the README"
        )


def _ray_context():
    """Ray's runtime context when this process is a Ray worker or driver, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context()


def placement() -> dict[str, Any]:
    """Where this process runs: host and pid, and the Ray node and worker under Ray."""
    found: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    context = _ray_context()
    if context is not None:
        found["ray_node_id"] = context.get_node_id()
        found["ray_worker_id"] = context.get_worker_id()
        found["ray_resources"] = context.get_assigned_resources()
    return found


def describe(where: dict[str, Any]) -> str:
    text = f"host {where['host']}"
    if where.get("ray_node_id"):
        text += f" (Ray node {where['ray_node_id'][:12]})"
    return text


def granted_threads() -> int | None:
    """The CPUs Ray granted the task this process runs (at least 1); None outside a Ray task."""
    context = _ray_context()
    if context is None or context.worker.mode != 1:  # 1: a worker running tasks, not the driver
        return None
    return max(1, math.floor(context.get_assigned_resources().get("CPU", 1)))
