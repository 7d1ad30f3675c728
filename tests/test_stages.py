"""Every stage on the tiny preset: losses logged, the right weights trained, outputs that load.

The whole chain data_prep -> sft -> reward -> dpo -> ppo -> evaluate runs once per session
(seconds per stage); each test checks one stage's output. Failure rescue runs SFT on its
own; resume runs SFT and the reward stage on their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pipeline_lib.config import PipelineConfig, load_config
from pipeline_lib.errors import ConfigError
from pipeline_lib import registry, tracking
from pipeline_lib.data.files import read_jsonl, read_prompts
from pipeline_lib.models import load_causal_lm, load_tokenizer
from pipeline_lib.stages import reward, sft, training

INTERVAL_METRICS = ("oracle_gain_vs_sft", "reward_model_gain_vs_sft", "win_rate_vs_sft", "sampled_kl_to_sft")
RATIO_METRICS = ("distinct_2_ratio_to_sft", "length_ratio_to_sft")
EVAL_METRICS = {"oracle_mean", "reward_model_mean", "mean_length_words", "distinct_2", *INTERVAL_METRICS, *RATIO_METRICS} | {
    f"{metric}_ci95" for metric in (*INTERVAL_METRICS, *RATIO_METRICS)
}


@dataclass
class TinyPipeline:
    config: PipelineConfig
    base: Path
    data: Path
    outputs: dict[str, Path]
    metrics: dict[str, dict[str, Any]]


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    root = tmp_path_factory.mktemp("pipeline")
    config = load_config("tiny", overrides=[f"output_root={root}"], env_file=None)
    out: dict[str, Path] = {}
    metrics: dict[str, dict[str, Any]] = {}
    # Every declared stage in DAG order, called directly as `accelerate launch` or a test would.
    for name, stage in registry.stages().items():
        metrics[name] = stage.run(config, registry.stage_inputs(name, out, tiny_base_model), root / name)
        out[name] = root / name
    return TinyPipeline(config, tiny_base_model, out["data_prep"], out, metrics)


def decoder_layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def assert_only_top_layers_changed(before_dir: Path, after_dir: Path) -> None:
    """top_k=2 of 4 layers: embeddings and layers 0-1 untouched, every tensor of layers 2-3 and the final norm moved."""
    before, after = load_file(before_dir / "model.safetensors"), load_file(after_dir / "model.safetensors")
    shared = sorted(set(before) & set(after))
    assert "model.embed_tokens.weight" in shared and len(shared) == len(before)
    for name in shared:
        frozen = name == "model.embed_tokens.weight" or decoder_layer(name) in (0, 1)
        if frozen:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(before[name], after[name]), f"trainable {name} did not change"


def logged(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "log_history.json").read_text())


def assert_loss_logged(output_dir: Path, key: str = "loss") -> None:
    losses = [entry[key] for entry in logged(output_dir) if key in entry]
    assert losses, f"no {key!r} in {output_dir / 'log_history.json'}"
    assert all(math.isfinite(value) for value in losses)


def assert_model_card(output_dir: Path, *lineage: Path) -> None:
    card = (output_dir / "README.md").read_text()
    for path in lineage:
        assert f"`{path}`" in card


def assert_causal_lm_loads(output_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir, use_safetensors=True)
    tokenizer = load_tokenizer(output_dir)
    ids = tokenizer("I loved the movie.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_sft_trains_the_top_layers(tiny_pipeline: TinyPipeline) -> None:
    output, metrics = tiny_pipeline.outputs["sft"], tiny_pipeline.metrics["sft"]
    assert_loss_logged(output)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["resumed_from_checkpoint"] is False
    assert_only_top_layers_changed(tiny_pipeline.base, output)
    assert_causal_lm_loads(output)
    assert_model_card(output, tiny_pipeline.base, tiny_pipeline.data)


def test_reward_model_trains_top_layers_and_score_head(tiny_pipeline: TinyPipeline) -> None:
    from transformers import AutoModelForSequenceClassification

    output, metrics = tiny_pipeline.outputs["reward"], tiny_pipeline.metrics["reward"]
    assert_loss_logged(output)
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], output)
    assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0 and metrics["eval_pairs"] == 8
    # The held-out accuracy apart by which side is longer: its pairs are among the held-out ones.
    assert metrics["eval_pairs_chosen_longer"] + metrics["eval_pairs_chosen_shorter"] <= 8
    for side in ("longer", "shorter"):
        accuracy = metrics[f"pairwise_accuracy_chosen_{side}"]
        assert (accuracy is None) == (metrics[f"eval_pairs_chosen_{side}"] == 0) and (accuracy is None or 0.0 <= accuracy <= 1.0)
    # Every training pair is learned from, grouped by prompt (each response forwarded once).
    train_rows = read_jsonl(tiny_pipeline.data / "reward_train.jsonl")
    assert metrics["train_pairs"] == len(train_rows)
    assert metrics["train_prompts"] == len({row["prompt"] for row in train_rows})
    model = AutoModelForSequenceClassification.from_pretrained(output, use_safetensors=True)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert model.score.weight.shape == (1, 64)
    assert_model_card(output, tiny_pipeline.outputs["sft"], tiny_pipeline.data)


def test_dpo_trains_the_top_layers(tiny_pipeline: TinyPipeline) -> None:
    output, metrics = tiny_pipeline.outputs["dpo"], tiny_pipeline.metrics["dpo"]
    assert_loss_logged(output)
    assert any("rewards/margins" in entry for entry in logged(output))
    assert metrics["final_reward_margin"] is not None
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], output)
    assert_causal_lm_loads(output)
    assert_model_card(output, tiny_pipeline.outputs["sft"], tiny_pipeline.data)


def test_dpo_with_a_likelihood_term_raises_the_chosen_responses_more(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """``dpo.sft_weight`` (RPO): the same batches in the same order, but the policy also learns
    to say the chosen responses, so their log-ratio to SFT (TRL's rewards/chosen) ends higher
    than DPO alone leaves it."""
    config = tiny_pipeline.config.model_copy(deep=True)
    assert config.dpo.sft_weight == 0
    config.dpo.sft_weight = 5.0
    inputs = {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}
    metrics = registry.stage("dpo").run(config, inputs, tmp_path / "dpo")

    def chosen(output: Path) -> list[float]:
        return [entry["rewards/chosen"] for entry in logged(output) if "rewards/chosen" in entry]

    alone, with_term = chosen(tiny_pipeline.outputs["dpo"]), chosen(tmp_path / "dpo")
    assert len(alone) == len(with_term) == config.dpo.max_steps
    assert all(b > a for a, b in zip(alone[1:], with_term[1:])), (alone, with_term)
    assert metrics["final_reward_margin"] is not None
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], tmp_path / "dpo")


def test_ppo_trains_the_policy_top_layers(tiny_pipeline: TinyPipeline) -> None:
    output, metrics = tiny_pipeline.outputs["ppo"], tiny_pipeline.metrics["ppo"]
    assert_loss_logged(output, "loss/policy_avg")
    assert_loss_logged(output, "loss/value_avg")
    assert metrics["logged_losses"] >= 1 and metrics["final_reward_model_score"] is not None
    # The saved model is the policy alone, a causal LM with the SFT model's tensors.
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], output)
    assert_causal_lm_loads(output)
    assert_model_card(output, tiny_pipeline.outputs["sft"], tiny_pipeline.outputs["reward"], tiny_pipeline.data)


def test_ppo_reads_the_reward_standardised_and_the_value_head_on_the_same_scale(tiny_pipeline: TinyPipeline) -> None:
    """``ppo.normalize_reward``: PPO's reward is (score - mean) / std over the training pairs'
    responses, and the value model (which starts from the reward model) predicts on that scale."""
    from pipeline_lib.data.files import read_split
    from pipeline_lib.generation import reward_scores
    from pipeline_lib.models import load_sequence_classifier
    from pipeline_lib.stages.ppo_reward import EosClosedReward, rescale_value_head, score_statistics

    assert tiny_pipeline.config.ppo.normalize_reward
    metrics = tiny_pipeline.metrics["ppo"]
    tokenizer = load_tokenizer(tiny_pipeline.outputs["reward"])
    reward_model = load_sequence_classifier(tiny_pipeline.outputs["reward"], tokenizer.pad_token_id)
    value_model = load_sequence_classifier(tiny_pipeline.outputs["reward"], tokenizer.pad_token_id)
    pairs = read_split(tiny_pipeline.data, "pairs_train")
    prompts = [pair["prompt"] for pair in pairs] * 2
    responses = [pair["chosen"] for pair in pairs] + [pair["rejected"] for pair in pairs]
    system_prompt = tiny_pipeline.config.model.system_prompt
    scores = torch.tensor(reward_scores(reward_model, tokenizer, prompts, responses, system_prompt=system_prompt))
    # The stage standardised by the statistics of exactly these responses.
    assert metrics["reward_mean"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert metrics["reward_std"] == pytest.approx(scores.std().item(), rel=1e-4)

    head_before = value_model.score.weight.detach().clone()
    mean, std = score_statistics(scores.tolist())
    rescale_value_head(value_model, mean, std)
    assert torch.allclose(value_model.score.weight, head_before / std)
    hidden = torch.randn(3, head_before.shape[1])
    wrapped = EosClosedReward(reward_model, tokenizer.eos_token_id, mean, std)
    assert torch.allclose(wrapped.score(hidden), (reward_model.score(hidden) - mean) / std)
    # Standardised, the responses' own scores have mean 0 and deviation 1.
    standardised = (scores - mean) / std
    assert abs(standardised.mean().item()) < 1e-5 and standardised.std().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="same score"):
        score_statistics([0.5, 0.5, 0.5])


def test_pairwise_accuracy_scores_each_response_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three samples of a prompt make three pairs: the reward model runs on three texts, not
    six, and each pair is still judged by its own two scores."""
    scored: list[str] = []

    def fake_scores(model, tokenizer, prompts, responses, system_prompt=None):
        scored.extend(responses)
        return [{"good": 2.0, "fine": 1.0, "bad": 1.5}[response] for response in responses]

    from pipeline_lib import generation

    monkeypatch.setattr(generation, "reward_scores", fake_scores)
    pairs = [
        {"prompt": "p", "chosen": "good", "rejected": "fine"},  # right
        {"prompt": "p", "chosen": "good", "rejected": "bad"},  # right
        {"prompt": "p", "chosen": "fine", "rejected": "bad"},  # wrong: 1.0 < 1.5
    ]
    assert reward.pairwise_accuracy(None, None, pairs) == pytest.approx(2 / 3)
    assert sorted(scored) == ["bad", "fine", "good"]


def test_accuracy_by_length_splits_the_held_out_pairs_by_which_response_is_longer() -> None:
    """A reward model that prefers longer responses: right on every pair whose chosen side is
    the longer, wrong on every pair whose chosen side is the shorter; pairs of equal length
    count in neither group."""

    def tokenizer(text, add_special_tokens=True):
        return {"input_ids": text.split()}

    pairs = [
        {"prompt": "p", "chosen": "a b c", "rejected": "a"},
        {"prompt": "p", "chosen": "a b", "rejected": "a"},
        {"prompt": "p", "chosen": "a", "rejected": "a b c"},
        {"prompt": "p", "chosen": "a b", "rejected": "c d"},
    ]
    by_length = [float(len(pair[side].split())) for pair in pairs for side in ("chosen", "rejected")]
    split = reward.accuracy_by_length(tokenizer, pairs, by_length[::2], by_length[1::2])
    assert split == {
        "pairwise_accuracy_chosen_longer": 1.0,
        "eval_pairs_chosen_longer": 2,
        "pairwise_accuracy_chosen_shorter": 0.0,
        "eval_pairs_chosen_shorter": 1,
    }
    assert reward.accuracy_by_length(tokenizer, pairs[:2], [1.0, 1.0], [0.0, 0.0])["pairwise_accuracy_chosen_shorter"] is None


def test_kl_early_stop_keeps_the_last_policy_measured_within_the_limit() -> None:
    """Batch k's rollouts measure the policy from before update k: when they pass
    ``max_kl`` the weights go back to the policy before that one, and training stops."""
    from types import SimpleNamespace

    from pipeline_lib.stages.ppo_reward import KlEarlyStop

    policy = torch.nn.Linear(1, 1, bias=False)
    stop = KlEarlyStop(policy, max_kl=3.0)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    stop.on_train_begin(None, None, None)
    for update, kl in enumerate([0.0, 1.0, 2.0], start=1):  # each logged after update k, measuring policy k-1
        with torch.no_grad():
            policy.weight.fill_(float(update))
        stop.on_log(None, SimpleNamespace(episode=16 * update), None, logs={"objective/kl": kl})
    with torch.no_grad():
        policy.weight.fill_(4.0)
    with pytest.raises(training.StopTraining, match="episode 64: its rollouts were 5.00 nats"):
        stop.on_log(None, SimpleNamespace(episode=64), None, logs={"objective/kl": 5.0})  # policy 3 is past the limit
    assert policy.weight.item() == 2.0 and stop.stopped_at_episode == 64 and stop.kept_kl == 2.0


def test_the_diversity_guard_bisects_the_line_to_sft() -> None:
    """Under the floor, ``keep_diverse`` bisects the line in the weights from SFT's to the
    trained ones and keeps the furthest point measured at or above it; at or above the
    floor the trained policy stays; with no probe, SFT's weights."""
    from pipeline_lib.stages.ppo_reward import keep_diverse

    policy, sft = torch.nn.Linear(1, 1, bias=False), {"weight": torch.zeros(1, 1)}
    diversity = lambda model: 1.0 - 0.08 * model.weight.item()  # noqa: E731  trained (4): 0.68, SFT (0): 1
    with torch.no_grad():
        policy.weight.fill_(4.0)
    # 1/2 of the way (2.0) reads 0.84 and stays, 3/4 (3.0) 0.76, 5/8 (2.5) 0.80.
    kept, measured = keep_diverse(policy, sft, diversity, floor=0.79, probes=3)
    assert kept == 0.625 and measured == pytest.approx([0.68, 0.84, 0.76, 0.80]) and policy.weight.item() == pytest.approx(2.5)
    with torch.no_grad():
        policy.weight.fill_(4.0)
    assert keep_diverse(policy, sft, diversity, floor=0.5, probes=3) == (1.0, [pytest.approx(0.68)])  # kept as trained
    assert policy.weight.item() == 4.0
    assert keep_diverse(policy, sft, diversity, floor=0.79, probes=0) == (0.0, [pytest.approx(0.68)])
    assert policy.weight.item() == 0.0


def test_tail_averaging_keeps_the_mean_of_the_last_batches_policies() -> None:
    """With 4 batches and the last 3 averaged, the policy kept is the mean of the policies
    after batches 2, 3 and 4 (read when TRL logs each batch's KL); frozen weights are left
    alone and the mean is taken in float32 whatever the weights' dtype."""
    from pipeline_lib.stages.ppo_reward import TailAverage

    policy = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(1, 1, bias=False)).to(torch.bfloat16)
    policy[0].weight.requires_grad_(False)
    tail = TailAverage(policy, batches=3, total_batches=4)
    for batch, value in enumerate([10.0, 1.0, 2.0, 4.5], start=1):
        with torch.no_grad():
            policy[1].weight.fill_(value)
        tail.on_log(None, None, None, logs={"objective/kl": 0.1 * batch})
        tail.on_log(None, None, None, logs={"loss/value_avg": 0.1})  # a log without KL is no batch
    assert tail.apply() == 3
    assert policy[1].weight.item() == pytest.approx(2.5) and policy[1].weight.dtype == torch.bfloat16
    assert policy[0].weight.requires_grad is False and tail.mean.keys() == {"1.weight"}


def test_the_adaptive_kl_coefficient_follows_ziegler_et_al() -> None:
    """Under the target the coefficient falls, over it it rises, each by at most 20% of
    episodes/horizon a batch; TRL reads it from args for the next batch."""
    from types import SimpleNamespace

    from pipeline_lib.stages.ppo_reward import AdaptiveKlCoef

    args, controller = SimpleNamespace(kl_coef=0.25), AdaptiveKlCoef(target=1.0, horizon=320, episodes_per_batch=32)
    for kl in (0.0, 0.95, 3.0):
        controller.on_log(args, None, None, logs={"objective/kl": kl})
    controller.on_log(args, None, None, logs={"loss/value_avg": 0.1})  # a log without KL changes nothing
    expected = [0.25 * 0.98, 0.25 * 0.98 * 0.995, 0.25 * 0.98 * 0.995 * 1.02]
    assert controller.history == pytest.approx(expected) and args.kl_coef == pytest.approx(expected[-1])


def test_every_training_stage_tracks_offline_without_a_login(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default preset's tracking (``tracking.mode: offline``) with no API key: each
    training stage, in a process of its own as the flow runs it, trains and leaves a local
    wandb run (``wandb sync`` sends it later) named as the course scripts named theirs.
    PPO builds its trainer under a scoped environment variable; that scope once took
    wandb's settings with it, and the stage then asked wandb for a login."""
    from pipeline_lib.launch import run_stage_process

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = tiny_pipeline.config.model_copy(deep=True)
    config.tracking.mode, config.output_root = "offline", str(tmp_path)
    runs = tmp_path / "wandb" / "wandb"
    for name in ("sft", "reward", "dpo", "ppo"):
        inputs = registry.stage_inputs(name, tiny_pipeline.outputs, tiny_pipeline.base)
        metrics = run_stage_process(name, config.model_dump(mode="json"), inputs, tmp_path / name)
        run_id = metrics["tracking_run_id"]
        assert run_id, f"{name} left no wandb run"
        [run_dir] = runs.glob(f"offline-run-*-{run_id}")
        # The run's name, as wandb keeps it offline (protobuf records; the name is a plain string in them).
        assert tracking.run_name(name, config).encode() in (run_dir / f"run-{run_id}.wandb").read_bytes()


def test_ppo_with_a_target_kl_moves_its_coefficient(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """A target no rollout reaches (1000 nats) lowers kl_coef by the most a batch may, 20%,
    after every batch (a horizon of one episode)."""
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.target_kl, config.ppo.kl_horizon = 1000.0, 1
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    metrics = registry.stage("ppo").run(config, inputs, tmp_path / "ppo")
    assert metrics["logged_losses"] >= 2  # one entry per batch
    assert metrics["final_kl_coef"] == pytest.approx(config.ppo.kl_coef * 0.8 ** metrics["logged_losses"])


def test_ppo_with_a_constant_schedule_updates_every_batch_at_the_peak_rate(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """``lr_scheduler_type: constant``: each batch of rollouts updates at the peak rate, where
    the default linear schedule (the fixture's PPO run) lowers it batch by batch."""
    rates = lambda output: [entry["lr"] for entry in logged(output) if "objective/kl" in entry]  # noqa: E731
    linear = rates(tiny_pipeline.outputs["ppo"])
    assert len(linear) >= 2 and linear == sorted(linear, reverse=True) and linear[-1] < linear[0]
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.lr_scheduler_type = "constant"
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    registry.stage("ppo").run(config, inputs, tmp_path / "ppo")
    assert rates(tmp_path / "ppo") == [config.ppo.learning_rate] * len(linear)


def test_ppo_with_a_batch_of_warm_up_moves_nothing_before_its_second_batch(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """``warmup_steps: 1`` (the default preset's PPO): the first batch of rollouts updates at
    rate 0 (Adam's moments gather its gradients, the weights stay), so the second batch is
    rolled out by SFT's policy itself, 0 nats from it; the peak rate comes with the second."""
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.warmup_steps = 1
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    registry.stage("ppo").run(config, inputs, tmp_path / "ppo")
    batches = [entry for entry in logged(tmp_path / "ppo") if "objective/kl" in entry]
    assert len(batches) >= 2
    assert [batch["lr"] for batch in batches[:2]] == [0.0, config.ppo.learning_rate]
    assert batches[1]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    # Without warm-up (the fixture's run) the first batch's updates move the policy already.
    unwarmed = [entry for entry in logged(tiny_pipeline.outputs["ppo"]) if "objective/kl" in entry]
    assert abs(unwarmed[1]["objective/kl"]) > 1e-3


def test_ppo_with_tail_averaging_saves_the_mean_of_its_last_batches_policies(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ppo.average_last_batches: 2``: the saved policy's trained layers are the mean of the
    policies after the last two batches (read as the run goes), not the last batch's."""
    from pipeline_lib.stages import ppo_reward
    from pipeline_lib.stages.callbacks import trainable_snapshot

    after_each_batch: list[dict] = []
    real_on_log = ppo_reward.TailAverage.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        real_on_log(self, args, state, control, logs=logs, **kwargs)
        if "objective/kl" in (logs or {}):
            after_each_batch.append(trainable_snapshot(self.policy, device="cpu"))

    monkeypatch.setattr(ppo_reward.TailAverage, "on_log", on_log)
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.average_last_batches = 2
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    metrics = registry.stage("ppo").run(config, inputs, tmp_path / "ppo")
    assert metrics["batches_averaged"] == 2 and len(after_each_batch) >= 2
    saved = load_file(tmp_path / "ppo" / "model.safetensors")
    last, before_last = after_each_batch[-1], after_each_batch[-2]
    assert last.keys() <= saved.keys() and any(not torch.equal(last[name], before_last[name]) for name in last)
    for name in last:
        assert torch.allclose(saved[name].float(), (last[name].float() + before_last[name].float()) / 2, atol=1e-6), name


def test_ppo_stops_early_on_kl_and_keeps_sft_when_the_first_update_is_too_far(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """With a limit no update can stay within, the stage stops at the second batch (whose
    rollouts measure the first update), or at the first when SFT's own rollouts measure a
    rounding error past it, and either way saves the SFT policy it started from."""
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.max_kl = 1e-9
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    metrics = registry.stage("ppo").run(config, inputs, tmp_path / "ppo")
    batch = config.ppo.per_device_train_batch_size * config.ppo.gradient_accumulation_steps
    assert metrics["stopped_early_at_episode"] in (batch, 2 * batch)
    sft, ppo = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    assert sft.keys() == ppo.keys() and all(torch.equal(sft[name], ppo[name]) for name in sft)


def test_ppo_under_its_diversity_floor_goes_back_to_sft(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``ppo.min_distinct_ratio``: when neither the trained policy's greedy responses nor
    those of any point on the line back to SFT keep the floor's share of SFT's distinct-2,
    the stage says so and saves the SFT policy it started from. The real measurement runs;
    the ratios it returns are scripted (SFT's distinct-2, then a tenth of it)."""
    from pipeline_lib.stages import ppo

    measured: list[float] = []

    def scripted(model, tokenizer, prompts, config) -> float:
        measured.append(real(model, tokenizer, prompts, config))
        return 1.0 if len(measured) == 1 else 0.1

    real = ppo.greedy_distinct_2
    monkeypatch.setattr(ppo, "greedy_distinct_2", scripted)
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.min_distinct_ratio, config.ppo.distinct_check_prompts = 0.5, 4
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    with caplog.at_level("WARNING", logger="pipeline_lib.stages.ppo"):
        metrics = ppo.run(config, inputs, tmp_path / "ppo")
    assert metrics["diversity_kept_fraction"] == 0
    assert any("under ppo.min_distinct_ratio=0.5: keeping the point 0 of the way" in r.getMessage() for r in caplog.records)
    probes = config.ppo.distinct_check_probes
    assert probes >= 1 and metrics["diversity_ratios_measured"] == [0.1] * (1 + probes)
    assert len(measured) == 2 + probes and all(0 <= value <= 1 for value in measured)
    sft, kept = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    assert sft.keys() == kept.keys() and all(torch.equal(sft[name], kept[name]) for name in sft)


def test_ppo_diversity_guard_is_off_when_sft_has_no_word_pairs(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One-word answers have no distinct-2 to keep a share of: the stage says so, trains as
    without the guard and keeps what it trained."""
    from pipeline_lib.stages import ppo

    monkeypatch.setattr(ppo, "greedy_distinct_2", lambda model, tokenizer, prompts, config: 0.0)
    config = tiny_pipeline.config.model_copy(deep=True)
    config.ppo.min_distinct_ratio = 0.5
    inputs = {name: tiny_pipeline.outputs[name] for name in ("sft", "reward")} | {"data_prep": tiny_pipeline.data}
    with caplog.at_level("WARNING", logger="pipeline_lib.stages.ppo"):
        metrics = ppo.run(config, inputs, tmp_path / "ppo")
    assert metrics["diversity_kept_fraction"] is None and metrics["diversity_ratios_measured"] is None
    assert any("no word pairs" in r.getMessage() and "guard is off" in r.getMessage() for r in caplog.records)
    sft, trained = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    assert any(not torch.equal(sft[name], trained[name]) for name in sft)


def train_one_weight(guard, policy: torch.nn.Linear, max_steps: int = 9) -> None:
    """Drive ``guard`` as a trainer would, with the policy's one weight set to the step."""
    from types import SimpleNamespace

    state, control = SimpleNamespace(global_step=0, max_steps=max_steps), SimpleNamespace(should_training_stop=False)
    guard.on_train_begin(None, state, control)
    for step in range(1, max_steps + 1):
        state.global_step = step
        with torch.no_grad():
            policy.weight.fill_(float(step))
        guard.on_step_end(None, state, control)
        if control.should_training_stop:
            break


def test_sampled_kl_stop_measures_every_few_steps_and_keeps_the_last_policy_within_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DPO's guard measures at every ``every_steps``-th step and the last; the first
    measurement past ``max_kl`` puts back the policy of the last one within, and stops."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    guard = SampledKlStop(policy, None, None, ["p"], max_kl=3.0, every_steps=2, max_new_tokens=4, seed=0)
    measured = iter([1.0, 2.5, 3.5])
    monkeypatch.setattr(guard, "measure", lambda: next(measured))
    train_one_weight(guard, policy)
    assert [check["step"] for check in guard.checks] == [2, 4, 6]
    assert guard.stopped_at_step == 6 and guard.kept_step == 4 and policy.weight.item() == 4.0


def test_sampled_kl_stop_keeps_the_furthest_point_within_on_the_line_to_the_policy_past_the_limit() -> None:
    """Past the limit, the guard's probes measure points on the straight line from the last
    policy within to the one past, and keep the furthest within, not the last check's. Here
    the KL grows as w**2 / 10 in the one weight w, which is the step: 1.6 at step 4, 3.6 at
    step 6, limit 3.0 (reached at w = 5.477)."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    policy = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        policy.weight.fill_(0.0)
    guard = SampledKlStop(policy, None, None, ["p"], max_kl=3.0, every_steps=2, max_new_tokens=4, seed=0, probes=2)
    guard.measure = lambda: policy.weight.item() ** 2 / 10
    train_one_weight(guard, policy)
    assert guard.stopped_at_step == 6 and guard.kept_step == 4
    assert [(check["step"], "fraction" in check) for check in guard.checks] == [(2, False), (4, False), (6, False), (6, True), (6, True)]
    kept = policy.weight.item()
    assert 5.4 <= kept <= 5.4773 and kept ** 2 / 10 <= 3.0  # past step 4's 4.0, within the limit
    assert guard.kept_fraction == pytest.approx((kept - 4.0) / 2.0, abs=1e-6)


def test_dpo_kl_guard_reads_zero_before_training_with_a_reference_copy_and_with_lora(tiny_pipeline: TinyPipeline) -> None:
    """The guard's reference is SFT: a frozen copy, or with LoRA the policy with its adapter
    disabled. Before any update the policy is SFT, so the sampled KL is 0 both ways, to float
    error: the policy's log-probabilities come from its sampler's KV-cached steps, the
    reference's from one forward pass over the same tokens."""
    from pipeline_lib.stages import dpo
    from pipeline_lib.stages.training import load_policy_and_reference, prepare_model

    config = tiny_pipeline.config.model_copy(deep=True)
    config.dpo.max_kl, config.dpo.kl_check_prompts = 1.0, 4
    sft_dir = tiny_pipeline.outputs["sft"]
    tokenizer = load_tokenizer(sft_dir)
    rows = read_jsonl(tiny_pipeline.data / "pairs_train.jsonl")
    for adapter in ("none", "lora"):
        config.dpo.adapter = adapter
        policy, reference = load_policy_and_reference(config, config.dpo, sft_dir)
        policy, _ = prepare_model(policy, "dpo", config.dpo)
        assert (reference is None) == (adapter == "lora")
        guard = dpo.kl_guard(config, policy, reference, tokenizer, rows)
        assert len(guard.prompts) == 4
        assert guard.measure() == pytest.approx(0.0, abs=1e-3)


def test_dpo_stops_early_on_kl_and_saves_the_policy_kept(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limit at its first measurement (step 1), DPO stops there and saves the policy
    it started from, SFT's weights exactly, with a warning that names the setting."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    monkeypatch.setattr(SampledKlStop, "measure", lambda self: 10.0)
    config = tiny_pipeline.config.model_copy(deep=True)
    config.dpo.max_kl, config.dpo.kl_check_steps = 1.0, 1
    inputs = {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}
    with caplog.at_level("WARNING", logger="pipeline_lib.stages.training"):
        metrics = registry.stage("dpo").run(config, inputs, tmp_path / "dpo")
    assert metrics["stopped_early_at_step"] == 1 and metrics["kept_step"] == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("first KL check" in message and "dpo.max_kl=1.0" in message for message in warnings)
    # the check, then the default two probes towards step 1's policy, both past the limit too
    assert [(check["step"], check["kl"]) for check in metrics["kl_checks"]] == [(1, 10.0)] * 3
    assert metrics["kept_fraction"] == 0.0
    sft, trained = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors"), load_file(tmp_path / "dpo" / "model.safetensors")
    assert sft.keys() == trained.keys() and all(torch.equal(sft[name], trained[name]) for name in sft)


def test_dpo_past_the_limit_at_its_first_check_keeps_a_point_on_the_way_when_one_is_within(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same first check past the limit, but the first probe (a tenth of the way from SFT
    to step 1's policy: the chord from 0 to 10 nats reaches the limit of 1 there) is within:
    DPO saves that point, not SFT's weights."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    measured = iter([10.0, 0.5, 10.0])
    monkeypatch.setattr(SampledKlStop, "measure", lambda self: next(measured))
    config = tiny_pipeline.config.model_copy(deep=True)
    config.dpo.max_kl, config.dpo.kl_check_steps = 1.0, 1
    inputs = {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}
    metrics = registry.stage("dpo").run(config, inputs, tmp_path / "dpo")
    assert metrics["stopped_early_at_step"] == 1 and metrics["kept_step"] == 0
    assert metrics["kl_checks"] == [{"step": 1, "kl": 10.0}, {"step": 1, "fraction": 0.1, "kl": 0.5},
                                    {"step": 1, "fraction": 0.19, "kl": 10.0}]
    assert metrics["kept_fraction"] == pytest.approx(0.1)
    sft, trained = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors"), load_file(tmp_path / "dpo" / "model.safetensors")
    assert sft.keys() == trained.keys() and any(not torch.equal(sft[name], trained[name]) for name in sft)


def test_dpo_resumed_between_kl_checks_goes_back_where_the_uninterrupted_run_does(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks at steps 3 and 4, checkpoints at 2 and 4, the limit passed at step 3. A run
    killed during step 3 resumes from checkpoint-2, which no check measured: it must still
    search the line from SFT (the last policy within), as the run never killed does, not
    take checkpoint-2 for a policy within. The guard's stand-in for the sampled KL is the
    squared distance of the trained weights from SFT's, which grows as DPO moves."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    sft_weights = load_file(tiny_pipeline.outputs["sft"] / "model.safetensors")
    scale = 1.0

    def distance(self) -> float:
        trained = [(name, p) for name, p in self.policy.named_parameters() if p.requires_grad]
        return scale * sum(float((p.detach() - sft_weights[name]).double().pow(2).sum()) for name, p in trained)

    monkeypatch.setattr(SampledKlStop, "measure", distance)
    inputs = {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}

    def run_dpo(out_dir: Path, max_kl: float) -> dict:
        config = tiny_pipeline.config.model_copy(deep=True)
        config.dpo.max_kl, config.dpo.kl_check_steps = max_kl, 3
        assert (config.dpo.max_steps, config.dpo.save_steps) == (4, 2)
        return registry.stage("dpo").run(config, inputs, out_dir)

    seen = run_dpo(tmp_path / "unbounded", 1e9)["kl_checks"]
    assert [check["step"] for check in seen] == [3, 4] and seen[0]["kl"] > 0
    scale = 10.0 / seen[0]["kl"]  # step 3 now reads 10 nats; the limit is 5
    uninterrupted = run_dpo(tmp_path / "uninterrupted", 5.0)
    assert uninterrupted["stopped_early_at_step"] == 3 and uninterrupted["kept_step"] == 0
    assert 0 < uninterrupted["kept_fraction"] < 1

    train_resumable = training.train_resumable

    def crashing(stage, trainer, out_dir, resume=True):
        trainer.add_callback(CrashAfterStep(2, RuntimeError("simulated interruption")))
        return train_resumable(stage, trainer, out_dir, resume)

    monkeypatch.setattr(training, "train_resumable", crashing)
    with pytest.raises(training.StageFailed, match="simulated interruption"):
        run_dpo(tmp_path / "resumed", 5.0)
    assert training.latest_checkpoint(tmp_path / "resumed").endswith("checkpoint-2")
    monkeypatch.setattr(training, "train_resumable", train_resumable)
    resumed = run_dpo(tmp_path / "resumed", 5.0)

    assert resumed["resumed_from_checkpoint"] is True
    assert (resumed["stopped_early_at_step"], resumed["kept_step"]) == (3, 0)
    assert resumed["kept_fraction"] == pytest.approx(uninterrupted["kept_fraction"], abs=1e-3)
    assert [check["step"] for check in resumed["kl_checks"]] == [check["step"] for check in uninterrupted["kl_checks"]]
    kept, expected = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(tmp_path / "uninterrupted" / "model.safetensors")
    assert kept.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(kept[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_dpo_on_policy_pairs_are_sft_samples_ranked_by_the_oracle_and_reused_on_resume(
    tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dpo.pair_source: policy``: DPO trains on pairs of SFT's own samples of the training
    prompts (``dpo.samples_per_prompt`` of each, up to ``dpo.pairs_per_prompt`` pairs), each
    chosen above its rejected by the margin by the oracle; a re-run of the stage in the same
    directory (a resume) reads the written pairs back instead of sampling."""
    from collections import Counter

    from pipeline_lib.data import sentiment_task
    from pipeline_lib.stages import dpo

    config = tiny_pipeline.config.model_copy(deep=True)
    config.dpo.pair_source = "policy"
    config.dpo.samples_per_prompt, config.dpo.pairs_per_prompt = config.data.samples_per_prompt + 1, 2
    config.data.pair_margin = 0.0  # the tiny model's samples are words VADER mostly scores 0
    inputs = {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}
    sampled_with = []
    real_sample_pairs = sentiment_task.sample_pairs

    def recording_sample_pairs(*args, **kwargs):
        sampled_with.append(args[3].pairs_per_prompt)
        return real_sample_pairs(*args, **kwargs)

    monkeypatch.setattr(sentiment_task, "sample_pairs", recording_sample_pairs)
    metrics = dpo.run(config, inputs, tmp_path / "dpo")
    rows = read_jsonl(tmp_path / "dpo" / dpo.SAMPLED_PAIRS)
    prompts = read_prompts(tiny_pipeline.data, "prompts_train")
    assert metrics["pairs"] == len(rows) >= 2 and metrics["sampled_responses"] == len(prompts) * config.dpo.samples_per_prompt
    assert sampled_with == [2] and max(Counter(row["prompt"] for row in rows).values()) <= 2
    assert {row["prompt"] for row in rows} <= set(prompts)
    for row in rows:
        assert row["chosen"] != row["rejected"]
        assert sentiment_task.oracle_score(row["chosen"]) == row["chosen_score"] > row["rejected_score"]
    # Not data prep's pairs: the tiny preset's are fixed templates.
    assert not {row["chosen"] for row in rows} & {row["chosen"] for row in read_jsonl(tiny_pipeline.data / "pairs_train.jsonl")}
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], tmp_path / "dpo")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(sentiment_task, "sample_pairs", no_sampling)
    assert dpo.run(config, inputs, tmp_path / "dpo")["pairs"] == len(rows)


def test_dpo_policy_pairs_need_the_embedded_oracle(tmp_path: Path) -> None:
    def pair_source(preset: str, *overrides: str) -> str:
        return load_config(preset, overrides=[f"output_root={tmp_path}", *overrides], env_file=None).dpo.pair_source

    # 'auto': on-policy where data prep samples a model for its pairs, a user's own pairs otherwise.
    assert pair_source("default") == "policy"
    assert pair_source("tiny") == "data"  # template pairs
    assert pair_source("default", f"data.source={tmp_path}/pairs.jsonl") == "data"
    with pytest.raises(ConfigError, match=r"dpo.pair_source 'policy'.*pairs.jsonl"):
        load_config("tiny", overrides=[f"output_root={tmp_path}", f"data.source={tmp_path}/pairs.jsonl", "dpo.pair_source=policy"], env_file=None)


def test_evaluate_writes_figures_generations_report_and_plot(tiny_pipeline: TinyPipeline) -> None:
    output = tiny_pipeline.outputs["evaluate"]
    policies = ["base", *registry.policy_names()]

    results = json.loads((output / "eval.json").read_text())
    assert list(results["policies"]) == policies
    for name in policies:
        assert set(results["policies"][name]) == EVAL_METRICS, name
    assert results["held_out_prompts"] == 8 and results["held_out_pairs"] == 8
    assert results["oracle"] == "vader"
    # SFT is the reference: against itself it ties every prompt and has no KL.
    sft = results["policies"]["sft"]
    assert sft["win_rate_vs_sft"] == 0.5 and sft["win_rate_vs_sft_ci95"] == [0.5, 0.5]
    assert sft["sampled_kl_to_sft"] == 0.0 and sft["oracle_gain_vs_sft"] == 0.0
    # Every other policy: intervals around its figures, and a KL from sampled responses.
    for name in policies:
        row = results["policies"][name]
        for metric in INTERVAL_METRICS:
            low, high = row[f"{metric}_ci95"]
            assert low <= row[metric] <= high, (name, metric)
        assert row["oracle_gain_vs_sft"] == pytest.approx(row["oracle_mean"] - sft["oracle_mean"])
        # Ratios to SFT on the same prompts, each with an ordered interval (None where SFT's is 0).
        for ratio, figure in (("distinct_2_ratio_to_sft", "distinct_2"), ("length_ratio_to_sft", "mean_length_words")):
            if sft[figure]:
                assert row[ratio] == pytest.approx(row[figure] / sft[figure]), (name, ratio)
                assert row[f"{ratio}_ci95"][0] <= row[f"{ratio}_ci95"][1], (name, ratio)
            else:
                assert row[ratio] is None and row[f"{ratio}_ci95"] is None, (name, ratio)
    low, high = results["reward_model_pairwise_accuracy_ci95"]
    assert low <= results["reward_model_pairwise_accuracy"] <= high
    # Base is another model than SFT: its KL comes from its own samples, one figure per prompt.
    # (Its sign is left alone here: on the tiny models the estimate is within noise of 0;
    # tests/test_metrics.py checks KL > 0 against a clearly different model.)
    base_kl = [row["sampled_kl_to_sft"] for row in read_jsonl(output / "generations.jsonl") if row["policy"] == "base"]
    assert len(base_kl) == 8 and all(value != 0.0 for value in base_kl)
    config = tiny_pipeline.config.evaluate
    assert results["intervals"] == {
        "method": "paired percentile bootstrap over held-out prompts",
        "confidence": 0.95,
        "resamples": config.bootstrap_resamples,
        "seed": tiny_pipeline.config.seed,
        "prompts": 8,
    }
    assert results["sampled_kl"]["samples_per_prompt"] == config.kl_samples > 0

    generations = read_jsonl(output / "generations.jsonl")
    prompts = read_prompts(tiny_pipeline.data, "prompts_eval")
    assert sorted((row["prompt"], row["policy"]) for row in generations) == sorted(
        (prompt, policy) for prompt in prompts for policy in policies
    )

    report = (output / "report.md").read_text()
    for name in policies:
        assert f"| {name} |" in report
    assert "paired bootstrap over the 8 held-out prompts" in report
    assert "(eval.png)" in report
    assert (output / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tiny_pipeline.metrics["evaluate"]["sft/win_rate_vs_sft"] == 0.5
    assert tiny_pipeline.metrics["evaluate"]["sft/win_rate_vs_sft_ci95_low"] == 0.5


def test_evaluate_is_seeded(tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same config gives the same figures, sampled KL and intervals included. The reward
    model's held-out accuracy comes from the reward stage's own scores of those pairs: the
    second evaluation never scores them."""
    from pipeline_lib.stages import evaluate

    def no_second_scoring(*args, **kwargs):
        raise AssertionError("evaluate scored the held-out pairs the reward stage had scored")

    monkeypatch.setattr(evaluate, "pair_scores", no_second_scoring)
    ran = {name: tiny_pipeline.outputs[name] for name in ("data_prep", "sft", "reward", "dpo")}
    again = registry.stage("evaluate").run(tiny_pipeline.config, registry.stage_inputs("evaluate", ran, tiny_pipeline.base), tmp_path)
    first = tiny_pipeline.metrics["evaluate"]
    assert again == {metric: value for metric, value in first.items() if metric in again}
    assert {metric.split("/")[0] for metric in again if "/" in metric} == {"base", "sft", "dpo"}
    assert again["reward_model_pairwise_accuracy"] == tiny_pipeline.metrics["reward"]["pairwise_accuracy"]


def test_the_reward_stages_held_out_scores_are_read_only_for_the_pairs_they_score(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    """Kept scores are the published model's (scoring afresh gives them again); other pairs,
    a reward model without kept scores (trained elsewhere), or scores from a bf16 run (whose
    published weights are rounded) get None and are scored."""
    from pipeline_lib.data.files import read_split
    from pipeline_lib.models import load_sequence_classifier

    reward_dir = tiny_pipeline.outputs["reward"]
    pairs = read_split(tiny_pipeline.data, "reward_eval")
    kept = reward.stored_pair_scores(reward_dir, pairs)
    tokenizer = load_tokenizer(reward_dir)
    model = load_sequence_classifier(reward_dir, tokenizer.pad_token_id).eval()
    with torch.no_grad():
        fresh = reward.pair_scores(model, tokenizer, pairs, tiny_pipeline.config.model.system_prompt)
    assert kept is not None and len(kept[0]) == len(kept[1]) == len(pairs) > 1
    assert kept[0] == pytest.approx(fresh[0], abs=1e-4) and kept[1] == pytest.approx(fresh[1], abs=1e-4)
    assert reward.stored_pair_scores(reward_dir, pairs[1:]) is None
    assert reward.stored_pair_scores(tmp_path, pairs) is None
    record = json.loads((reward_dir / reward.HELD_OUT_SCORES).read_text())
    assert record["precision"] == "fp32"
    (tmp_path / reward.HELD_OUT_SCORES).write_text(json.dumps({**record, "precision": "bf16"}))
    assert reward.stored_pair_scores(tmp_path, pairs) is None


# --- failure rescue and resume -------------------------------------------------------


class CrashAfterStep(TrainerCallback):
    """Raise once the trainer has finished ``step`` optimizer steps."""

    def __init__(self, step: int, error: BaseException):
        self.step, self.error = step, error

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.step:
            raise self.error


class RecordSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def tiny_trainer(model_dir: Path, out_dir: Path, callback: TrainerCallback):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer("I loved the movie; it was wonderful.", add_special_tokens=False)["input_ids"]
    dataset = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 8)
    args = TrainingArguments(
        output_dir=str(out_dir / training.CHECKPOINT_DIR), max_steps=4, per_device_train_batch_size=2,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    return Trainer(model=load_causal_lm(model_dir), args=args, train_dataset=dataset, callbacks=[callback])


@pytest.mark.parametrize(
    "error, raised",
    [(RuntimeError("simulated crash"), training.StageFailed), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["exception", "keyboard-interrupt"],
)
def test_failed_training_saves_the_partial_model_and_names_the_stage(
    tiny_base_model: Path, tmp_path: Path, error: BaseException, raised: type
) -> None:
    trainer = tiny_trainer(tiny_base_model, tmp_path, CrashAfterStep(1, error))

    with pytest.raises(raised) as failure:
        training.train_resumable("sft", trainer, tmp_path)

    if raised is training.StageFailed:
        assert str(failure.value) == "sft failed: RuntimeError: simulated crash"
        assert failure.value.__cause__ is error
    rescued = tmp_path / "failed" / "model" / "model.safetensors"
    assert rescued.is_file()
    partial, base = load_file(rescued), load_file(tiny_base_model / "model.safetensors")
    assert not torch.equal(partial["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]), (
        "the rescued model holds the steps trained before the crash"
    )
    report = json.loads((tmp_path / "failed" / "error.json").read_text())
    assert report["stage"] == "sft" and type(error).__name__ in report["error"]
    assert not (tmp_path / "model.safetensors").exists(), "a failed stage never writes its output in place"


def test_reward_stage_names_max_length_when_no_pair_fits(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    config = load_config("tiny", overrides=[f"output_root={tmp_path}", "reward.max_length=8"], env_file=None)
    with pytest.raises(training.StageFailed, match="no training example fits reward.max_length=8"):
        reward.run(config, {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}, tmp_path / "reward")
    assert not (tmp_path / "reward" / "model.safetensors").exists()


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_an_interrupted_stage_resumes_and_matches_an_uninterrupted_run(
    stage: str, tiny_pipeline: TinyPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_pipeline.config
    section = getattr(config, stage)
    assert (section.max_steps, section.save_steps) == (4, 2)
    run_stage = {
        "sft": lambda: sft.run(config, {"base_model": tiny_pipeline.base, "data_prep": tiny_pipeline.data}, tmp_path),
        "reward": lambda: reward.run(config, {"sft": tiny_pipeline.outputs["sft"], "data_prep": tiny_pipeline.data}, tmp_path),
    }[stage]
    train_resumable = training.train_resumable

    def with_callback(callback: TrainerCallback):
        def train(stage, trainer, out_dir, resume=True):
            trainer.add_callback(callback)
            return train_resumable(stage, trainer, out_dir, resume)

        return train

    crash = CrashAfterStep(2, RuntimeError("simulated interruption"))
    monkeypatch.setattr(training, "train_resumable", with_callback(crash))
    with pytest.raises(training.StageFailed, match=f"{stage} failed: RuntimeError: simulated interruption"):
        run_stage()
    assert training.latest_checkpoint(tmp_path).endswith("checkpoint-2")

    steps = RecordSteps()
    monkeypatch.setattr(training, "train_resumable", with_callback(steps))
    metrics = run_stage()

    assert metrics["resumed_from_checkpoint"] is True
    assert steps.steps == [3, 4], "the second run continues after checkpoint-2 instead of starting over"
    assert [entry["step"] for entry in logged(tmp_path) if "loss" in entry] == [1, 2, 3, 4]
    resumed = load_file(tmp_path / "model.safetensors")
    uninterrupted = load_file(tiny_pipeline.outputs[stage] / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-5, msg=name)


def test_grpo_trains_the_policy_top_layers_against_the_reward_model(tiny_pipeline: TinyPipeline) -> None:
    output, metrics = tiny_pipeline.outputs["grpo"], tiny_pipeline.metrics["grpo"]
    assert_loss_logged(output)
    rewards = [entry["reward"] for entry in logged(output) if "reward" in entry]
    assert rewards and all(math.isfinite(value) for value in rewards)
    assert metrics["final_reward_model_score"] == rewards[-1]
    assert metrics["final_kl"] is not None  # beta > 0: the KL to SFT is penalised and logged
    assert_only_top_layers_changed(tiny_pipeline.outputs["sft"], output)
    assert_causal_lm_loads(output)
    assert_model_card(output, tiny_pipeline.outputs["sft"], tiny_pipeline.outputs["reward"], tiny_pipeline.data)


def test_grpo_reward_is_the_reward_model_read_at_eos(tiny_pipeline: TinyPipeline) -> None:
    """GRPO's reward function scores conversational completions exactly as evaluation does."""
    from pipeline_lib.generation import reward_scores
    from pipeline_lib.models import load_sequence_classifier
    from pipeline_lib.stages.grpo import reward_model_function

    tokenizer = load_tokenizer(tiny_pipeline.outputs["sft"])
    reward_model = load_sequence_classifier(tiny_pipeline.outputs["reward"], tokenizer.pad_token_id)
    prompts = read_prompts(tiny_pipeline.data, "prompts_train")[:3]
    responses = ["I loved it.", "Dull and far too long.", "It was fine"]
    score = reward_model_function(reward_model, tokenizer, system_prompt=None)
    completions = [[{"role": "assistant", "content": text}] for text in responses]
    scores = score(prompts=None, completions=completions, prompt_text=prompts, trainer_state=None)
    assert scores == reward_scores(reward_model, tokenizer, prompts, responses)
    assert len(set(scores)) == 3
