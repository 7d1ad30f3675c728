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


class InverseCdfSampler:
    """Samples each row's next token from softmax(scores / temperature), and hands greedy
    decoding a row that is -inf everywhere but there, so ``generate``'s argmax takes it.

    Why not ``generate(do_sample=True)``: on CPU, ``torch.multinomial`` draws one
    exponential variate per vocabulary entry, about 100 ms a step for 64 rows of a 49k
    vocabulary, a quarter of a decoding step of the 135M model. One uniform per row
    against the cumulative distribution draws from the same distribution in about 10 ms.
    The draws come from a generator of its own, so they are reproducible from ``seed``
    whatever else used the global generator.

    ``logprobs`` holds, step by step, each row's log-probability of the token it drew under
    the distribution it drew from: at temperature 1 the policy's own log pi(token), which a
    sampled KL needs and would otherwise spend a second forward pass on (``token_logprobs``).
    """

    def __init__(self, temperature: float, seed: int):
        import torch

        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.logprobs: list[torch.Tensor] = []  # one (rows,) tensor per decoding step

    def __call__(self, input_ids, scores):
        import torch

        scaled = scores.float() / self.temperature
        probs = torch.softmax(scaled, dim=-1)
        cumulative = probs.cumsum(dim=-1).cpu()
        draws = torch.rand(cumulative.shape[0], 1, generator=self.generator) * cumulative[:, -1:]
        tokens = torch.searchsorted(cumulative, draws, right=True).clamp_(max=cumulative.shape[-1] - 1).to(scores.device)
        self.logprobs.append((scaled.gather(1, tokens) - torch.logsumexp(scaled, dim=-1, keepdim=True)).squeeze(1))
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens, 0.0)


def _decode(
    model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, copies: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New token ids for ``copies`` continuations of each prompt (prompt-major), sampled at
    ``temperature`` from the full distribution (no top-k, top-p or repetition penalty),
    greedy at 0, and when sampling each token's log-probability under the distribution it
    was drawn from (``InverseCdfSampler.logprobs``, same shape; None when greedy). The prompt
    is encoded once into the KV cache, and a batch stops as soon as every row has emitted EOS."""
    import torch
    from transformers import LogitsProcessorList

    ids, mask = _left_pad(prompt_ids, tokenizer.pad_token_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    sampler = InverseCdfSampler(temperature, seed) if temperature > 0 else None
    processors = LogitsProcessorList([sampler] if sampler else [])
    with _autocast_for(model):
        cache = None
        if copies > 1:
            # Encode each prompt once, not once per copy: a 28-token prompt costs as much as
            # the 24 tokens sampled after it. All but its last token go into the KV cache,
            # which is then repeated for the copies; generate encodes only what is not cached.
            # Only the cache is wanted: logits for one position, not 27 x 49k floats per prompt.
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            prefix_mask = mask[:, :-1]
            positions = (prefix_mask.cumsum(-1) - 1).clamp_(min=0)
            model(input_ids=ids[:, :-1], attention_mask=prefix_mask, position_ids=positions, cache=cache, use_cache=True,
                  logits_to_keep=1)
            cache.batch_repeat_interleave(copies)
            ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            do_sample=False,
            logits_processor=processors,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
    return output[:, ids.shape[1] :], torch.stack(sampler.logprobs, dim=1) if sampler else None


def _by_length(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of the prompts in batches of similar length (longest first), so a batch
    pads few positions; seeding per batch keeps each batch's draws its own."""
    order = sorted(range(len(prompt_ids)), key=lambda index: (-len(prompt_ids[index]), index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


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
    """``num_return_sequences`` responses per prompt, in the prompts' order; greedy when
    temperature is 0. ``batch_size`` counts prompts."""
    model.eval()
    prompt_ids = [chat_prompt_ids(tokenizer, prompt, system_prompt) for prompt in prompts]
    results: list[list[str]] = [[] for _ in prompts]
    groups = _by_length(prompt_ids, batch_size)
    for start in progress.batches(len(prompts), batch_size, "generating"):
        batch = groups[start // batch_size]
        generated, _ = _decode(
            model, tokenizer, [prompt_ids[i] for i in batch], max_new_tokens, temperature, num_return_sequences, seed + start
        )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for row, index in enumerate(batch):
            chunk = texts[row * num_return_sequences : (row + 1) * num_return_sequences]
            results[index] = [text.strip() for text in chunk]
    return results


def response_logprobs(
    model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16, system_prompt: str | None = None
) -> list[float]:
    """Sum over response tokens of log p(token | prompt, earlier tokens) under ``model``;
    each response is re-tokenized and closed by EOS."""
    pairs = [(chat_prompt_ids(tokenizer, p, system_prompt), response_ids(tokenizer, r)) for p, r in zip(prompts, responses)]
    return token_logprobs(model, pairs, tokenizer.pad_token_id, batch_size)


@no_grad
def token_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Sum of log p(response token | prompt, earlier tokens) under ``model`` for each
    (prompt ids, response ids) pair; the tokens are scored exactly as given."""
    import torch

    model.eval()
    totals: list[float] = []
    for start in progress.batches(len(pairs), batch_size, "log-probabilities"):
        batch = pairs[start : start + batch_size]
        ids, mask = _left_pad([prompt + answer for prompt, answer in batch], pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        with _autocast_for(model):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, (_, answer) in enumerate(batch):
            totals.append(float(logprobs[row, -len(answer) :].sum()) if answer else 0.0)
    return totals


@no_grad
def sample_response_ids(
    model,
    tokenizer,
    prompts: list[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    batch_size: int = 16,
    seed: int = 0,
    system_prompt: str | None = None,
) -> tuple[list[tuple[list[int], list[int]]], list[float]]:
    """(prompt ids, response ids) for ``samples_per_prompt`` samples per prompt, prompt-major,
    drawn at temperature 1 from the full distribution (no top-k, top-p or repetition penalty),
    so they are samples of the policy itself, as a KL estimate needs, and each response's
    log-probability under ``model`` (summed over its tokens, as ``token_logprobs`` scores
    it, but read off the sampler instead of a second forward pass). A response keeps its
    EOS when it emitted one and stops at ``max_new_tokens`` otherwise; the token ids are
    kept as sampled, never decoded and re-tokenized. Seeded per batch, so a batch's samples
    do not depend on the batches before it."""
    model.eval()
    prompt_ids = [chat_prompt_ids(tokenizer, prompt, system_prompt) for prompt in prompts]
    samples: list[list[tuple[list[int], list[int], float]]] = [[] for _ in prompts]
    prompts_per_batch = max(1, batch_size // samples_per_prompt)
    groups = _by_length(prompt_ids, prompts_per_batch)
    for start in progress.batches(len(prompts), prompts_per_batch, "sampling"):
        batch = groups[start // prompts_per_batch]
        generated, logprobs = _decode(
            model, tokenizer, [prompt_ids[i] for i in batch], max_new_tokens, 1.0, samples_per_prompt, seed + start
        )
        for row, (response, step_logprobs) in enumerate(zip(generated.tolist(), logprobs.float().tolist())):
            if tokenizer.eos_token_id in response:
                response = response[: response.index(tokenizer.eos_token_id) + 1]
            index = batch[row // samples_per_prompt]
            samples[index].append((prompt_ids[index], response, sum(step_logprobs[: len(response)])))
    flat = [sample for per_prompt in samples for sample in per_prompt]
    return [(prompt, response) for prompt, response, _ in flat], [logprob for _, _, logprob in flat]


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


def pair_response_scores(
    reward_model, tokenizer, pairs: list[dict[str, str]], system_prompt: str | None = None
) -> dict[tuple[str, str], float]:
    """The reward of every distinct (prompt, response) on either side of ``pairs``, each
    scored once: a prompt's k samples make up to k(k-1)/2 pairs, so scoring pair by pair
    would run the model on each sample k-1 times."""
    texts = list(dict.fromkeys((pair["prompt"], pair[side]) for pair in pairs for side in ("chosen", "rejected")))
    prompts, responses = [prompt for prompt, _ in texts], [response for _, response in texts]
    return dict(zip(texts, reward_scores(reward_model, tokenizer, prompts, responses, system_prompt=system_prompt)))
