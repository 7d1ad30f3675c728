"""The DAG, the stage keys and what is already in the store: everything ``--dry-run`` prints.

The DAG comes from the stages' declarations (``pipeline_lib.registry``): each stage
runs after the stages it reads, for the default stages

    data_prep -> sft -> reward -> ppo, grpo --\\
                     \\-> dpo ------------------+-> evaluate

Evaluate needs SFT and the reward model, and evaluates every other policy that is part
of the run (every policy stage is an optional input of it). Selecting stages pulls in what they
need and nothing else. ``force`` re-runs the named stages and all their descendants.

Hub models and datasets are listed by ``hub_downloads`` (what a real run would fetch,
with whether each can be had now) and checked before any stage: a real run that cannot
get one fails before any work, naming them all; a dry run never downloads, lists them,
and when the hub does not answer plans with an unresolved data fingerprint whose keys it
calls provisional.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline_lib import cores, models, registry
from pipeline_lib.config import ConfigError, PipelineConfig, check_precision, check_top_k
from pipeline_lib.data import schemas, sentiment_task, sources
from pipeline_lib.distributed import check_launch_here
from pipeline_lib.errors import ModelError
from pipeline_lib.execution import check_execution
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
    threads: int = 1  # torch threads it trains with here (pipeline_lib/cores.py)
    wave: int = 0  # on this machine it starts when the stages of earlier waves have ended

    @property
    def will_run(self) -> bool:
        return self.forced or not self.cached


@dataclass
class Plan:
    stages: list[PlannedStage] = field(default_factory=list)
    data_fingerprint: str = ""
    # Why the stage keys may change on a real run (a hub dataset's revision unresolved
    # offline, ...); empty when the keys are final. Every stage key holds the data fingerprint.
    provisional: list[str] = field(default_factory=list)

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


def _data_sources(config: PipelineConfig) -> list[tuple[str, str, str | None, str]]:
    """(setting, source, revision, split) of each configured data source. ``data.sft_source``
    has no revision setting: it is always read at its latest revision."""
    data = config.data
    found = [("data.source", data.source, data.revision, data.split)]
    if data.sft_source:
        found.append(("data.sft_source", data.sft_source, None, data.sft_split))
    return found


def _is_hub_dataset(source: str) -> bool:
    return not sources.is_local(source) and not sources.is_embedded(source)


def data_fingerprint(config: PipelineConfig, allow_unresolved: bool = False) -> str:
    """What identifies the run's data and base model, for every stage key. With
    ``allow_unresolved`` (dry runs), a hub dataset whose revision cannot be resolved now
    gets ``sources.unresolved_fingerprint`` and the result starts with ``unresolved:``."""
    return _data_fingerprint(config, allow_unresolved)[0]


def _data_fingerprint(config: PipelineConfig, allow_unresolved: bool = False) -> tuple[str, list[str]]:
    parts: list[str] = []
    unresolved: list[str] = []
    for _, source, revision, _ in _data_sources(config):
        try:
            parts.append(sources.source_fingerprint(source, revision))
        except schemas.DataValidationError:
            if not (allow_unresolved and _is_hub_dataset(source)):
                raise
            parts.append(sources.unresolved_fingerprint(source, revision))
            unresolved.append(source)
    parts.append(models.base_model_fingerprint(config.model))
    digest = sha256_text(":".join(parts))
    return (f"{sources.UNRESOLVED}:{digest}" if unresolved else digest), unresolved


# --- what a real run downloads from the hub


@dataclass
class HubDownload:
    """A hub model or dataset the run reads: what, which setting names it, and whether
    it can be had now. A dry run lists these; a real run fails before work on a problem."""

    kind: str  # "model" or "dataset"
    setting: str  # model.name, data.source or data.sft_source
    name: str
    revision: str | None  # as configured; None: the latest
    split: str | None = None
    resolved: str | None = None  # the commit the hub resolves it to now (None: not asked, or no answer)
    local: str | None = None  # a copy already on this machine, when there is one
    problem: str | None = None  # why it cannot be had now
    final: bool = False  # the problem fails a dry run too (no such repo or revision, gated)

    @property
    def available(self) -> bool:
        return self.problem is None or self.local is not None

    def label(self) -> str:
        return f"{self.name}" + (f"@{self.revision}" if self.revision else "")

    def as_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("final")
        return found


def _is_hub_model(name: str) -> bool:
    """A hub model id, not the embedded model, the tiny model or a local directory.
    A name that cannot be a hub id (a path) and is no directory is a ConfigError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name in (models.EMBEDDED_SMOLLM2, models.TINY_LLAMA) or Path(name).is_dir():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"model.name: {name!r} is not a directory (a local model) nor a hub model id") from None
    return True


def hub_downloads(config: PipelineConfig) -> list[HubDownload]:
    """Every hub model and dataset the config reads, in setting order; no network."""
    found = []
    if _is_hub_model(config.model.name):
        found.append(HubDownload("model", "model.name", config.model.name, config.model.revision))
    for setting, source, revision, split in _data_sources(config):
        if _is_hub_dataset(source):
            found.append(HubDownload("dataset", setting, source, revision, split))
    return found


def _model_status(item: HubDownload, models_dir: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    converted = models_dir / item.name.replace("/", "--")  # where models.materialize_base_model keeps it
    if (converted / "config.json").is_file():
        item.local = str(converted)
        return
    item.resolved, item.problem, item.final = sources.hub_commit("model", item.name, item.revision, "model.revision")
    if item.resolved is None and not item.final:
        cached = try_to_load_from_cache(item.name, "config.json", revision=item.revision)
        if isinstance(cached, str):
            item.local = str(Path(cached).parent)


def check_hub(downloads: list[HubDownload], output_root: Path) -> list[HubDownload]:
    """Fill in each item's current commit, local copy or problem; downloads nothing."""
    for item in downloads:
        if item.kind == "model":
            _model_status(item, Path(output_root) / "models")
        else:
            item.resolved, cached, item.problem, item.final = sources.hub_dataset_status(item.name, item.revision)
            if cached:
                item.local = "datasets cache"
    return downloads


def _named(items: list[HubDownload]) -> str:
    """``model X and datasets Y, Z``, each with the setting that names it."""
    groups = []
    for kind in ("model", "dataset"):
        chosen = [
            f"{item.label()} ({item.setting}{f', commit {item.resolved[:12]}' if item.resolved else ''})"
            for item in items
            if item.kind == kind
        ]
        if chosen:
            groups.append(f"{kind}{'s' if len(chosen) > 1 else ''} {', '.join(chosen)}")
    return " and ".join(groups)


def unavailable_error(downloads: list[HubDownload]) -> ConfigError | None:
    """The error a real run fails with before any work when a hub item cannot be had."""
    missing = [item for item in downloads if not item.available]
    if not missing:
        return None
    reasons = sorted({item.problem for item in missing if item.problem})
    return ConfigError(
        f"cannot download {_named(missing)} from the hub: {'; '.join(reasons)}, and no copy is in the local cache. "
        "Run once with internet access, or point these settings at a local model directory or data file."
    )


def describe_downloads(downloads: list[HubDownload], plan: Plan | None = None) -> str | None:
    """The dry run's line about the hub: what a real run would download, what cannot be
    reached now, and whether the stage keys are provisional. None when the hub is not used."""
    if not downloads:
        return None
    fetched = [item for item in downloads if item.local is None]
    have = [item for item in downloads if item.local is not None]
    parts = []
    if fetched:
        parts.append(f"a real run would download {_named(fetched)}")
    if have:
        parts.append(f"{'it' if fetched else 'a real run'} would use the local copy of {_named(have)}")
    unreachable = [item for item in downloads if item.problem]
    if unreachable:
        parts.append(f"not reachable now: {'; '.join(sorted({item.problem for item in unreachable if item.problem}))}")
        # A real run needs every item, and the current revision of every hub dataset.
        if any(not item.available for item in unreachable) or (plan is not None and plan.provisional):
            parts.append("a real run now would fail before any stage")
    else:
        parts.append("all reachable now")
    line = "dry run: " + "; ".join(parts) + "."
    if plan is not None and plan.provisional:
        line += f" Stage keys are provisional: {'; '.join(plan.provisional)}."
    return line


def dry_run_details(downloads: list[HubDownload], plan: Plan) -> dict[str, Any]:
    """What a dry run adds to the summary JSON: the hub downloads and the data fingerprint."""
    return {
        "downloads": [item.as_dict() for item in downloads],
        "data_fingerprint": plan.data_fingerprint,
        "provisional_keys": plan.provisional,
    }


def check_against_model(config: PipelineConfig, model_dir: Path, stages: list[str]) -> None:
    """What depends on the base model, for the stages a run includes: every top_k and
    reward.num_layers within its depth, every LoRA stage's target modules (its architecture
    on the meta device; no weights read)."""
    from pipeline_lib import adapters

    check_top_k(config, models.num_decoder_layers(model_dir), stages)
    adapters.check_targets(config, model_dir, stages)


def _check_local_model(config: PipelineConfig, stages: list[str]) -> None:
    """A local model directory: a HF model, checked against the settings (cheap: config.json)."""
    directory = Path(config.model.name)
    if config.model.name in (models.EMBEDDED_SMOLLM2, models.TINY_LLAMA) or not directory.is_dir():
        return
    if not (directory / "config.json").is_file():
        raise ModelError(f"model.name: {directory} is a directory without config.json (not a HF model)")
    check_against_model(config, directory, stages)


def check_before_work(config: PipelineConfig, dry_run: bool = False, stages: str | list[str] | None = None) -> list[HubDownload]:
    """What can be checked without training, checked before any stage starts: the output
    root, the stages the config names, where stages run (execution: resources name known
    stages, a real run's Ray cluster answers), the embedded task's sizes, a local model directory
    and its depth, every local data file (read, normalised and validated in full, so a bad
    row fails here naming file, row and field), and each hub model and dataset (nothing
    is downloaded). Returns the hub items a run reads (``hub_downloads``, checked).

    A real run fails here on any hub item it cannot get now, and on a hub dataset whose
    revision cannot be resolved (its stage keys would be unknown). A dry run fails only
    on a final problem (no such repository or revision) and reports the rest."""
    root = Path(config.output_root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_root: {root} exists and is not a directory")
    parse_stage_list(config.stages, what="stages")
    included = closure(parse_stage_list(stages, config.stages, "stages"))
    # Resources name known stages; a real run's Ray cluster answers (in seconds, not ray.init's minute).
    check_execution(config, registry.stage_names(), connect=not dry_run)
    check_precision_here(config)
    check_launch_here(config)
    data = config.data
    if sources.is_embedded(data.source):
        sources.check_embedded_task(data.source)
        sentiment_task.build_prompts(data.num_prompts, data.num_eval_prompts, config.seed, data.extra_reward_eval_prompts)
    _check_local_model(config, included)
    for source, split, kind in ((data.source, data.split, "pairs"), (data.sft_source, data.sft_split, "sft")):
        if source and sources.is_local(source):
            schemas.normalize_rows(sources.load_rows(source, split, None, data.max_rows), kind, source, data.max_field_chars)
    downloads = check_hub(hub_downloads(config), root)
    final = [item for item in downloads if item.final]
    if final:
        raise ConfigError("; ".join(f"{item.setting}: {item.label()}: {item.problem}" for item in final))
    if not dry_run:
        error = unavailable_error(downloads)
        if error:
            raise error
        data_fingerprint(config)  # a cached hub dataset offline still needs its revision pinned
    return downloads


def check_precision_here(config: PipelineConfig) -> None:
    """``precision`` against this machine's GPU (or its absence); fp32 runs anywhere, and
    is checked without importing torch. Under Ray the stages run where Ray places them, so
    this machine's GPU says nothing: fp16 then needs every training stage to ask for a GPU
    (bf16 on a GPU without it fails on its node)."""
    if config.execution.runner == "ray":
        without_gpu = [name for name in config.train_sections() if config.execution.resources_for(name).gpus == 0]
        if config.precision == "fp16" and without_gpu:
            raise ConfigError(
                f"precision: 'fp16' needs a CUDA GPU, and under Ray stage(s) {without_gpu} ask for none; "
                "set execution.resources.gpus (or execution.stage_resources.<stage>.gpus)"
            )
        return
    if config.precision == "fp32":
        return
    import torch

    cuda = torch.cuda.is_available()
    check_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())


def store_for(config: PipelineConfig) -> Store:
    return Store(Path(config.output_root) / "store")


def make_plan(
    config: PipelineConfig,
    stages: str | list[str] | None = None,
    force: str | list[str] | None = None,
    allow_unresolved: bool = False,
) -> Plan:
    """The stages a run includes, each with its key and whether the store has it.
    ``allow_unresolved`` (dry runs): plan with provisional keys when a hub dataset's
    revision cannot be resolved now, instead of failing."""
    included = closure(parse_stage_list(stages, config.stages, "stages"))
    forced = descendants(parse_stage_list(force, what="force"), included) if force else set()
    fingerprint, unresolved = _data_fingerprint(config, allow_unresolved)
    store = store_for(config)
    plan = Plan(data_fingerprint=fingerprint)
    if unresolved:
        plan.provisional.append(
            f"the current revision of {', '.join(unresolved)} is unresolved until the hub answers "
            "(data fingerprint 'unresolved'), and every stage key holds the data fingerprint"
        )
    # Waves and threads from the DAG of every stage the config runs (what this run selects
    # and what the store holds aside), so a stage run alone trains as inside the whole run.
    configured = closure(list(dict.fromkeys([*parse_stage_list(config.stages, what="stages"), *included])))
    waves = cores.waves({name: upstream_of(name, configured) for name in configured})
    threads = cores.planned_threads(waves)
    keys: dict[str, str] = {}
    for name in included:
        upstream = {dep: keys[dep] for dep in upstream_of(name, included)}
        stage = registry.stage(name)
        key = stage_key(name, stage.config_section(config), upstream, fingerprint, registry.code_version(name))
        keys[name] = key
        problem = store.validate(name, key) if store.path(name, key).exists() else "not in the store"
        plan.stages.append(
            PlannedStage(
                name, key, upstream, store.path(name, key), cached=problem is None, forced=name in forced, problem=problem,
                threads=threads[name], wave=waves[name],
            )
        )
    return plan
