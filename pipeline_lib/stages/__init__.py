"""The pipeline's stages: one module each, declared once with ``STAGE = Stage(...)``.

A stage module reads top to bottom (docstring, setup, data, model, train, save) and ends
with its declaration: its name, the stages whose outputs it reads, the config sections
its output depends on, and ``run``. Everything else (the DAG, the stage keys and their
code hashes, the Prefect task, the flow, evaluation's list of policies, the benchmarks)
is derived from the declarations by ``pipeline_lib.registry``. Adding a stage means
adding its module, its config section, its presets' settings and its tests.

Every ``run`` has one signature: ``run(config, inputs, out_dir) -> metrics``, where
``inputs`` maps ``"base_model"`` and the name of each upstream stage to a directory, and
``metrics`` is a small JSON-able dict for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from pipeline_lib.config import PipelineConfig

BASE_MODEL = "base_model"  # the inputs entry every stage may read: the materialised base model


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["PipelineConfig", dict[str, Path], Path], dict[str, Any]]
    summary: str
    requires: tuple[str, ...] = ()
    # Config sections the output depends on (the seed always counts); default: the stage's own.
    sections: tuple[str, ...] = ()
    # The output is a causal LM that evaluation generates from and judges.
    policy: bool = False
    # Reads every policy stage of the run as an optional input (evaluation).
    judges_policies: bool = False
    # The metrics of ``run`` a person looks at first (benchmarks print these).
    key_metrics: tuple[str, ...] = ()
    # Trains with a TRL trainer that runs on several processes under ``accelerate launch``
    # when ``launch.num_processes > 1`` (pipeline_lib/distributed.py); the launch settings
    # are then part of its key (the world size changes the effective batch).
    distributed: bool = False

    @property
    def module(self) -> str:
        return self.run.__module__

    @property
    def config_sections(self) -> tuple[str, ...]:
        return self.sections or (self.name,)

    def config_section(self, config: "PipelineConfig") -> dict[str, Any]:
        """The part of the config this stage's key depends on."""
        parts = {name: getattr(config, name).model_dump(mode="json") for name in self.config_sections}
        if self.distributed:
            parts["launch"] = config.launch.model_dump(mode="json")
        return {"seed": config.seed, "precision": config.precision, **parts}
