"""Evaluate every policy on held-out prompts, honestly, and write what lets anyone re-check it.

Inputs: the base model, data prep's directory (held-out ``prompts_eval`` and
``reward_eval``), the reward model, and every policy stage of the run (SFT always; DPO,
PPO, GRPO, ... whichever ran): each input other than data prep and the reward model is a
policy, judged in the order given, the base model first. Per policy:

* mean reward-model score, and win rate against SFT judged by the reward model;
* the oracle's mean (VADER) where the task has an oracle (the embedded task);
* KL to SFT per response: log pi(y|x) - log pi_sft(y|x), y from the policy;
* mean length in words and distinct-2;
and the reward model's pairwise accuracy on held-out pairs.

Outputs: ``eval.json`` (the figures), ``generations.jsonl`` (every prompt, policy,
response and its scores), ``report.md`` (table and examples) and ``eval.png`` (oracle
score against KL to SFT, and the distribution of oracle scores per policy).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from statistics import fmean
from typing import Any

from pipeline_lib import progress
from pipeline_lib.config import PipelineConfig
from pipeline_lib.data import sentiment_task
from pipeline_lib.data.files import EMBEDDED_SENTIMENT, data_card, read_prompts, read_split, write_jsonl
from pipeline_lib.errors import StageFailed
from pipeline_lib.generation import generate_responses, response_logprobs, reward_scores
from pipeline_lib.metrics import distinct_n, mean_words, sequence_kl, win_rate
from pipeline_lib.models import load_causal_lm, load_sequence_classifier, load_tokenizer, torch_dtype
from pipeline_lib.stages import BASE_MODEL, Stage
from pipeline_lib.stages.reward import pairwise_accuracy as reward_pairwise_accuracy

logger = logging.getLogger(__name__)
NOT_POLICIES = ("data_prep", "reward")  # the inputs evaluation reads that are not policies


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

    # --- generate and score every policy
    per_policy: dict[str, dict[str, list]] = {}
    for name in policies:
        progress.set_phase(f"evaluate {name}")
        model = sft_model if name == "sft" else load_causal_lm(policies[name], dtype=dtype)
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
        logprobs = response_logprobs(model, tokenizer, prompts, responses, section.batch_size, system_prompt)
        sft_logprobs = (
            logprobs if name == "sft" else response_logprobs(sft_model, tokenizer, prompts, responses, section.batch_size, system_prompt)
        )
        per_policy[name] = {
            "responses": responses,
            "reward": reward_scores(reward_model, tokenizer, prompts, responses, section.batch_size, system_prompt),
            "oracle": [sentiment_task.oracle_score(text) for text in responses] if with_oracle else [],
            "kl": sequence_kl(logprobs, sft_logprobs),
        }
        logger.info("evaluate: %s done", name)
    progress.set_phase(None)

    # --- aggregate
    sft_rewards = per_policy["sft"]["reward"]
    table: dict[str, dict[str, float | None]] = {}
    for name, scores in per_policy.items():
        table[name] = {
            "reward_model_mean": fmean(scores["reward"]),
            "win_rate_vs_sft": win_rate(scores["reward"], sft_rewards),
            "oracle_mean": fmean(scores["oracle"]) if scores["oracle"] else None,
            "kl_to_sft_mean": fmean(scores["kl"]),
            "mean_length_words": mean_words(scores["responses"]),
            "distinct_2": distinct_n(scores["responses"], 2),
        }
    pairs = read_split(data_dir, "reward_eval")
    reward_accuracy = reward_pairwise_accuracy(reward_model, tokenizer, pairs, system_prompt)
    results = {
        "policies": table,
        "reward_model_pairwise_accuracy": reward_accuracy,
        "held_out_prompts": len(prompts),
        "held_out_pairs": len(pairs),
        "oracle": "vader" if with_oracle else None,
    }

    # --- write
    generations = [
        {
            "prompt": prompt,
            "policy": name,
            "response": scores["responses"][index],
            "reward_model": scores["reward"][index],
            "oracle": scores["oracle"][index] if scores["oracle"] else None,
            "kl_to_sft": scores["kl"][index],
        }
        for name, scores in per_policy.items()
        for index, prompt in enumerate(prompts)
    ]
    write_jsonl(out_dir / "generations.jsonl", generations)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    plot = plot_oracle_vs_kl(per_policy, out_dir / "eval.png") if with_oracle else None
    (out_dir / "report.md").write_text(render_report(results, per_policy, prompts, section.num_examples, plot))
    return flatten_metrics(results)


def flatten_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    flat: dict[str, float | None] = {"reward_model_pairwise_accuracy": results["reward_model_pairwise_accuracy"]}
    for name, row in results["policies"].items():
        flat.update({f"{name}/{metric}": value for metric, value in row.items()})
    return flat


def render_report(
    results: dict[str, Any], per_policy: dict[str, dict[str, list]], prompts: list[str], num_examples: int, plot: str | None
) -> str:
    metrics = list(next(iter(results["policies"].values())).keys())

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = ["# Evaluation", "", f"Held-out prompts: {results['held_out_prompts']}. "
             f"Reward model pairwise accuracy on {results['held_out_pairs']} held-out pairs: "
             f"{results['reward_model_pairwise_accuracy']:.3f}.", ""]
    lines.append("| policy | " + " | ".join(metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, row in results["policies"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row[m]) for m in metrics) + " |")
    if plot:
        lines += ["", f"![oracle score against KL to SFT]({plot})"]
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


def plot_oracle_vs_kl(per_policy: dict[str, dict[str, list]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (frontier, spread) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(per_policy)
    for name in names:
        frontier.scatter(fmean(per_policy[name]["kl"]), fmean(per_policy[name]["oracle"]), s=60, label=name)
        frontier.annotate(name, (fmean(per_policy[name]["kl"]), fmean(per_policy[name]["oracle"])), xytext=(4, 4), textcoords="offset points")
    frontier.set_xlabel("mean KL to SFT per response (nats)")
    frontier.set_ylabel("mean oracle score (VADER)")
    frontier.set_title("Reward vs KL")
    frontier.grid(alpha=0.3)
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
    summary="every policy of the run on held-out prompts: oracle, reward model, KL, diversity",
    requires=("data_prep", "sft", "reward"),
    judges_policies=True,
    key_metrics=("reward_model_pairwise_accuracy",),
)
