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
