"""Evaluation metrics on hand-computed values, and the report built from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.generation import (
    InverseCdfSampler,
    chat_prompt_ids,
    generate_responses,
    sample_response_ids,
    token_logprobs,
)
from pipeline_lib.metrics import (
    bootstrap_interval,
    distinct_n,
    distinct_n_ratio,
    mean_words,
    paired_differences,
    pairwise_accuracy,
    per_prompt_wins,
    ratio_of_sums,
    sampled_kl,
    sequence_kl,
    win_rate,
)
from pipeline_lib.models import load_causal_lm, load_tokenizer
from pipeline_lib.stages.dpo_kl import token_kls
from pipeline_lib.stages.evaluate import flatten_metrics, policy_row, render_report


def test_distinct_n_counts_unique_ngrams_across_all_responses() -> None:
    # bigrams: (a b) (b a) (a b) | (a b) (b c)  -> 3 distinct of 5
    assert distinct_n(["a b a b", "a b c"], n=2) == pytest.approx(3 / 5)
    # unigrams: a b a b a b c -> 3 distinct of 7
    assert distinct_n(["a b a b", "a b c"], n=1) == pytest.approx(3 / 7)
    assert distinct_n(["same words", "same words"], n=2) == pytest.approx(1 / 2)


def test_distinct_n_without_ngrams_is_zero() -> None:
    assert distinct_n([], n=2) == 0.0
    assert distinct_n(["one", ""], n=2) == 0.0


def test_win_rate_counts_ties_as_half() -> None:
    # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0]) == pytest.approx(0.625)
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == 0.5


@pytest.mark.parametrize("scores, baseline", [([1.0], [1.0, 2.0]), ([], [])])
def test_win_rate_rejects_unequal_or_empty_lists(scores: list, baseline: list) -> None:
    with pytest.raises(ValueError, match="equally long"):
        win_rate(scores, baseline)


def test_pairwise_accuracy_counts_ties_as_wrong() -> None:
    # right, tie, wrong, right -> 2 / 4
    assert pairwise_accuracy([1.0, 0.5, -1.0, 3.0], [0.0, 0.5, 0.0, 2.9]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pairwise_accuracy([1.0], [])


def test_sequence_kl_is_policy_minus_reference_logprob() -> None:
    assert sequence_kl([-1.0, -5.0, -2.5], [-2.0, -4.0, -2.5]) == pytest.approx([1.0, -1.0, 0.0])


def test_sampled_kl_averages_each_prompts_samples() -> None:
    # two prompts, two samples each: ratios 1, -1 | 2, 4  -> 0, 3
    assert sampled_kl([-1.0, -5.0, -1.0, 0.0], [-2.0, -4.0, -3.0, -4.0], samples_per_prompt=2) == pytest.approx([0.0, 3.0])
    with pytest.raises(ValueError, match="whole number"):
        sampled_kl([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], samples_per_prompt=2)


def test_paired_differences_and_wins_per_prompt() -> None:
    assert paired_differences([0.5, 0.0, 1.0], [0.25, 0.5, 1.0]) == pytest.approx([0.25, -0.5, 0.0])
    assert per_prompt_wins([0.5, 0.0, 1.0], [0.25, 0.5, 1.0]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="equally long"):
        paired_differences([1.0], [])


def test_bootstrap_interval_contains_the_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    values = list(rng.normal(0.3, 0.5, size=40))
    low, high = bootstrap_interval(values, resamples=2000, seed=3)
    assert low < float(np.mean(values)) < high
    assert bootstrap_interval(values, resamples=2000, seed=3) == (low, high)
    assert bootstrap_interval(values, resamples=2000, seed=4) != (low, high)
    # A normal mean's 95% interval is about +-1.96 sd/sqrt(n); the bootstrap's is close to it.
    half_width = 1.96 * np.std(values) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_bootstrap_interval_narrows_with_more_prompts() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for prompts in (20, 80, 320):
        low, high = bootstrap_interval(list(rng.normal(0.0, 1.0, size=prompts)), resamples=2000, seed=0)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.25)  # width ~ 1 / sqrt(prompts)


def test_distinct_ratio_and_its_interval_on_hand_made_responses() -> None:
    # Every SFT response is its own; the policy opens 30 of its 40 the same way.
    sft = [f"review {i} says word{i} and more{i}" for i in range(40)]
    policy = [("I am glad to see it" if i < 30 else f"policy {i} says term{i} and extra{i}") for i in range(40)]
    ratio, (low, high) = distinct_n_ratio(policy, sft, 2, resamples=500, seed=0)
    assert ratio == pytest.approx(distinct_n(policy) / distinct_n(sft))
    assert low < ratio < high < 1.0  # clearly below SFT's, and the interval says so
    assert distinct_n_ratio(policy, sft, 2, resamples=500, seed=0) == (ratio, (low, high))  # seeded
    same, (same_low, same_high) = distinct_n_ratio(sft, sft, 2, resamples=200)
    assert same == 1.0 and same_low == same_high == pytest.approx(1.0)
    assert distinct_n_ratio(["a b"], ["one"]) == (None, None)  # SFT without a bigram: no ratio
    with pytest.raises(ValueError, match="equally long"):
        distinct_n_ratio(["a b"], [])


def test_ratio_of_sums_is_a_clustered_share() -> None:
    # Three prompts' pairs: 2 of 2, 1 of 4, 3 of 3 ranked right -> 6 of 9, not the mean of the shares.
    share, (low, high) = ratio_of_sums([2, 1, 3], [2, 4, 3], resamples=2000, seed=1)
    assert share == pytest.approx(6 / 9)
    assert 0.0 <= low < share < high <= 1.0
    assert ratio_of_sums([1.0, 2.0], [0.0, 0.0]) == (None, None)
    # The same prompt resamples as bootstrap_interval's: a mean is a ratio of sums over counts of 1.
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    assert ratio_of_sums(values, [1.0] * 5, resamples=300, seed=2)[1] == pytest.approx(bootstrap_interval(values, 300, 2))


def test_bootstrap_interval_of_constant_values_is_a_point() -> None:
    assert bootstrap_interval([0.5] * 10, resamples=200) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError):
        bootstrap_interval([], resamples=200)


def test_paired_bootstrap_is_narrower_than_the_unpaired_spread() -> None:
    """Prompts differ far more than the policies do: pairing removes the prompts' share."""
    rng = np.random.default_rng(1)
    prompt_difficulty = rng.normal(0.0, 1.0, size=60)
    baseline = list(prompt_difficulty + rng.normal(0.0, 0.1, size=60))
    policy = list(prompt_difficulty + 0.2 + rng.normal(0.0, 0.1, size=60))
    low, high = bootstrap_interval(paired_differences(policy, baseline), resamples=2000, seed=0)
    assert 0.0 < low < 0.2 < high
    unpaired_half_width = 1.96 * np.sqrt(np.var(policy) / 60 + np.var(baseline) / 60)
    assert (high - low) / 2 < unpaired_half_width / 5


def test_policy_row_intervals_contain_the_figures() -> None:
    sft = {"responses": ["a b c", "d e", "f g h"], "reward": [0.0, 0.5, -0.5], "oracle": [0.1, 0.2, 0.0], "kl": [0.0] * 3}
    dpo = {"responses": ["a b", "c d", "e f"], "reward": [1.0, 0.25, 0.5], "oracle": [0.6, 0.1, 0.5], "kl": [0.5, 1.5, 1.0]}
    row = policy_row(dpo, sft, resamples=500, seed=0)
    assert row["oracle_gain_vs_sft"] == pytest.approx(0.3)
    assert row["reward_model_gain_vs_sft"] == pytest.approx(1.75 / 3)
    assert row["win_rate_vs_sft"] == pytest.approx(2 / 3)
    assert row["sampled_kl_to_sft"] == pytest.approx(1.0)
    for metric in ("oracle_gain_vs_sft", "reward_model_gain_vs_sft", "win_rate_vs_sft", "sampled_kl_to_sft"):
        low, high = row[f"{metric}_ci95"]
        assert low <= row[metric] <= high, metric
    reference = policy_row(sft, sft, resamples=500, seed=0)
    assert reference["oracle_gain_vs_sft_ci95"] == [0.0, 0.0] and reference["win_rate_vs_sft_ci95"] == [0.5, 0.5]
    no_oracle_no_kl = policy_row({**dpo, "oracle": [], "kl": []}, {**sft, "oracle": []}, resamples=500, seed=0)
    assert no_oracle_no_kl["oracle_gain_vs_sft"] is None and no_oracle_no_kl["sampled_kl_to_sft_ci95"] is None


def test_sampled_kl_is_zero_against_itself_and_positive_against_another_model(tiny_base_model: Path) -> None:
    """KL from real samples of the tiny model: 0 against itself, > 0 against a perturbed copy, seeded."""
    tokenizer = load_tokenizer(tiny_base_model)
    policy = load_causal_lm(tiny_base_model)
    other = load_causal_lm(tiny_base_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in other.model.layers[-1].mlp.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    prompts = ["Review the movie 'A'.", "Review the novel 'B'.", "Review the hotel 'C'."]
    pairs, sampled_logprobs = sample_response_ids(policy, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, batch_size=8, seed=0)
    assert len(pairs) == 12 and all(0 < len(answer) <= 8 for _, answer in pairs)
    assert (pairs, sampled_logprobs) == sample_response_ids(
        policy, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=8, batch_size=8, seed=0
    )
    policy_logprobs = token_logprobs(policy, pairs, tokenizer.pad_token_id)
    # The sampler's own log-probabilities are the policy's, as a forward pass scores the same tokens.
    assert sampled_logprobs == pytest.approx(policy_logprobs, abs=1e-3)
    assert sampled_kl(policy_logprobs, token_logprobs(policy, pairs, tokenizer.pad_token_id), 4) == pytest.approx([0.0] * 3, abs=1e-4)
    to_other = sampled_kl(policy_logprobs, token_logprobs(other, pairs, tokenizer.pad_token_id), 4)
    assert sum(to_other) / len(to_other) > 0.1


def test_token_kls_read_the_same_kl_as_the_sampled_log_ratio_with_the_draw_averaged_out(tiny_base_model: Path) -> None:
    """DPO's KL guard reads the exact per-position KLs along sampled responses: 0 against
    the model itself; for a one-token response, the KL of the first token's distributions
    whichever token was drawn; the same in a padded batch as alone; and over many samples
    the same mean as the sampled log-ratio (k1), with a smaller spread per response."""
    from statistics import fmean, pstdev

    tokenizer = load_tokenizer(tiny_base_model)
    policy, other = load_causal_lm(tiny_base_model), load_causal_lm(tiny_base_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in other.model.layers[-1].mlp.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)

    def logits_of(model):
        return lambda ids, mask, keep: model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits

    pad = tokenizer.pad_token_id
    prompt = chat_prompt_ids(tokenizer, "Review the movie 'A'.")
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        logq = torch.log_softmax(other(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    first_token_kl = float((logp.exp() * (logp - logq)).sum())
    assert first_token_kl > 0.01
    assert token_kls(policy, logits_of(other), [(prompt, [20]), (prompt, [100])], pad) == pytest.approx([first_token_kl] * 2, rel=1e-4)

    pairs = [([1, 5, 9, 11], [20, 21]), ([1, 7], [30, 31, 32, 33]), ([1, 2, 3, 4, 5, 6], [40]), ([1, 2], [])]
    batched = token_kls(policy, logits_of(other), pairs, pad, batch_size=4)
    assert batched == pytest.approx([token_kls(policy, logits_of(other), [pair], pad)[0] for pair in pairs], rel=1e-4, abs=1e-5)
    assert batched[-1] == 0.0 and all(value > 0 for value in batched[:-1])
    assert token_kls(policy, logits_of(policy), pairs, pad) == pytest.approx([0.0] * 4, abs=1e-5)

    prompts = ["Review the movie 'A'.", "Review the novel 'B'.", "Review the hotel 'C'.", "Review the play 'D'."]
    sampled, sampled_logprobs = sample_response_ids(policy, tokenizer, prompts, 256, 8, batch_size=64, seed=1)
    log_ratios = sequence_kl(sampled_logprobs, token_logprobs(other, sampled, pad, batch_size=64))
    along = token_kls(policy, logits_of(other), sampled, pad, batch_size=64)
    # k1's standard error over these 1024 responses is ~0.02 nats on a KL of ~0.21; token_kls' ~0.0005.
    assert abs(fmean(along) - fmean(log_ratios)) < 3 * pstdev(log_ratios) / len(log_ratios) ** 0.5
    assert pstdev(along) < 0.2 * pstdev(log_ratios)


def test_the_sampler_draws_from_the_softmax_at_its_temperature() -> None:
    """Frequencies of 40,000 draws (rows of one batch) match softmax(logits / T) at T=1
    and T=0.5, the same seed draws the same tokens, and a row is -inf but for its token."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    for temperature in (1.0, 0.5):
        scores = logits.repeat(40_000, 1)
        chosen = InverseCdfSampler(temperature, seed=3)(None, scores)
        assert bool(((chosen == 0).sum(dim=1) == 1).all()) and bool(torch.isinf(chosen).sum(dim=1).eq(4).all())
        counts = torch.bincount(chosen.argmax(dim=1), minlength=5).float() / 40_000
        assert counts.tolist() == pytest.approx(torch.softmax(logits / temperature, dim=0).tolist(), abs=0.01)
        assert torch.equal(chosen, InverseCdfSampler(temperature, seed=3)(None, scores))
    assert not torch.equal(InverseCdfSampler(1.0, seed=3)(None, scores), InverseCdfSampler(1.0, seed=4)(None, scores))


def test_generated_responses_come_back_in_the_prompts_order(tiny_base_model: Path) -> None:
    """Prompts are batched by length, and each response still lands at its own prompt:
    greedy responses are the same whatever the batch size."""
    tokenizer = load_tokenizer(tiny_base_model)
    model = load_causal_lm(tiny_base_model)
    prompts = ["Review it.", "Review the movie 'A long title here' please.", "Hi.", "Review the novel 'B'."]
    alone = [generate_responses(model, tokenizer, [prompt], max_new_tokens=6, batch_size=1)[0] for prompt in prompts]
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == alone
    # Several copies of a prompt share its encoding (a KV cache repeated per copy): greedy
    # copies are each the greedy response.
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=6, num_return_sequences=2, batch_size=3) == [
        [texts[0], texts[0]] for texts in alone
    ]
    sampled = generate_responses(model, tokenizer, prompts, 6, temperature=1.0, num_return_sequences=3, batch_size=2, seed=5)
    assert [len(texts) for texts in sampled] == [3, 3, 3, 3]
    assert sampled == generate_responses(model, tokenizer, prompts, 6, temperature=1.0, num_return_sequences=3, batch_size=2, seed=5)


def test_token_logprobs_match_one_sequence_at_a_time(tiny_base_model: Path) -> None:
    """Left padding in a batch does not change a sequence's log-probability."""
    tokenizer = load_tokenizer(tiny_base_model)
    model = load_causal_lm(tiny_base_model)
    pairs = [([1, 5, 9, 11], [20, 21]), ([1, 7], [30, 31, 32, 33]), ([1, 2, 3, 4, 5, 6], [40])]
    batched = token_logprobs(model, pairs, tokenizer.pad_token_id, batch_size=3)
    alone = [token_logprobs(model, [pair], tokenizer.pad_token_id, batch_size=1)[0] for pair in pairs]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_mean_words() -> None:
    assert mean_words(["one two three", "four", "  five   six  "]) == pytest.approx(2.0)
    assert mean_words([]) == 0.0


def small_results() -> tuple[dict, dict, list[str]]:
    prompts = ["Review the movie 'A'.", "Review the novel 'B'.", "Review the hotel 'C'."]
    per_policy = {
        "sft": {"responses": ["It was fine.", "Okay\nbook.", "Meh."], "reward": [0.0, 0.25, -0.5], "oracle": [0.2, 0.0, -0.1]},
        "dpo": {"responses": ["Loved it!", "Great book.", "Lovely."], "reward": [1.0, 1.5, 0.75], "oracle": [0.6, 0.62, 0.5]},
    }
    results = {
        "policies": {
            "sft": {"reward_model_mean": -0.0833, "win_rate_vs_sft": 0.5, "win_rate_vs_sft_ci95": [0.5, 0.5], "oracle_mean": 0.0333},
            "dpo": {"reward_model_mean": 1.0833, "win_rate_vs_sft": 1.0, "win_rate_vs_sft_ci95": [0.75, 1.0], "oracle_mean": None},
        },
        "reward_model_pairwise_accuracy": 0.875,
        "reward_model_pairwise_accuracy_ci95": [0.75, 1.0],
        "held_out_prompts": 3,
        "held_out_pairs": 8,
        "intervals": {"confidence": 0.95, "resamples": 2000, "seed": 42, "prompts": 3},
        "responses": {"per_prompt": 1, "temperature": 0.0, "max_new_tokens": 24},
        "sampled_kl": {"samples_per_prompt": 4, "temperature": 1.0, "max_new_tokens": 24},
    }
    return results, per_policy, prompts


def test_render_report_has_the_table_and_the_requested_examples() -> None:
    results, per_policy, prompts = small_results()

    report = render_report(results, per_policy, prompts, num_examples=2, plot="eval.png")
    lines = report.splitlines()

    assert "Held-out prompts: 3. Reward model pairwise accuracy on 8 held-out pairs: 0.875 [0.750, 1.000]." in report
    assert "| policy | reward_model_mean | win_rate_vs_sft | oracle_mean |" in lines
    assert "| sft | -0.083 | 0.500 [0.500, 0.500] | 0.033 |" in lines
    assert "| dpo | 1.083 | 1.000 [0.750, 1.000] | n/a |" in lines
    assert "paired bootstrap over the 3 held-out prompts (2000 resamples, seed 42" in report
    assert "one greedy response per prompt and policy" in report
    assert "from 4 responses per prompt sampled at temperature 1 (12 per policy)" in report
    assert "![oracle score against sampled KL to SFT](eval.png)" in lines
    assert [line for line in lines if line.startswith("**Prompt:**")] == [f"**Prompt:** {p}" for p in prompts[:2]]
    assert "- *dpo* (reward +1.50, oracle +0.62): Great book." in lines
    assert "- *sft* (reward +0.25, oracle +0.00): Okay book." in lines, "newlines in responses stay on one line"


def test_render_report_without_oracle_or_plot() -> None:
    results, per_policy, prompts = small_results()
    for scores in per_policy.values():
        scores["oracle"] = []

    report = render_report(results, per_policy, prompts, num_examples=1, plot=None)

    assert "![" not in report
    assert "- *sft* (reward +0.00): It was fine." in report.splitlines()
    assert "oracle +" not in report


def test_flatten_metrics_prefixes_each_policy() -> None:
    results, _, _ = small_results()
    assert flatten_metrics(results) == {
        "reward_model_pairwise_accuracy": 0.875,
        "reward_model_pairwise_accuracy_ci95_low": 0.75,
        "reward_model_pairwise_accuracy_ci95_high": 1.0,
        "sft/reward_model_mean": -0.0833,
        "sft/win_rate_vs_sft": 0.5,
        "sft/win_rate_vs_sft_ci95_low": 0.5,
        "sft/win_rate_vs_sft_ci95_high": 0.5,
        "sft/oracle_mean": 0.0333,
        "dpo/reward_model_mean": 1.0833,
        "dpo/win_rate_vs_sft": 1.0,
        "dpo/win_rate_vs_sft_ci95_low": 0.75,
        "dpo/win_rate_vs_sft_ci95_high": 1.0,
        "dpo/oracle_mean": None,
    }
