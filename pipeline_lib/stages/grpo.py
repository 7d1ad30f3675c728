"""Group Relative Policy Optimization with TRL's ``GRPOTrainer``, against the trained reward model.

GRPO (Shao et al. 2024, DeepSeekMath) is online and critic-free: for each training prompt
it samples ``grpo.num_generations`` responses, scores each with a reward function, and
uses each response's reward relative to its group's mean (scaled by the group's standard
deviation, ``grpo.scale_rewards``) as its advantage, so no value model is trained.

Inputs: the SFT model directory (policy start and, when ``grpo.beta`` > 0, the frozen
reference of the KL penalty), the reward model directory and data prep's
``prompts_train``. The reward function is the trained reward model, read exactly as PPO
and evaluation read it (chat prompt, response, EOS; ``generation.reward_scores``), never
the evaluation oracle, so evaluation stays an honest judge of all policies. Only the top
``grpo.top_k`` decoder layers of the policy train.
Output: a HF-format causal LM, plus the first and last logged mean reward and KL.

Departures from the paper: TRL's defaults (one policy update per generation batch, the
"dapo" token-level loss normalisation) unless the config says otherwise; the KL penalty
is TRL's k3 estimator against SFT, off when ``grpo.beta`` is 0.

Run alone: ``run(config, {"sft": SFT_DIR, "reward": REWARD_DIR, "data_prep": DATA_DIR}, OUT_DIR)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.files import read_prompts
from pipeline_lib.generation import chat_messages, reward_scores
from pipeline_lib.models import load_causal_lm, load_sequence_classifier, load_tokenizer, torch_dtype
from pipeline_lib.stages import Stage, training


def reward_model_function(reward_model, tokenizer, system_prompt: str | None):
    """The reward model as a GRPO reward function: one score per (prompt, completion).

    TRL passes the dataset's other columns as keyword arguments: ``prompt_text`` holds the
    plain prompt, so the sequence scored is laid out exactly as in reward training."""

    def reward_model_score(prompts, completions, prompt_text, **_) -> list[float]:
        responses = [completion[-1]["content"] if isinstance(completion, list) else completion for completion in completions]
        return reward_scores(reward_model, tokenizer, list(prompt_text), responses, system_prompt=system_prompt)

    return reward_model_score


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    # --- setup
    section = config.grpo
    sft_model_dir, reward_model_dir, data_dir = inputs["sft"], inputs["reward"], inputs["data_prep"]
    training.seed_everything(config.seed)
    system_prompt = config.model.system_prompt
    # --- data: conversational prompts (the chat template applies), plus the plain text the reward reads
    prompts = read_prompts(data_dir, "prompts_train")
    train_dataset = Dataset.from_list([{"prompt": chat_messages(p, system_prompt), "prompt_text": p} for p in prompts])
    # --- models
    tokenizer = load_tokenizer(sft_model_dir)
    dtype = torch_dtype(config.precision)
    policy = load_causal_lm(sft_model_dir, config.model.trust_remote_code, dtype)
    reward_model = load_sequence_classifier(reward_model_dir, tokenizer.pad_token_id, dtype=dtype)
    reward_model.requires_grad_(False)
    # With LoRA, TRL takes the reference as the policy with its adapter disabled.
    policy, parameter_counts = training.prepare_model(policy, "grpo", section)
    # --- train
    args = GRPOConfig(
        **training.trainer_args("grpo", config, section, out_dir),
        num_generations=section.num_generations,
        max_completion_length=section.max_completion_length,
        temperature=section.temperature,
        top_k=0,
        top_p=1.0,
        beta=section.beta,
        num_iterations=section.num_iterations,
        loss_type=section.loss_type,
        scale_rewards=section.scale_rewards,
        remove_unused_columns=False,
        trust_remote_code=config.model.trust_remote_code,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_model_function(reward_model, tokenizer, system_prompt),
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    train_metrics = training.train_resumable("grpo", trainer, out_dir)
    # --- save
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    training.write_loss_log(trainer, out_dir)
    training.save_model(
        trainer.model, tokenizer, out_dir, "grpo",
        {"sft_model": str(sft_model_dir), "reward_model": str(reward_model_dir), "data": str(data_dir)},
        start_dir=sft_model_dir, section=section, trainer=trainer,
    )
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        **parameter_counts,
        "train_loss": train_metrics.get("train_loss"),
        "first_reward_model_score": first.get("reward"),
        "final_reward_model_score": last.get("reward"),
        "final_kl": last.get("kl"),
        "logged_losses": len(history),
        "resumed_from_checkpoint": train_metrics["resumed_from_checkpoint"],
        "tracking_run_id": training.tracking.finish(),
    }


STAGE = Stage(
    name="grpo",
    run=run,
    summary="GRPO from SFT: groups of sampled responses scored by the reward model, no value model",
    requires=("data_prep", "sft", "reward"),
    policy=True,
    distributed=True,
    key_metrics=("first_reward_model_score", "final_reward_model_score", "final_kl"),
)
