"""Direct Preference Optimization with TRL's ``DPOTrainer``.

Inputs: the SFT model directory (policy start and frozen reference, as in the DPO
paper) and data prep's ``pairs_train.jsonl`` (prompt, chosen, rejected), or with
``dpo.pair_source: policy`` pairs of SFT's own samples on data prep's training prompts,
ranked by the embedded task's oracle (``policy_pairs``). Only the top
``dpo.top_k`` decoder layers of the policy train; ``dpo.beta`` sets how far it may move
from the reference, and ``dpo.max_kl`` (early stopping on a sampled KL to SFT,
``dpo_kl.SampledKlStop``) how far it may go at most.
Output: a HF-format causal LM, plus the final reward margins/accuracies TRL logs.

Run alone: ``run(config, {"sft": SFT_DIR, "data_prep": DATA_DIR}, OUT_DIR)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.distributed import LAUNCH_DIR, is_main_process, main_process_first, shared_dataset
from pipeline_lib.generation import chat_messages
from pipeline_lib.models import load_tokenizer
from pipeline_lib.data.files import read_jsonl, read_prompts, read_split, write_jsonl
from pipeline_lib.data.schemas import DataValidationError
from pipeline_lib.stages import Stage, training

SAMPLED_PAIRS = "pairs_sampled.jsonl"


def conversational_pairs(rows: list[dict[str, str]], system_prompt: str | None = None):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": chat_messages(row["prompt"], system_prompt),
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    )


def policy_pairs(config: PipelineConfig, policy, tokenizer, data_dir: Path, out_dir: Path) -> tuple[list[dict], dict]:
    """``dpo.pair_source: policy``: ``dpo.samples_per_prompt`` samples of the starting
    policy (SFT) per training prompt, ranked by the embedded task's oracle as data prep
    ranks the base model's (same margin; ``dpo.pairs_per_prompt`` pairs per prompt, widest
    gap first), and the sampling stats. Both default to data prep's settings (resolved in
    the config, so the stage key holds them).

    On-policy pairs: DPO's loss is computed on responses the policy it starts from would
    write, as in the DPO paper's sentiment experiment, not on the base model's.
    Written to ``SAMPLED_PAIRS`` in the stage directory (renamed into place once
    complete), which a resumed stage reads back instead of sampling again; on several
    processes rank 0 samples and the others read its file."""
    from pipeline_lib.data import sentiment_task

    path = Path(out_dir) / SAMPLED_PAIRS
    stats: dict[str, Any] = {}
    with main_process_first():
        if is_main_process() and not path.exists():
            prompts = read_prompts(data_dir, "prompts_train")
            # Seeds seed and seed + 1 drew data prep's training and held-out samples.
            data = config.data.model_copy(update={"pairs_per_prompt": config.dpo.pairs_per_prompt})
            pairs, _, stats = sentiment_task.sample_pairs(
                policy, tokenizer, prompts, data, config.seed + 2, config.model.system_prompt,
                config.dpo.samples_per_prompt, phase="dpo",
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            write_jsonl(partial, pairs)
            partial.replace(path)
    rows = read_jsonl(path)
    if len(rows) < 2:
        raise DataValidationError(
            str(path),
            f"only {len(rows)} pairs of SFT's samples cleared the oracle margin {config.data.pair_margin}; "
            "lower data.pair_margin or raise data.samples_per_prompt",
        )
    return rows, stats


def kl_guard(config: PipelineConfig, policy, reference, tokenizer, rows: list[dict[str, str]]):
    """``dpo.max_kl``'s early stopping, measured on the first ``kl_check_prompts`` training
    prompts, sampled and scored ``evaluate.batch_size`` at a time as evaluation's KL is."""
    from pipeline_lib.stages.dpo_kl import SampledKlStop

    section, batch_size = config.dpo, config.evaluate.batch_size

    def reference_logits(ids, attention_mask, logits_to_keep):
        if reference is not None:
            return reference(input_ids=ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits
        with policy.disable_adapter():  # LoRA: the reference is the policy without its adapter
            return policy(input_ids=ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits

    prompts = list(dict.fromkeys(row["prompt"] for row in rows))[: section.kl_check_prompts]
    return SampledKlStop(
        policy, reference_logits, tokenizer, prompts, section.max_kl, section.kl_check_steps,
        section.kl_check_tokens, config.seed, config.model.system_prompt, batch_size, section.kl_check_probes,
    )


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    # --- setup
    section = config.dpo
    sft_model_dir, data_dir = inputs["sft"], inputs["data_prep"]
    training.seed_everything(config.seed)
    # --- models: the policy trains; the reference is a second frozen copy of SFT, or with
    # LoRA the policy with its adapter disabled (TRL's PEFT path: no second copy)
    tokenizer = load_tokenizer(sft_model_dir)
    policy, reference = training.load_policy_and_reference(config, section, sft_model_dir)
    # --- data: data prep's pairs, or pairs of the policy's own samples before it trains
    sampling: dict[str, Any] = {}
    if section.pair_source == "policy":
        rows, sampling = policy_pairs(config, policy, tokenizer, data_dir, Path(out_dir))
    else:
        rows = read_split(data_dir, "pairs_train")
    train_dataset = conversational_pairs(rows, config.model.system_prompt)
    train_dataset = shared_dataset(train_dataset, Path(out_dir) / LAUNCH_DIR / "pairs_train")  # several processes only
    policy, parameter_counts = training.prepare_model(policy, "dpo", section)
    # --- train: RPO's likelihood term is TRL's "sft" loss, weighed against the DPO loss
    losses = {section.loss_type: 1.0} | ({"sft": section.sft_weight} if section.sft_weight else {})
    args = DPOConfig(
        **training.trainer_args("dpo", config, section, out_dir),
        beta=section.beta,
        loss_type=list(losses),
        loss_weights=list(losses.values()),
        precompute_ref_log_probs=section.precompute_ref_log_probs,
        max_length=section.max_length,
        eval_strategy="no",
    )
    try:
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=train_dataset, processing_class=tokenizer
        )
    except ValueError as error:
        # With precompute_ref_log_probs, TRL scores the reference inside the constructor and
        # fails on an empty dataset (every pair truncated away) with a bare torch.cat error,
        # before train_resumable could name the cause.
        if "non-empty list of Tensors" not in str(error):
            raise
        raise training.no_example_fits("dpo", section.max_length) from error
    guard = kl_guard(config, policy, reference, tokenizer, rows) if section.max_kl is not None else None
    if guard is not None:
        trainer.add_callback(guard)
    train_metrics = training.train_resumable("dpo", trainer, out_dir)
    # --- save
    history = training.write_loss_log(trainer, out_dir)
    last = next((entry for entry in reversed(history) if "rewards/margins" in entry), {})
    training.save_model(
        trainer.model, tokenizer, out_dir, "dpo", {"sft_model": str(sft_model_dir), "data": str(data_dir)},
        start_dir=sft_model_dir, section=section, trainer=trainer,
    )
    return {
        **parameter_counts,
        "pairs": len(rows),
        **sampling,
        "train_loss": train_metrics.get("train_loss"),
        "final_reward_margin": last.get("rewards/margins"),
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "kl_checks": guard.checks if guard else None,
        "stopped_early_at_step": guard.stopped_at_step if guard else None,
        "kept_step": guard.kept_step if guard and guard.stopped_at_step else None,
        "kept_fraction": guard.kept_fraction if guard and guard.stopped_at_step else None,
        "logged_losses": len(history),
        "resumed_from_checkpoint": train_metrics["resumed_from_checkpoint"],
        "tracking_run_id": training.tracking.finish(),
    }


STAGE = Stage(
    name="dpo",
    run=run,
    summary="direct preference optimisation from SFT on the preference pairs",
    requires=("data_prep", "sft"),
    policy=True,
    distributed=True,
    key_metrics=("train_loss", "final_reward_margin", "final_reward_accuracy"),
)
