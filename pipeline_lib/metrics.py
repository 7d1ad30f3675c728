"""Evaluation metrics as pure functions, tested on hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import chain
from statistics import fmean

import numpy as np


def ngrams(text: str, n: int = 2) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams across responses (Li et al., 2016); 0 for no n-grams."""
    return _distinct([ngrams(text, n) for text in texts])


def _distinct(grams_per_text: Sequence[list[tuple[str, ...]]]) -> float:
    total = sum(len(grams) for grams in grams_per_text)
    return len(set(chain.from_iterable(grams_per_text))) / total if total else 0.0


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Share of prompts where the policy's score beats the baseline's; a tie counts half."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    return fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores))


def ranked_right(chosen_scores: list[float], rejected_scores: list[float]) -> list[float]:
    """1 for each pair scored the right way round, 0 otherwise (a tie counts as wrong)."""
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("pairwise_accuracy needs two equally long, non-empty score lists")
    return [1.0 if c > r else 0.0 for c, r in zip(chosen_scores, rejected_scores)]


def pairwise_accuracy(chosen_scores: list[float], rejected_scores: list[float]) -> float:
    """Share of pairs scored the right way round; a tie counts as wrong."""
    return fmean(ranked_right(chosen_scores, rejected_scores))


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


def resampled_prompts(count: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` rows of ``count`` prompt indices drawn with replacement: every interval
    of one evaluation draws these same rows (same count and seed), so its intervals rest on
    the same resamples of prompts."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def _percentile_interval(estimates: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def _check_bootstrap(count: int, resamples: int, confidence: float, name: str) -> None:
    if count < 1:
        raise ValueError(f"{name} needs at least one value")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"{name} needs resamples >= 1 and 0 < confidence < 1")


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
    _check_bootstrap(len(per_prompt), resamples, confidence, "bootstrap_interval")
    values = np.asarray(per_prompt, dtype=np.float64)
    return _percentile_interval(values[resampled_prompts(len(values), resamples, seed)].mean(axis=1), confidence)


def bootstrap_statistic_interval(
    statistic: Callable[[np.ndarray], float], count: int, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic that is not a mean of per-prompt values
    (distinct-2 pools the n-grams of every response; a ratio divides two sums):
    ``statistic(indices)`` computes it on the prompts ``indices`` (repeats included), for
    each of the rows ``bootstrap_interval`` draws with the same ``count`` and ``seed``.
    Resamples where it is undefined (NaN: a baseline of 0, say) are left out; None when
    every one is."""
    _check_bootstrap(count, resamples, confidence, "bootstrap_statistic_interval")
    estimates = np.array([statistic(rows) for rows in resampled_prompts(count, resamples, seed)], dtype=np.float64)
    estimates = estimates[np.isfinite(estimates)]
    return _percentile_interval(estimates, confidence) if len(estimates) else None


def distinct_n_ratio(
    texts: list[str], baseline_texts: list[str], n: int = 2, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float | None, tuple[float, float] | None]:
    """Distinct-n of ``texts`` over the baseline's on the same prompts (prompt i's response
    in each), with its paired percentile bootstrap interval; (None, None) where the
    baseline has no n-grams. Each resample pools the n-grams of the prompts drawn, for the
    policy and the baseline alike: a prompt drawn twice repeats its n-grams in both, which
    lowers both distinct-n and leaves their ratio about where it was."""
    if len(texts) != len(baseline_texts) or not texts:
        raise ValueError("distinct_n_ratio needs two equally long, non-empty lists of responses (one per prompt)")
    grams, baseline = [ngrams(text, n) for text in texts], [ngrams(text, n) for text in baseline_texts]
    reference = _distinct(baseline)
    if not reference:
        return None, None

    def ratio(rows: np.ndarray) -> float:
        below = _distinct([baseline[row] for row in rows])
        return _distinct([grams[row] for row in rows]) / below if below else math.nan

    return _distinct(grams) / reference, bootstrap_statistic_interval(ratio, len(texts), resamples, seed, confidence)


def ratio_of_sums(
    numerators: list[float], denominators: list[float], resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float | None, tuple[float, float] | None]:
    """sum(numerators) / sum(denominators), one term of each per prompt, with its percentile
    bootstrap interval over prompts; (None, None) where the denominators sum to 0. Mean
    length over SFT's (words per prompt, the policy's over SFT's), and a share of pairs
    grouped by prompt (pairs ranked right per prompt over pairs per prompt: a clustered
    bootstrap, since a prompt's pairs share its responses and are not independent)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("ratio_of_sums needs two equally long, non-empty lists (one term per prompt)")
    _check_bootstrap(len(numerators), resamples, confidence, "ratio_of_sums")
    above, below = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if not below.sum():
        return None, None
    rows = resampled_prompts(len(above), resamples, seed)
    sums_above, sums_below = above[rows].sum(axis=1), below[rows].sum(axis=1)
    defined = sums_below != 0
    interval = _percentile_interval(sums_above[defined] / sums_below[defined], confidence) if defined.any() else None
    return float(above.sum() / below.sum()), interval


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
    the same (prompt ids, response ids) under the reference. Evaluation's KL to SFT; DPO's KL
    guard reads the same KL along its samples with less noise (``stages.dpo_kl.token_kls``)."""
    from pipeline_lib.generation import sample_response_ids

    pairs, policy_logprobs = sample_response_ids(
        policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, batch_size, seed, system_prompt
    )
    return sampled_kl(policy_logprobs, reference_logprobs(pairs), samples_per_prompt)
