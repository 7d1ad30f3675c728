"""Data prep: turn the configured sources into the files every later stage reads.

Inputs: the config's ``model`` and ``data`` sections and the base model directory (the
embedded task samples it). Output: the files of ``pipeline_lib.data.files`` (SFT rows,
DPO and reward-model pairs, training and held-out prompts, each a JSON-lines file) and
``data_card.json`` (schema, counts, fingerprints, an example).

Everything is validated before anything expensive: a bad file fails here naming the
file, row and field. Splits are deterministic in (rows, percent, seed).

Run alone: ``python -m pipeline_lib.stages.data_prep --preset tiny OUT_DIR``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data import sentiment_task
from pipeline_lib.data.files import DATA_CARD, EMBEDDED_SENTIMENT, split_path, write_jsonl
from pipeline_lib.data.schemas import DataValidationError, normalize_rows
from pipeline_lib.data.sources import check_embedded_task, is_embedded, load_rows, rows_fingerprint, split_rows, take_percent
from pipeline_lib.stages import BASE_MODEL, Stage

logger = logging.getLogger(__name__)


def _base_sampler(config: PipelineConfig, base_model_dir: Path):
    """Sample the base model and rank with the oracle (``sentiment_task.sample_pairs``): a
    function of (prompts, seed, prefix fractions, samples per prompt, reward margin), the
    model loaded once for every call."""
    from pipeline_lib.models import load_causal_lm, load_tokenizer, torch_dtype

    tokenizer = load_tokenizer(base_model_dir)
    model = load_causal_lm(base_model_dir, config.model.trust_remote_code, torch_dtype(config.precision))

    def sample(
        prompts: list[str], seed: int, prefix_fractions: list[float], samples_per_prompt: int, reward_margin: float | None = None
    ) -> tuple[list, list, dict]:
        return sentiment_task.sample_pairs(
            model, tokenizer, prompts, config.data, seed, config.model.system_prompt, samples_per_prompt, prefix_fractions,
            phase="data_prep", reward_margin=reward_margin,
        )

    return sample


def best_responses(pairs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One SFT row per prompt: the chosen side of its first (widest-gap) pair."""
    first = {}
    for pair in pairs:
        first.setdefault(pair["prompt"], pair["chosen"])
    return [{"prompt": prompt, "completion": completion} for prompt, completion in first.items()]


def _embedded_task(config: PipelineConfig, base_model_dir: Path) -> dict[str, Any]:
    data = config.data
    train_prompts, eval_prompts, reward_prompts = sentiment_task.build_prompts(
        data.num_prompts, data.num_eval_prompts, config.seed, data.extra_reward_eval_prompts
    )
    stats: dict[str, Any] = {}
    if data.pair_source == "template":
        pairs_train = reward_train = sentiment_task.template_pairs(train_prompts, config.seed)
        pairs_eval = sentiment_task.template_pairs(eval_prompts, config.seed + 1)
        reward_eval = pairs_eval + sentiment_task.template_pairs(reward_prompts, config.seed + 2)
    else:
        sample = _base_sampler(config, base_model_dir)
        pairs_train, reward_train, stats = sample(
            train_prompts, config.seed, data.reward_prefix_fractions, data.samples_per_prompt, data.reward_pair_margin
        )
        # Held-out pairs stay whole responses at pair_margin: the reward model is judged on
        # what it will score, by the same pairs whatever its training pairs' margin.
        eval_samples = data.eval_samples_per_prompt or data.samples_per_prompt
        pairs_eval, reward_eval, eval_stats = sample(eval_prompts, config.seed + 1, [], eval_samples)
        stats["held_out_sample_oracle_mean"] = eval_stats["sample_oracle_mean"]
        if reward_prompts:  # sampled on their own, so the policies' held-out pairs are the same with or without them
            reward_eval = reward_eval + sample(reward_prompts, config.seed + 2, [], eval_samples)[1]
    if len(pairs_train) < 2 or not pairs_eval:
        raise DataValidationError(
            EMBEDDED_SENTIMENT,
            f"only {len(pairs_train)} training and {len(pairs_eval)} held-out pairs cleared the oracle margin "
            f"{data.pair_margin}; lower data.pair_margin or raise data.samples_per_prompt",
        )
    return {
        "schema": f"embedded ({data.pair_source} pairs)",
        "pairs_train": pairs_train,
        "pairs_eval": pairs_eval,
        "reward_train": reward_train,
        "reward_eval": reward_eval,
        # SFT imitates the best sample of each prompt: the first pair's chosen side.
        "sft_train": best_responses(pairs_train),
        "sft_eval": best_responses(pairs_eval),
        "prompts_train": train_prompts,
        "prompts_eval": eval_prompts,
        "stats": stats,
    }


def _external_sources(config: PipelineConfig) -> dict[str, Any]:
    data = config.data
    rows = load_rows(data.source, data.split, data.revision, data.max_rows)
    schema, pairs = normalize_rows(rows, "pairs", data.source, data.max_field_chars)
    pairs_train, pairs_eval = split_rows(pairs, data.holdout_percent, config.seed)
    if data.sft_source:
        sft_rows = load_rows(data.sft_source, data.sft_split, None, data.max_rows)
        _, sft = normalize_rows(sft_rows, "sft", data.sft_source, data.max_field_chars)
        sft_train, sft_eval = split_rows(sft, data.holdout_percent, config.seed)
    else:
        sft_train = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs_train]
        sft_eval = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs_eval]
    return {
        "schema": schema,
        "pairs_train": pairs_train,
        "pairs_eval": pairs_eval,
        "sft_train": sft_train,
        "sft_eval": sft_eval,
        "prompts_train": list(dict.fromkeys(p["prompt"] for p in pairs_train)),
        "prompts_eval": list(dict.fromkeys(p["prompt"] for p in pairs_eval)),
        "stats": {},
    }


def collect(config: PipelineConfig, base_model_dir: Path | None) -> dict[str, Any]:
    """Read, normalise, validate and split; apply the policy and reward percentages."""
    data = config.data
    if is_embedded(data.source):
        check_embedded_task(data.source)
        parts = _embedded_task(config, base_model_dir)
    else:
        parts = _external_sources(config)
    files = {
        "sft_train": take_percent(parts["sft_train"], data.train_percent, "sft_train (data.train_percent)", 2),
        "sft_eval": take_percent(parts["sft_eval"], data.eval_percent, "sft_eval (data.eval_percent)"),
        "pairs_train": take_percent(parts["pairs_train"], data.train_percent, "pairs_train (data.train_percent)", 2),
        "pairs_eval": take_percent(parts["pairs_eval"], data.eval_percent, "pairs_eval (data.eval_percent)"),
        "reward_train": take_percent(
            parts.get("reward_train", parts["pairs_train"]), data.reward_train_percent, "reward_train (data.reward_train_percent)", 2
        ),
        "reward_eval": take_percent(
            parts.get("reward_eval", parts["pairs_eval"]), data.reward_eval_percent, "reward_eval (data.reward_eval_percent)"
        ),
        "prompts_train": [{"prompt": p} for p in take_percent(parts["prompts_train"], data.train_percent, "prompts_train", 1)],
        "prompts_eval": [{"prompt": p} for p in take_percent(parts["prompts_eval"], data.eval_percent, "prompts_eval", 1)],
    }
    return {"schema": parts["schema"], "files": files, "stats": parts["stats"]}


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Only the embedded task samples the base model; template and file sources need none.
    prepared = collect(config, inputs.get(BASE_MODEL))
    for name, rows in prepared["files"].items():
        write_jsonl(split_path(out_dir, name), rows)
    counts = {name: len(rows) for name, rows in prepared["files"].items()}
    card = {
        "source": config.data.source,
        "schema": prepared["schema"],
        "counts": counts,
        "fingerprints": {name: rows_fingerprint(rows) for name, rows in prepared["files"].items()},
        "example": prepared["files"]["pairs_train"][0],
        **prepared["stats"],
    }
    (out_dir / DATA_CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False))
    logger.info("data prep: %s", counts)
    return {**{f"rows_{name}": count for name, count in counts.items()}, **prepared["stats"]}


STAGE = Stage(
    name="data_prep",
    run=run,
    summary="read, normalise, validate and split the data (the embedded task samples the base model)",
    sections=("model", "data"),
    key_metrics=("rows_pairs_train", "rows_pairs_eval", "sample_oracle_mean", "held_out_sample_oracle_mean"),
)


if __name__ == "__main__":
    import argparse

    from pipeline_lib.config import load_config
    from pipeline_lib.models import materialize_base_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="default")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(arguments.preset)
    model_dir = materialize_base_model(cfg.model, cfg.output_root / "models", sentiment_task.corpus())
    print(json.dumps(run(cfg, {BASE_MODEL: model_dir}, arguments.out_dir), indent=2))
