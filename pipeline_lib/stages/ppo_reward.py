"""The reward model as PPO reads it (``EosClosedReward``, its scores standardised by
``score_statistics``), PPO's early stopping on KL (``KlEarlyStop``), its adaptive KL
coefficient (``AdaptiveKlCoef``) and its diversity guard (``keep_diverse``), a module of
their own so that the PPO stage's module imports without torch."""

from __future__ import annotations

import logging

import torch
import transformers

from pipeline_lib.stages.callbacks import restore_snapshot, trainable_snapshot
from pipeline_lib.stages.training import StopTraining

logger = logging.getLogger("pipeline_lib.stages.training")


class EosClosedReward(torch.nn.Module):
    """The reward model as TRL's PPO calls it, scoring every rollout as closed by EOS.

    TRL's ``get_reward`` runs ``model.<base_model_prefix>`` and ``model.score`` and reads
    the reward at each rollout's last token. A rollout cut off at ``ppo.response_length``
    (most of them at 24 tokens) ends mid-sentence, a position the reward model never
    learned to read: reward training and evaluation close every response with EOS
    (``generation.scored_sequence_ids``), and read at that EOS the reward model ranks
    held-out pairs at 0.71-0.78, mid-sentence at 0.60-0.63. This wrapper appends the EOS
    such a rollout lacks and returns, at its last token, the hidden state of that EOS, so
    PPO optimises the reward that evaluation reports. Rollouts that stopped at EOS are
    scored unchanged.
    """

    base_model_prefix = "closed_backbone"

    def __init__(self, reward_model: torch.nn.Module, eos_token_id: int, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.reward_model = reward_model
        self.score = StandardizedHead(reward_model.score, mean, std)  # the identity at mean 0, std 1
        self.eos_token_id = eos_token_id

    def closed_backbone(self, input_ids, attention_mask, position_ids, **kwargs):
        backbone = getattr(self.reward_model, self.reward_model.base_model_prefix)
        batch, width = input_ids.shape
        rows = torch.arange(batch, device=input_ids.device)
        last = width - 1 - attention_mask.long().flip(1).argmax(1)  # each row's last real token
        open_rows = rows[input_ids[rows, last] != self.eos_token_id]
        end = last[open_rows]  # where each open row's EOS goes: end + 1 (right padding follows)
        # One more column, then EOS right after the last token of every open row.
        ids, mask, positions = (torch.nn.functional.pad(t.long(), (0, 1)) for t in (input_ids, attention_mask, position_ids))
        ids[open_rows, end + 1] = self.eos_token_id
        mask[open_rows, end + 1] = 1
        positions[open_rows, end + 1] = position_ids[open_rows, end] + 1
        output = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        hidden = output.hidden_states[-1]
        closed = hidden[:, :width].clone()
        closed[open_rows, end] = hidden[open_rows, end + 1]
        output.hidden_states = (*output.hidden_states[:-1], closed)
        return output


class StandardizedHead(torch.nn.Module):
    """A score head whose output is ``(score - mean) / std``."""

    def __init__(self, head: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.head, self.mean, self.std = head, mean, std

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.head(hidden) - self.mean) / self.std


def score_statistics(scores: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of the reward model's ``scores`` (``ppo.normalize_reward``).

    A reward model trained on pairs learns differences of scores only: their scale is
    whatever the pairwise loss settled on (on the default task a standard deviation of
    3.6-4.3 over the training pairs' responses with 4 trained layers, 5.5 with 8).
    Standardised to one standard deviation over the responses it was trained to rank, the
    reward weighs the same against ``ppo.kl_coef`` nats of KL for every reward model, as
    Ziegler et al. (2019) normalise theirs."""
    values = torch.tensor(scores, dtype=torch.float64)
    if len(values) < 2:
        raise ValueError(f"standardising the reward needs at least 2 scored responses, got {len(values)}")
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise ValueError("the reward model gives every training response the same score: nothing to standardise by")
    return mean, std


def rescale_value_head(value_model: torch.nn.Module, mean: float, std: float) -> None:
    """The value model starts from the reward model: its head goes on the standardised scale
    too, so it starts out predicting rewards on the scale PPO trains it on."""
    with torch.no_grad():
        value_model.score.weight.div_(std)
        if getattr(value_model.score, "bias", None) is not None:
            value_model.score.bias.sub_(mean).div_(std)


class KlEarlyStop(transformers.TrainerCallback):
    """Ends PPO when a batch's rollouts are further than ``max_kl`` from SFT, keeping the last
    policy whose rollouts stayed within it (``ppo.max_kl``).

    On the default task, PPO that collapses onto one opening does so as its KL to SFT runs
    away (one seed's rollouts went 1.7, 3.7, 5.4 nats in three batches while their entropy
    fell by a quarter). TRL logs the KL (``objective/kl``) of each batch's rollouts after
    updating on them, so the rollouts of batch k measure the policy from before update k.
    When they pass the limit, that policy is already past it, so the trainable weights go
    back to the policy before it: the one whose rollouts were last measured within the
    limit. A snapshot is a copy of the trainable parameters only (the top layers, or the
    LoRA adapters)."""

    def __init__(self, policy: torch.nn.Module, max_kl: float):
        self.policy, self.max_kl = policy, max_kl
        self.within: dict[str, torch.Tensor] | None = None  # the last policy measured within the limit
        self.previous: dict[str, torch.Tensor] | None = None  # the policy the next batch's rollouts measure
        self.stopped_at_episode: int | None = None
        self.kept_kl: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = trainable_snapshot(self.policy)

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("objective/kl")
        if kl is None:
            return
        if kl <= self.max_kl:
            self.within, self.previous, self.kept_kl = self.previous, trainable_snapshot(self.policy), kl
            return
        self.stopped_at_episode = state.episode
        restore_snapshot(self.policy, self.within if self.within is not None else self.previous)
        raise StopTraining(
            f"stopped at episode {state.episode}: its rollouts were {kl:.2f} nats from SFT, past ppo.max_kl={self.max_kl}; "
            f"keeping the policy whose rollouts were {self.kept_kl if self.kept_kl is not None else 0.0:.2f}"
        )


class AdaptiveKlCoef(transformers.TrainerCallback):
    """Ziegler et al. (2019)'s adaptive KL coefficient, which TRL's PPO no longer has: after
    each batch, ``kl_coef`` moves towards the value that keeps the rollouts ``target`` nats
    from SFT (``ppo.target_kl``),

        error = clip(kl / target - 1, -0.2, 0.2);  kl_coef *= 1 + error * min(1, episodes / horizon)

    with ``kl`` the batch's rollouts' KL (TRL's ``objective/kl``), ``episodes`` the batch's
    rollouts and ``horizon`` ``ppo.kl_horizon``. A run under the target loosens the leash,
    one over it tightens it, by at most 20% a batch (less when the horizon is longer). TRL reads
    ``args.kl_coef`` when it computes each batch's rewards, so the next batch uses the new
    value. ``history``: the coefficient after each batch."""

    def __init__(self, target: float, horizon: int, episodes_per_batch: int):
        self.target, self.horizon, self.episodes_per_batch = target, horizon, episodes_per_batch
        self.history: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = (logs or {}).get("objective/kl")
        if kl is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        args.kl_coef *= 1.0 + error * min(1.0, self.episodes_per_batch / self.horizon)
        self.history.append(args.kl_coef)
        logger.info("ppo: rollouts %.3f nats from SFT (target %.3g): kl_coef now %.4g", kl, self.target, args.kl_coef)


class TailAverage(transformers.TrainerCallback):
    """Polyak averaging of PPO's iterates (``ppo.average_last_batches``): the policy after
    each of the last ``batches`` rollout batches (of ``total_batches``) is added to a running
    mean of the trainable weights, kept on the CPU in float32, and ``apply`` puts that mean
    in the policy once training ends.

    Why: each of PPO's updates follows one batch of sampled rollouts, so the last batch's
    policy carries that batch's noise, and where a short run ends is as much its draw as
    its settings (on the default task PPO's gain moved by up to 0.1 between 192 and 288
    episodes of the same seed, either way). The mean of the last few iterates keeps their
    shared direction and averages their noise out, as stochastic weight averaging does
    for supervised training (Izmailov et al. 2018) and WARP's moving average does for RLHF
    (Ramé et al. 2024). The mean sits behind the last iterate, closer to SFT, so it wants
    a run a little longer to travel as far. TRL logs ``objective/kl`` once per batch,
    after updating on it: that is when a batch's policy is read."""

    def __init__(self, policy: torch.nn.Module, batches: int, total_batches: int):
        self.policy = policy
        self.first = max(total_batches - batches, 0) + 1  # the first batch averaged, counted from 1
        self.mean: dict[str, torch.Tensor] | None = None
        self.batches_seen = self.averaged = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (logs or {}).get("objective/kl") is None:
            return
        self.batches_seen += 1
        if self.batches_seen < self.first:
            return
        self.averaged += 1
        weights = {name: value.float() for name, value in trainable_snapshot(self.policy, device="cpu").items()}
        if self.mean is None:
            self.mean = weights
            return
        for name, value in weights.items():
            self.mean[name] += (value - self.mean[name]) / self.averaged

    def apply(self) -> int:
        """Put the mean in the policy; returns how many batches' policies it averaged."""
        if self.averaged > 1:
            restore_snapshot(self.policy, self.mean)  # copy_ casts to each parameter's device and dtype
        return self.averaged


def keep_diverse(policy, start: dict, diversity, floor: float, probes: int) -> tuple[float, list[float]]:
    """PPO's diversity guard (``ppo.min_distinct_ratio``): the trained policy stays if
    ``diversity(policy)`` (its distinct-2 over SFT's) is at least ``floor``; otherwise
    ``probes`` bisections of the straight line in the trainable weights from SFT's
    (``start``, a ratio of 1 by definition) to the trained ones find the furthest point
    measured at or above it, and the weights go there (SFT's when no probe is). Returns that
    point, as the fraction of the way from SFT (1: the trained policy), and the ratios
    measured, in the order measured.

    Why greedy distinct-2 and not KL or entropy: on the default task PPO's failures are
    collapses onto one opening (32 of 80 held-out responses of one seed began "I'm glad to"),
    and neither showed them. That seed's rollouts ended at 2.8 nats, within the other
    seeds' 1.7-3.6, and at the highest entropy of any seed's; its greedy responses to its
    own training prompts kept 0.815 of SFT's distinct-2, and 0.798 on held-out prompts.
    Why the line to SFT and not an earlier batch's policy: the ratio is not monotone in the
    batches (one seed read 0.864 after batch 1, 0.692 after batch 2, 0.83 after batch 6),
    so going back batch by batch to the latest one above the floor threw most of that
    seed's gain away; interpolating weights between the tuned model and its start is the
    alignment-tax remedy of Lin et al. (2023), and what DPO's guard does on its own line."""
    measured = [diversity(policy)]
    if measured[0] >= floor:
        return 1.0, measured
    trained = trainable_snapshot(policy, device="cpu")
    within, beyond = 0.0, 1.0
    for _ in range(probes):
        fraction = (within + beyond) / 2
        restore_snapshot(policy, start, toward=trained, fraction=fraction)
        measured.append(diversity(policy))
        within, beyond = (fraction, beyond) if measured[-1] >= floor else (within, fraction)
    restore_snapshot(policy, start, toward=trained, fraction=within)
    return within, measured
