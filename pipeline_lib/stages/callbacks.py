"""The trainer callbacks every training stage adds (``training.train_resumable``): step
progress in the logs and the Prefect UI.
A module of their own so that importing a stage (to list or plan it) does not import
transformers."""

from __future__ import annotations

import logging

import transformers

logger = logging.getLogger("pipeline_lib.stages.training")  # where these lines have always been logged


class StepProgress(transformers.TrainerCallback):
    """Logs ``stage: step i/n, loss`` through standard logging, so step progress reaches the
    Prefect UI (the flow forwards ``pipeline_lib`` loggers) and not only a terminal's tqdm."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = next((value for key, value in (logs or {}).items() if key.endswith("loss")), None)
        shown = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
        # ``progress``: the flow shows it as the stage's progress artifact (pipeline_lib/progress.py).
        steps = {"label": f"{self.stage} training", "done": state.global_step, "total": state.max_steps}
        logger.info("%s: step %d/%d%s", self.stage, state.global_step, state.max_steps, shown, extra={"progress": steps})


def trainable_snapshot(model, device=None) -> dict:
    """A copy of the parameters that train (the top layers, or the LoRA adapters): all a KL
    guard needs to put a policy back, at a fraction of a whole model's memory; on
    ``device`` (e.g. ``"cpu"``, to keep a copy off the accelerator), else where they are."""
    return {
        name: parameter.detach().to(device, copy=True) if device is not None else parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def restore_snapshot(model, snapshot: dict, toward: dict | None = None, fraction: float = 0.0) -> None:
    """Put ``snapshot``'s parameters back; with ``toward``, the point ``fraction`` of the way
    along the straight line from ``snapshot`` to ``toward`` (0: ``snapshot`` exactly)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in snapshot:
                start = snapshot[name]
                parameter.copy_(start if toward is None or fraction == 0 else torch.lerp(start, toward[name], fraction))
