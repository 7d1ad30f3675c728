"""Reward model with TRL's ``RewardTrainer``, scored by its own pairwise accuracy.

Inputs: the SFT model directory (the reward model starts from it, with a scalar
``score`` head) and data prep's ``reward_train.jsonl``/``reward_eval.jsonl``
(prompt, chosen, rejected). Trained on the Bradley-Terry pairwise loss, with each
prompt's pairs as one example that forwards every distinct response once
(``reward_groups``; ``reward.per_device_train_batch_size`` counts prompts); only the top
``reward.top_k`` decoder layers and the head train. ``reward.num_layers`` keeps only the
bottom N layers of SFT (a shallower, cheaper reward model; PPO's value model inherits it).
Every sequence is laid out as PPO's rollouts are (chat prompt, response, EOS; see
``generation.scored_sequence_ids``), so the reward is read at the same token in reward
training, in PPO and in evaluation.
Output: a HF-format sequence-classification model and ``pairwise_accuracy``: the share
of held-out pairs where r(chosen) > r(rejected), computed here on the saved model
rather than taken from the trainer's running average; and the same share apart for the
pairs whose chosen response is the longer and the shorter one (``accuracy_by_length``).

Run alone: ``run(config, {"sft": SFT_DIR, "data_prep": DATA_DIR}, OUT_DIR)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.generation import pair_response_scores
from pipeline_lib.metrics import pairwise_accuracy as accuracy_of_scores, ranked_right
from pipeline_lib.models import load_sequence_classifier, load_tokenizer, torch_dtype
from pipeline_lib.data.files import read_split
from pipeline_lib.data.sources import rows_fingerprint
from pipeline_lib.distributed import is_main_process
from pipeline_lib.stages import Stage, training


def pair_scores(model, tokenizer, pairs: list[dict[str, str]], system_prompt: str | None = None) -> tuple[list[float], list[float]]:
    """The reward model's scores of each pair's chosen and rejected responses; each response
    is scored once however many pairs it is in."""
    score_of = pair_response_scores(model, tokenizer, pairs, system_prompt)
    return [score_of[(pair["prompt"], pair["chosen"])] for pair in pairs], [score_of[(pair["prompt"], pair["rejected"])] for pair in pairs]


# The reward stage's scores of the held-out pairs, kept beside the model: evaluation reads
# them instead of scoring the same pairs with the same model again (~20 s of the default
# run's critical path for its ~2000 pairs).
HELD_OUT_SCORES = "held_out_scores.json"


def save_held_out_scores(
    out_dir: Path, pairs: list[dict[str, str]], chosen: list[float], rejected: list[float], precision: str
) -> None:
    record = {"pairs_fingerprint": rows_fingerprint(pairs), "precision": precision, "chosen": chosen, "rejected": rejected}
    (Path(out_dir) / HELD_OUT_SCORES).write_text(json.dumps(record))


def stored_pair_scores(reward_dir: Path, pairs: list[dict[str, str]]) -> tuple[list[float], list[float]] | None:
    """The reward stage's own scores of exactly these pairs, where they are the published
    model's: trained in float32, it is published as it scored them. None where none were
    kept (a reward model from elsewhere), they are of other pairs, or the stage ran in
    bf16 or fp16 (its weights are published rounded to bf16, or it scored under fp16
    autocast): the caller scores the pairs itself."""
    path = Path(reward_dir) / HELD_OUT_SCORES
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("precision") != "fp32" or record.get("pairs_fingerprint") != rows_fingerprint(pairs):
        return None
    return record["chosen"], record["rejected"]


def pairwise_accuracy(model, tokenizer, pairs: list[dict[str, str]], system_prompt: str | None = None) -> float:
    """Share of pairs the reward model ranks the right way round (ties count as wrong)."""
    return accuracy_of_scores(*pair_scores(model, tokenizer, pairs, system_prompt))


def accuracy_by_length(tokenizer, pairs: list[dict[str, str]], chosen_scores: list[float], rejected_scores: list[float]) -> dict[str, Any]:
    """Held-out accuracy apart for the pairs whose chosen response is the longer one and for
    those where it is the shorter (in tokens), with each group's pair count. A reward model
    that learned length along with content ranks the second group worse: the gap is the
    length bias PPO can exploit. An empty group's accuracy is None."""
    lengths: dict[str, int] = {}  # a held-out response is in several pairs; tokenized once

    def length(text: str) -> int:
        if text not in lengths:
            lengths[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return lengths[text]

    groups: dict[str, list[float]] = {"chosen_longer": [], "chosen_shorter": []}
    for pair, right in zip(pairs, ranked_right(chosen_scores, rejected_scores)):
        chosen, rejected = length(pair["chosen"]), length(pair["rejected"])
        if chosen != rejected:
            groups["chosen_longer" if chosen > rejected else "chosen_shorter"].append(right)
    result: dict[str, Any] = {}
    for name, rights in groups.items():
        result[f"pairwise_accuracy_{name}"] = sum(rights) / len(rights) if rights else None
        result[f"eval_pairs_{name}"] = len(rights)
    return result


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from trl import RewardConfig

    from pipeline_lib.stages.reward_groups import GroupedRewardTrainer, prompt_groups

    # --- setup
    section = config.reward
    sft_model_dir, data_dir = inputs["sft"], inputs["data_prep"]
    training.seed_everything(config.seed)
    # --- data
    train_rows = read_split(data_dir, "reward_train")
    eval_rows = read_split(data_dir, "reward_eval")
    # --- model
    tokenizer = load_tokenizer(sft_model_dir)
    model = load_sequence_classifier(
        sft_model_dir, tokenizer.pad_token_id, config.model.trust_remote_code, section.num_layers, torch_dtype(config.precision)
    )
    model, parameter_counts = training.prepare_model(model, "reward", section)
    system_prompt = config.model.system_prompt
    # No accuracy before training: the score head starts random, so that reading is chance
    # whatever the data, and it cost a full pass over the held-out pairs (~30 s of the
    # default run's critical path on one CPU core).
    # --- train
    args = RewardConfig(
        **training.trainer_args("reward", config, section, out_dir),
        max_length=section.max_length,
        eval_strategy="no",
    )
    groups = prompt_groups(train_rows, tokenizer, section.max_length, system_prompt)
    trainer = GroupedRewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(groups), processing_class=tokenizer
    )
    train_metrics = training.train_resumable("reward", trainer, out_dir)
    # --- evaluate and save
    chosen_scores, rejected_scores = pair_scores(trainer.model, tokenizer, eval_rows, system_prompt)
    accuracy = accuracy_of_scores(chosen_scores, rejected_scores)
    history = training.write_loss_log(trainer, out_dir)
    training.save_model(
        trainer.model, tokenizer, out_dir, "reward", {"sft_model": str(sft_model_dir), "data": str(data_dir)},
        start_dir=sft_model_dir, section=section, trainer=trainer,
    )
    if is_main_process():
        save_held_out_scores(out_dir, eval_rows, chosen_scores, rejected_scores, config.precision)
    return {
        **parameter_counts,
        "train_loss": train_metrics.get("train_loss"),
        "pairwise_accuracy": accuracy,
        **accuracy_by_length(tokenizer, eval_rows, chosen_scores, rejected_scores),
        "train_prompts": len(groups),
        "train_pairs": sum(len(group["chosen_index"]) for group in groups),
        "eval_pairs": len(eval_rows),
        "logged_losses": len(history),
        "resumed_from_checkpoint": train_metrics["resumed_from_checkpoint"],
        "tracking_run_id": training.tracking.finish(),
    }


STAGE = Stage(
    name="reward",
    run=run,
    summary="reward model on preference pairs, judged by held-out pairwise accuracy",
    requires=("data_prep", "sft"),
    distributed=True,
    key_metrics=("train_loss", "pairwise_accuracy"),
)
