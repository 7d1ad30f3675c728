"""Configuration: presets, source priority, overrides and rejection of invalid values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline_lib import registry
from pipeline_lib.config import PRESET_DIR, ConfigError, check_top_k, load_config, parse_overrides

PRESET_FILES = sorted(PRESET_DIR.glob("*.yaml"))
# Decoder layers of each preset's base model, so every preset's top_k is checked against it.
BASE_MODEL_LAYERS = {"tiny": 4, "default": 30, "tldr": 32}  # tiny-random-llama, SmolLM2-135M, SmolLM2-360M


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RLHF_* variable or wandb key from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("RLHF_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def assert_yaml_applied(expected: dict, loaded: dict, where: str = "") -> None:
    for name, value in expected.items():
        path = f"{where}{name}"
        if isinstance(value, dict):
            assert_yaml_applied(value, loaded[name], f"{path}.")
        else:
            assert loaded[name] == value, f"{path}: YAML says {value!r}, config has {loaded[name]!r}"


@pytest.mark.parametrize("preset_file", PRESET_FILES, ids=[path.stem for path in PRESET_FILES])
def test_every_preset_loads_with_its_yaml_values(preset_file: Path) -> None:
    config = load_config(preset_file.stem, env_file=None)

    assert config.preset == preset_file.stem
    assert_yaml_applied(yaml.safe_load(preset_file.read_text()), config.model_dump(mode="json"))
    check_top_k(config, BASE_MODEL_LAYERS[preset_file.stem])


def test_the_documented_presets_exist() -> None:
    assert {"tiny", "default", "tldr"} <= {path.stem for path in PRESET_FILES}


def test_priority_preset_then_file_then_dotenv_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_file = tmp_path / "experiment.yaml"
    user_file.write_text("dpo:\n  beta: 0.2\nsft:\n  learning_rate: 0.002\n")
    dotenv = tmp_path / ".env"
    # A real .env also carries secrets and other tools' variables; they must not break loading.
    dotenv.write_text("RLHF_DPO__BETA=0.3\nRLHF_SEED=7\nWANDB_API_KEY=not-a-field\nOTHER_TOOL=1\n")

    preset = load_config("tiny", env_file=None)
    assert (preset.dpo.beta, preset.dpo.top_k, preset.sft.learning_rate) == (0.1, 2, 1e-3)

    from_file = load_config("tiny", config_file=user_file, env_file=None)
    assert from_file.dpo.beta == 0.2
    assert from_file.sft.learning_rate == 0.002
    assert from_file.dpo.top_k == 2, "a YAML file overriding one field keeps the preset's others"

    from_dotenv = load_config("tiny", config_file=user_file, env_file=dotenv)
    assert from_dotenv.dpo.beta == 0.3
    assert from_dotenv.seed == 7
    assert from_dotenv.sft.learning_rate == 0.002

    monkeypatch.setenv("RLHF_DPO__BETA", "0.4")
    from_environment = load_config("tiny", config_file=user_file, env_file=dotenv)
    assert from_environment.dpo.beta == 0.4
    assert from_environment.seed == 7, "the environment overrides .env per field, not per section"
    assert from_environment.dpo.top_k == 2

    from_overrides = load_config("tiny", config_file=user_file, env_file=dotenv, overrides=["dpo.beta=0.5"])
    assert from_overrides.dpo.beta == 0.5
    assert from_overrides.dpo.learning_rate == 1e-3


def test_secrets_in_dotenv_never_reach_the_config(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("WANDB_API_KEY=secret-value-123\nHF_TOKEN=hf_secret\n")
    dumped = load_config("tiny", env_file=dotenv).model_dump_json()
    assert "secret-value-123" not in dumped
    assert "hf_secret" not in dumped


def test_parse_overrides_nests_and_types_values() -> None:
    parsed = parse_overrides(
        ["dpo.beta=0.2", "sft.top_k=0", "seed=7", "model.trust_remote_code=true", "model.revision=", "data.source=a=b.jsonl"]
    )
    assert parsed == {
        "dpo": {"beta": 0.2},
        "sft": {"top_k": 0},
        "seed": 7,
        "model": {"trust_remote_code": True, "revision": ""},
        "data": {"source": "a=b.jsonl"},
    }
    assert isinstance(parsed["sft"]["top_k"], int) and isinstance(parsed["dpo"]["beta"], float)


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match="dpo.beta"):
        parse_overrides(["dpo.beta"])


def test_exponent_override_reaches_a_float_field() -> None:
    # YAML 1.1 reads "1e-3" as a string; the float field must still get 0.001.
    config = load_config("tiny", env_file=None, overrides=["sft.learning_rate=1e-3", "dpo.learning_rate=2.5e-4"])
    assert config.sft.learning_rate == pytest.approx(1e-3)
    assert config.dpo.learning_rate == pytest.approx(2.5e-4)


@pytest.mark.parametrize(
    "override, field",
    [
        ("sft.learning_rate=-0.001", "sft.learning_rate"),
        ("data.holdout_percent=150", "data.holdout_percent"),
        ("data.train_percent=0", "data.train_percent"),
        ("reward.top_k=-1", "reward.top_k"),
        ("dpo.betta=0.2", "dpo.betta"),
        ("tracking.mode=loud", "tracking.mode"),
        ("data.reward_prefix_fractions=[0.5,1.0]", "data.reward_prefix_fractions.1"),
    ],
)
def test_invalid_override_is_rejected_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        load_config("tiny", env_file=None, overrides=[override])


def test_a_list_setting_reads_from_an_override_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config("tiny", env_file=None, overrides=["data.reward_prefix_fractions=[0.5, 0.75]"])
    assert config.data.reward_prefix_fractions == [0.5, 0.75]
    monkeypatch.setenv("RLHF_DATA__REWARD_PREFIX_FRACTIONS", "[0.25]")
    assert load_config("tiny", env_file=None).data.reward_prefix_fractions == [0.25]


def test_invalid_environment_value_is_rejected_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_DPO__BETA", "-1")
    with pytest.raises(ConfigError, match=r"dpo\.beta"):
        load_config("tiny", env_file=None)


def test_unknown_preset_is_rejected_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"preset.*'tinny'.*default, tiny, tldr"):
        load_config("tinny")


def test_missing_config_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config("tiny", config_file=tmp_path / "missing.yaml", env_file=None)


def test_top_k_above_the_layer_count_is_rejected() -> None:
    config = load_config("tiny", env_file=None, overrides=["dpo.top_k=6"])
    check_top_k(config, 6)
    with pytest.raises(ConfigError, match=r"dpo\.top_k: 6 .* 4 decoder layers"):
        check_top_k(config, 4)


def test_a_shallow_reward_model_bounds_reward_and_ppo_top_k() -> None:
    config = load_config("tiny", env_file=None, overrides=["reward.num_layers=2", "reward.top_k=2", "ppo.top_k=2", "dpo.top_k=4"])
    check_top_k(config, 4)
    for stage in ("reward", "ppo"):
        with pytest.raises(ConfigError, match=rf"{stage}\.top_k: 3 .* 2 decoder layers"):
            check_top_k(config.model_copy(update={stage: getattr(config, stage).model_copy(update={"top_k": 3})}), 4)
    with pytest.raises(ConfigError, match=r"reward\.num_layers: 5 .* 4 decoder layers"):
        check_top_k(load_config("tiny", env_file=None, overrides=["reward.num_layers=5"]), 4)


def test_online_tracking_needs_a_wandb_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.mode.*WANDB_API_KEY"):
        load_config("tiny", env_file=None, overrides=["tracking.mode=online"])

    monkeypatch.setenv("WANDB_API_KEY", "key-from-the-environment")
    config = load_config("tiny", env_file=None, overrides=["tracking.mode=online"])
    assert config.tracking.mode == "online"
    assert "key-from-the-environment" not in config.model_dump_json()


def test_stage_section_holds_only_what_the_stage_depends_on() -> None:
    base = load_config("tiny", env_file=None)
    other_beta = load_config("tiny", env_file=None, overrides=["dpo.beta=0.3"])
    other_seed = load_config("tiny", env_file=None, overrides=["seed=1"])

    def section(config, name):
        return registry.stage(name).config_section(config)

    assert section(other_beta, "dpo") != section(base, "dpo")
    assert section(other_beta, "sft") == section(base, "sft")
    assert section(other_beta, "data_prep") == section(base, "data_prep")
    for stage in registry.stage_names():
        assert section(other_seed, stage) != section(base, stage), stage


def test_env_example_lists_every_setting_with_its_description():
    """.env.example is what users copy: it must match the config model, field for field."""
    from pipeline_lib.config import PipelineConfig, env_example

    repo_file = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    assert repo_file == env_example(), "regenerate: python -m pipeline_lib.config --env-example > .env.example"

    def variables(model: type, prefix: str) -> list[str]:
        """Every leaf setting's variable name, nested sections (sft.lora.r) included."""
        found = []
        for name, field in model.model_fields.items():
            if name == "preset":
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                found += variables(annotation, f"{prefix}{name.upper()}__")
            else:
                found.append(f"{prefix}{name.upper()}")
        return found

    names = variables(PipelineConfig, "RLHF_")
    assert "RLHF_SFT__LORA__R" in names and "RLHF_PRECISION" in names
    for variable in names:
        assert f"# {variable}=" in repo_file, variable


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["sed=7"], "unknown setting(s) ['sed']"),
        (["nosuch.field=1"], "unknown setting(s) ['nosuch']"),
        (["=1"], "'=1' does not name a setting"),
        (["dpo.=1"], "'dpo.=1' does not name a setting"),
        (["dpo.beta=[1"], "'dpo.beta=[1': the value is not valid YAML"),
        (["dpo=1", "dpo.beta=0.2"], "dpo was already given a value"),
        (["dpo.nosuch=1"], "dpo.nosuch"),
    ],
)
def test_a_bad_override_is_rejected_naming_it(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", env_file=None, overrides=overrides)
    assert named in str(raised.value)


@pytest.mark.parametrize(
    "content, named",
    [
        ("sed: 7\n", "unknown setting(s) ['sed']"),
        ("dpo: {beta: [1\n", "is not valid YAML"),
        ("- dpo\n- sft\n", "the top level must be a mapping of sections, not a list"),
        ("dpo:\n  betta: 0.2\n", "dpo.betta"),
    ],
)
def test_a_bad_config_file_is_rejected_naming_it(tmp_path: Path, content: str, named: str) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_config("tiny", config_file=path, env_file=None)
    assert named in str(raised.value)


def test_a_typo_in_dotenv_is_rejected_but_secrets_there_are_left_alone(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("WANDB_API_KEY=not-a-setting\nRLHF_SEED=3\n")
    assert load_config("tiny", env_file=env_file).seed == 3
    env_file.write_text("RLHF_SED=3\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['sed'\]"):
        load_config("tiny", env_file=env_file)


@pytest.mark.parametrize("name, value", [("RLHF_DPO", "abc"), ("RLHF_DATA__REWARD_PREFIX_FRACTIONS", "[0.5,")])
def test_a_malformed_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="in the environment"):
        load_config("tiny", env_file=None)


def test_top_k_is_checked_only_for_the_stages_a_run_includes():
    config = load_config("tiny", env_file=None, overrides=["grpo.top_k=3"])
    check_top_k(config, 2, stages=["data_prep", "sft"])  # tiny's top_k 2 fits, grpo is not in the run
    with pytest.raises(ConfigError, match=r"grpo\.top_k: 3 is above the 2 decoder layers"):
        check_top_k(config, 2, stages=["data_prep", "sft", "reward", "grpo"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_preset_cannot_be_set_inside_a_config(tmp_path: Path, where: str):
    """It would be overwritten by --preset without a word: an error naming the way to do it."""
    path = tmp_path / "my.yaml"
    path.write_text("preset: tiny\nseed: 3\n")
    with pytest.raises(ConfigError, match="choose the preset with --preset"):
        if where == "file":
            load_config("default", config_file=path, env_file=None)
        else:
            load_config("default", overrides=["preset=tiny"], env_file=None)


def test_dpo_policy_pairs_on_a_users_own_data_are_rejected_whatever_else_dpo_sets() -> None:
    """'policy' pairs need the embedded task's oracle: on a user's own file the config names
    dpo.pair_source, with DPO's sampling settings left to their defaults or set."""
    for extra in ([], ["dpo.pairs_per_prompt=2"], ["dpo.samples_per_prompt=6"]):
        with pytest.raises(ConfigError, match=r"dpo\.pair_source 'policy'.*has none: use 'data'"):
            load_config(overrides=["data.source=./my-pairs.jsonl", "dpo.pair_source=policy", *extra], env_file=None)
