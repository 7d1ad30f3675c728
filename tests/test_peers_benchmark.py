"""benchmarks/peers.py: the course's bare TRL stages run on tiny data, and the side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import benchmark_script

from pipeline_lib import registry
from pipeline_lib.config import load_config
from pipeline_lib.data import sentiment_task
from pipeline_lib.data.files import read_split
from pipeline_lib.models import load_causal_lm, materialize_base_model, num_decoder_layers


@pytest.fixture(scope="module")
def peers():
    return benchmark_script("peers")


def test_the_course_stages_train_on_the_pipelines_data(peers, tmp_path: Path) -> None:
    """SFT, reward (per-pair batches, the whole SFT model), DPO (reference every step) and
    PPO as the course ran them, one after another on data prep's files; the oracle then
    judges every policy they made."""
    config = load_config("tiny", overrides=[f"output_root={tmp_path}", "tracking.mode=disabled"], env_file=None)
    course = tmp_path / "course"
    course.mkdir()
    base = materialize_base_model(config.model, course / "models", sentiment_task.corpus())
    registry.stage("data_prep").run(config, registry.stage_inputs("data_prep", {}, base), course / "data_prep")

    metrics = {name: peers._course_stage(name, config, course, name) for name in peers.TRAINING}
    assert metrics["reward"]["train_pairs"] == len(read_split(course / "data_prep", "reward_train"))
    assert 0.0 <= metrics["reward"]["pairwise_accuracy"] <= 1.0
    assert num_decoder_layers(course / "reward") == num_decoder_layers(base)  # the whole SFT model, unlike ours
    for name in peers.TRAINING:
        assert (course / name / "model.safetensors").is_file(), name
    for name in peers.POLICIES:
        load_causal_lm(course / name)
    assert metrics["ppo"]["final_reward_model_score"] is not None

    (tmp_path / "ours").symlink_to(course, target_is_directory=True)  # the oracle reads ours/ and course/
    oracle = peers._oracle_stage("oracle", config, tmp_path, "oracle")
    assert set(oracle) == {f"{way}/{policy}" for way in ("ours", "course") for policy in peers.POLICIES}
    assert oracle["ours/dpo"] == oracle["course/dpo"]  # the same model judged twice gives the same figure


def stage(wall: float, mib: float, **metrics) -> dict:
    return {"wall_s": wall, "peak_rss_mib": mib, "metrics": metrics, "error": None}


def test_the_table_gives_speed_ups_quality_and_the_aims(peers, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = {
        "preset": "default", "seed": 0, "overrides": [],
        "flow": {"wall_s": 500.0, "stage_seconds": {"data_prep": 60.0, "evaluate": 120.0}},
        "ours": {"sft": stage(30, 900), "reward": stage(100, 1000, pairwise_accuracy=0.88), "dpo": stage(120, 1100),
                 "ppo": stage(100, 1200)},
        "course": {"sft": stage(30, 900), "reward": stage(300, 1500, pairwise_accuracy=0.80), "dpo": stage(150, 1400),
                   "ppo": stage(150, 1200)},
        "oracle": {"ours/sft": 0.40, "ours/dpo": 0.70, "ours/ppo": 0.65, "course/sft": 0.40, "course/dpo": 0.60, "course/ppo": 0.70},
    }  # fmt: skip
    assert peers.quality(results, "ours", "dpo") == pytest.approx(0.30)
    assert peers.quality(results, "course", "reward") == 0.80
    lines = peers.table(results)
    reward_row = next(line for line in lines if line.startswith("reward"))
    assert "3.00x" in reward_row and "0.880" in reward_row and "0.800" in reward_row
    # The course's whole run: data prep and evaluation (180 s) plus its four stages (630 s).
    assert "the course's scripts one after another 810 s" in lines[-2] and "1.62x" in lines[-2]
    assert "reward 3.00x met, dpo 1.25x MISSED" in lines[-1] and "MISSED on ppo" in lines[-1]

    (tmp_path / "peers.json").write_text(json.dumps(results))
    import sys

    argv = sys.argv
    sys.argv = ["peers.py", "--reuse", "--output-root", str(tmp_path)]
    try:
        assert peers.main() == 0
    finally:
        sys.argv = argv
    assert "whole pipeline: the flow 500 s" in capsys.readouterr().out
