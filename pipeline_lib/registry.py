"""Every stage, found from its declaration; the DAG and each stage's code version follow.

``stages()`` imports each module of ``pipeline_lib.stages`` and keeps those that declare
``STAGE``, in an order where every stage comes after what it reads. Nothing else in the
project lists the stages.

``code_version(stage)`` hashes the source of every project module the stage's module
imports, transitively (``pipeline_lib.code_version``). Editing any code a stage runs
changes its key, with no hand-kept list to go stale.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

import pipeline_lib.stages as stage_package
from pipeline_lib.code_version import PROJECT_ROOT, code_files, module_code_version
from pipeline_lib.errors import ConfigError
from pipeline_lib.stages import BASE_MODEL, Stage

__all__ = [
    "BASE_MODEL", "Stage", "stages", "stage", "stage_names", "policy_names", "inputs_of", "stage_inputs",
    "PROJECT_ROOT", "code_files", "module_code_version", "code_version",
]


@lru_cache(maxsize=1)
def stages() -> dict[str, Stage]:
    """Every declared stage by name, each after all the stages it reads."""
    declared: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(stage_package.__path__):
        source = Path(info.module_finder.path) / f"{info.name}.py"
        if source.is_file() and "\nSTAGE = Stage(" not in source.read_text():
            # A helper of the stages (training, reward_groups, callbacks): not imported to
            # list them, so that listing and planning stay free of torch and TRL.
            continue
        module = importlib.import_module(f"{stage_package.__name__}.{info.name}")
        candidate = getattr(module, "STAGE", None)
        if isinstance(candidate, Stage):
            if candidate.name in declared:
                raise ConfigError(f"stage {candidate.name!r} is declared twice ({declared[candidate.name].module}, {candidate.module})")
            declared[candidate.name] = candidate
    for candidate in declared.values():
        missing = [name for name in candidate.requires if name not in declared]
        if missing:
            raise ConfigError(f"stage {candidate.name!r} requires undeclared stage(s) {missing}")
    return {name: declared[name] for name in _dependency_order(declared)}


def _dependency_order(declared: dict[str, Stage]) -> list[str]:
    """Stages by depth in the DAG (longest path from a source); among equals, the one with
    the longest chain of stages after it first (it is on the critical path, so the flow
    submits it first), then by name. Stable and readable: data_prep, sft, reward, dpo, ...,
    evaluation last."""
    reads = {name: _all_inputs(candidate, declared) for name, candidate in declared.items()}
    depth: dict[str, int] = {}

    def depth_of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in seen:
            raise ConfigError(f"stages form a cycle: {' -> '.join((*seen, name))}")
        if name not in depth:
            depth[name] = 1 + max((depth_of(dep, (*seen, name)) for dep in reads[name]), default=-1)
        return depth[name]

    def chain_after(name: str) -> int:
        return 1 + max((chain_after(other) for other in declared if name in reads[other]), default=-1)

    return sorted(declared, key=lambda name: (depth_of(name), -chain_after(name), name))


def _all_inputs(candidate: Stage, declared: dict[str, Stage]) -> tuple[str, ...]:
    optional = tuple(
        name for name, other in declared.items() if candidate.judges_policies and other.policy and name not in candidate.requires
    )
    return candidate.requires + optional


def stage(name: str) -> Stage:
    try:
        return stages()[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; choose from {', '.join(stages())}") from None


def stage_names() -> list[str]:
    return list(stages())


def policy_names() -> list[str]:
    return [name for name, declared in stages().items() if declared.policy]


def inputs_of(name: str, included: list[str] | None = None) -> list[str]:
    """The stages ``name`` reads in a run of ``included`` stages: its requirements, plus
    every policy of the run for a stage that judges policies."""
    declared = stage(name)
    return [dep for dep in _all_inputs(declared, stages()) if dep in declared.requires or included is None or dep in included]


def code_version(name: str) -> str:
    """The code version in a stage's key: every project module the stage runs."""
    return module_code_version(stage(name).module)


def stage_inputs(name: str, outputs: dict[str, Path], base_model: Path | None) -> dict[str, Path]:
    """The ``inputs`` of ``run`` for stage ``name``, given the output directories of the
    stages that ran so far: for running stages directly, without Prefect (tests, benchmarks)."""
    return {BASE_MODEL: base_model, **{dep: Path(outputs[dep]) for dep in inputs_of(name, list(outputs))}}
