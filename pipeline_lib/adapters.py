"""LoRA adapters (``peft``) for every training stage: which modules, attach, publish, load.

A stage with ``adapter: lora`` freezes its start model and trains LoRA adapters on the
linear layers ``lora.target_modules`` names, in the top ``top_k`` decoder layers when
``top_k`` > 0 (the two compose: ``top_k`` picks the layers, LoRA how they train). A
reward model's scalar head (``score``) trains in full beside the adapters and is saved
with them (``modules_to_save``), or a reloaded reward model would score with a random head.

A stage is published in one of two forms (the model card and ``pipeline_adapter.json`` say which):

* **adapter** (default): ``adapter_config.json`` + ``adapter_model.safetensors`` + the
  tokenizer. ``base_model_name_or_path`` is always a directory of full weights on disk (the
  base model, or a stage published with full weights), so a user loads it with plain peft:
  ``AutoPeftModelForCausalLM.from_pretrained(path)`` (reward model:
  ``AutoPeftModelForSequenceClassification.from_pretrained(path, **base_kwargs)``).
* **merged** (``lora.merge: true``): full weights with the adapter merged in.

A stage that starts from another stage's adapter (DPO with LoRA after SFT with LoRA)
trains a new adapter on the start with the start's adapter merged in memory; it publishes
the two adapters concatenated (rank r1 + r2), relative to the start's own base: exactly
the same function, still one adapter on one base on disk.

Downstream stages read an adapter by loading its base and merging it (``load_merged``).
DPO, PPO and GRPO with LoRA hold no second copy of the model as their reference (TRL's own
PEFT path): PPO disables the policy's adapter; DPO and GRPO add a frozen copy of the
fresh, all-zero adapter ("ref"), the same function, and switch to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline_lib.config import PipelineConfig, TrainSection

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "pipeline_adapter.json"  # how to load the adapter's base: class and from_pretrained kwargs
CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFIER = "sequence_classifier"
# Scalar heads of reward and value models: trained in full and saved with the adapter.
SCALAR_HEADS = ("score",)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_info(path: str | Path) -> dict[str, Any]:
    """``{"base_model": DIR, "kind": causal_lm | sequence_classifier, "base_kwargs": {...}}``."""
    info_file = Path(path) / ADAPTER_INFO
    if info_file.is_file():
        return json.loads(info_file.read_text())
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    kind = SEQUENCE_CLASSIFIER if config.get("task_type") == "SEQ_CLS" else CAUSAL_LM
    return {"base_model": config["base_model_name_or_path"], "kind": kind, "base_kwargs": {}}


def _is_linear(module: nn.Module) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D  # GPT-2 style models' linear layers

    return isinstance(module, (nn.Linear, Conv1D))


def _decoder_layer_prefix(model: nn.Module) -> tuple[str, int]:
    """The qualified name of the decoder-block list and its length."""
    from pipeline_lib.models import decoder_layers

    layers = decoder_layers(model)
    name = next(name for name, module in model.named_modules() if module is layers)
    return name, len(layers)


def target_module_names(model: nn.Module, stage: str, section: "TrainSection") -> list[str]:
    """The qualified names of the linear layers that get adapters; a ConfigError naming the
    field when ``lora.target_modules`` names no linear layer of the model, or none inside
    the top ``top_k`` layers.

    Resolved here, not by peft's own matching, so that ``top_k`` and ``all-linear`` compose
    and every name in the published ``adapter_config.json`` is explicit."""
    wanted = section.lora.target_modules
    # Scalar heads train in full; 'all-linear' also leaves out the output head, as peft's does.
    skipped = {name for name, _ in model.named_modules() if name.split(".")[-1] in SCALAR_HEADS}
    if wanted == "all-linear":
        skipped |= {name for name, module in model.named_modules() if module is model.get_output_embeddings()}
    linear = [name for name, module in model.named_modules() if _is_linear(module) and name not in skipped]
    if wanted != "all-linear":
        all_named = [name for name, module in model.named_modules() if name]
        unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in all_named)]
        if unknown:
            examples = sorted({name.split(".")[-1] for name in linear})
            raise ConfigError(
                f"{stage}.lora.target_modules: {unknown} name no module of the model; its linear layers are {examples}"
            )
        linear = [name for name in linear if any(name == t or name.endswith("." + t) for t in wanted)]
        if not linear:
            raise ConfigError(f"{stage}.lora.target_modules: {list(wanted)} name no linear layer (LoRA adapts linear layers)")
    if section.top_k:
        prefix, count = _decoder_layer_prefix(model)
        top = tuple(f"{prefix}.{index}." for index in range(count - section.top_k, count))
        inside = [name for name in linear if name.startswith(top)]
        if not inside:
            raise ConfigError(
                f"{stage}.lora.target_modules: {wanted if wanted == 'all-linear' else list(wanted)} name no linear layer "
                f"inside the top {section.top_k} decoder layers that {stage}.top_k selects; set {stage}.top_k: 0 to "
                "adapt modules outside the decoder layers"
            )
        linear = inside
    output_head = next((name for name, module in model.named_modules() if module is model.get_output_embeddings()), None)
    if output_head in linear and getattr(model.config, "tie_word_embeddings", False):
        # Merging a LoRA on a tied head would change the input embeddings as well.
        raise ConfigError(
            f"{stage}.lora.target_modules: {output_head} shares its weights with the input embeddings in this "
            "model (tie_word_embeddings); leave it out"
        )
    return linear


def lora_config(model: nn.Module, stage: str, section: "TrainSection", **extra):
    """The stage's ``lora`` settings as a ``peft.LoraConfig`` on the model's resolved targets."""
    from peft import LoraConfig

    lora = section.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_module_names(model, stage, section),
        **extra,
    )


def attach(model: nn.Module, stage: str, section: "TrainSection") -> nn.Module:
    """Freeze ``model`` and wrap it with fresh LoRA adapters (``peft.get_peft_model``)."""
    from peft import TaskType, get_peft_model

    heads = [head for head in SCALAR_HEADS if hasattr(model, head)]
    config = lora_config(
        model, stage, section, task_type=TaskType.SEQ_CLS if heads else TaskType.CAUSAL_LM, modules_to_save=heads or None
    )
    return get_peft_model(model, config)


def attach_in_place(model: nn.Module, stage: str, section: "TrainSection") -> None:
    """LoRA layers injected into ``model`` itself (no ``PeftModel`` wrapper), for a model
    that trains but is never published and that a trainer reaches into by attribute (PPO's
    value model: TRL calls its backbone and ``score`` directly, outside autocast, so the
    layers keep the model's dtype). Everything else is frozen but the scalar head."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(model, stage, section), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name or name.split(".")[0] in SCALAR_HEADS


def check_targets(config: "PipelineConfig", base_model_dir: Path, stages: list[str] | None = None) -> None:
    """The target modules of every LoRA stage in ``stages`` (None: all), resolved on the
    base model's architecture built on the meta device (no weights read), so a bad name
    fails before any training."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    lora_stages = {
        name: section
        for name, section in config.train_sections().items()
        if section.adapter == "lora" and (stages is None or name in stages)
    }
    if not lora_stages:
        return
    model_config = AutoConfig.from_pretrained(base_model_dir, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    for stage, section in lora_stages.items():
        # The reward model (and PPO's value model) keep reward.num_layers layers; their top
        # layers are those of the truncated stack, the same linear layers by name.
        target_module_names(model, stage, section)


def load_merged(path: Path, trust_remote_code: bool = False, dtype: "torch.dtype | None" = None) -> nn.Module:
    """A published adapter as a plain transformers model: its base with the adapter merged in."""
    from peft import PeftModel

    from pipeline_lib import models

    info = adapter_info(path)
    kwargs = dict(info.get("base_kwargs") or {})
    # Merged in float32, then cast: a bf16 merge would round the adapter's update away.
    if info["kind"] == SEQUENCE_CLASSIFIER:
        base = models.load_sequence_classifier(
            Path(info["base_model"]), kwargs.get("pad_token_id"), trust_remote_code, kwargs.get("num_hidden_layers", 0)
        )
    else:
        base = models.load_causal_lm(Path(info["base_model"]), trust_remote_code)
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    return merged if dtype is None else merged.to(dtype)


def publish(model, out_dir: Path, start_dir: Path, merge: bool) -> dict[str, Any]:
    """Save a trained ``PeftModel`` (adapter, or merged weights); returns what the model card
    says about the form. ``start_dir`` is the directory the stage's model started from."""
    out_dir = Path(out_dir)
    if merge:
        model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
        return {"format": "full weights (LoRA adapter merged in)"}
    scalar_head = model.peft_config["default"].task_type == "SEQ_CLS"
    # Only the trained adapter: TRL's DPO and GRPO add a frozen copy ("ref") of it as the reference.
    model.save_pretrained(out_dir, safe_serialization=True, selected_adapters=["default"])
    base_kwargs: dict[str, Any] = {}
    if scalar_head:
        base_config = model.get_base_model().config
        base_kwargs = {"num_labels": 1, "pad_token_id": base_config.pad_token_id}
        base_kwargs["num_hidden_layers"] = base_config.num_hidden_layers
    base = Path(start_dir)
    if is_adapter(start_dir):
        present = {name for name, _ in model.named_modules()}
        _concatenate_start_adapter(out_dir, Path(start_dir), present)
        base = Path(adapter_info(start_dir)["base_model"])
    adapter_config = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    adapter_config["base_model_name_or_path"] = str(base.resolve())
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
    info = {
        "base_model": str(base.resolve()),
        "kind": SEQUENCE_CLASSIFIER if scalar_head else CAUSAL_LM,
        "base_kwargs": base_kwargs,
        "rank": adapter_config["r"],
    }
    (out_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    loader = "AutoPeftModelForSequenceClassification" if scalar_head else "AutoPeftModelForCausalLM"
    shown_kwargs = "".join(f", {key}={value!r}" for key, value in base_kwargs.items())
    return {
        "format": f"LoRA adapter, rank {adapter_config['r']}",
        "base model it needs": str(base.resolve()),
        "load with": f"peft.{loader}.from_pretrained(path{shown_kwargs})",
    }


def _scaling(config: dict[str, Any]) -> float:
    rank = config["r"]
    return config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _concatenate_start_adapter(out_dir: Path, start_dir: Path, present: set[str]) -> None:
    """Rewrite the adapter in ``out_dir`` (trained on the start with the start's adapter
    merged) as one adapter on the start's base: A = [s1*A1; s2*A2], B = [B1, B2], rank
    r1 + r2, scaling 1, so W + B A = W + s1 B1 A1 + s2 B2 A2 exactly.

    peft's ``add_weighted_adapter(combination_type="cat")`` computes the same, but needs
    both adapters injected into a loaded copy of the base model (a second model in memory
    at the end of every such stage); this works on the two small weight files alone.
    Modules of the start's adapter that the stage's model lacks (a reward model keeping
    the bottom reward.num_layers layers) are left out."""
    import torch
    from safetensors.torch import load_file, save_file

    new_config = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    old_config = json.loads((start_dir / ADAPTER_CONFIG).read_text())
    new, old = load_file(out_dir / ADAPTER_WEIGHTS), load_file(start_dir / ADAPTER_WEIGHTS)
    new_scale, old_scale = _scaling(new_config), _scaling(old_config)
    r_new, r_old = new_config["r"], old_config["r"]

    def lora_modules(weights: dict[str, torch.Tensor]) -> set[str]:
        return {key.rsplit(".lora_A.", 1)[0] for key in weights if ".lora_A." in key}

    new_modules = lora_modules(new)
    old_modules = {module for module in lora_modules(old) if module in present}
    combined = {key: value for key, value in new.items() if ".lora_A." not in key and ".lora_B." not in key}
    for module in sorted(new_modules | old_modules):
        a_new, b_new = new.get(f"{module}.lora_A.weight"), new.get(f"{module}.lora_B.weight")
        a_old, b_old = old.get(f"{module}.lora_A.weight"), old.get(f"{module}.lora_B.weight")
        reference_a = a_new if a_new is not None else a_old
        reference_b = b_new if b_new is not None else b_old
        dtype = reference_a.dtype
        fan_in, fan_out = reference_a.shape[1], reference_b.shape[0]
        a_parts = [
            (a_old * old_scale).to(dtype) if a_old is not None else torch.zeros(r_old, fan_in, dtype=dtype),
            (a_new * new_scale).to(dtype) if a_new is not None else torch.zeros(r_new, fan_in, dtype=dtype),
        ]
        b_parts = [
            b_old.to(dtype) if b_old is not None else torch.zeros(fan_out, r_old, dtype=dtype),
            b_new.to(dtype) if b_new is not None else torch.zeros(fan_out, r_new, dtype=dtype),
        ]
        combined[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).contiguous()
        combined[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()
    prefix = "base_model.model."
    new_config.update(
        r=r_new + r_old,
        lora_alpha=r_new + r_old,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(module.removeprefix(prefix) for module in new_modules | old_modules),
    )
    save_file(combined, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(new_config, indent=2))
