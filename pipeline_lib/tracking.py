"""Experiment tracking: wandb, offline by default, switchable off, never a login prompt.

Run names keep the original scripts' pattern
``{stage}_{model_id}_{train_percent}_{eval_percent}_{epochs}``. The API key is read by
wandb from ``WANDB_API_KEY`` and never passes through this module's return values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline_lib.config import PipelineConfig


def run_name(stage: str, config: PipelineConfig) -> str:
    data = config.data
    if stage == "reward":
        train_percent, eval_percent = data.reward_train_percent, data.reward_eval_percent
    else:
        train_percent, eval_percent = data.train_percent, data.eval_percent
    section = getattr(config, stage, None)
    epochs = getattr(section, "num_train_epochs", 0)
    model_id = re.sub(r"[^A-Za-z0-9.-]+", "-", config.model.name.split("/")[-1].removeprefix("embedded:"))
    return f"{stage}_{model_id}_{train_percent:g}_{eval_percent:g}_{epochs:g}"


def configure(config: PipelineConfig) -> list[str]:
    """Set wandb's environment for this process; return the trainers' ``report_to``."""
    mode = config.tracking.mode
    if mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
        return []
    wandb_dir = Path(config.output_root).resolve() / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "WANDB_MODE": mode,
            "WANDB_DIR": str(wandb_dir),
            "WANDB_PROJECT": config.tracking.project,
            "WANDB_SILENT": "true",
            # Never block on a terminal prompt (offline runs do not need a login at all).
            "WANDB_CONSOLE": "off",
        }
    )
    return ["wandb"]


def finish() -> str | None:
    """Close the active wandb run, returning its id (None when tracking is off)."""
    try:
        import wandb
    except ImportError:
        return None
    run = wandb.run
    if run is None:
        return None
    run_id = run.id
    wandb.finish()
    return run_id
