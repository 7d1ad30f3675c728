"""The Prefect task runner a run's stages go through, chosen from ``execution.runner``.

``process`` (the default): a thread pool on the flow's machine; each stage's task waits in
a thread while its ML runs in a child process (``pipeline_lib/launch.py``), and the
children share this machine's cores (``pipeline_lib/cores.py``).

``ray``: prefect-ray's ``RayTaskRunner``: every stage is a Ray task that asks for the CPUs,
GPUs and memory of ``execution.resources`` (with the stage's overrides) through
prefect-ray's ``remote_options``, and Ray places it on a node that has them free. A local
Ray is started for the run unless ``execution.ray_address`` names a cluster to join.

The runner is built inside the flow from the run's config (``flows/rlhf.py``), not fixed in
its decorator, so a run started from a deployment or the UI, whose config comes from the
flow's parameters, runs where its config says.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from prefect import get_client
from prefect.context import FlowRunContext
from prefect.states import Crashed
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pipeline_lib.config import PipelineConfig
from pipeline_lib.execution import ray_remote_options

# Stages whose inputs are ready train side by side on this machine, at most this many at once.
STAGE_WORKERS = 2


def task_runner_for(config: PipelineConfig) -> TaskRunner:
    """A fresh (not yet started) task runner for the run's stages."""
    execution = config.execution
    if execution.runner == "ray":
        from prefect_ray import RayTaskRunner

        # A local Ray for the run needs no dashboard; joining a cluster takes its settings.
        init_kwargs = {"include_dashboard": False} if execution.ray_address is None else {}
        return RayTaskRunner(address=execution.ray_address, init_kwargs=init_kwargs)
    return ThreadPoolTaskRunner(max_workers=STAGE_WORKERS)


@contextmanager
def stage_runners(config: PipelineConfig) -> Iterator[tuple[TaskRunner, TaskRunner]]:
    """Started runners: (for stages that train, for stages the store already has).

    Under Ray a stage the store has takes no resources and needs no node: it goes through
    threads of the flow's process, where it comes back Cached in a fraction of a second,
    instead of waiting seconds for a fresh Ray worker to import the ML libraries."""
    with task_runner_for(config) as runner:
        if config.execution.runner != "ray":
            yield runner, runner
            return
        with ThreadPoolTaskRunner(max_workers=STAGE_WORKERS) as local:
            yield runner, local


def placed(config: PipelineConfig, stage: str):
    """Around a stage's submission: its resource request under Ray, nothing otherwise."""
    if config.execution.runner != "ray":
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(**ray_remote_options(config, stage))


@contextmanager
def api_for_workers(config: PipelineConfig) -> Iterator[None]:
    """Ray workers run the task engine themselves and must talk to the flow's Prefect
    API. The settings travel with each submission, but a run on Prefect's temporary
    server (``PREFECT_API_URL`` unset) would have every worker start a temporary server
    of its own: name the flow's server instead. (A cluster of several machines needs a
    Prefect server they all reach: set ``PREFECT_API_URL``.)"""
    context = FlowRunContext.get()
    if config.execution.runner != "ray" or PREFECT_API_URL.value() or context is None or context.client is None:
        yield
        return
    with temporary_settings({PREFECT_API_URL: str(context.client.api_url)}):
        yield


def record_lost_task_run(future) -> None:
    """A task whose Ray worker died (killed, out of memory, its node lost) never reports
    its end, and the API would show it Running forever: record the crash the flow saw."""
    state = future.state
    if not state.is_crashed():
        return
    with get_client(sync_client=True) as client:
        current = client.read_task_run(future.task_run_id).state
        if current is None or not current.is_final():
            client.set_task_run_state(future.task_run_id, Crashed(message=state.message), force=True)
