"""Supervised fine-tuning with TRL's ``SFTTrainer``.

Inputs: the base model directory and data prep's ``sft_train.jsonl``/``sft_eval.jsonl``
(prompt, completion). Rows become conversational prompt/completion pairs, so the
model's chat template applies and the loss covers the completion only (TRL's
``completion_only_loss``). Only the top ``sft.top_k`` decoder layers train (or LoRA
adapters on them: ``sft.adapter: lora``).
Output: a HF-format causal LM (safetensors) with tokenizer and model card.

Run alone: ``run(config, {"base_model": BASE_DIR, "data_prep": DATA_DIR}, OUT_DIR)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.files import read_split
from pipeline_lib.generation import chat_messages
from pipeline_lib.models import load_causal_lm, load_tokenizer, torch_dtype
from pipeline_lib.stages import BASE_MODEL, Stage, training


def conversational(rows: list[dict[str, str]], system_prompt: str | None = None):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": chat_messages(row["prompt"], system_prompt),
                "completion": [{"role": "assistant", "content": row["completion"]}],
            }
            for row in rows
        ]
    )


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    # --- setup
    section = config.sft
    base_model_dir, data_dir = inputs[BASE_MODEL], inputs["data_prep"]
    training.seed_everything(config.seed)
    # --- data
    system_prompt = config.model.system_prompt
    train_dataset = conversational(read_split(data_dir, "sft_train"), system_prompt)
    eval_dataset = conversational(read_split(data_dir, "sft_eval"), system_prompt)
    # --- model
    tokenizer = load_tokenizer(base_model_dir)
    model = load_causal_lm(base_model_dir, config.model.trust_remote_code, torch_dtype(config.precision))
    model, parameter_counts = training.prepare_model(model, "sft", section)
    # --- train
    args = SFTConfig(
        **training.trainer_args("sft", config, section, out_dir),
        max_length=section.max_length,
        eval_strategy="no",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
    train_metrics = training.train_resumable("sft", trainer, out_dir)
    eval_metrics = trainer.evaluate(eval_dataset)
    # --- save
    history = training.write_loss_log(trainer, out_dir)
    training.save_model(
        trainer.model, tokenizer, out_dir, "sft", {"base_model": str(base_model_dir), "data": str(data_dir)},
        start_dir=base_model_dir, section=section, trainer=trainer,
    )
    return {
        **parameter_counts,
        "train_loss": train_metrics.get("train_loss"),
        "eval_loss": eval_metrics.get("eval_loss"),
        "logged_losses": len(history),
        "resumed_from_checkpoint": train_metrics["resumed_from_checkpoint"],
        "tracking_run_id": training.tracking.finish(),
    }


STAGE = Stage(
    name="sft",
    run=run,
    summary="supervised fine-tuning of the base model on the best responses",
    requires=("data_prep",),
    policy=True,
    distributed=True,
    key_metrics=("train_loss", "eval_loss", "trainable_parameters"),
)
