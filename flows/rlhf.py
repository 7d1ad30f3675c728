"""The ``rlhf`` flow: data prep -> SFT -> reward -> DPO / PPO -> evaluate, cached and resumable.

    python flows/rlhf.py                        # the default preset, offline, embedded model
    python flows/rlhf.py --preset tiny --dry-run
    python flows/rlhf.py --set dpo.beta=0.3 --stages dpo,evaluate
    python flows/rlhf.py --force reward         # re-run reward and everything after it
    python flows/rlhf.py --set execution.runner=ray --set execution.ray_address=head:6379

Every stage's Prefect cache key is its stage key (config, upstream keys, data
fingerprint, code, library versions), so a second run is all Cached, a changed stage
re-runs with its descendants only, and a re-run after a failure or kill skips finished
stages while the interrupted one resumes from its last trainer checkpoint. Before
trusting a Prefect cache hit the flow checks the store; an output that is missing or
does not match its checksums is trained again.

Uses Prefect's temporary local server when ``PREFECT_API_URL`` is unset and the
configured server otherwise. The last line on standard output is one JSON object with
the overall status, each stage's key, path and cache state, and the evaluation metrics.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any


def _prefect_toml_as_defaults(path: Path = Path(__file__).resolve().parents[1] / "prefect.toml") -> None:
    """Prefect reads ``prefect.toml`` from the working directory only; a run started
    elsewhere would lose the repository's settings (no telemetry, the server's start-up
    time, pipeline logs in the UI). Apply them as environment defaults (PREFECT_SECTION_KEY),
    before Prefect is imported; a variable the user set wins."""

    def flatten(table: dict, prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}_{key}".upper()
            if isinstance(value, dict):
                flatten(value, name)
            else:
                os.environ.setdefault(name, str(value).lower() if isinstance(value, bool) else str(value))

    if path.is_file():
        flatten(tomllib.loads(path.read_text()), "PREFECT")


_prefect_toml_as_defaults()

from pipeline_lib.config import available_presets  # noqa: E402  (light: no Prefect, no torch)
from pipeline_lib.registry import stage_names  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python flows/rlhf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="default", choices=available_presets(), help="starting configuration")
    parser.add_argument("--config", dest="config_file", help="YAML file whose sections override the preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one setting, e.g. --set dpo.beta=0.3, --set adapter=lora (LoRA on every training stage), "
        "--set precision=bf16 (repeatable); see .env.example for every field",
    )
    parser.add_argument(
        "--stages",
        help=f"comma-separated stages to run, with what they need ({','.join(stage_names())}), or 'all'; "
        "default: the preset's stages",
    )
    parser.add_argument("--force", help="comma-separated stages to re-run with their descendants even if cached")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's key and whether it is cached; train nothing")
    parser.add_argument("--output-root", help="where the store, caches and results live (default .data)")
    return parser


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    build_parser().parse_args()  # prints the help and exits, before Prefect and torch are imported

from prefect import allow_failure, flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from pipeline_lib.config import PipelineConfig, load_config
from pipeline_lib.data import sentiment_task
from pipeline_lib.errors import PipelineError, StageFailed
from pipeline_lib.execution import check_execution, mark_store
from pipeline_lib.launch import stages_stop_on_sigterm
from pipeline_lib.models import materialize_base_model
from pipeline_lib.plan import (
    Plan,
    check_against_model,
    check_before_work,
    check_precision_here,
    closure,
    describe_downloads,
    dry_run_details,
    make_plan,
    parse_stage_list,
    store_for,
)
from tasks.runners import api_for_workers, placed, record_lost_task_run, stage_runners
from tasks.stages import StageResult, prefect_dir, stage_cache_policy, stage_task

Preset = Enum("Preset", {name: name for name in available_presets()}, type=str)
Stage = Enum("Stage", {name: name for name in stage_names()}, type=str)


class RunParameters(BaseModel):
    """What one run of the pipeline does; the Prefect UI shows these as the Custom run form."""

    preset: Preset = Field(Preset("default"), description="Starting configuration: tiny (tests), default (embedded, CPU), tldr (hub).")
    config_file: str | None = Field(None, description="A YAML file whose sections override the preset.")
    overrides: list[str] = Field(
        default_factory=list, description="Dotted overrides applied last, e.g. 'dpo.beta=0.3', 'sft.top_k=0'."
    )
    stages: list[Stage] = Field(
        default_factory=list,
        description="Stages to run, with what they need (none = the preset's stages, normally every stage).",
    )
    force: list[Stage] = Field(default_factory=list, description="Stages to re-run (with their descendants) even if cached.")
    output_root: str | None = Field(None, description="Where the store, caches and results live (default: the config's .data).")

    def config(self) -> PipelineConfig:
        overrides = list(self.overrides) + ([f"output_root={self.output_root}"] if self.output_root else [])
        return load_config(self.preset.value, self.config_file, overrides)

    def stage_names(self) -> list[str]:
        return [stage.value for stage in self.stages]

    def force_names(self) -> list[str]:
        return [stage.value for stage in self.force]


def prepare_base_model(config: PipelineConfig, stages: list[str] | None = None) -> Path:
    """Materialise the base model (converted once, then reused) and check against it what
    depends on it, for the stages the run includes: top_k depths, LoRA target modules."""
    check_precision_here(config)
    base_model_dir = materialize_base_model(config.model, Path(config.output_root) / "models", sentiment_task.corpus())
    check_against_model(config, base_model_dir, closure(parse_stage_list(stages, config.stages, "stages")))
    return base_model_dir


def submit_stages(runners, config: PipelineConfig, plan: Plan, base_model_dir: Path, store_id: str) -> dict[str, Any]:
    """Submit one task per planned stage, each given the futures of the stages it reads
    and, under Ray, its resource request. ``runners``: (for stages that train, for stages
    the store has); under Ray a stage goes to Ray when it trains or reads one that does."""
    runner, local = runners
    policy = stage_cache_policy(config)
    storage = prefect_dir(config) / "results"
    futures: dict[str, Any] = {}
    remote: set[str] = set()
    with api_for_workers(config):
        for stage in plan.stages:
            upstream = {name: futures[name] for name in stage.upstream}
            target = runner if stage.will_run or remote & set(upstream) else local
            if target is not local:
                # A Ray task takes Ray futures or values: a stage from the store, run here,
                # hands over its result (it is done in a moment). One that failed keeps its
                # dependant here too, where it stops at once as not ready.
                for name in set(upstream) - remote:
                    upstream[name].wait()
                    if upstream[name].state.is_completed():
                        upstream[name] = upstream[name].result()
                    else:
                        target = local
            if target is not local:
                remote.add(stage.name)
            task = stage_task(stage.name).with_options(
                cache_policy=policy,
                result_storage=storage,
                # Prefect only knows its own records: refresh when the store lacks the output.
                refresh_cache=stage.will_run,
            )
            parameters = dict(
                stage_name=stage.name,
                key=stage.key,
                rerun=stage.forced,
                config=config,
                base_model_dir=str(base_model_dir),
                upstream=upstream,
                store_id=store_id,
                threads=stage.threads,
            )
            # On this machine a stage starts once the earlier waves have ended, failed or not
            # (pipeline_lib/cores.py); Ray decides for itself.
            earlier = [] if config.execution.runner == "ray" else [
                allow_failure(futures[other.name]) for other in plan.stages
                if other.name in futures and other.wave < stage.wave and other.name not in upstream
            ]
            with placed(config, stage.name):
                futures[stage.name] = target.submit(task, parameters, wait_for=earlier or None)
    return futures


def publish_artifacts(plan: Plan, results: dict[str, StageResult]) -> None:
    lineage = ["| stage | key | inputs | path |", "|---|---|---|---|"]
    for stage in plan.stages:
        if stage.name in results:
            inputs = ", ".join(f"{name} `{key[:12]}`" for name, key in stage.upstream.items()) or "sources"
            lineage.append(f"| {stage.name} | `{stage.key[:12]}` | {inputs} | `{results[stage.name].path}` |")
    markdown = ["# RLHF run", "", "## Lineage", "", *lineage]
    evaluation = results.get("evaluate")
    if evaluation:
        report_dir = Path(evaluation.path)
        report = (report_dir / "report.md").read_text()
        plot = report_dir / "eval.png"
        if plot.is_file():
            # Artifacts cannot serve local files: inline the plot so the UI shows it.
            encoded = base64.b64encode(plot.read_bytes()).decode()
            report = report.replace("(eval.png)", f"(data:image/png;base64,{encoded})")
        markdown += ["", report]
        policies = json.loads((report_dir / "eval.json").read_text())["policies"]
        create_table_artifact(
            [{"policy": name, **{k: artifact_cell(v) for k, v in row.items()}} for name, row in policies.items()],
            key="rlhf-metrics",
            description="Evaluation metrics per policy on held-out prompts",
        )
    create_markdown_artifact("\n".join(markdown), key="rlhf-report", description="Evaluation and lineage of every output")


def artifact_cell(value: Any) -> Any:
    """A figure for the UI's table: 4 decimals; an interval as ``[low, high]`` text."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return "[" + ", ".join(f"{bound:.4f}" for bound in value) + "]"
    return value


# The stages go through the task runner the run's config names (tasks/runners.py), built
# here rather than in the decorator so that a run from a deployment or the UI, whose
# config comes from its parameters, runs where that config says. With the default
# (execution.runner: process) each task waits in a thread of the flow while its stage
# trains in a process of its own (pipeline_lib/launch.py): torch's RNG and model loading
# are process-global, a stage that is killed must fail alone, and each stage's memory goes
# back when it ends; the stage processes share the cores through pipeline_lib.cores. With
# ray, Ray places each stage that trains by its resources and the same child process runs
# in the Ray worker; a stage the store already has comes back Cached from a thread here.
@flow(name="rlhf")
def rlhf(params: RunParameters = RunParameters()) -> dict[str, Any]:
    """Run the RLHF pipeline; returns each stage's key, path, cache state and the evaluation."""
    logger = get_run_logger()
    config = params.config()
    # Workers elsewhere (Ray) have other working directories: every path they get is absolute.
    config.output_root = Path(config.output_root).resolve()
    check_execution(config, stage_names())  # a run from a deployment skips main()'s checks
    base_model_dir = prepare_base_model(config, params.stage_names())
    plan = make_plan(config, params.stage_names(), params.force_names())
    for stage in plan.stages:
        state = "cached" if not stage.will_run else f"will run ({stage.threads} torch thread{'s' * (stage.threads > 1)})"
        logger.info("plan: %-9s %s %s", stage.name, stage.key[:12], state)
    progress = create_progress_artifact(0.0, key="rlhf-progress", description="Stages finished")
    results: dict[str, StageResult] = {}
    failures: dict[str, str] = {}
    store_id = mark_store(config.output_root)
    with stages_stop_on_sigterm(), stage_runners(config) as runners:
        futures = submit_stages(runners, config, plan, base_model_dir, store_id)
        for future in as_completed(list(futures.values())):
            name = next(stage for stage, candidate in futures.items() if candidate is future)
            future.wait()
            if future.state.is_completed():
                results[name] = future.result()
                if future.state.name == "Cached":
                    results[name] = results[name].model_copy(update={"trained": False})
            else:
                failures[name] = failure_message(future.state)
                record_lost_task_run(future)
            update_progress_artifact(progress, 100.0 * (len(results) + len(failures)) / len(futures))
    publish_artifacts(plan, results)
    summary = run_summary(plan, results, failures)
    if failures:
        first = next(name for name in plan.names() if name in failures)
        detail = failures[first]
        error = StageFailed(detail if detail.startswith(f"stage {first} failed") else f"stage {first} failed: {detail}")
        error.summary = summary  # main() prints it: every stage's status and error
        raise error
    return summary


def failure_message(state) -> str:
    """What went wrong in a failed task, in the stage's own words: the exception it raised
    (a StageFailed names the stage and its cause) rather than Prefect's wrapper text."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result itself could not be read
        error = None
    return str(error) if isinstance(error, BaseException) and str(error) else str(state.message or state.name)


def run_summary(
    plan: Plan,
    results: dict[str, StageResult] | None = None,
    failures: dict[str, str] | None = None,
    status: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The JSON object that ends every run's standard output, in one shape for a finished
    run, a failed one (from the flow's results, or from the store alone when the flow
    could not say) and a dry run: overall status, then each stage's key, path, whether it
    was cached and its status, then the evaluation."""
    failures = failures or {}
    stages = {}
    for stage in plan.stages:
        if results is None:  # no results from the flow: the store says what is finished
            cached = not stage.will_run
            if status == "dry-run":
                state = "cached" if cached else "forced" if stage.forced else "will run"
            else:
                state = "completed" if stage.cached else "not completed"
        else:
            result = results.get(stage.name)
            cached = result is not None and not result.trained
            state = "completed" if result else "failed" if stage.name in failures else "not run"
        stages[stage.name] = {"key": stage.key, "path": str(stage.path), "cached": cached, "status": state}
        if stage.name in failures:
            stages[stage.name]["error"] = failures[stage.name]
    evaluation = (results or {}).get("evaluate")
    summary: dict[str, Any] = {"status": status or ("failed" if failures else "completed")}
    if error:
        summary["error"] = error
    summary["stages"] = stages
    summary["evaluation"] = json.loads((Path(evaluation.path) / "eval.json").read_text()) if evaluation else None
    return summary


def everything_cached(config: PipelineConfig, params: RunParameters) -> dict[str, Any] | None:
    """The run's summary, read from the store, when every planned stage is already there
    (and none is forced); None when something has to run.

    With Prefect's temporary server (no ``PREFECT_API_URL``) a run leaves no record anyone
    can open once the process ends, so a run with nothing to do answers from the store
    without starting one: the server's start-up is most of a cached run's cost. With a
    configured server, every run goes through the flow, so that it shows in the UI."""
    plan = make_plan(config, params.stage_names(), params.force_names())
    if any(stage.will_run for stage in plan.stages):
        return None
    store = store_for(config)
    results = {}
    for stage in plan.stages:
        output = store.load(stage.name, stage.key)
        results[stage.name] = StageResult(
            stage=stage.name, key=stage.key, path=str(output.path), metrics=output.manifest.get("metrics", {}), trained=False
        )
    print(f"every stage of this run is in the store ({len(plan.stages)} stages, all cached): nothing to run", file=sys.stderr)
    return run_summary(plan, results)


def parameters_from_args(args: argparse.Namespace) -> RunParameters:
    def split(value: str | None) -> list[str] | None:
        return [name.strip() for name in value.split(",") if name.strip()] if value else None

    fields: dict[str, Any] = {"preset": args.preset, "config_file": args.config_file, "overrides": args.overrides}
    if args.output_root:
        fields["output_root"] = args.output_root
    for name in ("stages", "force"):
        names = split(getattr(args, name))
        if names:
            fields[name] = parse_stage_list(names, what=f"--{name}")
    return RunParameters(**fields)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = parameters_from_args(args)
        config = params.config()
        # Downloads nothing; a real run that cannot get a hub model or dataset, or whose Ray
        # cluster does not answer, fails here.
        downloads = check_before_work(config, dry_run=args.dry_run, stages=params.stage_names())
        if not args.dry_run:
            prepare_base_model(config, params.stage_names())  # converted once and reused; checked against its depth
        if args.dry_run:
            plan = make_plan(config, params.stage_names(), params.force_names(), allow_unresolved=True)
            provisional = "  (provisional key)" if plan.provisional else ""
            for stage in plan.stages:
                state = "cached" if not stage.will_run else ("forced" if stage.forced else "will run")
                print(f"{stage.name:<10} {stage.key}  {state}" + (f"  ({stage.problem})" if stage.problem else "") + provisional)
            note = describe_downloads(downloads, plan)
            if note:
                print(note, file=sys.stderr)
            print(json.dumps({**run_summary(plan, status="dry-run"), **dry_run_details(downloads, plan)}))
            return 0
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        print(json.dumps({"status": "invalid", "error": str(error)}))
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        summary = everything_cached(config, params)
        if summary is not None:
            print(json.dumps(summary))
            return 0
    state = rlhf(params, return_state=True)
    if state.is_completed():
        print(json.dumps(state.result()))
        return 0
    try:
        summary = getattr(state.result(raise_on_failure=False), "summary", None)
    except Exception:  # a crashed run may have no result to read
        summary = None
    if summary is not None:  # the flow's own account: each stage's status and error
        print(json.dumps({**summary, "error": str(state.message)}))
        return 1
    # The flow failed before it could say: report what the store holds for each planned stage.
    try:
        plan = make_plan(config, params.stage_names())
    except Exception as error:  # the summary must still be printed
        print(json.dumps({"status": "failed", "error": f"{state.message}; planning failed too: {error}", "stages": {}, "evaluation": None}))
        return 1
    print(json.dumps(run_summary(plan, status="failed", error=str(state.message))))
    return 1


if __name__ == "__main__":
    sys.exit(main())
