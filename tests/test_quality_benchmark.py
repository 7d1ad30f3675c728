"""benchmarks/quality.py's judging, on hand-written evaluation summaries: floors per seed, intervals shown."""

from __future__ import annotations

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def quality():
    return benchmark_script("quality")


def policy(oracle: float, gain: float, win: float, kl: float | None, distinct: float = 1.0, length: float = 1.0) -> dict:
    """``distinct`` and ``length``: distinct-2 and mean length over SFT's."""
    return {
        "oracle_mean": oracle,
        "oracle_gain_vs_sft": gain,
        "oracle_gain_vs_sft_ci95": [gain - 0.1, gain + 0.1],
        "reward_model_mean": 0.0,
        "reward_model_gain_vs_sft": gain * 2,
        "reward_model_gain_vs_sft_ci95": [gain * 2 - 0.2, gain * 2 + 0.2],
        "win_rate_vs_sft": win,
        "win_rate_vs_sft_ci95": [win - 0.1, min(1.0, win + 0.1)],
        "sampled_kl_to_sft": kl,
        "sampled_kl_to_sft_ci95": None if kl is None else [kl * 0.8, kl * 1.2],
        "mean_length_words": 12.0 * length,
        "length_ratio_to_sft": length,
        "length_ratio_to_sft_ci95": [length * 0.9, length * 1.1],
        "distinct_2": 0.6 * distinct,
        "distinct_2_ratio_to_sft": distinct,
        "distinct_2_ratio_to_sft_ci95": [distinct - 0.05, distinct + 0.05],
    }


def summary(dpo_gain: float, accuracy: float = 0.9) -> dict:
    return {
        "evaluation": {
            "reward_model_pairwise_accuracy": accuracy,
            "reward_model_pairwise_accuracy_ci95": [accuracy - 0.02, accuracy + 0.02],
            "held_out_prompts": 40,
            "policies": {
                "base": policy(0.40, -0.05, 0.45, 3.0),
                "sft": policy(0.45, 0.0, 0.5, 0.0),
                "dpo": policy(0.45 + dpo_gain, dpo_gain, 0.8, 5.0),
                "ppo": policy(0.65, 0.20, 0.7, 2.0, distinct=0.55 / 0.6, length=20 / 12),
            },
        }
    }


def test_seed_metrics_reads_gains_and_their_intervals(quality) -> None:
    metrics, intervals = quality.seed_metrics(summary(0.3), wall_seconds=600.0)
    assert metrics["dpo/oracle_gain"] == pytest.approx(0.3)
    assert intervals["dpo/oracle_gain"] == pytest.approx([0.2, 0.4])
    assert metrics["ppo/sampled_kl"] == 2.0 and intervals["ppo/win_rate"] == pytest.approx([0.6, 0.8])
    assert metrics["ppo/distinct_2_ratio"] == pytest.approx(0.55 / 0.6)
    assert metrics["ppo/length_ratio"] == pytest.approx(20 / 12)
    assert intervals["ppo/distinct_2_ratio"] == pytest.approx([0.55 / 0.6 - 0.05, 0.55 / 0.6 + 0.05])
    assert metrics["reward_model_accuracy"] == 0.9 and intervals["reward_model_accuracy"] == pytest.approx([0.88, 0.92])
    assert "base/oracle_gain" not in metrics and "sft/win_rate" not in metrics  # references are not judged


def test_floors_are_judged_per_seed_not_on_the_mean(quality, capsys: pytest.CaptureFixture) -> None:
    # Seed 0 clears the DPO gain floor (0.25) by far, seed 1 misses it; their mean (0.30) would clear it.
    records = []
    for seed, gain in ((0, 0.40), (1, 0.20)):
        metrics, intervals = quality.seed_metrics(summary(gain), wall_seconds=600.0)
        records.append({"seed": seed, "metrics": metrics, "intervals": intervals, "stage_seconds": {}})
    assert quality.missed_floors(records[0]["metrics"]) == []
    assert quality.missed_floors(records[1]["metrics"]) == ["DPO oracle gain over SFT"]
    verdicts = quality.judge_floors(records[0]["metrics"])
    assert verdicts["GRPO oracle gain over SFT"] is None  # GRPO did not run: not judged

    assert quality.report(records) is False
    printed = capsys.readouterr().out
    assert "seed 0: 10/10 met, meets every floor" in printed
    assert "seed 1: 9/10 met, MISSES DPO oracle gain over SFT (0.200; its 95% interval [0.100, 0.300] reaches the floor)" in printed
    assert "1/2 seeds  DPO oracle gain over SFT (floor >= 0.25)" in printed
    assert "0.400 [0.300, 0.500]" in printed  # seed 0's DPO gain with its interval
    assert "0.300 +- " in printed  # the mean over seeds with its t-interval

    records[1] = {**records[0], "seed": 1}
    assert quality.report(records) is True


def test_length_floor_is_a_band(quality) -> None:
    metrics, _ = quality.seed_metrics(summary(0.4), wall_seconds=600.0)
    metrics["ppo/length_ratio"] = 2.5
    assert quality.missed_floors(metrics) == ["PPO mean length / SFT's"]
    metrics["ppo/length_ratio"] = 0.4
    assert quality.missed_floors(metrics) == ["PPO mean length / SFT's"]


def test_mean_over_seeds(quality) -> None:
    mean, half_width = quality.mean_over_seeds([1.0, 3.0])
    assert mean == 2.0 and half_width == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)
    assert quality.mean_over_seeds([1.0]) == (1.0, None)


def test_a_ratio_to_an_empty_sft_is_not_judged(quality) -> None:
    """The tiny preset's untrained SFT can answer nothing: no distinct-2 ratio, no verdict, no crash."""
    empty_sft = summary(0.4)
    for name in ("sft", "dpo", "ppo"):
        empty_sft["evaluation"]["policies"][name].update(distinct_2_ratio_to_sft=None, distinct_2_ratio_to_sft_ci95=None)
    metrics, _ = quality.seed_metrics(empty_sft, wall_seconds=60.0)
    assert metrics["dpo/distinct_2_ratio"] is None
    assert quality.judge_floors(metrics)["DPO distinct-2 / SFT's"] is None


def test_a_miss_says_when_its_interval_reaches_the_floor(quality, capsys: pytest.CaptureFixture) -> None:
    """Still a miss, but the reader learns whether the held-out prompts could tell it from a pass."""
    records = []
    for seed, distinct in ((0, 0.79), (1, 0.70)):  # intervals +-0.05: [0.74, 0.84] reaches 0.8, [0.65, 0.75] does not
        summary_ppo = summary(0.4)
        summary_ppo["evaluation"]["policies"]["ppo"] = policy(0.65, 0.20, 0.7, 2.0, distinct=distinct)
        metrics, intervals = quality.seed_metrics(summary_ppo, wall_seconds=600.0)
        records.append({"seed": seed, "metrics": metrics, "intervals": intervals, "stage_seconds": {}})
        assert quality.missed_floors(metrics) == ["PPO distinct-2 / SFT's"]
    assert quality.report(records) is False
    printed = capsys.readouterr().out
    assert "seed 0: 9/10 met, MISSES PPO distinct-2 / SFT's (0.790; its 95% interval [0.740, 0.840] reaches the floor)" in printed
    assert "seed 1: 9/10 met, MISSES PPO distinct-2 / SFT's (0.700)" in printed
