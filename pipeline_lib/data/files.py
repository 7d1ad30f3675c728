"""The files data prep writes and every later stage reads: one contract, one place.

A prepared-data directory holds one JSON-lines file per split and purpose, plus
``data_card.json``; stages name the files through these constants and read them with
``read_jsonl``, never by importing the data prep stage.

    sft_train / sft_eval          prompt, completion           (SFT)
    pairs_train / pairs_eval      prompt, chosen, rejected     (DPO)
    reward_train / reward_eval    prompt, chosen, rejected     (reward model)
    prompts_train                 prompt                       (on-policy stages: PPO, GRPO)
    prompts_eval                  prompt                       (evaluation, held out)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EMBEDDED_SENTIMENT = "embedded:sentiment"
SPLIT_FILES = (
    "sft_train",
    "sft_eval",
    "pairs_train",
    "pairs_eval",
    "reward_train",
    "reward_eval",
    "prompts_train",
    "prompts_eval",
)
DATA_CARD = "data_card.json"


def split_path(data_dir: Path | str, name: str) -> Path:
    if name not in SPLIT_FILES:
        raise KeyError(f"{name!r} is not a prepared-data file; choose from {', '.join(SPLIT_FILES)}")
    return Path(data_dir) / f"{name}.jsonl"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_split(data_dir: Path | str, name: str) -> list[dict[str, Any]]:
    """The rows of one prepared file, e.g. ``read_split(data_dir, "pairs_train")``."""
    return read_jsonl(split_path(data_dir, name))


def read_prompts(data_dir: Path | str, name: str) -> list[str]:
    return [row["prompt"] for row in read_split(data_dir, name)]


def data_card(data_dir: Path | str) -> dict[str, Any]:
    return json.loads((Path(data_dir) / DATA_CARD).read_text())
