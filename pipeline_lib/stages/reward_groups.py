"""Reward training on prompt groups: every distinct response is forwarded once per step.

TRL's ``RewardTrainer`` takes one (chosen, rejected) pair per example and forwards both
sides, so a prompt whose K responses form many pairs pays two forward passes per pair.
Here the pairs of one prompt form one example: its distinct responses, tokenized once,
and the comparisons as index pairs. The loss is still TRL's Bradley-Terry loss,
-log sigmoid(r(chosen) - r(rejected)); as in InstructGPT (Ouyang et al., 2022, sec. 3.5)
each prompt's comparisons are averaged, so a prompt weighs as one example however many
pairs it has. A group with one pair is exactly TRL's loss on that pair.

The responses of one prompt share its chat prompt (and often their first tokens), so the
shared prefix is forwarded once and its keys and values are repeated for each response
(``shared_prefix_rewards``): in the default preset about half of every sequence is prompt,
and a training step on a 2-core CPU takes about 17% less. It is the same forward; the first batch
checks it against the plain forward, and a model whose rewards differ, or that takes no
cache, is trained with the plain forward (every response forwarded whole).

Written here rather than taken from TRL because TRL has no grouped (K-choose-2) reward
loss; everything else (optimiser, schedule, checkpoints, resume, logging) is TRL's and
transformers' own, through the subclass below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.utils import pad

from pipeline_lib.generation import scored_sequence_ids

logger = logging.getLogger(__name__)


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


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to forward
    after the prefix (the reward is read at a sequence's last token)."""
    shortest = min(len(ids) for ids in sequences)
    length = 0
    while length < shortest - 1 and all(ids[length] == sequences[0][length] for ids in sequences):
        length += 1
    return length


@dataclass
class GroupCollator:
    """A batch of prompt groups. Per group: the tokens all its responses share
    (``prefix_ids``) and the rest of each response, right-padded (``suffix_ids``,
    ``suffix_mask``); the comparisons index the groups' responses in order, each with a
    weight of 1 / (pairs in its group x groups in the batch)."""

    pad_token_id: int

    def __call__(self, groups: list[dict[str, list]]) -> dict[str, Any]:
        prefixes, suffixes, masks, chosen, rejected, weights = [], [], [], [], [], []
        offset = 0
        for group in groups:
            sequences, pairs = group["sequence_ids"], len(group["chosen_index"])
            length = shared_prefix_length(sequences)
            rest = [torch.tensor(ids[length:]) for ids in sequences]
            prefixes.append(torch.tensor(sequences[0][:length], dtype=torch.long))
            suffixes.append(pad(rest, padding_value=self.pad_token_id, padding_side="right"))
            masks.append(pad([torch.ones_like(ids) for ids in rest], padding_value=0, padding_side="right"))
            chosen += [offset + index for index in group["chosen_index"]]
            rejected += [offset + index for index in group["rejected_index"]]
            weights += [1.0 / (pairs * len(groups))] * pairs
            offset += len(sequences)
        return {
            "prefix_ids": prefixes,
            "suffix_ids": suffixes,
            "suffix_mask": masks,
            "chosen_index": torch.tensor(chosen),
            "rejected_index": torch.tensor(rejected),
            "pair_weight": torch.tensor(weights),
        }


def plain_rewards(model, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_token_id: int) -> torch.Tensor:
    """The rewards of every response of ``groups`` ((prefix, suffixes, mask) each), in
    order, each response forwarded whole: one right-padded forward for the whole batch."""
    sequences = [
        torch.cat([prefix, suffix[row_mask.bool()]])
        for prefix, suffixes, mask in groups
        for suffix, row_mask in zip(suffixes, mask)
    ]
    input_ids = pad(sequences, padding_value=pad_token_id, padding_side="right")
    attention_mask = pad([torch.ones_like(ids) for ids in sequences], padding_value=0, padding_side="right")
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)


def shared_prefix_rewards(model, prefix_ids: torch.Tensor, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
    """One group's rewards with the shared prefix forwarded once: its cache (keys and
    values, with their gradients) is repeated for each response, and the responses'
    own tokens continue from its positions. The reward is read at each response's last
    non-pad token, as in the plain forward."""
    count, length = suffix_ids.shape[0], prefix_ids.shape[0]
    if length == 0:
        return model(input_ids=suffix_ids, attention_mask=suffix_mask, use_cache=False).logits.squeeze(-1)
    cache = model(input_ids=prefix_ids[None], use_cache=True).cache
    cache.batch_repeat_interleave(count)
    positions = torch.arange(length, length + suffix_ids.shape[1], device=suffix_ids.device).expand(count, -1)
    attention_mask = torch.cat([suffix_mask.new_ones(count, length), suffix_mask], 1)
    outputs = model(input_ids=suffix_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True)
    return outputs.logits.squeeze(-1)


def shared_prefix_matches(model, group: tuple[torch.Tensor, torch.Tensor, torch.Tensor], pad_token_id: int) -> bool:
    """Whether the shared-prefix forward gives this model's plain rewards (to bf16's
    rounding); False for a model that takes no cache. Compared in eval mode, so dropout
    does not tell them apart."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = plain_rewards(model, [group], pad_token_id).float()
            shared = shared_prefix_rewards(model, *group).float()
    except (TypeError, ValueError, AttributeError, RuntimeError) as error:
        logger.info("reward: the shared-prefix forward failed (%s); every response is forwarded whole", error)
        return False
    finally:
        model.train(training)
    tolerance = 2e-2 * (1.0 + plain.abs().max().item())
    return shared.shape == plain.shape and (shared - plain).abs().max().item() <= tolerance


class GroupedRewardTrainer(RewardTrainer):
    """``RewardTrainer`` whose examples are ``prompt_groups`` rows (already tokenized and
    length-filtered); ``per_device_train_batch_size`` counts prompts, not pairs."""

    def __init__(self, *args, processing_class, **kwargs):
        kwargs.setdefault("data_collator", GroupCollator(pad_token_id=processing_class.pad_token_id))
        super().__init__(*args, processing_class=processing_class, **kwargs)
        self._shared_prefix: bool | None = None  # decided on the first batch

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_groups has tokenized and filtered it

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["sequence_ids", "chosen_index", "rejected_index"]

    def group_rewards(self, model, inputs) -> torch.Tensor:
        groups = list(zip(inputs["prefix_ids"], inputs["suffix_ids"], inputs["suffix_mask"]))
        pad_token_id = self.processing_class.pad_token_id
        if self._shared_prefix is None:
            # Activation checkpointing recomputes the forward without a cache.
            self._shared_prefix = not self.args.activation_checkpointing and shared_prefix_matches(model, groups[0], pad_token_id)
            logger.info("reward: %s", "the shared prefix of each prompt's responses is forwarded once"
                        if self._shared_prefix else "every response is forwarded whole")
        if not self._shared_prefix:
            return plain_rewards(model, groups, pad_token_id)
        return torch.cat([shared_prefix_rewards(model, *group) for group in groups])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        rewards = self.group_rewards(model, inputs)
        outputs = {"rewards": rewards}
        rewards_chosen, rewards_rejected = rewards[inputs["chosen_index"]], rewards[inputs["rejected_index"]]
        margins = rewards_chosen - rewards_rejected
        loss = -(torch.nn.functional.logsigmoid(margins) * inputs["pair_weight"]).sum()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean(rewards**2)
        if mode == "train":
            self._total_train_tokens += sum(
                mask.sum().item() + mask.shape[0] * prefix.shape[0] for prefix, mask in zip(inputs["prefix_ids"], inputs["suffix_mask"])
            )
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():  # the same running metrics TRL logs, over comparisons
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["accuracy"].append((margins > 0).float().mean().item())
            self._metrics[mode]["margin"].append(margins.mean().item())
        return (loss, outputs) if return_outputs else loss
