"""The grouped reward loss: each prompt's distinct responses forwarded once, TRL's loss kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from pipeline_lib.generation import scored_sequence_ids
from pipeline_lib.models import load_sequence_classifier, load_tokenizer
from pipeline_lib.stages.reward_groups import GroupedRewardTrainer, prompt_groups

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
    args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    groups = prompt_groups(ROWS, tokenizer, max_length=None)
    grouped = GroupedRewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(groups), processing_class=tokenizer)
    batch = grouped.data_collator(groups)
    assert batch["input_ids"].shape[0] == 5  # 3 + 2 distinct responses, not 2 x 4 pair sides
    loss = grouped.compute_loss(model, batch)

    def tokenized(rows):
        return [
            {
                "chosen_ids": scored_sequence_ids(tokenizer, row["prompt"], row["chosen"]),
                "rejected_ids": scored_sequence_ids(tokenizer, row["prompt"], row["rejected"]),
            }
            for row in rows
        ]

    pairwise = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(tokenized(ROWS)), processing_class=tokenizer)
    per_prompt = [
        pairwise.compute_loss(model, pairwise.data_collator(tokenized([row for row in ROWS if row["prompt"] == prompt])))
        for prompt in ("Describe the sea.", "Describe a cat.")
    ]
    assert torch.allclose(loss, torch.stack(per_prompt).mean(), atol=1e-6)
