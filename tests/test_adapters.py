"""LoRA on every stage, precision and gradient checkpointing, on the tiny model.

What a user checks: every stage with ``adapter: lora`` publishes an adapter that plain
peft loads (``AutoPeftModelFor...from_pretrained(path)``) and that computes what the
trainer's model computed; the reward model's score head travels with its adapter; a
LoRA stage started from a LoRA SFT publishes one adapter on the base model; DPO with
LoRA builds no reference copy; bad LoRA/precision settings fail before training, naming
the field; the LoRA rank is part of the stage key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline_lib import adapters, registry
from pipeline_lib.config import ConfigError, check_precision, load_config
from pipeline_lib.data.files import read_split
from pipeline_lib.generation import reward_scores
from pipeline_lib.models import load_causal_lm, load_tokenizer
from pipeline_lib.plan import make_plan
from pipeline_lib.stages import training

REPO = Path(__file__).resolve().parents[1]
PROBE_PROMPTS = ["Write a short review of the film Solaris.", "Write a short review of a quiet cafe."]
PROBE_RESPONSES = ["It was wonderful and moving.", "Dull, slow and far too long."]


@dataclass
class Run:
    config: Any
    base: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    # What the trainer's own model computed on the probe inputs, captured as it was saved.
    trained: dict[str, torch.Tensor] = field(default_factory=dict)


def probe(model, tokenizer, scalar_head: bool) -> torch.Tensor:
    """Reward scores (scalar head) or next-token logits (causal LM) on fixed inputs."""
    model.eval()
    with torch.no_grad():
        if scalar_head:
            return torch.tensor(reward_scores(model, tokenizer, PROBE_PROMPTS, PROBE_RESPONSES, system_prompt=""))
        ids = tokenizer(PROBE_RESPONSES[0], return_tensors="pt")["input_ids"].to(model.device)
        return model(input_ids=ids).logits.float().cpu()


def run_stages(base: Path, root: Path, overrides: list[str], names: list[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Run the named stages (DAG order) directly, capturing each trained model's outputs."""
    config = load_config("tiny", overrides=[f"output_root={root}", *overrides], env_file=None)
    run = Run(config, base)
    original = training.save_model

    def capturing_save(model, tokenizer, out_dir, stage, lineage, **kwargs):
        run.trained[stage] = probe(model, tokenizer, scalar_head=stage == "reward")
        original(model, tokenizer, out_dir, stage, lineage, **kwargs)

    monkeypatch.setattr(training, "save_model", capturing_save)
    for name in names:
        run.metrics[name] = registry.stage(name).run(config, registry.stage_inputs(name, run.outputs, base), root / name)
        run.outputs[name] = root / name
    monkeypatch.undo()
    return run


@pytest.fixture(scope="module")
def lora_run(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Every stage with LoRA (``adapter: lora``), so each LoRA stage after SFT starts from an adapter."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_stages(
            tiny_base_model, tmp_path_factory.mktemp("lora"), ["adapter=lora"], registry.stage_names(), monkeypatch
        )


POLICY_STAGES = ("sft", "dpo", "ppo", "grpo")


@pytest.mark.parametrize("stage", POLICY_STAGES)
def test_plain_peft_loads_each_lora_policy_as_trained(lora_run: Run, stage: str) -> None:
    from peft import AutoPeftModelForCausalLM

    output = lora_run.outputs[stage]
    assert adapters.is_adapter(output) and not (output / "model.safetensors").exists()
    config = json.loads((output / adapters.ADAPTER_CONFIG).read_text())
    # Always one adapter on the base model on disk, whatever the stage started from.
    assert Path(config["base_model_name_or_path"]) == lora_run.base.resolve()
    tokenizer = load_tokenizer(output)
    reloaded = probe(AutoPeftModelForCausalLM.from_pretrained(output), tokenizer, scalar_head=False)
    torch.testing.assert_close(reloaded, lora_run.trained[stage], atol=2e-5, rtol=1e-5)
    # The pipeline's own loader (base + adapter merged) computes the same.
    torch.testing.assert_close(probe(load_causal_lm(output), tokenizer, False), lora_run.trained[stage], atol=2e-5, rtol=1e-5)
    card = (output / "README.md").read_text()
    assert "LoRA adapter" in card and str(lora_run.base.resolve()) in card and "AutoPeftModelForCausalLM" in card


def test_lora_after_a_lora_sft_publishes_both_adapters_as_one(lora_run: Run) -> None:
    rank = lora_run.config.sft.lora.r
    for stage in ("reward", "dpo", "ppo", "grpo"):
        config = json.loads((lora_run.outputs[stage] / adapters.ADAPTER_CONFIG).read_text())
        assert config["r"] == 2 * rank, stage  # SFT's adapter and the stage's, concatenated
    assert json.loads((lora_run.outputs["sft"] / adapters.ADAPTER_CONFIG).read_text())["r"] == rank


def test_lora_trains_far_fewer_parameters_and_the_evaluation_judges_every_policy(lora_run: Run) -> None:
    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        metrics = lora_run.metrics[stage]
        assert 0 < metrics["trainable_parameters"] < 0.25 * metrics["total_parameters"], stage
    evaluation = json.loads((lora_run.outputs["evaluate"] / "eval.json").read_text())
    assert set(evaluation["policies"]) == {"base", "sft", "dpo", "ppo", "grpo"}
    assert all(policy["oracle_mean"] == policy["oracle_mean"] for policy in evaluation["policies"].values())


def test_reward_adapter_reloads_with_its_score_head_bit_identical(
    tiny_base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream trap (a LoRA reward model saved without its head): reload the published
    reward model with plain peft and get the trainer's scores exactly."""
    from peft import AutoPeftModelForSequenceClassification

    run = run_stages(tiny_base_model, tmp_path, ["reward.adapter=lora"], ["data_prep", "sft", "reward"], monkeypatch)
    output = run.outputs["reward"]
    info = adapters.adapter_info(output)
    assert info["kind"] == adapters.SEQUENCE_CLASSIFIER
    assert Path(info["base_model"]) == run.outputs["sft"].resolve()  # a full-weights SFT on disk
    model = AutoPeftModelForSequenceClassification.from_pretrained(output, **info["base_kwargs"])
    reloaded = probe(model, load_tokenizer(output), scalar_head=True)
    assert torch.equal(reloaded, run.trained["reward"])
    # The head is the trained one, not a fresh random one.
    assert not torch.equal(model.score.modules_to_save["default"].weight, model.score.original_module.weight)
    # The stage's own accuracy is reproduced from the published files.
    from pipeline_lib.models import load_sequence_classifier
    from pipeline_lib.stages.reward import pairwise_accuracy

    tokenizer = load_tokenizer(output)
    reward_model = load_sequence_classifier(output, tokenizer.pad_token_id)
    eval_rows = read_split(run.outputs["data_prep"], "reward_eval")
    system_prompt = run.config.model.system_prompt
    assert pairwise_accuracy(reward_model, tokenizer, eval_rows, system_prompt) == run.metrics["reward"]["pairwise_accuracy"]


def test_dpo_with_lora_holds_no_reference_copy(tiny_base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_lib import models

    loads: list[str] = []
    original = models.load_causal_lm

    def counting_load(path, *args, **kwargs):
        loads.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(models, "load_causal_lm", counting_load)  # as training.load_policy_and_reference reaches it
    run = run_stages(tiny_base_model, tmp_path, ["dpo.adapter=lora"], ["data_prep", "sft", "dpo"], monkeypatch)
    assert len(loads) == 1  # the policy only: the reference is the policy with its adapter disabled
    assert run.metrics["dpo"]["final_reward_margin"] is not None


def test_merge_publishes_full_weights(tiny_base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    run = run_stages(tiny_base_model, tmp_path, ["sft.adapter=lora", "sft.lora.merge=true"], ["data_prep", "sft"], monkeypatch)
    output = run.outputs["sft"]
    assert (output / "model.safetensors").is_file() and not adapters.is_adapter(output)
    model = AutoModelForCausalLM.from_pretrained(output)
    torch.testing.assert_close(probe(model, load_tokenizer(output), False), run.trained["sft"], atol=2e-5, rtol=1e-5)
    assert "merged" in (output / "README.md").read_text()


def test_bf16_and_gradient_checkpointing_train(tiny_base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    plain = run_stages(tiny_base_model, tmp_path / "plain", ["sft.adapter=lora"], ["data_prep", "sft"], monkeypatch)
    checkpointed = run_stages(
        tiny_base_model, tmp_path / "gc", ["sft.adapter=lora", "sft.gradient_checkpointing=true"], ["data_prep", "sft"], monkeypatch
    )
    # Recomputing activations changes the memory, not the arithmetic.
    assert checkpointed.metrics["sft"]["train_loss"] == pytest.approx(plain.metrics["sft"]["train_loss"], rel=1e-5)
    bf16 = run_stages(tiny_base_model, tmp_path / "bf16", ["precision=bf16"], ["data_prep", "sft"], monkeypatch)
    assert bf16.metrics["sft"]["train_loss"] == pytest.approx(plain.metrics["sft"]["train_loss"], rel=0.05)
    with safe_open(bf16.outputs["sft"] / "model.safetensors", "pt") as weights, safe_open(tiny_base_model / "model.safetensors", "pt") as base:
        trained = weights.get_tensor("model.norm.weight")
        assert trained.dtype == torch.bfloat16  # published in the precision it ran in
        # What trains is kept in float32 during training, so small updates are not rounded away.
        assert not torch.equal(trained, base.get_tensor("model.norm.weight").to(torch.bfloat16))


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_every_stage_in_bf16_with_gradient_checkpointing(
    tiny_base_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, adapter: str
) -> None:
    """PPO builds its own Accelerator and replaces Trainer.train: both settings reach it anyway.
    The mixed precision PPO hands its Accelerator through the environment is put back after,
    or float32 stages run later in the same process would train under bf16 autocast."""
    overrides = ["precision=bf16", f"adapter={adapter}", *(f"{stage}.gradient_checkpointing=true" for stage in ("dpo", "ppo", "grpo"))]
    before = os.environ.get("ACCELERATE_MIXED_PRECISION")
    run = run_stages(tiny_base_model, tmp_path, overrides, registry.stage_names(), monkeypatch)
    assert os.environ.get("ACCELERATE_MIXED_PRECISION") == before
    assert run.metrics["ppo"]["final_kl"] is not None and run.metrics["grpo"]["final_kl"] is not None
    assert set(json.loads((run.outputs["evaluate"] / "eval.json").read_text())["policies"]) == {"base", "sft", "dpo", "ppo", "grpo"}
    assert load_causal_lm(run.outputs["ppo"]).dtype == torch.float32  # loads as asked, whatever was saved


# --- bad settings fail before any training, naming the field


@pytest.mark.parametrize(
    "overrides, field_named",
    [
        (["sft.lora.r=0"], "sft.lora.r"),
        (["dpo.lora.dropout=1.5"], "dpo.lora.dropout"),
        (["reward.lora.target_modules=[]"], "reward.lora.target_modules"),
        (["precision=fp8"], "precision"),
        (["adapter=qlora"], "adapter"),
    ],
)
def test_invalid_lora_settings_name_the_field(overrides: list[str], field_named: str) -> None:
    with pytest.raises(ConfigError, match=field_named.replace(".", r"\.")):
        load_config("tiny", overrides=overrides, env_file=None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sft.adapter=lora", "sft.lora.target_modules=[q_proj,nonexistent_proj]"], r"sft\.lora\.target_modules: \['nonexistent_proj'\]"),
        (["dpo.adapter=lora", "dpo.lora.target_modules=[embed_tokens]"], r"dpo\.lora\.target_modules.*no linear layer"),
        (["ppo.adapter=lora", "ppo.top_k=2", "ppo.lora.target_modules=[lm_head]"], r"ppo\.lora\.target_modules.*top 2 decoder layers.*ppo\.top_k"),
    ],
)
def test_target_modules_are_checked_against_the_model(tiny_base_model: Path, overrides: list[str], message: str) -> None:
    config = load_config("tiny", overrides=overrides, env_file=None)
    with pytest.raises(ConfigError, match=message):
        adapters.check_targets(config, tiny_base_model)


def test_a_tied_output_head_is_no_lora_target(tiny_base_model: Path) -> None:
    """The tiny model ties lm_head to the input embeddings: merging a LoRA on it would change both."""
    config = load_config("tiny", overrides=["sft.adapter=lora", "sft.top_k=0", "sft.lora.target_modules=[lm_head]"], env_file=None)
    with pytest.raises(ConfigError, match=r"sft\.lora\.target_modules: lm_head shares its weights"):
        adapters.check_targets(config, tiny_base_model)


def test_fp16_needs_cuda() -> None:
    config = load_config("tiny", overrides=["precision=fp16"], env_file=None)
    with pytest.raises(ConfigError, match="precision: 'fp16' needs a CUDA GPU"):
        check_precision(config, cuda_available=False)
    check_precision(config, cuda_available=True)
    check_precision(load_config("tiny", overrides=["precision=bf16"], env_file=None), cuda_available=False)


def test_flow_rejects_a_bad_target_module_before_any_work(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", "tiny",
        "--set", f"output_root={tmp_path}", "--set", "adapter=lora", "--set", "sft.lora.target_modules=[qproj]",
    ]
    env = {**os.environ, "PREFECT_API_URL": ""}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "sft.lora.target_modules: ['qproj'] name no module" in completed.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_adapter_for_all_sets_every_training_stage_and_keys_follow_the_rank(tmp_path: Path) -> None:
    config = load_config("tiny", overrides=[f"output_root={tmp_path}", "adapter=lora"], env_file=None)
    assert {section.adapter for section in config.train_sections().values()} == {"lora"}
    changed = load_config("tiny", overrides=[f"output_root={tmp_path}", "adapter=lora", "dpo.lora.r=4"], env_file=None)
    keys = {stage.name: stage.key for stage in make_plan(config).stages}
    new_keys = {stage.name: stage.key for stage in make_plan(changed).stages}
    assert {name for name in keys if keys[name] != new_keys[name]} == {"dpo", "evaluate"}
    full = {stage.name: stage.key for stage in make_plan(load_config("tiny", overrides=[f"output_root={tmp_path}"], env_file=None)).stages}
    assert {name for name in keys if keys[name] != full[name]} == set(registry.stage_names()) - {"data_prep"}


def test_lora_has_its_own_learning_rate_when_set() -> None:
    config = load_config("tiny", overrides=["dpo.learning_rate=1e-4", "dpo.lora.learning_rate=2e-3"], env_file=None)
    assert training.learning_rate(config.dpo) == 1e-4  # adapter none: the stage's rate
    config = load_config("tiny", overrides=["adapter=lora", "dpo.learning_rate=1e-4", "dpo.lora.learning_rate=2e-3"], env_file=None)
    assert training.learning_rate(config.dpo) == 2e-3
    assert training.learning_rate(config.sft) == config.sft.learning_rate  # no LoRA rate set: the stage's
