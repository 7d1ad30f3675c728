"""What every training stage shares: TRL config fields, resume, rescue on failure, saving.

* ``trainer_args`` maps a stage section onto TRL's own config fields (names unchanged).
* ``train_resumable`` resumes from the newest ``checkpoints/checkpoint-*`` in the work
  directory, so an interrupted stage continues instead of starting over; if training
  raises, what was trained so far goes to ``failed/model`` beside ``failed/error.json``
  (never in place of a good output) and the error propagates.
* ``save_model`` writes safetensors, the tokenizer and a model card with lineage.

On several processes (``launch.num_processes > 1``, ``pipeline_lib/distributed.py``)
every rank runs the same stage code; only rank 0 writes (``is_main_process``), and the
trainers save their checkpoints from rank 0 themselves.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from pathlib import Path
from typing import Any

from pipeline_lib import adapters, tracking
from pipeline_lib.config import PipelineConfig, TrainSection
from pipeline_lib.distributed import is_main_process, sharded_weights
from pipeline_lib.errors import StageFailed

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"


def seed_everything(seed: int) -> None:
    import torch
    import transformers

    transformers.set_seed(seed)
    torch.use_deterministic_algorithms(False)


def learning_rate(section: TrainSection) -> float:
    """The stage's peak rate: ``lora.learning_rate`` when it trains LoRA adapters and sets one."""
    if section.adapter == "lora" and section.lora.learning_rate is not None:
        return section.lora.learning_rate
    return section.learning_rate


def trainer_args(stage: str, config: PipelineConfig, section: TrainSection, out_dir: Path) -> dict[str, Any]:
    """Keyword arguments shared by TRL's SFTConfig, RewardConfig, DPOConfig and PPOConfig."""
    import torch

    return {
        "output_dir": str(Path(out_dir) / CHECKPOINT_DIR),
        "num_train_epochs": section.num_train_epochs,
        "max_steps": section.max_steps,
        "learning_rate": learning_rate(section),
        "per_device_train_batch_size": section.per_device_train_batch_size,
        "gradient_accumulation_steps": section.gradient_accumulation_steps,
        "warmup_steps": section.warmup_steps,
        "lr_scheduler_type": section.lr_scheduler_type,
        "logging_steps": section.logging_steps,
        "save_strategy": "steps",
        "save_steps": section.save_steps,
        "save_total_limit": 2,
        "save_only_model": False,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": tracking.configure(config),
        "run_name": tracking.run_name(stage, config),
        "use_cpu": not torch.cuda.is_available(),
        "bf16": config.precision == "bf16",
        "fp16": config.precision == "fp16",
        "activation_checkpointing": section.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
        # Several processes (DDP): every parameter that trains is used in every forward, so
        # DDP need not search the graph for unused ones after each backward.
        "ddp_find_unused_parameters": False,
    }


def latest_checkpoint(out_dir: Path) -> str | None:
    checkpoints = sorted(
        (Path(out_dir) / CHECKPOINT_DIR).glob("checkpoint-*"),
        key=lambda path: int(re.sub(r"\D", "", path.name) or 0),
    )
    complete = [path for path in checkpoints if (path / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def no_example_fits(stage: str, max_length: int | None) -> StageFailed:
    return StageFailed(f"{stage} failed: no training example fits {stage}.max_length={max_length}; raise {stage}.max_length")


class StopTraining(Exception):
    """A callback's way to end training where it stands, with the model as the callback left
    it: TRL's PPO loop never reads ``control.should_training_stop``. Not a failure."""


def train_resumable(stage: str, trainer, out_dir: Path, resume: bool = True) -> dict[str, Any]:
    """Train (resuming from the last checkpoint when there is one); rescue the model on failure."""
    examples = getattr(trainer, "train_dataset", None)
    if examples is not None and len(examples) == 0:
        # TRL drops examples longer than max_length before training; say so, not "num_samples=0".
        raise no_example_fits(stage, getattr(trainer.args, "max_length", None))
    from pipeline_lib.stages.callbacks import StepProgress

    trainer.add_callback(StepProgress(stage))
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint:
        logger.info("%s: resuming from %s (%s)", stage, Path(checkpoint).name, checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint) if resume else trainer.train()
    except StopTraining as stop:
        logger.info("%s: %s", stage, stop)
        result = None
    except BaseException as error:
        if is_main_process():
            _rescue(trainer, stage, Path(out_dir) / "failed", error)
        tracking.finish()
        if isinstance(error, Exception):
            raise StageFailed(f"{stage} failed: {type(error).__name__}: {error}") from error
        raise
    metrics = dict(getattr(result, "metrics", None) or {})
    metrics["resumed_from_checkpoint"] = checkpoint is not None
    return metrics


def _rescue(trainer, stage: str, rescue: Path, error: BaseException) -> None:
    """What was trained so far, and the error, to ``failed/`` (never in place of an output)."""
    try:
        trainer.save_model(str(rescue / "model"))
    except Exception:  # the model may be in no state to save; the error matters more
        logger.exception("%s: could not save the partially trained model", stage)
    rescue.mkdir(parents=True, exist_ok=True)
    (rescue / "error.json").write_text(
        json.dumps({"stage": stage, "error": repr(error), "traceback": traceback.format_exc()}, indent=2)
    )


def loss_history(trainer) -> list[dict[str, float]]:
    return [
        {key: value for key, value in entry.items() if isinstance(value, (int, float))}
        for entry in trainer.state.log_history
        if any(key.endswith("loss") for key in entry)
    ]


def prepare_model(model, stage: str, section: TrainSection, upcast: bool = True) -> tuple[Any, dict[str, int]]:
    """The model a stage trains: LoRA adapters on it (``adapter: lora``) or its top
    ``top_k`` layers unfrozen; plus its trainable and total parameter counts. ``upcast``
    keeps what trains in float32 under bf16 weights (a trainer that runs every forward
    under autocast); peft's adapters are float32 either way."""
    from pipeline_lib.models import freeze_all_but_top_k, parameter_counts, upcast_trainable

    if section.adapter == "lora":
        model = adapters.attach(model, stage, section)
    else:
        freeze_all_but_top_k(model, section.top_k)
    if upcast:
        upcast_trainable(model)  # bf16 weights: what trains stays float32 (autocast computes in bf16)
    if section.gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; make them require it.
        model.enable_input_require_grads()
    return model, parameter_counts(model)


def load_policy_and_reference(config: PipelineConfig, section: TrainSection, start_dir: Path):
    """The policy a preference stage starts from, and its frozen reference: a second copy,
    or None with LoRA (TRL then takes the reference from the policy itself: no second copy)."""
    from pipeline_lib.models import load_causal_lm, torch_dtype

    def load():
        return load_causal_lm(start_dir, config.model.trust_remote_code, torch_dtype(config.precision))

    return load(), None if section.adapter == "lora" else load()


def save_model(
    model,
    tokenizer,
    out_dir: Path,
    stage: str,
    lineage: dict[str, Any],
    start_dir: Path | None = None,
    section: TrainSection | None = None,
    trainer=None,
) -> None:
    """Publish a trained model: full weights, or (a LoRA stage) its adapter or merged
    weights (``adapters.publish``); the tokenizer; a model card with lineage and form.

    Called on every rank. Under an engine that shards the weights (FSDP, DeepSpeed ZeRO-3)
    the trainer's own ``save_model`` gathers them (a collective) and rank 0 writes them;
    otherwise rank 0 holds the whole model and writes it alone."""
    import torch
    from peft import PeftModel

    out_dir = Path(out_dir)
    if trainer is not None and sharded_weights():
        trainer.save_model(str(out_dir))
        if not is_main_process():
            return
        (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments; nothing reads it
        form = {"format": "full weights"}
    elif not is_main_process():
        return
    elif isinstance(model, PeftModel):
        if start_dir is None or section is None:
            raise ValueError("saving a LoRA model needs the directory it started from and its section")
        form = adapters.publish(model, out_dir, start_dir, section.lora.merge)
    else:
        frozen = [parameter.dtype for parameter in model.parameters() if not parameter.requires_grad]
        if torch.bfloat16 in frozen:  # precision bf16: publish in bf16, trained float32 layers included
            model = model.to(torch.bfloat16)
        model.save_pretrained(out_dir, safe_serialization=True)
        form = {"format": "full weights"}
    tokenizer.save_pretrained(out_dir)
    lines = [f"# {stage} model", "", "Produced by the rlhf-pipeline.", ""]
    lines += [f"- **{name}**: `{value}`" for name, value in form.items()]
    lines += ["", "Lineage:", ""]
    lines += [f"- **{name}**: `{value}`" for name, value in lineage.items()]
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def write_loss_log(trainer, out_dir: Path) -> list[dict[str, float]]:
    history = loss_history(trainer)
    if is_main_process():
        (Path(out_dir) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    return history
