"""One thin, generic Prefect task for every stage: cache key, lock, logging, a link artifact. No ML here.

The task is called with a stage's name, the run's config, the stage key the plan
computed and the results of its upstream stages, and returns a small ``StageResult`` (stage, key, path,
metrics): paths travel between tasks, never models.

Caching: the Prefect cache key *is* the stage key (``CacheKeyFnPolicy``), results are
persisted to ``<output_root>/prefect/results`` and the same key is locked across
processes (``SERIALIZABLE`` isolation, file locks that die with their process), so two runs with the
same inputs train a stage once: the second waits and comes back Cached. Prefect only
checks its own records, so the flow checks the store first and refreshes the cache when
the store disagrees (see ``flows/rlhf.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from pipeline_lib import registry
from pipeline_lib.config import PipelineConfig
from pipeline_lib.distributed import run_stage_distributed
from pipeline_lib.execution import check_store_visible, granted_threads, placement
from pipeline_lib.launch import run_stage_process
from pipeline_lib.plan import store_for
from pipeline_lib.progress import percent
from pipeline_lib.registry import BASE_MODEL
from tasks.locking import ProcessBoundLockManager


class StageResult(BaseModel):
    stage: str
    key: str
    path: str
    metrics: dict[str, Any] = {}
    trained: bool = True  # False when the store already held this key


def prefect_dir(config: PipelineConfig) -> Path:
    return Path(config.output_root).resolve() / "prefect"


def stage_cache_policy(config: PipelineConfig) -> CacheKeyFnPolicy:
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: f"{parameters['stage_name']}-{parameters['key']}")
    return policy.configure(
        isolation_level="SERIALIZABLE",
        lock_manager=ProcessBoundLockManager(lock_files_directory=prefect_dir(config) / "locks"),
    )


def execute(
    stage: str,
    key: str,
    config: PipelineConfig,
    upstream: dict[str, StageResult],
    train: Callable[[Path], dict[str, Any]],
    rerun: bool = False,
) -> StageResult:
    """Run ``train`` into the key's work directory and publish it, unless the store has it
    (or ``rerun`` asks to train again). A failure publishes nothing. The manifest records
    where the stage ran (host, and the Ray node under Ray)."""
    logger = get_run_logger()
    store = store_for(config)
    where = placement()
    if not rerun and store.validate(stage, key) is None:
        logger.info("%s %s: already in the store, not training", stage, key[:12])
        output = store.load(stage, key)
        return StageResult(stage=stage, key=key, path=str(output.path), metrics=output.manifest.get("metrics", {}), trained=False)
    work_dir = store.begin(stage, key)
    started = time.time()
    logger.info("%s %s: running in %s", stage, key[:12], work_dir)
    metrics = train(work_dir)
    manifest = {
        "config": registry.stage(stage).config_section(config),
        "upstream": {name: {"key": result.key, "path": result.path} for name, result in upstream.items()},
        "metrics": metrics,
        "timings": {"seconds": round(time.time() - started, 2)},
        "placement": where,
        "tracking_run_id": metrics.get("tracking_run_id"),
    }
    output = store.publish(stage, key, manifest)
    create_link_artifact(
        link=output.path.resolve().as_uri(),
        link_text=f"{stage} output {key[:12]}",
        description=f"{stage} output directory (key {key})",
    )
    logger.info("%s %s: published %s in %.1fs", stage, key[:12], output.path, time.time() - started)
    return StageResult(stage=stage, key=key, path=str(output.path), metrics=metrics)


class ProgressArtifacts:
    """The stage's progress in the Prefect UI: one progress artifact per thing it reports
    (``data_prep: generating``, ``sft training``, ``evaluate dpo: generating``, ...), created
    at its first report and updated as the stage goes (pipeline_lib/progress.py)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.artifacts: dict[str, Any] = {}

    def __call__(self, report: dict[str, Any]) -> None:
        label, done = str(report.get("label", self.stage)), percent(report)
        description = f"{label}: {report.get('done')}/{report.get('total')}"
        if label not in self.artifacts:
            self.artifacts[label] = create_progress_artifact(done, description=description)
        else:
            update_progress_artifact(self.artifacts[label], done, description=description)


# One task for every stage; the flow names each run after its stage (``stage_task``).
TASK_OPTIONS = dict(persist_result=True, retries=0, task_run_name="{stage_name}-{key:.12}")


@task(name="stage", **TASK_OPTIONS)
def run_stage(
    stage_name: str,
    key: str,
    rerun: bool,
    config: PipelineConfig,
    base_model_dir: str,
    upstream: dict[str, StageResult],
    store_id: str | None = None,
    threads: int | None = None,
) -> StageResult:
    """Run one declared stage on the outputs of its upstream stages (paths, never models).
    ``store_id`` is the output root's identity for this run (``pipeline_lib.execution``):
    a worker that does not see the same output root fails here, before any work.
    ``threads``: the stage's torch threads from the plan (pipeline_lib/cores.py); under Ray,
    the CPUs Ray granted the task instead."""
    if store_id is not None:
        check_store_visible(config.output_root, store_id)
    inputs = {BASE_MODEL: Path(base_model_dir), **{name: Path(result.path) for name, result in upstream.items()}}

    def train(out_dir: Path) -> dict[str, Any]:
        # The stage's ML runs in a process of its own (pipeline_lib/launch.py), or on
        # launch.num_processes processes under accelerate (pipeline_lib/distributed.py): if
        # it dies, this task fails naming the stage, and the stages beside it carry on.
        several = registry.stage(stage_name).distributed and config.launch.num_processes > 1
        if config.launch.num_processes > 1 and not several and stage_name in config.train_sections():
            # TRL 1.12's PPO (trl.experimental) cannot save from ranks other than 0 under transformers 5.
            get_run_logger().info("%s: runs on one process (launch.num_processes applies to %s)", stage_name,
                                  ", ".join(name for name in registry.stage_names() if registry.stage(name).distributed))
        run = run_stage_distributed if several else run_stage_process
        return run(
            stage_name, config.model_dump(mode="json"), inputs, out_dir, prefect_dir(config) / "running",
            granted_threads() or threads, on_progress=ProgressArtifacts(stage_name),
        )

    return execute(stage_name, key, config, upstream, train, rerun)


def stage_task(stage_name: str):
    """The Prefect task of one stage: ``run_stage`` under the stage's name, so the UI, the
    logs and the cache records read "dpo", "ppo", ... ."""
    return run_stage.with_options(name=stage_name)
