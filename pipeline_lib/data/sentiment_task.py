"""The embedded default task: controlled sentiment, after the DPO paper's IMDB experiment.

The policy is asked for short reviews of many subjects; the goal is positive sentiment.
The VADER lexicon (``vadersentiment``, shipped in its wheel) is the oracle: it stands in
for the human labeller when pairs are formed, and it judges evaluation. It is never
used inside training: the reward model learns from its labels, as a reward model
learns from human labels.

* Prompts come from templates x subjects with a fixed seed. Held-out prompts use
  subjects that no training prompt mentions.
* ``sample`` pairs: draw several responses per prompt from the base model, score them
  with the oracle, keep (best, worst) when their gap is at least the margin. DPO can
  draw its own from SFT the same way (``dpo.pair_source: policy``, ``sample_pairs``).
* ``template`` pairs (tests): fixed positive and negative sentences, no model needed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

from pipeline_lib.errors import ConfigError

TEMPLATES = (
    "Write a one-sentence review of {subject}.",
    "In one sentence, what did you think of {subject}?",
    "Give a short opinion of {subject}.",
    "Describe your experience with {subject} in one sentence.",
    "Write a brief review of {subject} for a friend.",
    "Tell me in a sentence how you found {subject}.",
)
KINDS = ("the movie", "the novel", "the restaurant", "the album", "the video game", "the hotel", "the museum", "the TV series")
NAME_FIRST = (
    "Silent", "Golden", "Broken", "Hidden", "Crimson", "Northern", "Electric", "Last", "Wandering", "Paper",
    "Midnight", "Velvet", "Iron", "Quiet", "Distant", "Burning", "Frozen", "Secret", "Little", "Painted",
)
NAME_SECOND = (
    "Harbor", "Garden", "Empire", "River", "Lantern", "Forest", "Station", "Kingdom", "Window", "Orchard",
    "Mountain", "Bridge", "Circus", "Island", "Letter", "Machine", "Meadow", "Tower", "Voyage", "Kitchen",
)
POSITIVE = (
    "I loved {subject}; it was wonderful, warm and a real delight.",
    "{subject} was excellent, beautiful and great fun from start to finish.",
    "What a joy: {subject} is brilliant and I happily recommend it.",
)
NEGATIVE = (
    "I hated {subject}; it was awful, dull and a waste of time.",
    "{subject} was terrible, boring and painfully bad.",
    "What a mess: {subject} is dreadful and I regret it.",
)


def _all_subjects(seed: int) -> list[str]:
    subjects = [f"{kind} '{first} {second}'" for kind in KINDS for first in NAME_FIRST for second in NAME_SECOND]
    random.Random(seed).shuffle(subjects)
    return subjects


def build_prompts(num_train: int, num_eval: int, seed: int, num_reward_eval: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Training prompts, held-out prompts and held-out prompts that only judge the reward
    model (``num_reward_eval`` of them), over disjoint subjects.

    The reward-only subjects come after the training ones, so adding them leaves the
    training and held-out prompts as they were."""
    subjects = _all_subjects(seed)
    total = num_train + num_eval + num_reward_eval
    if total > len(subjects):
        raise ConfigError(
            f"data.num_prompts + data.num_eval_prompts + data.extra_reward_eval_prompts: the embedded task has "
            f"{len(subjects)} subjects, asked for {num_train} + {num_eval} + {num_reward_eval} = {total}"
        )
    rng = random.Random(seed + 1)
    eval_subjects = subjects[:num_eval]
    train_subjects = subjects[num_eval : num_eval + num_train]
    reward_subjects = subjects[num_eval + num_train : total]

    def prompts_for(items: list[str], rng: random.Random) -> list[str]:
        return [rng.choice(TEMPLATES).format(subject=subject) for subject in items]

    train, held_out = prompts_for(train_subjects, rng), prompts_for(eval_subjects, rng)
    return train, held_out, prompts_for(reward_subjects, random.Random(seed + 2))


def subject_of(prompt: str) -> str:
    start = prompt.find("the ")
    end = prompt.rfind("'")
    return prompt[start : end + 1] if start >= 0 and end > start else prompt


def template_pairs(prompts: list[str], seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for prompt in prompts:
        subject = subject_of(prompt)
        chosen = rng.choice(POSITIVE).format(subject=subject)
        rejected = rng.choice(NEGATIVE).format(subject=subject)
        pairs.append({"prompt": prompt, "chosen": chosen[0].upper() + chosen[1:], "rejected": rejected[0].upper() + rejected[1:]})
    return pairs


def corpus(seed: int = 0) -> list[str]:
    """Text to train the tiny test tokenizer on: every template, subject and canned review."""
    subjects = _all_subjects(seed)
    lines = [template.format(subject=s) for template in TEMPLATES for s in subjects[:40]]
    lines += [sentence.format(subject=s) for sentence in POSITIVE + NEGATIVE for s in subjects[:40]]
    return lines


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def oracle_score(text: str) -> float:
    """VADER compound sentiment in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def word_prefixes(text: str, fractions: list[float]) -> list[str]:
    """``text`` cut after these fractions of its words (at least one word, never all of them).

    A prefix is a response cut off earlier, which is how PPO's rollouts reach the reward
    model (most stop at ``response_length``), and the oracle scores it as it scores any
    response. Pairs between a response and its own prefix differ only in the words cut,
    so they show the reward model which words move the score, at no sampling cost.
    """
    words = text.split(" ")
    cuts = sorted({max(1, int(len(words) * fraction)) for fraction in fractions})
    return [" ".join(words[:cut]) for cut in cuts if cut < len(words)]


def rank_samples(prompt: str, samples: list[str], margin: float, max_pairs: int = 1) -> list[dict[str, object]]:
    """Up to ``max_pairs`` (better, worse) pairs of distinct samples whose oracle scores
    differ by at least ``margin``, widest gap first: the first is (best, worst).

    Several pairs per prompt give the reward model more comparisons from the same
    samples, as InstructGPT ranks K responses into K-choose-2 pairs.
    """
    scores = {text.strip(): oracle_score(text) for text in samples if text.strip()}
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    candidates = [
        (better, worse)
        for index, better in enumerate(ranked)
        for worse in ranked[index + 1 :]
        if better[1] - worse[1] >= margin and better[1] > worse[1]
    ]
    candidates.sort(key=lambda pair: pair[0][1] - pair[1][1], reverse=True)  # stable: ties keep rank order
    return [
        {"prompt": prompt, "chosen": better, "rejected": worse, "chosen_score": better_score, "rejected_score": worse_score}
        for (better, better_score), (worse, worse_score) in candidates[:max_pairs]
    ]


def sample_pairs(
    model,
    tokenizer,
    prompts: list[str],
    data,
    seed: int,
    system_prompt: str | None,
    samples_per_prompt: int,
    prefix_fractions: Sequence[float] = (),
    phase: str = "sampling",
    reward_margin: float | None = None,
) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Sample ``model``, rank with the oracle: (policy pairs, reward pairs, stats).

    ``data`` is the config's data section (temperature, length, margin, pairs kept);
    ``phase`` labels the progress records (the stage that samples).
    Reward pairs are ranked over the samples and their ``prefix_fractions`` word prefixes,
    at ``reward_margin`` (None: ``data.pair_margin``); policy pairs over the samples alone."""
    from pipeline_lib import progress
    from pipeline_lib.generation import generate_responses

    with progress.phase(phase):
        samples = generate_responses(
            model,
            tokenizer,
            prompts,
            max_new_tokens=data.sample_max_new_tokens,
            temperature=data.sample_temperature,
            num_return_sequences=samples_per_prompt,
            batch_size=data.sample_batch_size,
            seed=seed,
            system_prompt=system_prompt,
        )
    policy_pairs, reward_pairs = [], []
    for prompt, texts in zip(prompts, samples):
        policy_pairs += rank_samples(prompt, texts, data.pair_margin, data.pairs_per_prompt)
        prefixes = [prefix for text in texts for prefix in word_prefixes(text.strip(), prefix_fractions)]
        reward_pairs += rank_samples(
            prompt, texts + prefixes, data.pair_margin if reward_margin is None else reward_margin, data.reward_pairs_per_prompt
        )
    all_scores = [oracle_score(text) for texts in samples for text in texts]
    stats = {"sampled_responses": len(all_scores), "sample_oracle_mean": sum(all_scores) / max(1, len(all_scores))}
    return policy_pairs, reward_pairs, stats
