"""Stage declarations: the DAG derived from them, and stage keys that cover every line of
code a stage runs (found from its real imports, not a hand-kept list)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_lib import registry
from pipeline_lib.config import load_config
from pipeline_lib.data.schemas import DataValidationError, RowProblem
from pipeline_lib.errors import ConfigError, ModelError, StageFailed, StoreError
from pipeline_lib.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_comes_after_what_it_reads() -> None:
    names = registry.stage_names()
    assert names[0] == "data_prep" and names[-1] == "evaluate"
    assert {"sft", "reward", "dpo", "ppo", "grpo"} <= set(names)
    for name in names:
        for dependency in registry.inputs_of(name):
            assert names.index(dependency) < names.index(name), (dependency, name)
    # Evaluation judges every policy stage of the run, and only those that are in it.
    assert registry.inputs_of("evaluate") == ["data_prep", "sft", "reward", *[p for p in registry.policy_names() if p != "sft"]]
    assert registry.inputs_of("evaluate", ["data_prep", "sft", "reward", "dpo", "evaluate"]) == ["data_prep", "sft", "reward", "dpo"]


def test_unknown_stage_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown stage 'rlhf'.*grpo"):
        registry.stage("rlhf")


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "pipeline_lib", root / "pipeline_lib", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def versions(root: Path) -> dict[str, str]:
    # Comment edits leave the import graph alone, so code_files' cache stays valid.
    return {name: registry.module_code_version(stage.module, root) for name, stage in registry.stages().items()}


def runtime_imports(module: str) -> set[str]:
    """The project modules a fresh interpreter has loaded after importing ``module``: a
    second opinion on the import graph, independent of the byte-code scan (it misses
    imports inside functions, so it is a subset of what the key must cover)."""
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'pipeline_lib'))"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(output.split())


def file_of(module: str, root: Path) -> Path:
    path = root / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_editing_any_module_a_stage_imports_changes_its_key(project_copy: Path) -> None:
    before = versions(project_copy)
    for name, stage in registry.stages().items():
        for module in sorted(runtime_imports(stage.module)):
            source = file_of(module, project_copy)
            original = source.read_text()
            source.write_text(original + "\n# edited\n")
            try:
                assert versions(project_copy)[name] != before[name], f"editing {module} left the {name} key unchanged"
            finally:
                source.write_text(original)
    assert versions(project_copy) == before


def test_edits_change_exactly_the_stages_that_run_the_code(project_copy: Path) -> None:
    def changed_by(relative: str) -> set[str]:
        source = project_copy / relative
        original = source.read_text()
        before = versions(project_copy)
        source.write_text(original + "\n# edited\n")
        try:
            after = versions(project_copy)
        finally:
            source.write_text(original)
        return {name for name in before if before[name] != after[name]}

    everything = set(registry.stage_names())
    # The reward loss is imported inside the reward stage's run(): it was missed by the old hand-kept list.
    assert changed_by("pipeline_lib/stages/reward_groups.py") == {"reward", "evaluate"}
    assert changed_by("pipeline_lib/stages/dpo.py") == {"dpo"}
    assert changed_by("pipeline_lib/stages/grpo.py") == {"grpo"}
    assert changed_by("pipeline_lib/stages/ppo.py") == {"ppo"}
    assert changed_by("pipeline_lib/stages/training.py") == everything - {"data_prep"}
    assert changed_by("pipeline_lib/generation.py") == everything
    # PPO's diversity guard reads metrics.distinct_n; DPO's KL guard estimates its KL in
    # stages/dpo_kl.py (token_kls), and SFT and GRPO never read metrics.
    assert changed_by("pipeline_lib/metrics.py") == {"reward", "ppo", "evaluate"}
    assert changed_by("pipeline_lib/stages/dpo_kl.py") == {"dpo"}
    # How stages are found and ordered is not code any stage runs.
    assert changed_by("pipeline_lib/registry.py") == set()


def test_a_setting_re_keys_its_stage_and_descendants_only(tmp_path: Path) -> None:
    config = load_config("tiny", overrides=[f"output_root={tmp_path}"], env_file=None)
    changed = config.model_copy(update={"grpo": config.grpo.model_copy(update={"beta": 0.2})})
    before, after = make_plan(config), make_plan(changed)
    assert {s.name for s in before.stages if s.key != after[s.name].key} == {"grpo", "evaluate"}
    # Selecting GRPO alone pulls in what it reads.
    assert make_plan(config, ["grpo"]).names() == ["data_prep", "sft", "reward", "grpo"]


@pytest.mark.parametrize(
    "error",
    [
        DataValidationError("pairs.jsonl", [RowProblem(3, "chosen", "empty string")]),
        DataValidationError("pairs.jsonl", "no rows"),
        ConfigError("dpo.beta: must be > 0"),
        StageFailed("dpo failed: boom"),
        StoreError("dpo output is not usable"),
        ModelError("no such model"),
    ],
)
def test_project_errors_survive_pickling_with_their_message(error: Exception) -> None:
    """Stages raise in worker processes; the error must reach the flow intact."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
