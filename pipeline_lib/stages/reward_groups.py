"""Reward training on prompt groups: every distinct response is forwarded once per step.

TRL's ``RewardTrainer`` takes one (chosen, rejected) pair per example and forwards both
sides, so a prompt whose K responses form many pairs pays two forward passes per pair.
Here the pairs of one prompt form one example: its distinct responses, tokenized once,
and the comparisons as index pairs. The loss is still TRL's Bradley-Terry loss,
-log sigmoid(r(chosen) - r(rejected)); as in InstructGPT (Ouyang et al., 2022, sec. 3.5)
each prompt's comparisons are averaged, so a prompt weighs as one example however many
pairs it has. A group with one pair is exactly TRL's loss on that pair.

Written here rather than taken from TRL because TRL has no grouped (K-choose-2) reward
loss; everything else (optimiser, schedule, checkpoints, resume, logging) is TRL's and
transformers' own, through the subclass below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.utils import pad

from pipeline_lib.generation import scored_sequence_ids


def prompt_groups(
    rows: list[dict[str, str]], tokenizer, max_length: int | None, system_prompt: str | None = None
) -> list[dict[str, list]]:
    """Pairs grouped by prompt: ``sequence_ids`` (each distinct response once, in
    ``scored_sequence_ids`` layout) and ``chosen_index``/``rejected_index`` into them.
    Pairs with a side longer than ``max_length`` tokens are dropped, as TRL drops them."""
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        group = groups.setdefault(row["prompt"], {"index": {}, "sequence_ids": [], "chosen_index": [], "rejected_index": []})
        sides = []
        for text in (row["chosen"], row["rejected"]):
            if text not in group["index"]:
                ids = scored_sequence_ids(tokenizer, row["prompt"], text, system_prompt)
                fits = max_length is None or len(ids) <= max_length
                group["index"][text] = len(group["sequence_ids"]) if fits else None
                if fits:
                    group["sequence_ids"].append(ids)
            sides.append(group["index"][text])
        if None not in sides:
            group["chosen_index"].append(sides[0])
            group["rejected_index"].append(sides[1])
    return [
        {key: group[key] for key in ("sequence_ids", "chosen_index", "rejected_index")}
        for group in groups.values()
        if group["chosen_index"]
    ]


@dataclass
class GroupCollator:
    """Stacks a batch of prompt groups into one right-padded batch of sequences, with each
    comparison's indices shifted to its group's rows and a weight of 1 / (pairs in its
    group x groups in the batch)."""

    pad_token_id: int

    def __call__(self, groups: list[dict[str, list]]) -> dict[str, torch.Tensor]:
        sequences, chosen, rejected, weights = [], [], [], []
        for group in groups:
            offset, pairs = len(sequences), len(group["chosen_index"])
            sequences += [torch.tensor(ids) for ids in group["sequence_ids"]]
            chosen += [offset + index for index in group["chosen_index"]]
            rejected += [offset + index for index in group["rejected_index"]]
            weights += [1.0 / (pairs * len(groups))] * pairs
        return {
            "input_ids": pad(sequences, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(ids) for ids in sequences], padding_value=0, padding_side="right"),
            "chosen_index": torch.tensor(chosen),
            "rejected_index": torch.tensor(rejected),
            "pair_weight": torch.tensor(weights),
        }


class GroupedRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose examples are ``prompt_groups`` rows (already tokenized and
    length-filtered); ``per_device_train_batch_size`` counts prompts, not pairs."""

    def __init__(self, *args, processing_class, **kwargs):
        kwargs.setdefault("data_collator", GroupCollator(pad_token_id=processing_class.pad_token_id))
        super().__init__(*args, processing_class=processing_class, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_groups has tokenized and filtered it

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["sequence_ids", "chosen_index", "rejected_index"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        rewards_chosen, rewards_rejected = rewards[inputs["chosen_index"]], rewards[inputs["rejected_index"]]
        margins = rewards_chosen - rewards_rejected
        loss = -(torch.nn.functional.logsigmoid(margins) * inputs["pair_weight"]).sum()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean(rewards**2)
        if mode == "train":
            self._total_train_tokens += inputs["attention_mask"].sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():  # the same running metrics TRL logs, over comparisons
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["accuracy"].append((margins > 0).float().mean().item())
            self._metrics[mode]["margin"].append(margins.mean().item())
        return (loss, outputs) if return_outputs else loss
