"""Evaluate every policy on held-out prompts, honestly, and write what lets anyone re-check it.

Inputs: the base model, data prep's directory (held-out ``prompts_eval`` and
``reward_eval``), the reward model, and every policy stage of the run (SFT always; DPO,
PPO, GRPO, ... whichever ran): each input other than data prep and the reward model is a
policy, judged in the order given, the base model first. Per policy:

* mean reward-model score, its gain over SFT, and win rate against SFT judged by the reward model;
* the oracle's mean (VADER) and its gain over SFT where the task has an oracle (the embedded task);
  these read one response per prompt, decoded as ``evaluate.temperature`` says (greedy by default);
* KL(policy || SFT), estimated from ``evaluate.kl_samples`` responses per prompt sampled at
  temperature 1 from the policy: the mean over samples of log pi(y|x) - log pi_sft(y|x),
  summed over the response's tokens (>= 0 in expectation; exactly 0 for SFT itself);
* mean length in words and distinct-2, and each over SFT's on the same prompts;
and the reward model's pairwise accuracy on held-out pairs. Every gain, win rate, KL and
ratio to SFT carries a 95% interval from a paired bootstrap over the held-out prompts
(``evaluate.bootstrap_resamples`` resamples, seeded by ``seed``): each resample draws the
same prompts for the policy and for SFT. The reward model's accuracy carries one too, from
a bootstrap over the held-out pairs' prompts.

Outputs: ``eval.json`` (the figures), ``generations.jsonl`` (every prompt, policy,
response and its scores), ``report.md`` (table and examples) and ``eval.png`` (oracle
score against sampled KL to SFT, and the distribution of oracle scores per policy).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from statistics import fmean
from typing import Any

from pipeline_lib import progress
from pipeline_lib.config import PipelineConfig
from pipeline_lib.data import sentiment_task
from pipeline_lib.data.files import EMBEDDED_SENTIMENT, data_card, read_prompts, read_split, write_jsonl
from pipeline_lib.errors import StageFailed
from pipeline_lib.generation import generate_responses, reward_scores, token_logprobs
from pipeline_lib.metrics import (
    bootstrap_interval,
    distinct_n,
    distinct_n_ratio,
    mean_words,
    paired_differences,
    per_prompt_wins,
    policy_kl,
    ranked_right,
    ratio_of_sums,
    win_rate,
)
from pipeline_lib.models import load_causal_lm, load_sequence_classifier, load_tokenizer, torch_dtype
from pipeline_lib.stages import BASE_MODEL, Stage
from pipeline_lib.stages.reward import pair_scores, stored_pair_scores

logger = logging.getLogger(__name__)
NOT_POLICIES = ("data_prep", "reward")  # the inputs evaluation reads that are not policies
CONFIDENCE = 0.95


def _has_oracle(data_dir: Path) -> bool:
    return data_card(data_dir).get("source") == EMBEDDED_SENTIMENT


def policies_of(inputs: dict[str, Path]) -> dict[str, Path]:
    """The policies to judge, by name: the base model, then every policy input in order."""
    policies = {"base": inputs[BASE_MODEL]} if inputs.get(BASE_MODEL) else {}
    policies.update({name: Path(path) for name, path in inputs.items() if name not in (BASE_MODEL, *NOT_POLICIES)})
    return policies


def run(config: PipelineConfig, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    section = config.evaluate
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policies, reward_model_dir, data_dir = policies_of(inputs), inputs["reward"], inputs["data_prep"]
    if "sft" not in policies:
        raise StageFailed("evaluate needs the SFT policy: it is the reference for KL and win rate")
    prompts = read_prompts(data_dir, "prompts_eval")
    if section.num_prompts:
        prompts = prompts[: section.num_prompts]
    with_oracle = _has_oracle(data_dir)
    system_prompt = config.model.system_prompt
    tokenizer = load_tokenizer(policies["sft"])
    dtype = torch_dtype(config.precision)
    reward_model = load_sequence_classifier(reward_model_dir, tokenizer.pad_token_id, dtype=dtype)
    sft_model = load_causal_lm(policies["sft"], dtype=dtype)

    # --- generate and score every policy; sample from it for KL to SFT
    per_policy: dict[str, dict[str, list]] = {}
    seconds = {"responses": 0.0, "sampled_kl": 0.0}
    for name in policies:
        progress.set_phase(f"evaluate {name}")
        model = sft_model if name == "sft" else load_causal_lm(policies[name], dtype=dtype)
        started = time.perf_counter()
        responses = [
            texts[0]
            for texts in generate_responses(
                model,
                tokenizer,
                prompts,
                max_new_tokens=section.max_new_tokens,
                temperature=section.temperature,
                batch_size=section.batch_size,
                seed=config.seed,
                system_prompt=system_prompt,
            )
        ]
        per_policy[name] = {
            "responses": responses,
            "reward": reward_scores(reward_model, tokenizer, prompts, responses, section.batch_size, system_prompt),
            "oracle": [sentiment_task.oracle_score(text) for text in responses] if with_oracle else [],
        }
        seconds["responses"] += time.perf_counter() - started
        started = time.perf_counter()
        per_policy[name]["kl"] = kl_to_sft(model, sft_model, tokenizer, prompts, config) if name != "sft" else (
            [0.0] * len(prompts) if section.kl_samples else []  # SFT against itself: 0 by construction
        )
        seconds["sampled_kl"] += time.perf_counter() - started
        logger.info("evaluate: %s done", name)
    progress.set_phase(None)

    # --- aggregate
    table = {name: policy_row(scores, per_policy["sft"], section.bootstrap_resamples, config.seed) for name, scores in per_policy.items()}
    pairs = read_split(data_dir, "reward_eval")
    scores = stored_pair_scores(reward_model_dir, pairs) or pair_scores(reward_model, tokenizer, pairs, system_prompt)
    reward_accuracy, reward_accuracy_interval = pairwise_accuracy_by_prompt(pairs, *scores, section.bootstrap_resamples, config.seed)
    results = {
        "policies": table,
        "reward_model_pairwise_accuracy": reward_accuracy,
        "reward_model_pairwise_accuracy_ci95": reward_accuracy_interval,
        "held_out_prompts": len(prompts),
        "held_out_pairs": len(pairs),
        "oracle": "vader" if with_oracle else None,
        "intervals": {
            "method": "paired percentile bootstrap over held-out prompts",
            "confidence": CONFIDENCE,
            "resamples": section.bootstrap_resamples,
            "seed": config.seed,
            "prompts": len(prompts),
        },
        "responses": {"per_prompt": 1, "temperature": section.temperature, "max_new_tokens": section.max_new_tokens},
        "sampled_kl": {
            "samples_per_prompt": section.kl_samples,
            "temperature": 1.0,
            "max_new_tokens": section.max_new_tokens,
            "estimator": "mean over samples y ~ policy of sum_t log pi(y_t|x,y<t) - log pi_sft(y_t|x,y<t)",
        },
        "seconds": {part: round(value, 1) for part, value in seconds.items()},
    }

    # --- write
    generations = [
        {
            "prompt": prompt,
            "policy": name,
            "response": scores["responses"][index],
            "reward_model": scores["reward"][index],
            "oracle": scores["oracle"][index] if scores["oracle"] else None,
            "sampled_kl_to_sft": scores["kl"][index] if scores["kl"] else None,
        }
        for name, scores in per_policy.items()
        for index, prompt in enumerate(prompts)
    ]
    write_jsonl(out_dir / "generations.jsonl", generations)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    plot = plot_evaluation(table, per_policy, out_dir / "eval.png") if with_oracle else None
    (out_dir / "report.md").write_text(render_report(results, per_policy, prompts, section.num_examples, plot))
    return flatten_metrics(results)


def kl_to_sft(model, sft_model, tokenizer, prompts: list[str], config: PipelineConfig) -> list[float]:
    """Per-prompt KL(policy || SFT) estimates from ``kl_samples`` samples of the policy; [] when 0."""
    section = config.evaluate
    if not section.kl_samples:
        return []
    return policy_kl(
        model, lambda pairs: token_logprobs(sft_model, pairs, tokenizer.pad_token_id, section.batch_size), tokenizer,
        prompts, section.kl_samples, section.max_new_tokens, section.batch_size, config.seed, config.model.system_prompt,
    )


def rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return [round(bound, 6) for bound in interval] if interval else None


def pairwise_accuracy_by_prompt(
    pairs: list[dict[str, str]], chosen: list[float], rejected: list[float], resamples: int, seed: int
) -> tuple[float, list[float] | None]:
    """The reward model's share of held-out pairs ranked right (ties wrong), with its 95%
    interval from a bootstrap over the pairs' prompts: a prompt's pairs share its responses,
    so the prompt, not the pair, is the unit resampled."""
    right: dict[str, float] = {}
    count: dict[str, float] = {}
    for pair, hit in zip(pairs, ranked_right(chosen, rejected), strict=True):
        right[pair["prompt"]] = right.get(pair["prompt"], 0.0) + hit
        count[pair["prompt"]] = count.get(pair["prompt"], 0.0) + 1
    accuracy, interval = ratio_of_sums(list(right.values()), list(count.values()), resamples, seed, CONFIDENCE)
    return accuracy, rounded(interval)


def policy_row(scores: dict[str, list], sft: dict[str, list], resamples: int, seed: int) -> dict[str, Any]:
    """One policy's figures; every gain, win rate, KL and ratio to SFT with its paired-bootstrap
    interval. One seed for every interval: each draws the same prompt resamples, policy after
    policy, figure after figure."""

    def interval(per_prompt: list[float]) -> list[float] | None:
        return rounded(bootstrap_interval(per_prompt, resamples, seed, CONFIDENCE)) if per_prompt else None

    distinct_ratio, distinct_interval = distinct_n_ratio(scores["responses"], sft["responses"], 2, resamples, seed, CONFIDENCE)
    length_ratio, length_interval = ratio_of_sums(
        [len(text.split()) for text in scores["responses"]], [len(text.split()) for text in sft["responses"]],
        resamples, seed, CONFIDENCE,
    )

    oracle_gains = paired_differences(scores["oracle"], sft["oracle"]) if scores["oracle"] else []
    reward_gains = paired_differences(scores["reward"], sft["reward"])
    wins = per_prompt_wins(scores["reward"], sft["reward"])
    return {
        "oracle_mean": fmean(scores["oracle"]) if scores["oracle"] else None,
        "oracle_gain_vs_sft": fmean(oracle_gains) if oracle_gains else None,
        "oracle_gain_vs_sft_ci95": interval(oracle_gains),
        "reward_model_mean": fmean(scores["reward"]),
        "reward_model_gain_vs_sft": fmean(reward_gains),
        "reward_model_gain_vs_sft_ci95": interval(reward_gains),
        "win_rate_vs_sft": win_rate(scores["reward"], sft["reward"]),
        "win_rate_vs_sft_ci95": interval(wins),
        "sampled_kl_to_sft": fmean(scores["kl"]) if scores["kl"] else None,
        "sampled_kl_to_sft_ci95": interval(scores["kl"]),
        "mean_length_words": mean_words(scores["responses"]),
        "length_ratio_to_sft": length_ratio,
        "length_ratio_to_sft_ci95": rounded(length_interval),
        "distinct_2": distinct_n(scores["responses"], 2),
        "distinct_2_ratio_to_sft": distinct_ratio,
        "distinct_2_ratio_to_sft_ci95": rounded(distinct_interval),
    }


def flatten_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """Flat float metrics for the manifest and tracking: an interval becomes ``..._ci95_low`` and ``..._ci95_high``."""
    accuracy_interval = results["reward_model_pairwise_accuracy_ci95"] or [None, None]
    flat: dict[str, float | None] = {
        "reward_model_pairwise_accuracy": results["reward_model_pairwise_accuracy"],
        "reward_model_pairwise_accuracy_ci95_low": accuracy_interval[0],
        "reward_model_pairwise_accuracy_ci95_high": accuracy_interval[1],
    }
    for name, row in results["policies"].items():
        for metric, value in row.items():
            if isinstance(value, list):
                flat.update({f"{name}/{metric}_low": value[0], f"{name}/{metric}_high": value[1]})
            elif metric.endswith("_ci95"):
                flat.update({f"{name}/{metric}_low": None, f"{name}/{metric}_high": None})
            else:
                flat[f"{name}/{metric}"] = value
    return flat


def render_report(
    results: dict[str, Any], per_policy: dict[str, dict[str, list]], prompts: list[str], num_examples: int, plot: str | None
) -> str:
    first_row = next(iter(results["policies"].values()))
    metrics = [metric for metric in first_row if not metric.endswith("_ci95")]

    def cell(row: dict[str, Any], metric: str) -> str:
        value, bounds = row[metric], row.get(f"{metric}_ci95")
        if value is None:
            return "n/a"
        return f"{value:.3f} [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else f"{value:.3f}"

    lines = ["# Evaluation", "", f"Held-out prompts: {results['held_out_prompts']}. "
             f"Reward model pairwise accuracy on {results['held_out_pairs']} held-out pairs: "
             f"{cell(results, 'reward_model_pairwise_accuracy')}.", ""]
    lines += intervals_note(results)
    lines.append("| policy | " + " | ".join(metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, row in results["policies"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row, m) for m in metrics) + " |")
    if plot:
        lines += ["", f"![oracle score against sampled KL to SFT]({plot})"]
    lines += ["", "## Examples (same held-out prompts for every policy)", ""]
    for index, prompt in enumerate(prompts[:num_examples]):
        lines.append(f"**Prompt:** {prompt}")
        lines.append("")
        for name, scores in per_policy.items():
            oracle = f", oracle {scores['oracle'][index]:+.2f}" if scores["oracle"] else ""
            response = scores["responses"][index].replace("\n", " ")
            lines.append(f"- *{name}* (reward {scores['reward'][index]:+.2f}{oracle}): {response}")
        lines.append("")
    return "\n".join(lines)


def intervals_note(results: dict[str, Any]) -> list[str]:
    """What the table's brackets and its KL rest on, in words."""
    intervals, responses, kl = results.get("intervals"), results.get("responses"), results.get("sampled_kl")
    if not intervals:
        return []
    decoding = "greedy" if not responses["temperature"] else f"sampled at temperature {responses['temperature']}"
    note = (
        f"Brackets: {intervals['confidence']:.0%} intervals from a paired bootstrap over the {intervals['prompts']} held-out "
        f"prompts ({intervals['resamples']} resamples, seed {intervals['seed']}; each resample draws the same prompts for "
        f"the policy and for SFT). Rewards, oracle scores, win rates, lengths and distinct-2 read one {decoding} response "
        f"per prompt and policy (at most {responses['max_new_tokens']} tokens)."
    )
    if kl["samples_per_prompt"]:
        note += (
            f" sampled_kl_to_sft is KL(policy || SFT) in nats per response, from {kl['samples_per_prompt']} responses per "
            f"prompt sampled at temperature 1 ({kl['samples_per_prompt'] * intervals['prompts']} per policy): the mean of "
            "log pi(y|x) - log pi_sft(y|x) summed over the response's tokens."
        )
    else:
        note += " KL to SFT was not estimated (evaluate.kl_samples = 0)."
    return [note, ""]


def frontier_axes(axes, points: list[dict[str, Any]], title: str = "Oracle score vs sampled KL") -> None:
    """Oracle score against sampled KL to SFT, one marker per point (``name``, ``kl``,
    ``kl_ci95``, ``oracle``, optionally ``marker`` and ``color``); base and SFT, the
    references, stand out. Shared with ``benchmarks/frontier.py``."""
    markers = {"base": ("s", "black"), "sft": ("D", "tab:red")}
    for point in points:
        if point.get("kl") is None or point.get("oracle") is None:
            continue
        marker, color = markers.get(point["name"], (point.get("marker", "o"), point.get("color")))
        low, high = point.get("kl_ci95") or (point["kl"], point["kl"])
        axes.errorbar(
            point["kl"], point["oracle"], xerr=[[point["kl"] - low], [high - point["kl"]]], fmt=marker, color=color,
            markersize=8, capsize=3,
        )
        axes.annotate(point["name"], (point["kl"], point["oracle"]), xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("KL(policy || SFT), sampled, nats per response")
    axes.set_ylabel("mean oracle score (VADER)")
    axes.set_title(title)
    axes.grid(alpha=0.3)


def plot_evaluation(table: dict[str, dict[str, Any]], per_policy: dict[str, dict[str, list]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (frontier, spread) = plt.subplots(1, 2, figsize=(10, 4))
    points = [
        {"name": name, "kl": row["sampled_kl_to_sft"], "kl_ci95": row["sampled_kl_to_sft_ci95"], "oracle": row["oracle_mean"]}
        for name, row in table.items()
    ]
    frontier_axes(frontier, points)
    names = list(per_policy)
    spread.boxplot([per_policy[name]["oracle"] for name in names], tick_labels=names)
    spread.set_ylabel("oracle score per response")
    spread.set_title("Oracle score distribution")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


STAGE = Stage(
    name="evaluate",
    run=run,
    summary="every policy of the run on held-out prompts: oracle, reward model, sampled KL, diversity, 95% intervals",
    requires=("data_prep", "sft", "reward"),
    judges_policies=True,
    key_metrics=("reward_model_pairwise_accuracy",),
)
