"""DPO's early stopping on a sampled KL to SFT (``dpo.max_kl``), a module of its own so that
the DPO stage's module imports without torch and only DPO's stage key reads it."""

from __future__ import annotations

import logging

import transformers

from pipeline_lib.stages.callbacks import restore_snapshot, trainable_snapshot

logger = logging.getLogger("pipeline_lib.stages.training")


class SampledKlStop(transformers.TrainerCallback):
    """Early stopping on KL for a trainer that never samples (DPO): every ``every_steps``
    optimizer steps, sample one response per prompt from the policy at temperature 1 and
    estimate KL(policy || reference) as evaluation does (``metrics.policy_kl``: the mean
    over prompts of log pi(y|x) - log pi_ref(y|x), summed over the response). While it is
    within ``max_kl`` the policy is remembered; the first time it is past, the policy goes
    back to the last one measured within and training stops.

    Why: how far DPO moves in a fixed number of epochs depends on the data (on the embedded
    task the same settings took six draws of data 1.6 to 4.4 nats from SFT, and 192 prompts
    instead of 128 took one to 6.8 nats, where its oracle gain halved). Bounding the KL
    lets the preset train longer for data that moves the policy slowly without letting
    data that moves it fast run away. The prompts are training prompts (nothing held out
    is read) and their samples are seeded the same at every check, so successive checks
    differ by the policy, not by the draw.

    ``reference_logprobs(pairs)`` scores (prompt ids, response ids) under the reference:
    the frozen copy, or the policy with its LoRA adapter disabled. On several processes
    (DDP) every rank holds the same weights and measures the same KL, so all stop at the
    same step; under engines that shard the weights (ZeRO-3, FSDP) sampling would need
    them gathered first, which this does not do.
    """

    def __init__(self, policy, reference_logprobs, tokenizer, prompts: list[str], max_kl: float, every_steps: int,
                 max_new_tokens: int, seed: int, system_prompt: str | None = None, batch_size: int = 16):
        self.policy, self.reference_logprobs, self.tokenizer = policy, reference_logprobs, tokenizer
        self.prompts, self.max_kl, self.every_steps = prompts, max_kl, every_steps
        self.max_new_tokens, self.seed, self.system_prompt, self.batch_size = max_new_tokens, seed, system_prompt, batch_size
        self.within: dict | None = None  # the last policy measured within the limit
        self.checks: list[dict[str, float]] = []  # every measurement: step and KL
        self.stopped_at_step: int | None = None
        self.kept_step = 0

    def measure(self) -> float:
        from statistics import fmean

        from pipeline_lib.metrics import policy_kl

        was_training = self.policy.training
        kl = fmean(policy_kl(
            self.policy, self.reference_logprobs, self.tokenizer, self.prompts, 1, self.max_new_tokens, self.batch_size,
            self.seed, self.system_prompt,
        ))
        self.policy.train(was_training)
        return kl

    def on_train_begin(self, args, state, control, **kwargs):
        self.within = trainable_snapshot(self.policy)  # the reference itself, or where a resumed run starts
        self.kept_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps and state.global_step < state.max_steps:
            return
        kl = self.measure()
        self.checks.append({"step": state.global_step, "kl": round(kl, 4)})
        logger.info("kl guard: step %d, sampled KL to the reference %.2f (limit %.2f)", state.global_step, kl, self.max_kl)
        if kl <= self.max_kl:
            self.within, self.kept_step = trainable_snapshot(self.policy), state.global_step
            return
        restore_snapshot(self.policy, self.within)
        self.stopped_at_step = state.global_step
        control.should_training_stop = True
        logger.info(
            "kl guard: stopped at step %d (%.2f nats past the limit %.2f); keeping the policy of step %d",
            state.global_step, kl, self.max_kl, self.kept_step,
        )
        if len(self.checks) == 1:
            # Nothing trained survives: say so loudly. The default preset's bound is sized for
            # the embedded task, and a config layered over it inherits the bound.
            logger.warning(
                "dpo: the first KL check (step %d, %.2f nats) was already past dpo.max_kl=%s, so DPO saves the "
                "policy it started from (step %d); raise dpo.max_kl, lower dpo.kl_check_steps, or set dpo.max_kl "
                "to null to train without the bound",
                state.global_step, kl, self.max_kl, self.kept_step,
            )
