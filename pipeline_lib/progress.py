"""Progress a person can see: a bar on the terminal and a progress record for the Prefect UI.

Sampling in data prep, generation and scoring in evaluation, and every training step
report through here. Each report does two things:

* a tqdm bar on standard error (rate and time left), as the trainers' own bars do;
* a ``pipeline_lib.progress`` log record carrying ``record.progress = {"label", "done",
  "total"}``, at most every few seconds and always at the end. The record reaches the
  flow's process with the stage's other log records (``pipeline_lib/launch.py``), where
  the stage's task turns it into a Prefect progress artifact it updates as it goes
  (``tasks/stages.py``); the log line itself says ``evaluate sft: 32/64 prompts``.

No Prefect here: a stage called directly, or under ``accelerate launch``, reports the
same way and whoever reads its logs decides what to do with them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)
EVERY_SECONDS = 5.0  # the least time between two progress records of one label
_label: ContextVar[str | None] = ContextVar("progress_label", default=None)


def set_phase(label: str | None) -> None:
    """Name what the batches reported from now on belong to (``evaluate dpo``); None: nothing."""
    _label.set(label)


@contextmanager
def phase(label: str) -> Iterator[None]:
    """``set_phase`` for the duration of a block."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


class Reporter:
    """Throttled progress records for one label: the first, one every ``EVERY_SECONDS``, the last."""

    def __init__(self, label: str, total: int, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.last_sent = float("-inf")

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last_sent < EVERY_SECONDS:
            return
        self.last_sent = now
        logger.info(
            "%s: %d/%d %s", self.label, done, self.total, self.unit,
            extra={"progress": {"label": self.label, "done": done, "total": self.total}},
        )  # fmt: skip


def _bar(total: int, label: str, unit: str):
    from tqdm.auto import tqdm

    # TQDM_DISABLE=1 silences the bars here as it does the trainers'.
    return tqdm(total=total, desc=label, unit=unit, disable=bool(os.environ.get("TQDM_DISABLE")), leave=False)


def batches(total: int, batch_size: int, what: str, unit: str = "prompts") -> Iterator[int]:
    """``range(0, total, batch_size)``, reporting progress after each batch as
    ``<phase>: <what>`` (``evaluate dpo: generating``), or ``what`` outside a phase."""
    label = f"{_label.get()}: {what}" if _label.get() else what
    report = Reporter(label, total, unit)
    with _bar(total, label, unit) as bar:
        for start in range(0, total, batch_size):
            yield start
            done = min(start + batch_size, total)
            bar.update(done - start)
            report(done)


def percent(progress: dict) -> float:
    """A progress record's share done, 0-100."""
    total = progress.get("total") or 0
    return 100.0 * min(progress.get("done", 0), total) / total if total else 100.0


def forward(record: logging.LogRecord, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    """Hand a record's progress to ``on_progress``; a failure there never stops a stage."""
    progress = getattr(record, "progress", None)
    if on_progress is not None and isinstance(progress, dict):
        try:
            on_progress(progress)
        except Exception:
            logger.debug("progress not shown", exc_info=True)
