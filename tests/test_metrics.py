"""Evaluation metrics on hand-computed values, and the report built from them."""

from __future__ import annotations

import pytest

from pipeline_lib.metrics import distinct_n, mean_words, pairwise_accuracy, sequence_kl, win_rate
from pipeline_lib.stages.evaluate import flatten_metrics, render_report


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
            "sft": {"reward_model_mean": -0.0833, "win_rate_vs_sft": 0.5, "oracle_mean": 0.0333},
            "dpo": {"reward_model_mean": 1.0833, "win_rate_vs_sft": 1.0, "oracle_mean": None},
        },
        "reward_model_pairwise_accuracy": 0.875,
        "held_out_prompts": 3,
        "held_out_pairs": 8,
    }
    return results, per_policy, prompts


def test_render_report_has_the_table_and_the_requested_examples() -> None:
    results, per_policy, prompts = small_results()

    report = render_report(results, per_policy, prompts, num_examples=2, plot="eval.png")
    lines = report.splitlines()

    assert "Held-out prompts: 3. Reward model pairwise accuracy on 8 held-out pairs: 0.875." in report
    assert "| policy | reward_model_mean | win_rate_vs_sft | oracle_mean |" in lines
    assert "| sft | -0.083 | 0.500 | 0.033 |" in lines
    assert "| dpo | 1.083 | 1.000 | n/a |" in lines
    assert "![oracle score against KL to SFT](eval.png)" in lines
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
        "sft/reward_model_mean": -0.0833,
        "sft/win_rate_vs_sft": 0.5,
        "sft/oracle_mean": 0.0333,
        "dpo/reward_model_mean": 1.0833,
        "dpo/win_rate_vs_sft": 1.0,
        "dpo/oracle_mean": None,
    }
