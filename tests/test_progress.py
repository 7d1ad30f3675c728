"""Progress reports: a bar and throttled log records whose ``progress`` the flow shows in the UI."""

from __future__ import annotations

import logging

from pipeline_lib import progress


def test_batches_walk_the_range_and_report_the_first_and_last_under_the_phase(caplog, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 3600.0)
    with caplog.at_level(logging.INFO, logger="pipeline_lib.progress"):
        with progress.phase("evaluate dpo"):
            starts = list(progress.batches(10, 4, "generating"))
        outside = list(progress.batches(3, 4, "scoring"))
    assert starts == [0, 4, 8] and outside == [0]
    reports = [record.progress for record in caplog.records]
    assert reports == [
        {"label": "evaluate dpo: generating", "done": 4, "total": 10},  # the first batch
        {"label": "evaluate dpo: generating", "done": 10, "total": 10},  # the last, whatever the throttle
        {"label": "scoring", "done": 3, "total": 3},
    ]
    assert caplog.records[0].getMessage() == "evaluate dpo: generating: 4/10 prompts"
    assert [progress.percent(report) for report in reports] == [40.0, 100.0, 100.0]


def test_data_prep_sampling_reports_its_progress(tiny_base_model, tmp_path, caplog):
    from pipeline_lib import registry
    from pipeline_lib.config import load_config

    config = load_config(
        "tiny", overrides=[f"output_root={tmp_path}", "data.pair_source=sample", "data.sample_max_new_tokens=4"], env_file=None
    )
    with caplog.at_level(logging.INFO, logger="pipeline_lib.progress"):
        try:
            registry.stage("data_prep").run(config, {"base_model": tiny_base_model}, tmp_path / "data_prep")
        except Exception:  # a random tiny model may leave too few pairs; the sampling has reported by then
            pass
    reports = [record.progress for record in caplog.records if hasattr(record, "progress")]
    assert {report["label"] for report in reports} == {"data_prep: generating"}
    assert reports[-1]["done"] == reports[-1]["total"] > 0
