"""The grouped reward loss: each prompt's distinct responses forwarded once, TRL's loss kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipeline_lib.generation import chat_prompt_ids, scored_sequence_ids
from pipeline_lib.models import load_sequence_classifier, load_tokenizer
from pipeline_lib.stages.reward_groups import (
    GroupedRewardTrainer,
    plain_rewards,
    prompt_groups,
    shared_prefix_length,
    shared_prefix_rewards,
)

ROWS = [
    {"prompt": "Describe the sea.", "chosen": "Lovely and calm.", "rejected": "Grey."},
    {"prompt": "Describe the sea.", "chosen": "Lovely and calm.", "rejected": "Cold and awful."},
    {"prompt": "Describe the sea.", "chosen": "Grey.", "rejected": "Cold and awful."},
    {"prompt": "Describe a cat.", "chosen": "A wonderful friend.", "rejected": "A pest."},
]


@pytest.fixture
def tokenizer_and_model(tiny_base_model: Path):
    tokenizer = load_tokenizer(tiny_base_model)
    model = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id, False, None)
    model.eval()  # no dropout: both losses below must see the same rewards
    return tokenizer, model


def grouped_trainer(tokenizer, model, tmp_path: Path, checkpointing: bool = False):
    """A GroupedRewardTrainer over ROWS, and the one batch of all its groups."""
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, activation_checkpointing=checkpointing)
    groups = prompt_groups(ROWS, tokenizer, max_length=None)
    trainer = GroupedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(groups), processing_class=tokenizer)
    return trainer, trainer.data_collator(groups)


def test_prompt_groups_hold_each_distinct_response_once(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    sea, cat = prompt_groups(ROWS, tokenizer, max_length=None)
    assert len(sea["sequence_ids"]) == 3 and len(cat["sequence_ids"]) == 2
    assert sea["sequence_ids"][0] == scored_sequence_ids(tokenizer, "Describe the sea.", "Lovely and calm.")
    # (Lovely, Grey), (Lovely, Cold), (Grey, Cold) as indices into the group's responses
    assert list(zip(sea["chosen_index"], sea["rejected_index"])) == [(0, 1), (0, 2), (1, 2)]
    assert list(zip(cat["chosen_index"], cat["rejected_index"])) == [(0, 1)]


def test_prompt_groups_drop_pairs_with_a_side_over_max_length(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    rambling = "A wonderful, wonderful friend. " * 20
    rows = [
        *ROWS,
        {"prompt": "Describe a cat.", "chosen": rambling, "rejected": "A pest."},
        {"prompt": "Describe a dog.", "chosen": rambling, "rejected": "Loud."},
    ]
    groups = prompt_groups(rows, tokenizer, max_length=40)
    assert all(len(scored_sequence_ids(tokenizer, row["prompt"], rambling)) > 40 for row in rows[-2:])
    # The over-long response goes with its pairs; the dog, left with none, has no group.
    assert [len(group["chosen_index"]) for group in groups] == [3, 1]
    assert all(len(ids) <= 40 for group in groups for ids in group["sequence_ids"])


def test_grouped_loss_is_trls_pairwise_loss_averaged_per_prompt(tokenizer_and_model, tmp_path: Path) -> None:
    tokenizer, model = tokenizer_and_model
    grouped, batch = grouped_trainer(tokenizer, model, tmp_path)
    # 3 + 2 distinct responses, not 2 x 4 pair sides; each group's chat prompt once
    assert [suffix.shape[0] for suffix in batch["suffix_ids"]] == [3, 2]
    assert batch["prefix_ids"][0].tolist() == scored_sequence_ids(tokenizer, "Describe the sea.", "Grey.")[: len(batch["prefix_ids"][0])]
    assert len(batch["prefix_ids"][0]) >= len(chat_prompt_ids(tokenizer, "Describe the sea."))
    loss = grouped.compute_loss(model, batch)

    def tokenized(rows):
        return [
            {
                "chosen_ids": scored_sequence_ids(tokenizer, row["prompt"], row["chosen"]),
                "rejected_ids": scored_sequence_ids(tokenizer, row["prompt"], row["rejected"]),
            }
            for row in rows
        ]

    pairwise = RewardTrainer(model=model, args=grouped.args, train_dataset=Dataset.from_list(tokenized(ROWS)), processing_class=tokenizer)
    per_prompt = [
        pairwise.compute_loss(model, pairwise.data_collator(tokenized([row for row in ROWS if row["prompt"] == prompt])))
        for prompt in ("Describe the sea.", "Describe a cat.")
    ]
    assert grouped._shared_prefix  # the tiny Llama takes the shared-prefix forward
    assert torch.allclose(loss, torch.stack(per_prompt).mean(), atol=1e-5)


def test_shared_prefix_leaves_every_sequence_a_token() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # the reward is read at the last token
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_shared_prefix_forward_gives_the_plain_rewards_and_gradients(tokenizer_and_model, tmp_path: Path) -> None:
    tokenizer, model = tokenizer_and_model
    trainer, batch = grouped_trainer(tokenizer, model, tmp_path)
    results = []
    groups = list(zip(batch["prefix_ids"], batch["suffix_ids"], batch["suffix_mask"]))
    for shared in (False, True):
        model.zero_grad()
        if shared:
            rewards = torch.cat([shared_prefix_rewards(model, *group) for group in groups])
        else:
            rewards = plain_rewards(model, groups, tokenizer.pad_token_id)
        (rewards * torch.arange(1.0, len(rewards) + 1)).sum().backward()
        results.append((rewards.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (shared, shared_grads) = results
    assert torch.allclose(plain, shared, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=1e-4, rtol=1e-3), name


class _NoCache(torch.nn.Module):
    """A scalar-head model that takes no cache (as some architectures' forwards do not)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def test_a_model_without_a_cache_is_trained_on_whole_responses(tokenizer_and_model, tmp_path: Path) -> None:
    tokenizer, model = tokenizer_and_model
    trainer, batch = grouped_trainer(tokenizer, model, tmp_path)
    wrapped = _NoCache(model)
    loss = trainer.compute_loss(wrapped, batch)
    assert trainer._shared_prefix is False
    trainer._shared_prefix = None
    assert torch.allclose(loss, trainer.compute_loss(model, batch), atol=1e-5)  # same loss either way
    assert trainer._shared_prefix is True


def test_activation_checkpointing_forwards_whole_responses(tokenizer_and_model, tmp_path: Path) -> None:
    """Checkpointing recomputes each layer's forward without a cache: the plain forward is used."""
    tokenizer, model = tokenizer_and_model
    trainer, batch = grouped_trainer(tokenizer, model, tmp_path, checkpointing=True)
    trainer.compute_loss(model, batch)
    assert trainer._shared_prefix is False
