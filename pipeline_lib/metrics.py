"""Evaluation metrics as pure functions, tested on hand-computed values."""

from __future__ import annotations

from statistics import fmean

import numpy as np


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
    """Per-response log-ratio log pi(y|x) - log pi_ref(y|x); a KL estimate (k1) only where y ~ pi."""
    return [p - r for p, r in zip(policy_logprobs, reference_logprobs)]


def mean_words(texts: list[str]) -> float:
    return fmean(len(text.split()) for text in texts) if texts else 0.0


def paired_differences(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """Per-prompt gain of a policy over the baseline on the same prompts."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError("paired_differences needs two equally long, non-empty score lists")
    return [a - b for a, b in zip(scores, baseline_scores)]


def per_prompt_wins(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the policy beats the baseline on a prompt, 0.5 for a tie, 0 for a loss: ``win_rate``'s terms."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError("per_prompt_wins needs two equally long, non-empty score lists")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]


def bootstrap_interval(
    per_prompt: list[float], resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt values, prompts resampled with replacement.

    Paired by construction: pass per-prompt *differences* (``paired_differences``) or
    per-prompt *wins* (``per_prompt_wins``), so each resample draws the same prompts for the
    policy and its baseline and the prompt-to-prompt spread they share cancels out. The
    interval covers prompt sampling only: the evaluated models and their decoding are held
    fixed. Seeded, so the same scores give the same interval. Every value of one prompt
    (several samples, say) must be reduced to one number first: the prompt is the unit.
    """
    if not per_prompt:
        raise ValueError("bootstrap_interval needs at least one value")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError("bootstrap_interval needs resamples >= 1 and 0 < confidence < 1")
    values = np.asarray(per_prompt, dtype=np.float64)
    indices = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[indices].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def sampled_kl(policy_logprobs: list[float], reference_logprobs: list[float], samples_per_prompt: int) -> list[float]:
    """Per-prompt estimate of KL(pi || pi_ref): the mean over that prompt's samples y ~ pi of
    log pi(y|x) - log pi_ref(y|x), each a sum over the response's tokens (the k1 estimator:
    unbiased and >= 0 in expectation, though one sample can be negative). Log-probabilities
    come prompt-major, ``samples_per_prompt`` in a row per prompt."""
    if len(policy_logprobs) != len(reference_logprobs) or samples_per_prompt < 1 or len(policy_logprobs) % samples_per_prompt:
        raise ValueError("sampled_kl needs equally long log-probability lists, a whole number of samples per prompt")
    ratios = sequence_kl(policy_logprobs, reference_logprobs)
    return [fmean(ratios[start : start + samples_per_prompt]) for start in range(0, len(ratios), samples_per_prompt)]


def policy_kl(
    policy, reference_logprobs, tokenizer, prompts: list[str], samples_per_prompt: int, max_new_tokens: int,
    batch_size: int, seed: int, system_prompt: str | None = None,
) -> list[float]:
    """Per-prompt KL(policy || reference) (``sampled_kl``) from ``samples_per_prompt``
    responses sampled from ``policy`` at temperature 1; ``reference_logprobs(pairs)`` scores
    the same (prompt ids, response ids) under the reference. Evaluation's KL to SFT and
    DPO's KL guard both read this one estimate."""
    from pipeline_lib.generation import sample_response_ids

    pairs, policy_logprobs = sample_response_ids(
        policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, batch_size, seed, system_prompt
    )
    return sampled_kl(policy_logprobs, reference_logprobs(pairs), samples_per_prompt)
