"""Data sources, schema normalisation, validation and splits (``python -m pipeline_lib.data SOURCE``)."""

from pipeline_lib.data.schemas import DataValidationError, normalize_rows
from pipeline_lib.data.sources import load_rows, source_fingerprint, split_rows

__all__ = ["DataValidationError", "load_rows", "normalize_rows", "source_fingerprint", "split_rows"]
