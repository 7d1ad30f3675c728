"""The DAG, the stage keys and what is already in the store: everything ``--dry-run`` prints.

Only this module and the flow know the order of stages. Dependencies follow what each
stage reads:

    data_prep -> sft -> reward -> ppo ----\\
                     \\-> dpo -------------+-> evaluate

Evaluate needs SFT and the reward model, and evaluates every other policy that is part
of the run (DPO and PPO are optional inputs of it). Selecting stages pulls in what they
need and nothing else. ``force`` re-runs the named stages and all their descendants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline_lib import generation, metrics, models
from pipeline_lib.config import STAGES, ConfigError, PipelineConfig
from pipeline_lib.data import schemas, sentiment_task, sources
from pipeline_lib.stages import data_prep, dpo, evaluate, ppo, reward, sft, training
from pipeline_lib.store import Store, code_version, sha256_text, stage_key

REQUIRED = {
    "data_prep": (),
    "sft": ("data_prep",),
    "reward": ("data_prep", "sft"),
    "dpo": ("data_prep", "sft"),
    "ppo": ("data_prep", "sft", "reward"),
    "evaluate": ("data_prep", "sft", "reward"),
}
OPTIONAL = {"evaluate": ("dpo", "ppo")}
# The modules whose source each stage's output depends on: editing one changes the key.
STAGE_MODULES = {
    "data_prep": (data_prep, schemas, sources, sentiment_task, generation, models),
    "sft": (sft, training, models),
    "reward": (reward, training, models, generation, metrics),
    "dpo": (dpo, reward, training, models),
    "ppo": (ppo, training, models, generation),
    "evaluate": (evaluate, generation, metrics, models, sentiment_task),
}


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


def parse_stage_list(value: str | list[str] | None) -> list[str]:
    if not value:
        return list(STAGES)
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    return names


def closure(selected: list[str]) -> list[str]:
    """The selected stages and everything they require, in DAG order."""
    needed: set[str] = set()
    pending = list(selected)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(REQUIRED[name])
    return [name for name in STAGES if name in needed]


def upstream_of(name: str, included: list[str]) -> list[str]:
    return list(REQUIRED[name]) + [dep for dep in OPTIONAL.get(name, ()) if dep in included]


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


def store_for(config: PipelineConfig) -> Store:
    return Store(Path(config.output_root) / "store")


def make_plan(config: PipelineConfig, stages: str | list[str] | None = None, force: str | list[str] | None = None) -> Plan:
    included = closure(parse_stage_list(stages))
    forced = descendants(parse_stage_list(force), included) if force else set()
    fingerprint = data_fingerprint(config)
    store = store_for(config)
    plan = Plan(data_fingerprint=fingerprint)
    keys: dict[str, str] = {}
    for name in included:
        upstream = {dep: keys[dep] for dep in upstream_of(name, included)}
        key = stage_key(name, config.stage_section(name), upstream, fingerprint, code_version(*STAGE_MODULES[name]))
        keys[name] = key
        problem = store.validate(name, key) if store.path(name, key).exists() else "not in the store"
        plan.stages.append(
            PlannedStage(name, key, upstream, store.path(name, key), cached=problem is None, forced=name in forced, problem=problem)
        )
    return plan
