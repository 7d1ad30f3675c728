"""Batched chat generation and response log-probabilities, shared by data prep and evaluation."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import TYPE_CHECKING

from pipeline_lib import progress

if TYPE_CHECKING:
    import torch


def no_grad(function):
    """``torch.no_grad()`` as a decorator that imports torch when called, not when this
    module is imported (listing and planning the stages never load torch)."""

    @functools.wraps(function)
    def without_gradients(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return without_gradients


def chat_messages(prompt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation every stage sends: an optional system message, then the prompt.
    ``None`` leaves the system turn to the chat template's default."""
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*system, {"role": "user", "content": prompt}]


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    return tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=True, return_dict=False
    )


def response_ids(tokenizer, response: str) -> list[int]:
    """A response's tokens closed by end-of-sequence, as a policy emits them."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def scored_sequence_ids(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> list[int]:
    """Chat prompt + response + EOS: the exact tokens PPO's rollouts hold when the reward
    model scores them. Reward training, reward scoring and log-probabilities all use this
    one layout, so the reward is read at the same position (the EOS) everywhere."""
    return chat_prompt_ids(tokenizer, prompt, system_prompt) + response_ids(tokenizer, response)


def _autocast_for(model):
    """bf16 autocast for a model whose bf16 weights sit beside float32 ones (the layers or
    adapters that train stay float32 under ``precision: bf16``); no-op otherwise."""
    import torch

    dtypes = {parameter.dtype for parameter in model.parameters()}
    if torch.bfloat16 in dtypes and len(dtypes) > 1:
        return torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@no_grad
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    system_prompt: str | None = None,
) -> list[list[str]]:
    """``num_return_sequences`` responses per prompt; greedy when temperature is 0."""
    import torch

    model.eval()
    torch.manual_seed(seed)
    results: list[list[str]] = []
    for start in progress.batches(len(prompts), batch_size, "generating"):
        batch = prompts[start : start + batch_size]
        ids, mask = _left_pad([chat_prompt_ids(tokenizer, prompt, system_prompt) for prompt in batch], tokenizer.pad_token_id)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        ids, mask = ids.to(model.device), mask.to(model.device)
        with _autocast_for(model):
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_return_sequences,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        texts = tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
        for index in range(len(batch)):
            chunk = texts[index * num_return_sequences : (index + 1) * num_return_sequences]
            results.append([text.strip() for text in chunk])
    return results


@no_grad
def response_logprobs(
    model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16, system_prompt: str | None = None
) -> list[float]:
    """Sum over response tokens of log p(token | prompt, earlier tokens) under ``model``."""
    import torch

    model.eval()
    totals: list[float] = []
    for start in progress.batches(len(prompts), batch_size, "log-probabilities"):
        prompt_ids = [chat_prompt_ids(tokenizer, p, system_prompt) for p in prompts[start : start + batch_size]]
        answers = [response_ids(tokenizer, r) for r in responses[start : start + batch_size]]
        ids, mask = _left_pad([p + r for p, r in zip(prompt_ids, answers)], tokenizer.pad_token_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        with _autocast_for(model):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, response in enumerate(answers):
            totals.append(float(logprobs[row, -len(response) :].sum()))
    return totals


@no_grad
def reward_scores(
    reward_model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16, system_prompt: str | None = None
) -> list[float]:
    """Scalar reward of each (prompt, response), laid out as ``scored_sequence_ids``."""
    import torch

    reward_model.eval()
    scores: list[float] = []
    for start in progress.batches(len(prompts), batch_size, "reward scores"):
        sequences = [
            scored_sequence_ids(tokenizer, p, r, system_prompt)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
        ]
        # Right padding: sequence-classification heads read the last non-pad token.
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with _autocast_for(reward_model):
            logits = reward_model(input_ids=ids.to(reward_model.device), attention_mask=mask.to(reward_model.device)).logits
        scores.extend(float(value) for value in logits[:, 0].float())
    return scores
