"""The DAG, the stage keys and what is already in the store: everything ``--dry-run`` prints.

The DAG comes from the stages' declarations (``pipeline_lib.registry``): each stage
runs after the stages it reads, for the default stages

    data_prep -> sft -> reward -> ppo, grpo --\\
                     \\-> dpo ------------------+-> evaluate

Evaluate needs SFT and the reward model, and evaluates every other policy that is part
of the run (every policy stage is an optional input of it). Selecting stages pulls in what they
need and nothing else. ``force`` re-runs the named stages and all their descendants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline_lib import models, registry
from pipeline_lib.config import ConfigError, PipelineConfig
from pipeline_lib.data import schemas, sentiment_task, sources
from pipeline_lib.store import Store, sha256_text, stage_key


@dataclass
class PlannedStage:
    name: str
    key: str
    upstream: dict[str, str]
    path: Path
    cached: bool
    forced: bool = False
    problem: str | None = None  # why a published output is unusable, if one exists

    @property
    def will_run(self) -> bool:
        return self.forced or not self.cached


@dataclass
class Plan:
    stages: list[PlannedStage] = field(default_factory=list)
    data_fingerprint: str = ""

    def __getitem__(self, name: str) -> PlannedStage:
        return next(stage for stage in self.stages if stage.name == name)

    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]


def parse_stage_list(value: str | list[str] | None, default: list[str] | None = None, what: str = "stages") -> list[str]:
    """Stage names from a comma-separated string or a list (``all``: every stage);
    ``default`` (every stage if None) when empty. Unknown names are a ConfigError naming
    ``what`` was given."""
    known = registry.stage_names()
    if not value:
        return list(default or known)
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    if names == ["all"]:
        return known
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{what}: unknown stage(s) {unknown}; choose from {', '.join(known)}")
    return names


def closure(selected: list[str]) -> list[str]:
    """The selected stages and everything they require, in DAG order."""
    needed: set[str] = set()
    pending = list(selected)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(registry.stage(name).requires)
    return [name for name in registry.stage_names() if name in needed]


def upstream_of(name: str, included: list[str]) -> list[str]:
    return registry.inputs_of(name, included)


def descendants(names: list[str], included: list[str]) -> set[str]:
    found = set(names)
    changed = True
    while changed:
        changed = False
        for stage in included:
            if stage not in found and any(dep in found for dep in upstream_of(stage, included)):
                found.add(stage)
                changed = True
    return found


def data_fingerprint(config: PipelineConfig) -> str:
    parts = [sources.source_fingerprint(config.data.source, config.data.revision)]
    if config.data.sft_source:
        parts.append(sources.source_fingerprint(config.data.sft_source))
    parts.append(models.base_model_fingerprint(config.model))
    return sha256_text(":".join(parts))


def check_before_work(config: PipelineConfig) -> None:
    """What can be checked without training, checked before any stage starts: the output
    root, the stages the config names, the embedded task's sizes, that a hub dataset
    answers, and every local data file (read, normalised and validated in full, so a bad
    row fails here naming file, row and field)."""
    root = Path(config.output_root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_root: {root} exists and is not a directory")
    parse_stage_list(config.stages, what="stages")
    data = config.data
    if sources.is_embedded(data.source):
        sources.check_embedded_task(data.source)
        sentiment_task.build_prompts(data.num_prompts, data.num_eval_prompts, config.seed)
    for source, revision in ((data.source, data.revision), (data.sft_source, None)):
        if source and not sources.is_local(source) and not sources.is_embedded(source):
            sources.source_fingerprint(source, revision)  # a hub dataset that cannot be reached fails here
    for source, split, kind in ((data.source, data.split, "pairs"), (data.sft_source, data.sft_split, "sft")):
        if source and sources.is_local(source):
            schemas.normalize_rows(sources.load_rows(source, split, None, data.max_rows), kind, source, data.max_field_chars)


def store_for(config: PipelineConfig) -> Store:
    return Store(Path(config.output_root) / "store")


def make_plan(config: PipelineConfig, stages: str | list[str] | None = None, force: str | list[str] | None = None) -> Plan:
    included = closure(parse_stage_list(stages, config.stages, "stages"))
    forced = descendants(parse_stage_list(force, what="force"), included) if force else set()
    fingerprint = data_fingerprint(config)
    store = store_for(config)
    plan = Plan(data_fingerprint=fingerprint)
    keys: dict[str, str] = {}
    for name in included:
        upstream = {dep: keys[dep] for dep in upstream_of(name, included)}
        stage = registry.stage(name)
        key = stage_key(name, stage.config_section(config), upstream, fingerprint, registry.code_version(name))
        keys[name] = key
        problem = store.validate(name, key) if store.path(name, key).exists() else "not in the store"
        plan.stages.append(
            PlannedStage(name, key, upstream, store.path(name, key), cached=problem is None, forced=name in forced, problem=problem)
        )
    return plan
