"""DPO's early stopping on a sampled KL to SFT (``dpo.max_kl``), a module of its own so that
the DPO stage's module imports without torch and only DPO's stage key reads it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pipeline_lib import progress
from pipeline_lib.generation import no_grad
from pipeline_lib.stages.callbacks import restore_snapshot, trainable_snapshot

logger = logging.getLogger("pipeline_lib.stages.training")
GUARD_STATE, GUARD_WITHIN = "kl_guard.json", "kl_guard_within.safetensors"  # beside each trainer checkpoint


def checkpoint_folder(args, state) -> Path:
    """The trainer's checkpoint of the current step, named as transformers names it."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


@no_grad
def token_kls(model, reference_logits, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16) -> list[float]:
    """For each (prompt ids, response ids): the sum over the response's positions of the
    exact KL between ``model``'s and the reference's next-token distributions there, given
    the tokens before (``reference_logits(ids, attention_mask, logits_to_keep)`` runs the
    reference). Where the responses were sampled from ``model``, its mean estimates
    KL(model || reference) over whole responses, as the sampled log-ratio does (the chain
    rule: the sequence KL is the expected sum of the per-position KLs along a sample), with
    the draw of each token averaged out exactly (Rao-Blackwellised). On the embedded task,
    one response to each of 32 prompts from a DPO policy (seed 15's), drawn eight times,
    read 2.39 nats on the mean with a standard deviation of 0.09 over the draws this way,
    against 2.54 and 0.47 from the log-ratio of the same responses. It costs one forward
    pass of ``model`` more (the log-ratio reads the policy's log-probabilities off its
    sampler); only the response positions' logits are computed (``logits_to_keep``)."""
    import torch

    from pipeline_lib.generation import _autocast_for, _left_pad

    model.eval()
    totals: list[float] = []
    for start in progress.batches(len(pairs), batch_size, "KL along responses"):
        batch = pairs[start : start + batch_size]
        longest = max(len(answer) for _, answer in batch)
        ids, mask = _left_pad([prompt + answer for prompt, answer in batch], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        # Left padding puts every response at the end: the last `longest` positions predict them.
        with _autocast_for(model):
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=longest + 1).logits[:, :-1]
            reference = reference_logits(ids, mask, longest + 1)[:, :-1]
        logp, logq = torch.log_softmax(logits.float(), dim=-1), torch.log_softmax(reference.float(), dim=-1)
        per_position = (logp.exp() * (logp - logq)).sum(-1)
        for row, (_, answer) in enumerate(batch):
            totals.append(float(per_position[row, longest - len(answer) :].sum()))  # an empty response sums to 0
    return totals


class SampledKlStop(transformers.TrainerCallback):
    """Early stopping on KL for a trainer that never samples (DPO): every ``every_steps``
    optimizer steps, sample one response per prompt from the policy at temperature 1 and
    estimate KL(policy || reference) along them (``token_kls``: the mean over
    prompts of the exact per-position KLs, summed over the response). While it is
    within ``max_kl`` the policy is remembered; the first time it is past, training stops and
    the policy goes back towards the last one measured within: ``probes`` more measurements
    on the straight line between the two (in the trained weights) find the furthest point
    within, and that is kept (the last policy within itself when none is).

    Why the line: checks are far apart (an epoch, on the default preset), and going all the
    way back throws away a whole interval of training for a bound crossed somewhere inside
    it. On the first check that is everything: on a GPU, whose kernels round differently,
    two of five seeds were past the bound at their first check (4.09 and 4.38 nats against
    3.5) and DPO saved SFT unchanged. Points on the line between two checkpoints of one
    run are policies too (weight interpolation, as WiSE-FT and ExPO use between a fine-tuned
    model and its start), and their KL grows along it, give or take the check's noise. Each
    probe is placed where a straight line through the two nearest measurements reaches
    ``max_kl`` (regula falsi, kept 10% away from either end), and only a point measured
    within is kept. On the GPU's two seeds, two probes (~1 s each there, 12-14 s on one CPU
    core) kept the points 77% and 80% of the way from SFT to step 16 (3.31 and 3.09 nats).

    Why: how far DPO moves in a fixed number of epochs depends on the data (on the embedded
    task the same settings took six draws of data 1.6 to 4.4 nats from SFT, and 192 prompts
    instead of 128 took one to 6.8 nats, where its oracle gain halved). Bounding the KL
    lets the preset train longer for data that moves the policy slowly without letting
    data that moves it fast run away. The prompts are training prompts (nothing held out
    is read) and their samples are seeded the same at every check, so successive checks
    differ by the policy, not by the draw.

    Why not the sampled log-ratio evaluation reports (``metrics.policy_kl``): it estimates the
    same KL, but one response per prompt on 32 prompts left it noisier than the bound's
    margins. Checks of one run a few percent apart on the line read 2.95 and 3.62 nats (seed
    0), 4.23 at 88% of the way and 3.62 at its end (seed 10): which check crossed 3.5 was
    largely the draw's. The exact per-position KLs along the same responses read the same
    KL with about a fifth of the spread (``token_kls``).

    ``reference_logits(ids, attention_mask, logits_to_keep)`` runs the reference: the frozen
    copy, or the policy with its LoRA adapter disabled. On several processes
    (DDP) every rank holds the same weights and measures the same KL, so all stop at the
    same step; under engines that shard the weights (ZeRO-3, FSDP) sampling would need
    them gathered first, which this does not do.

    Resuming: every trainer checkpoint also gets the guard's measurements and the weights of
    the last policy within, so a run resumed from a checkpoint between two checks stops and
    goes back exactly where the uninterrupted run would (from the last policy measured
    within, not from the unmeasured checkpoint). No checkpoint is written once the guard has
    stopped training, so none resumes past a stop.
    """

    def __init__(self, policy, reference_logits, tokenizer, prompts: list[str], max_kl: float, every_steps: int,
                 max_new_tokens: int, seed: int, system_prompt: str | None = None, batch_size: int = 16,
                 probes: int = 0):
        self.policy, self.reference_logits, self.tokenizer = policy, reference_logits, tokenizer
        self.prompts, self.max_kl, self.every_steps, self.probes = prompts, max_kl, every_steps, probes
        self.max_new_tokens, self.seed, self.system_prompt, self.batch_size = max_new_tokens, seed, system_prompt, batch_size
        self.within: dict | None = None  # the last policy measured within the limit
        self.within_kl = 0.0  # its KL: 0 for the reference itself
        self.checks: list[dict[str, float]] = []  # every measurement: step, KL, and a probe's fraction
        self.stopped_at_step: int | None = None
        self.kept_step = 0
        self.kept_fraction = 0.0  # how far along the line from kept_step's policy to stopped_at_step's

    def measure(self) -> float:
        from statistics import fmean

        from pipeline_lib.generation import sample_response_ids

        was_training = self.policy.training
        pairs, _ = sample_response_ids(
            self.policy, self.tokenizer, self.prompts, 1, self.max_new_tokens, self.batch_size, self.seed, self.system_prompt
        )
        kl = fmean(token_kls(self.policy, self.reference_logits, pairs, self.tokenizer.pad_token_id, self.batch_size))
        self.policy.train(was_training)
        return kl

    def on_train_begin(self, args, state, control, **kwargs):
        self.within = trainable_snapshot(self.policy)  # the reference itself
        self.kept_step = state.global_step
        if state.global_step:
            self.resume(checkpoint_folder(args, state))

    def on_save(self, args, state, control, **kwargs):
        # Why by hand: transformers' ExportableState keeps a callback's JSON-able fields in
        # trainer_state.json and rebuilds the callback from them, which a guard holding the
        # policy, its tokenizer and the last policy within (weights) cannot be.
        from safetensors.torch import save_file

        if not state.is_world_process_zero:
            return
        folder = checkpoint_folder(args, state)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.within.items()}, folder / GUARD_WITHIN)
        (folder / GUARD_STATE).write_text(json.dumps(
            {"checks": self.checks, "within_kl": self.within_kl, "kept_step": self.kept_step}, indent=2))

    def resume(self, checkpoint: Path) -> None:
        """Pick up the measurements and the last policy within that ``checkpoint`` holds. Every
        checkpoint this code resumes has them: this module is in DPO's stage key, so a
        checkpoint written by the code before it belongs to another stage key's work folder."""
        from safetensors.torch import load_file

        saved = json.loads((checkpoint / GUARD_STATE).read_text())
        self.checks, self.within_kl, self.kept_step = saved["checks"], saved["within_kl"], saved["kept_step"]
        weights = load_file(checkpoint / GUARD_WITHIN)
        self.within = {name: weights[name].to(device=now.device, dtype=now.dtype) for name, now in self.within.items()}
        logger.info("kl guard: resumed from %s with %d measurements; the last policy within is step %d's (%.2f nats)",
                    checkpoint.name, len(self.checks), self.kept_step, self.within_kl)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps and state.global_step < state.max_steps:
            return
        kl = self.measure()
        self.checks.append({"step": state.global_step, "kl": round(kl, 4)})
        logger.info("kl guard: step %d, sampled KL to the reference %.2f (limit %.2f)", state.global_step, kl, self.max_kl)
        if kl <= self.max_kl:
            self.within, self.within_kl, self.kept_step = trainable_snapshot(self.policy), kl, state.global_step
            return
        self.stopped_at_step = state.global_step
        control.should_training_stop = True
        control.should_save = False  # the stage saves the policy kept; a checkpoint would only resume past the stop
        first_check = len(self.checks) == 1  # before the probes add theirs
        self.kept_fraction, kept_kl = self.search_line(state.global_step, kl)
        if self.kept_fraction == 0 and first_check:
            # Nothing trained survives: say so loudly. The default preset's bound is sized for
            # the embedded task, and a config layered over it inherits the bound.
            logger.warning(
                "dpo: the first KL check (step %d, %.2f nats) was already past dpo.max_kl=%s and no point on the way "
                "to it was within, so DPO saves the policy it started from (step %d); raise dpo.max_kl, lower "
                "dpo.kl_check_steps, or set dpo.max_kl to null to train without the bound",
                state.global_step, kl, self.max_kl, self.kept_step,
            )
        else:
            kept = (f"{100 * self.kept_fraction:.0f}% of the way from step {self.kept_step}'s to step {state.global_step}'s"
                    if self.kept_fraction else f"of step {self.kept_step}")
            logger.info("kl guard: stopped at step %d (%.2f nats, past the limit %.2f); keeping the policy %s (%.2f nats)",
                        state.global_step, kl, self.max_kl, kept, kept_kl)

    def search_line(self, step: int, kl: float) -> tuple[float, float]:
        """Leave the policy at the furthest point found within ``max_kl`` on the line from the
        last policy within (fraction 0) to the current one (fraction 1); its fraction and KL."""
        if not self.probes:  # no line to search: no copy of the policy past the limit either
            restore_snapshot(self.policy, self.within)
            return 0.0, self.within_kl
        past = trainable_snapshot(self.policy)
        (low, low_kl), (high, high_kl) = (0.0, self.within_kl), (1.0, kl)
        for _ in range(self.probes):
            # where the chord through the two ends reaches max_kl, kept off the ends
            share = (self.max_kl - low_kl) / (high_kl - low_kl) if high_kl > low_kl else 0.5
            fraction = low + (high - low) * min(max(share, 0.1), 0.9)
            restore_snapshot(self.policy, self.within, past, fraction)
            measured = self.measure()
            self.checks.append({"step": step, "fraction": round(fraction, 4), "kl": round(measured, 4)})
            logger.info("kl guard: %.0f%% of the way from step %d to step %d, sampled KL %.2f (limit %.2f)",
                        100 * fraction, self.kept_step, step, measured, self.max_kl)
            if measured <= self.max_kl:
                low, low_kl = fraction, measured
            else:
                high, high_kl = fraction, measured
        restore_snapshot(self.policy, self.within, past, low)
        return low, low_kl
