"""benchmarks/frontier.py's points, table and plot, on hand-written flow summaries."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def frontier():
    return benchmark_script("frontier")


def row(oracle: float, kl: float, distinct: float = 1.0) -> dict:
    return {
        "distinct_2": 0.5 * distinct,
        "distinct_2_ratio_to_sft": distinct,
        "distinct_2_ratio_to_sft_ci95": [distinct - 0.1, distinct + 0.1],
        "oracle_mean": oracle,
        "oracle_gain_vs_sft": oracle - 0.4,
        "oracle_gain_vs_sft_ci95": [oracle - 0.5, oracle - 0.3],
        "win_rate_vs_sft": 0.7,
        "win_rate_vs_sft_ci95": [0.6, 0.8],
        "sampled_kl_to_sft": kl,
        "sampled_kl_to_sft_ci95": [kl * 0.9, kl * 1.1],
    }


def record(method: str, setting: str, value: float, oracle: float, kl: float) -> dict:
    policies = {"base": row(0.3, 0.5), "sft": row(0.4, 0.0), method: row(oracle, kl, distinct=0.8)}
    evaluation = {"policies": policies, "held_out_prompts": 40, "intervals": {"resamples": 2000}, "sampled_kl": {"samples_per_prompt": 2}}
    stages = {method: {"cached": False, "seconds": 30.0}, "evaluate": {"cached": False, "seconds": 20.0}}
    return {"method": method, "setting": setting, "value": value, "wall_seconds": 60.0, "evaluation": evaluation, "stages": stages}


def test_points_table_and_plot(frontier, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = [record("dpo", "beta", 0.1, 0.7, 3.0), record("dpo", "beta", 0.4, 0.55, 1.0), record("ppo", "kl_coef", 0.06, 0.65, 2.0)]
    points = frontier.frontier_points(records)
    assert [p["name"] for p in points] == ["base", "sft", "dpo beta=0.1", "dpo beta=0.4", "ppo kl_coef=0.06"]
    assert points[2]["kl"] == 3.0 and points[2]["oracle_gain"] == pytest.approx(0.3) and points[2]["stage_seconds"] == 30.0
    assert points[4]["marker"] == "^"
    assert points[1]["distinct_2_ratio"] == pytest.approx(1.0) and points[2]["distinct_2_ratio"] == pytest.approx(0.8)

    frontier.print_table(points, records[0]["evaluation"])
    printed = capsys.readouterr().out
    assert "dpo beta=0.1" in printed and "+3.000 [+2.700, +3.300]" in printed and "distinct-2/SFT" in printed
    assert "0.800 [0.700, 0.900]" in printed.splitlines()[4]  # dpo beta=0.1's distinct-2 over SFT's
    assert "95% paired bootstrap over 40 held-out prompts (2000 resamples); KL from 2 samples per prompt" in printed

    frontier.plot_frontier(points, tmp_path / "frontier.png", "test")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
