"""Where rows come from, what identifies them, and how they are split.

* local ``.json``/``.jsonl``/``.parquet``/``.csv`` files, read with ``datasets``;
* hub datasets by name (and revision), read with ``datasets.load_dataset``;
* ``embedded:sentiment``, built in ``sentiment_task`` (it needs the base model).

The fingerprint of a source goes into every stage key: a local file's content hash, a
hub dataset's resolved commit (or its pinned revision when the hub is unreachable), the
embedded task's generator code. Scheduled runs recompute it, so new data retrains.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from pipeline_lib.data.schemas import DataValidationError
from pipeline_lib.store import sha256_file, sha256_text

EMBEDDED_PREFIX = "embedded:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_embedded(source: str) -> bool:
    return source.startswith(EMBEDDED_PREFIX)


def is_local(source: str) -> bool:
    return Path(source).suffix.lower() in LOCAL_FORMATS or Path(source).exists()


def load_rows(source: str, split: str = "train", revision: str | None = None, max_rows: int = 0) -> list[dict[str, Any]]:
    """Rows of a local file or hub dataset as plain dicts."""
    import datasets

    if is_local(source):
        path = Path(source)
        file_format = LOCAL_FORMATS.get(path.suffix.lower())
        if file_format is None:
            raise DataValidationError(source, f"unsupported file type {path.suffix!r}; use {', '.join(LOCAL_FORMATS)}")
        if not path.is_file():
            raise DataValidationError(source, "file does not exist")
        try:
            # datasets keys its Arrow cache of a local file on path and mtime only, so a file
            # replaced with its mtime kept (cp -p, rsync -t, tar) would be read stale while
            # source_fingerprint (content hash) says it is new: always rebuild from the file.
            dataset = datasets.load_dataset(
                file_format, data_files=str(path), split="train", download_mode="force_redownload"
            )
        except Exception as error:  # datasets raises many types for unreadable files
            raise DataValidationError(source, f"unreadable {file_format} file: {error}") from None
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, revision=revision)
        except Exception as error:
            raise DataValidationError(source, f"cannot load hub dataset (split {split!r}): {error}") from None
    if max_rows:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset.to_list()


def source_fingerprint(source: str, revision: str | None = None) -> str:
    if is_embedded(source):
        from pipeline_lib.data import sentiment_task
        from pipeline_lib.store import code_version

        return sha256_text(f"{source}:{code_version(sentiment_task)}")
    if is_local(source):
        path = Path(source)
        if not path.is_file():
            raise DataValidationError(source, "file does not exist")
        return sha256_file(path)
    return sha256_text(f"hub:{source}@{hub_dataset_revision(source, revision)}")


def hub_dataset_revision(name: str, revision: str | None) -> str:
    """The commit a hub dataset name/revision resolves to now; the pinned revision offline."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha or (revision or "main")
    except Exception as error:
        if revision:
            return revision
        raise DataValidationError(
            name, f"cannot resolve the dataset's current revision ({type(error).__name__}); pin data.revision to run offline"
        ) from None


def split_rows(rows: list[dict[str, Any]], holdout_percent: float, seed: int) -> tuple[list, list]:
    """Deterministic train/held-out split: the same rows, percent and seed give the same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out_count = max(1, round(len(rows) * holdout_percent / 100))
    if held_out_count >= len(rows):
        raise DataValidationError("split", f"{len(rows)} rows are too few to hold out {holdout_percent}%")
    held_out = sorted(order[:held_out_count])
    train = sorted(order[held_out_count:])
    return [rows[i] for i in train], [rows[i] for i in held_out]


def take_percent(rows: list, percent: float, name: str, minimum: int = 1) -> list:
    """The first ``percent`` of already shuffled-and-split rows; errors if too few remain."""
    count = int(len(rows) * percent / 100)
    if count < minimum:
        raise DataValidationError(name, f"{percent}% of {len(rows)} rows is {count}, fewer than the {minimum} needed")
    return rows[:count]


def rows_fingerprint(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(repr(sorted(row.items())).encode())
    return digest.hexdigest()
