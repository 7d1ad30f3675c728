"""Base models, tokenizers and top-k freezing on the tiny 4-layer Llama."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline_lib.config import ModelSection
from pipeline_lib.models import (
    CHATML_TEMPLATE,
    ModelError,
    _download_hub_model,
    base_model_fingerprint,
    freeze_all_but_top_k,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    materialize_base_model,
    num_decoder_layers,
)

# tiny-random-llama by hand: hidden 64, MLP 128, 4 query heads and 2 key/value heads of 16.
ATTENTION = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o
MLP = 3 * 64 * 128  # gate, up, down
LAYER = ATTENTION + MLP + 2 * 64  # + two RMSNorms
FINAL_NORM = 64


def trainable_names(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_top_k_zero_trains_the_whole_model(tiny_base_model: Path) -> None:
    model = load_causal_lm(tiny_base_model)
    counts = freeze_all_but_top_k(model, 0)
    assert counts["trainable_parameters"] == counts["total_parameters"]
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_top_k_two_trains_the_last_two_layers_and_final_norm(tiny_base_model: Path) -> None:
    model = load_causal_lm(tiny_base_model)
    vocabulary = model.config.vocab_size

    counts = freeze_all_but_top_k(model, 2)

    assert counts == {
        "trainable_parameters": 2 * LAYER + FINAL_NORM,
        # the LM head is tied to the embeddings: counted once
        "total_parameters": vocabulary * 64 + 4 * LAYER + FINAL_NORM,
    }
    trainable = trainable_names(model)
    assert {name.split(".")[2] for name in trainable if ".layers." in name} == {"2", "3"}
    assert "model.norm.weight" in trainable
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.lm_head.weight.requires_grad
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sequence_classifier_score_head_trains_with_the_top_layers(tiny_base_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_base_model)
    model = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id)

    counts = freeze_all_but_top_k(model, 2)

    assert counts["trainable_parameters"] == 2 * LAYER + FINAL_NORM + 64  # score: 64 -> 1, no bias
    assert "score.weight" in trainable_names(model)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_top_k_above_the_layer_count_is_rejected(tiny_base_model: Path) -> None:
    model = load_causal_lm(tiny_base_model)
    with pytest.raises(ModelError, match="top_k=5 is above the model's 4 decoder layers"):
        freeze_all_but_top_k(model, 5)
    assert num_decoder_layers(tiny_base_model) == 4


def test_tiny_base_model_is_reused_not_rebuilt(tiny_base_model: Path) -> None:
    model_section = ModelSection(name="tiny-random-llama")
    before = (tiny_base_model / "model.safetensors").stat().st_mtime_ns
    assert materialize_base_model(model_section, tiny_base_model.parent, corpus=[]) == tiny_base_model
    assert (tiny_base_model / "model.safetensors").stat().st_mtime_ns == before


def test_embedded_model_keys_follow_its_weights_not_when_they_were_installed(tmp_path: Path, monkeypatch) -> None:
    # A new virtual environment installs the same gguf at another time: the stages already
    # in the store must keep their keys. Other weights must not.
    from pipeline_lib import models

    gguf = tmp_path / models.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF weights" * 1000)
    monkeypatch.setattr(models, "_smollm2_gguf_dir", lambda: tmp_path)
    embedded = ModelSection(name=models.EMBEDDED_SMOLLM2)
    fingerprint = base_model_fingerprint(embedded)

    reinstalled = gguf.stat().st_mtime_ns + 3_600_000_000_000
    os.utime(gguf, ns=(reinstalled, reinstalled))
    assert base_model_fingerprint(embedded) == fingerprint

    gguf.write_bytes(b"other weights" * 1000)
    assert base_model_fingerprint(embedded) != fingerprint


def test_large_weights_are_hashed_once_per_machine_not_once_per_process(tmp_path: Path, monkeypatch) -> None:
    # An 8B model's safetensors take most of a minute to hash: a second process (here, the
    # in-process cache cleared) reads the digest kept on disk; a rewritten file is hashed again.
    from pipeline_lib import models

    local = tmp_path / "my-model"
    local.mkdir()
    weights = local / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "DISK_CACHED_BYTES", 1000)  # this file counts as large
    hashed: list[Path] = []
    real_sha256_file = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda path: hashed.append(path) or real_sha256_file(path))
    section = ModelSection(name=str(local))

    fingerprint = base_model_fingerprint(section)
    assert hashed == [weights] and len(list(models.digest_cache_dir().iterdir())) == 1
    models._cached_digest.cache_clear()  # a new process
    assert base_model_fingerprint(section) == fingerprint and hashed == [weights]

    weights.write_bytes(b"trained " * 1000)
    models._cached_digest.cache_clear()
    assert base_model_fingerprint(section) != fingerprint and hashed == [weights, weights]


def test_local_directory_is_used_as_the_base_model(tiny_base_model: Path, tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    shutil.copytree(tiny_base_model, local)

    model_section = ModelSection(name=str(local))

    assert materialize_base_model(model_section, tmp_path / "cache") == local
    assert load_causal_lm(local).config.num_hidden_layers == 4
    fingerprint = base_model_fingerprint(model_section)
    (local / "generation_config.json").write_text("{}")
    assert base_model_fingerprint(model_section) != fingerprint, "a changed file changes the fingerprint"


def test_hub_loading_path_on_a_local_directory(tiny_base_model: Path, tmp_path: Path) -> None:
    # from_pretrained takes a hub id or a path alike: this runs the download branch offline.
    target = _download_hub_model(ModelSection(name=str(tiny_base_model)), tmp_path / "cache" / "copy")

    assert (target / "config.json").is_file()
    copied, original = load_file(target / "model.safetensors"), load_file(tiny_base_model / "model.safetensors")
    assert copied.keys() == original.keys()
    assert all(torch.equal(copied[name], original[name]) for name in original)
    assert load_tokenizer(target).get_vocab() == load_tokenizer(tiny_base_model).get_vocab()
    assert not (tmp_path / "cache" / "copy.partial").exists()


def test_directory_without_config_json_is_rejected(tmp_path: Path) -> None:
    not_a_model = tmp_path / "weights-only"
    not_a_model.mkdir()
    (not_a_model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model\.name: .*weights-only is a directory without config\.json"):
        materialize_base_model(ModelSection(name=str(not_a_model)), tmp_path / "cache")


def test_tiny_tokenizer_has_a_pad_token_and_a_chatml_template(tiny_base_model: Path) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tiny_base_model)  # what was written, before load_tokenizer's fallbacks
    assert saved.chat_template == CHATML_TEMPLATE
    assert saved.pad_token == "<|endoftext|>" and saved.pad_token_id != saved.eos_token_id
    assert saved.eos_token == "<|im_end|>"

    tokenizer = load_tokenizer(tiny_base_model)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = "Write a one-sentence review of the movie 'Silent Harbor'."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_a_pad_equal_to_eos_is_replaced_by_a_distinct_token(tiny_base_model: Path, tmp_path: Path) -> None:
    """SmolLM2 ships pad == EOS (<|im_end|>); TRL's PPO would then mask the end-of-turn
    tokens inside every chat prompt. load_tokenizer must hand out a distinct pad."""
    from transformers import AutoTokenizer

    from pipeline_lib.generation import chat_prompt_ids

    saved = AutoTokenizer.from_pretrained(tiny_base_model)
    saved.pad_token = saved.eos_token
    saved.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id == saved.eos_token_id  # the case under test

    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    prompt = chat_prompt_ids(tokenizer, "Give a short opinion of the album 'Quiet River'.")
    assert tokenizer.eos_token_id in prompt  # <|im_end|> closes the user turn ...
    assert tokenizer.pad_token_id not in prompt  # ... and is no longer mistaken for padding


def _rollouts(queries: list[list[int]], answers: list[list[int]], pad_id: int, extra_padding: int = 0):
    """PPO's rollout layout: left-padded queries, responses, right padding; and the context width."""
    context = max(len(query) for query in queries)
    rows = torch.full((len(queries), context + max(len(answer) for answer in answers) + extra_padding), pad_id)
    for row, (query, answer) in enumerate(zip(queries, answers)):
        rows[row, context - len(query) : context] = torch.tensor(query)
        rows[row, context : context + len(answer)] = torch.tensor(answer)
    return rows, context


def test_reward_is_read_where_trl_ppo_reads_it(tiny_base_model: Path) -> None:
    """Reward training, evaluation and PPO score the same tokens at the same position:
    chat prompt + response + EOS, then padding."""
    from trl.experimental.utils import get_reward

    from pipeline_lib.generation import chat_prompt_ids, response_ids, reward_scores

    tokenizer = load_tokenizer(tiny_base_model)
    model = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id)
    prompts = ["Give a short opinion of the album 'Quiet River'.", "Write a one-sentence review of the hotel 'Iron Tower'."]
    responses = ["I loved it.", "It was dull and far too long for me."]
    ours = reward_scores(model, tokenizer, prompts, responses)

    # PPO's rollout layout: left-padded query, response closed by EOS, right padding.
    queries = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    answers = [response_ids(tokenizer, response) for response in responses]
    rows, context = _rollouts(queries, answers, tokenizer.pad_token_id, extra_padding=2)
    with torch.no_grad():
        _, scores, _ = get_reward(model, rows, tokenizer.pad_token_id, context)
    assert torch.allclose(scores, torch.tensor(ours), atol=1e-4)


def test_a_shallow_sequence_classifier_keeps_the_bottom_layers(tiny_base_model: Path) -> None:
    """reward.num_layers: the reward (and value) model keeps SFT's bottom layers, unchanged."""
    tokenizer = load_tokenizer(tiny_base_model)
    full = load_causal_lm(tiny_base_model)
    shallow = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id, num_layers=2)
    assert shallow.config.num_hidden_layers == 2 and len(shallow.model.layers) == 2
    for index in range(2):
        ours, theirs = shallow.model.layers[index].state_dict(), full.model.layers[index].state_dict()
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert torch.equal(shallow.model.embed_tokens.weight, full.model.embed_tokens.weight)
    with pytest.raises(ModelError, match="num_layers=5 is above the 4 decoder layers"):
        load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id, num_layers=5)


def test_ppo_scores_a_cut_off_rollout_as_evaluation_does(tiny_base_model: Path) -> None:
    """A PPO rollout that hit response_length has no EOS; TRL would read the reward at its
    last word. EosClosedReward closes it with EOS, so PPO and evaluation read the same score."""
    from trl.experimental.utils import get_reward

    from pipeline_lib.generation import chat_prompt_ids, response_ids, reward_scores
    from pipeline_lib.stages.ppo_reward import EosClosedReward

    tokenizer = load_tokenizer(tiny_base_model)
    model = load_sequence_classifier(tiny_base_model, tokenizer.pad_token_id)
    prompts = ["Give a short opinion of the album 'Quiet River'.", "Rate the cafe 'Red Door'.", "Review 'Iron Tower'."]
    responses = ["I loved it.", "It was dull and far too long for", "Bright, warm and"]
    expected = reward_scores(model, tokenizer, prompts, responses)  # every response closed by EOS

    # Rollouts: left-padded queries; the first stopped at EOS, the other two were cut off
    # (no EOS), one of them filling the whole response window.
    queries = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    answers = [response_ids(tokenizer, responses[0])] + [response_ids(tokenizer, r)[:-1] for r in responses[1:]]
    rows, context = _rollouts(queries, answers, tokenizer.pad_token_id)
    assert (rows[:, -1] != tokenizer.pad_token_id).any()  # one rollout fills the window
    with torch.no_grad():
        _, raw, _ = get_reward(model, rows, tokenizer.pad_token_id, context)
        _, closed, _ = get_reward(EosClosedReward(model, tokenizer.eos_token_id), rows, tokenizer.pad_token_id, context)
    assert torch.allclose(closed, torch.tensor(expected), atol=1e-4)
    assert torch.allclose(raw[0], closed[0], atol=1e-5)  # the complete rollout is unchanged
    assert not torch.allclose(raw[1:], closed[1:], atol=1e-3)  # read mid-sentence, the score differs
