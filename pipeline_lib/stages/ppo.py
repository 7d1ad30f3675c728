"""Proximal Policy Optimization with TRL 1.12's experimental ``PPOTrainer``.

Inputs: the SFT model directory (policy start and frozen reference), the reward model
directory (the reward, and the start of the value model, as in TRL's PPO recipe) and
data prep's ``prompts_train.jsonl``. Rollouts of ``ppo.response_length`` tokens are
scored by the reward model, never by the oracle; ``ppo.kl_coef`` penalises drift from
SFT. With ``ppo.normalize_reward`` (the default) the reward model's scores are first
standardised over the training pairs' responses, so ``kl_coef`` means nats of KL per
standard deviation of reward for every reward model.

Departures: TRL removed PPO in 1.13; we pin 1.12.x. Upstream says PPO checkpoint resume
does not work, so an interrupted PPO stage restarts from SFT (its checkpoints are not
read back). Only the top ``ppo.top_k`` decoder layers of policy and value model train
(with ``ppo.adapter: lora``, LoRA layers in them; the reference is then the policy with its
adapter disabled).
TRL treats every pad id as padding, so the tokenizer's pad must differ from EOS
(``models.load_tokenizer`` sees to it) or the end-of-turn tokens inside each chat prompt
would be masked and the reward read one token off. TRL reads the reward at a rollout's
last token, mid-sentence for a rollout cut off at ``response_length``; ``EosClosedReward`` (ppo_reward.py)
closes such rollouts with EOS first, as evaluation does.
With ``ppo.average_last_batches``, the policy kept is the mean of the policies after the
last few rollout batches (``TailAverage`` in ppo_reward.py), not the last one alone.
With ``ppo.min_distinct_ratio``, a diversity guard (``keep_diverse`` in ppo_reward.py) reads
the policy's greedy responses to the training prompts after training and, when they keep
less than that share of SFT's distinct-2, moves the trainable weights back along the line
to SFT's (a copy of them kept on the CPU) to the furthest point that keeps it.

Run alone: ``run(config, {"sft": SFT_DIR, "reward": REWARD_DIR, "data_prep": DATA_DIR}, OUT_DIR)``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline_lib import adapters
from pipeline_lib.config import PipelineConfig
from pipeline_lib.generation import chat_prompt_ids, generate_responses, pair_response_scores
from pipeline_lib.metrics import distinct_n
from pipeline_lib.models import (
    freeze_all_but_top_k,
    load_sequence_classifier,
    load_tokenizer,
    torch_dtype,
)
from pipeline_lib.data.files import read_prompts, read_split
from pipeline_lib.stages import Stage, training

logger = logging.getLogger(__name__)


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from pipeline_lib.stages.callbacks import trainable_snapshot
    from pipeline_lib.stages.ppo_reward import (
        AdaptiveKlCoef,
        EosClosedReward,
        KlEarlyStop,
        TailAverage,
        keep_diverse,
        rescale_value_head,
        score_statistics,
    )

    # --- setup
    section = config.ppo
    sft_model_dir, reward_model_dir, data_dir = inputs["sft"], inputs["reward"], inputs["data_prep"]
    training.seed_everything(config.seed)
    # Checkpoints cannot be resumed (see the docstring): start clean.
    shutil.rmtree(Path(out_dir) / training.CHECKPOINT_DIR, ignore_errors=True)
    # --- data: PPO takes tokenized prompts
    tokenizer = load_tokenizer(sft_model_dir)
    tokenizer.padding_side = "left"  # rollouts generate after the prompt
    prompts = read_prompts(data_dir, "prompts_train")
    train_dataset = Dataset.from_list([{"input_ids": chat_prompt_ids(tokenizer, p, config.model.system_prompt)} for p in prompts])
    # --- models
    # With LoRA the policy is SFT plus an adapter and the reference is the policy with its
    # adapter disabled (TRL's PEFT path); the value model trains LoRA layers and its head
    # (one optimizer and rate for both models), else its top layers in full.
    dtype = torch_dtype(config.precision)
    policy, reference = training.load_policy_and_reference(config, section, sft_model_dir)
    reward_model = load_sequence_classifier(reward_model_dir, tokenizer.pad_token_id, dtype=dtype)
    value_model = load_sequence_classifier(reward_model_dir, tokenizer.pad_token_id, dtype=dtype)
    for parameter in reward_model.parameters():
        parameter.requires_grad = False
    # TRL's PPO generates rollouts outside autocast, so with bf16 weights the layers it
    # trains in full stay bf16 too (pure bf16, as TRL's own examples); LoRA layers are
    # float32 either way (peft casts around them).
    policy, parameter_counts = training.prepare_model(policy, "ppo", section, upcast=False)
    if section.adapter == "lora":
        adapters.attach_in_place(value_model, "ppo", section)
    else:
        freeze_all_but_top_k(value_model, section.top_k)
    if section.gradient_checkpointing:
        # TRL's PPOTrainer replaces Trainer.train, where transformers would turn it on.
        for model in (policy, value_model):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reward_mean, reward_std = 0.0, 1.0
    if section.normalize_reward:
        # Over the training pairs' responses: samples of the prompts PPO rolls out from.
        pairs = read_split(data_dir, "pairs_train")
        scores = pair_response_scores(reward_model, tokenizer, pairs, config.model.system_prompt)
        reward_mean, reward_std = score_statistics(list(scores.values()))
        rescale_value_head(value_model, reward_mean, reward_std)
    # --- train
    # PPOTrainer builds its own Accelerator, which takes mixed precision from the environment
    # only. Set for the trainer's construction and put back after it: transformers reads the
    # variable too, so left set it would put every later stage of this process (a test, a
    # notebook that runs stages in turn) under bf16 autocast whatever its precision. Only
    # that variable is put back: the trainer's arguments set wandb's environment
    # (tracking.configure), which its callback reads when training starts.
    trainer_arguments = training.trainer_args("ppo", config, section, out_dir)
    mixed_precision = config.precision if config.precision != "fp32" else None
    with environment_variable("ACCELERATE_MIXED_PRECISION", mixed_precision):
        args = PPOConfig(
            **trainer_arguments,
            total_episodes=section.total_episodes,
            response_length=section.response_length,
            kl_coef=section.kl_coef,
            num_ppo_epochs=section.num_ppo_epochs,
            num_mini_batches=section.num_mini_batches,
            temperature=section.temperature,
            missing_eos_penalty=section.missing_eos_penalty,
            stop_token="eos",
            num_sample_generations=0,
            local_rollout_forward_batch_size=section.per_device_train_batch_size,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=EosClosedReward(reward_model, tokenizer.eos_token_id, reward_mean, reward_std),
            value_model=value_model,
            train_dataset=train_dataset,
        )
    sft_weights = None  # the diversity guard's start: SFT's trainable weights, on the CPU
    if section.min_distinct_ratio is not None:
        # SFT's figure is the policy's before any update (with LoRA, its zero adapters).
        check_prompts = prompts[: section.distinct_check_prompts]
        sft_distinct = greedy_distinct_2(policy, tokenizer, check_prompts, config)
        if sft_distinct > 0:
            sft_weights = trainable_snapshot(policy, device="cpu")
        else:  # one-word answers, say: no ratio to read, and no reason to fail the stage
            logger.warning(
                "ppo.min_distinct_ratio: SFT's greedy responses to the first %d training prompts have no word pairs, "
                "so there is no distinct-2 to compare against: the diversity guard is off for this run",
                len(check_prompts),
            )
    kl_stop = KlEarlyStop(policy, section.max_kl) if section.max_kl is not None else None
    if kl_stop is not None:
        trainer.add_callback(kl_stop)
    if section.target_kl is not None:  # args.batch_size: rollouts per batch, set by PPOTrainer
        trainer.add_callback(AdaptiveKlCoef(section.target_kl, section.kl_horizon, args.batch_size))
    tail = None
    if section.average_last_batches is not None:  # args.num_total_batches: set by PPOTrainer too
        tail = TailAverage(policy, section.average_last_batches, args.num_total_batches)
        trainer.add_callback(tail)
    training.train_resumable("ppo", trainer, out_dir, resume=False)
    averaged = None
    if tail is not None:
        if kl_stop is not None and kl_stop.stopped_at_episode is not None:
            # The KL stop put back the last policy within ppo.max_kl, a bound the mean was not measured against.
            logger.info("ppo: stopped on KL, so the policy kept is the last one within ppo.max_kl, not a tail average")
        else:
            averaged = tail.apply()
            logger.info("ppo: keeping the mean of the policies after the last %d rollout batches", averaged)
    kept_fraction, distinct_ratios = None, []
    if sft_weights is not None:
        kept_fraction, distinct_ratios = keep_diverse(
            policy, sft_weights,
            lambda model: greedy_distinct_2(model, tokenizer, check_prompts, config) / sft_distinct,
            section.min_distinct_ratio, section.distinct_check_probes,
        )
        if kept_fraction < 1:
            logger.warning(
                "ppo: greedy responses to %d training prompts kept %s of SFT's distinct-2 (the trained policy's first, "
                "then points on the line from SFT's weights to it), under ppo.min_distinct_ratio=%s: keeping the point "
                "%.3g of the way from SFT",
                len(check_prompts), ", ".join(f"{ratio:.3f}" for ratio in distinct_ratios), section.min_distinct_ratio,
                kept_fraction,
            )
    # --- save: the policy only (TRL's save_model unwraps it from the value model)
    history = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    training.write_loss_log(trainer, out_dir)
    training.save_model(
        trainer.model.policy, tokenizer, out_dir, "ppo",
        {"sft_model": str(sft_model_dir), "reward_model": str(reward_model_dir), "data": str(data_dir)},
        start_dir=sft_model_dir, section=section,
    )
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        **parameter_counts,
        "first_reward_model_score": first.get("objective/scores"),
        "final_reward_model_score": last.get("objective/scores"),
        "final_kl": last.get("objective/kl"),
        "final_kl_coef": args.kl_coef,
        "reward_mean": reward_mean if section.normalize_reward else None,
        "reward_std": reward_std if section.normalize_reward else None,
        "stopped_early_at_episode": kl_stop.stopped_at_episode if kl_stop else None,
        "batches_averaged": averaged,
        "diversity_kept_fraction": kept_fraction,
        "diversity_ratios_measured": [round(ratio, 4) for ratio in distinct_ratios] or None,
        "logged_losses": len(history),
        "resumed_from_checkpoint": False,
        "tracking_run_id": training.tracking.finish(),
    }


@contextmanager
def environment_variable(name: str, value: str | None) -> Iterator[None]:
    """Set one environment variable for the block (nothing when ``value`` is None), then put
    it back as it was. Not ``mock.patch.dict(os.environ)``: that puts back the whole
    environment, and with it undoes what the block set on purpose (wandb's settings)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def greedy_distinct_2(model, tokenizer, prompts: list[str], config: PipelineConfig) -> float:
    """Distinct-2 of the model's greedy responses to ``prompts``, as evaluation reads it."""
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens=config.ppo.response_length,
        batch_size=config.ppo.per_device_train_batch_size, seed=config.seed, system_prompt=config.model.system_prompt,
    )
    return distinct_n([texts[0] for texts in responses], 2)


STAGE = Stage(
    name="ppo",
    run=run,
    summary="PPO from SFT against the reward model, with a KL penalty to SFT",
    requires=("data_prep", "sft", "reward"),
    policy=True,
    key_metrics=("first_reward_model_score", "final_reward_model_score", "final_kl"),
)
