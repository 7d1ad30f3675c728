"""Evaluation metrics as pure functions, tested on hand-computed values."""

from __future__ import annotations

from statistics import fmean


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams across responses (Li et al., 2016); 0 for no n-grams."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Share of prompts where the policy's score beats the baseline's; a tie counts half."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))


def pairwise_accuracy(chosen_scores: list[float], rejected_scores: list[float]) -> float:
    """Share of pairs scored the right way round; a tie counts as wrong."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("pairwise_accuracy needs two equally long, non-empty score lists")
    return fmean(1.0 if c > r else 0.0 for c, r in zip(chosen_scores, rejected_scores))


def sequence_kl(policy_logprobs: list[float], reference_logprobs: list[float]) -> list[float]:
    """Per-response KL estimate log pi(y|x) - log pi_ref(y|x) for y sampled from pi (k1 estimator)."""
    return [p - r for p, r in zip(policy_logprobs, reference_logprobs)]


def mean_words(texts: list[str]) -> float:
    return fmean(len(text.split()) for text in texts) if texts else 0.0
