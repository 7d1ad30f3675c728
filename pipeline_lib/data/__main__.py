"""Check a data source before training on it: ``python -m pipeline_lib.data SOURCE``.

Loads SOURCE (a local json/jsonl/parquet/csv file, a hub dataset name, or
``embedded:sentiment``), normalises it as preference pairs (``--kind pairs``) or SFT
rows (``--kind sft``), and prints the detected schema, the train/held-out row counts of
the same deterministic split data prep makes (default holdout percent and seed), and
one normalised example as JSON. Invalid data prints every problem, naming the file, row
and field, to stderr and exits with status 2.

    python -m pipeline_lib.data comparisons.jsonl
    python -m pipeline_lib.data trl-lib/tldr --kind sft --revision main --max-rows 1000
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline_lib.config import DataSection, PipelineConfig
from pipeline_lib.data import sentiment_task
from pipeline_lib.data.schemas import DataValidationError, normalize_rows
from pipeline_lib.data.sources import check_embedded_task, is_embedded, load_rows, split_rows


def describe_embedded(source: str, data: DataSection, seed: int) -> None:
    """The embedded task is generated, not read: show its prompt counts and a template pair."""
    check_embedded_task(source)
    train_prompts, eval_prompts, reward_prompts = sentiment_task.build_prompts(
        data.num_prompts, data.num_eval_prompts, seed, data.extra_reward_eval_prompts
    )
    print(f"source: {source} (generated; held-out prompts use subjects no training prompt mentions)")
    print(f"prompts: train {len(train_prompts)}, held out {len(eval_prompts)}, held out for the reward model alone {len(reward_prompts)}")
    print("example template pair:")
    print(json.dumps(sentiment_task.template_pairs(train_prompts[:1], seed)[0], indent=2, ensure_ascii=False))


def describe_rows(arguments: argparse.Namespace, data: DataSection, seed: int) -> None:
    rows = load_rows(arguments.source, arguments.split, arguments.revision, arguments.max_rows)
    schema, normalised = normalize_rows(rows, arguments.kind, arguments.source, data.max_field_chars)
    train, held_out = split_rows(normalised, data.holdout_percent, seed)
    print(f"source: {arguments.source}")
    print(f"schema: {schema} ({arguments.kind})")
    print(
        f"rows: {len(normalised)} (train {len(train)}, held out {len(held_out)}; "
        f"holdout {data.holdout_percent:g}%, seed {seed})"
    )
    print("example:")
    print(json.dumps(normalised[0], indent=2, ensure_ascii=False))


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_lib.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="local json/jsonl/parquet/csv file, hub dataset name, or embedded:sentiment")
    parser.add_argument("--kind", choices=("pairs", "sft"), default="pairs", help="read preference pairs or SFT rows")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--revision", default=None, help="hub dataset revision (branch, tag or commit)")
    parser.add_argument("--max-rows", type=non_negative, default=0, help="read at most this many rows (0 = all)")
    arguments = parser.parse_args(argv)
    # The split data prep makes unless the config says otherwise.
    data, seed = DataSection(), PipelineConfig.model_fields["seed"].default
    try:
        if is_embedded(arguments.source):
            describe_embedded(arguments.source, data, seed)
        else:
            describe_rows(arguments, data, seed)
    except DataValidationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
