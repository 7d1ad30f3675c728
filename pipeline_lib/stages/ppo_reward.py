"""The reward model as PPO reads it (``EosClosedReward``), a module of its own so that the
PPO stage's module imports without torch."""

from __future__ import annotations

import torch


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

    def __init__(self, reward_model: torch.nn.Module, eos_token_id: int):
        super().__init__()
        self.reward_model = reward_model
        self.score = reward_model.score
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
