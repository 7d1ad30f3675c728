"""Bring your own model and data: what a new user does, end to end, at tiny sizes.

The user has a HF-format model directory (here a seeded 2-layer GPT-2, not the tiny
preset's Llama, with a byte-level BPE tokenizer trained on their text) and a local
``.jsonl`` of preference pairs in a public schema (UltraFeedback-binarized style: a prompt
string and chosen/rejected conversations). They write ONE YAML file, ``MY_YAML`` below
(the README's "Bring your own model and data" shows the same text), and run

    python flows/rlhf.py --config my.yaml

from the clone's root, where they put ``my-model/``, ``my-pairs.jsonl`` and ``my.yaml``; no
preset, no ``--set``. The run must finish, publish every stage, write the evaluation, and
leave policies that plain ``transformers`` loads. The test's stand-in for the clone's root
is a temporary directory holding the three files (the flow applies the clone's
``prefect.toml`` wherever it is started). Then the same files with LoRA on every stage.

Run alone: ``.venv/bin/python -m pytest -q tests/test_bring_your_own.py`` (~1-2 min on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parents[1]

# The whole configuration a user writes; paths are relative to the directory the command
# runs from. Everything not set here comes from the default preset, whose sizes are for
# the 30-layer embedded SmolLM2: a small model of your own needs its own top_k and
# reward.num_layers, and a first run wants few steps.
MY_YAML = """\
# my.yaml: my model, my data, a first run in minutes on a CPU.
model:
  name: ./my-model            # a HF-format directory: config.json, *.safetensors, tokenizer files
  system_prompt: null         # no system turn of our own (the default preset sends an empty one)
data:
  source: ./my-pairs.jsonl    # preference pairs in a public schema (json, jsonl, parquet or csv)
  holdout_percent: 20         # rows held out of every training stage, for the evaluation
output_root: ./runs           # the store, caches and Prefect results
tracking:
  mode: disabled              # or offline: local wandb runs, `wandb sync` later
sft: &small                   # the same small sizes for every training stage
  max_steps: 4
  learning_rate: 1.0e-3
  per_device_train_batch_size: 4
  max_length: 128             # tokens of prompt + response
  top_k: 0                    # train the whole model (N: only its top N layers)
  save_steps: 2
  logging_steps: 1
reward:
  <<: *small
  num_layers: 0               # the reward model keeps all of SFT's layers
dpo:
  <<: *small
  max_kl: null                # no KL bound: the default preset's is sized for the embedded task
ppo:
  <<: *small
  max_steps: -1               # PPO counts episodes, not steps
  total_episodes: 8
  response_length: 8
  num_ppo_epochs: 1
evaluate:
  max_new_tokens: 8
  batch_size: 8
  num_examples: 2
"""

SUBJECTS = ["a basil plant", "a sourdough starter", "a bicycle chain", "a cast iron pan",
            "a leather jacket", "a wooden cutting board", "an aquarium", "a vegetable garden"]
QUESTIONS = [
    "How do I look after {s}?",
    "What is the most common mistake people make with {s}?",
    "How often should I clean {s}?",
    "Can you give me one tip for {s}?",
    "What should I buy first for {s}?",
    "How do I know that {s} needs attention?",
]


def preference_rows() -> list[dict]:
    """48 pairs in UltraFeedback-binarized style: a helpful chosen answer, a curt rejected one."""
    rows = []
    for s_index, subject in enumerate(SUBJECTS):
        for q_index, question in enumerate(QUESTIONS):
            prompt = question.format(s=subject)
            good = (f"Start small and be regular with {subject}: check it every few days, keep it clean and dry, "
                    f"and write down what you changed so you learn what works (tip {s_index}.{q_index}).")
            bad = f"No idea, {subject} is not worth the trouble."
            rows.append({
                "prompt": prompt,
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
            })
    return rows


def texts_of(rows: list[dict]) -> list[str]:
    return [row["prompt"] for row in rows] + [turn["content"] for row in rows for side in ("chosen", "rejected") for turn in row[side]]


def build_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on the user's text, with its own EOS and pad tokens
    and no chat template (the pipeline supplies ChatML when a tokenizer has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def build_model_dir(target: Path, corpus: list[str]) -> Path:
    """A seeded 2-layer GPT-2 (hidden 64) and its tokenizer, saved as a user's model would be."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def write_user_project(directory: Path) -> Path:
    """my-model/, my-pairs.jsonl and my.yaml, as a user would have them; returns my.yaml."""
    rows = preference_rows()
    build_model_dir(directory / "my-model", texts_of(rows))
    with (directory / "my-pairs.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (directory / "my.yaml").write_text(MY_YAML)
    return directory / "my.yaml"


def run_cli(directory: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)  # the CLI starts its own temporary Prefect server
    return subprocess.run(
        [sys.executable, str(REPO / "flows" / "rlhf.py"), *args],
        cwd=directory, env=env, text=True, capture_output=True, timeout=timeout,
    )


def test_my_model_and_my_data_with_one_yaml_file(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_user_project(tmp_path)
    assert json.loads((tmp_path / "my-model" / "config.json").read_text())["model_type"] == "gpt2"
    assert (tmp_path / "my-model" / "model.safetensors").is_file()

    # The dry run a careful user tries first: nothing to download, every stage will run.
    dry = run_cli(tmp_path, "--config", "my.yaml", "--dry-run", timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = json.loads(dry.stdout.strip().splitlines()[-1])
    assert planned["status"] == "dry-run"
    assert planned.get("downloads", []) == []
    assert {stage["status"] for stage in planned["stages"].values()} == {"will run"}

    result = run_cli(tmp_path, "--config", "my.yaml")
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed", summary
    assert set(summary["stages"]) == set(planned["stages"]) >= {"data_prep", "sft", "reward", "dpo", "ppo", "evaluate"}

    def output(name: str) -> Path:
        """A stage's published directory; the summary's paths are under output_root as
        the user wrote it (./runs), so relative to the directory the command ran in."""
        return tmp_path / summary["stages"][name]["path"]

    for name, stage in summary["stages"].items():
        assert stage["status"] == "completed" and not stage["cached"], (name, stage)
        assert output(name) == tmp_path / "runs" / "store" / name / stage["key"]
        assert (output(name) / "manifest.json").is_file(), name

    card = json.loads((output("data_prep") / "data_card.json").read_text())
    assert card["schema"] == "conversational"
    assert card["counts"]["pairs_train"] + card["counts"]["pairs_eval"] == 48

    evaluation = summary["evaluation"]
    assert set(evaluation["policies"]) >= {"base", "sft", "dpo", "ppo"}
    assert evaluation["oracle"] is None  # the user's task has no oracle: the reward model judges
    for policy, row in evaluation["policies"].items():
        for metric in ("reward_model_mean", "win_rate_vs_sft", "sampled_kl_to_sft", "mean_length_words", "distinct_2"):
            assert isinstance(row[metric], float), (policy, metric, row)
    assert 0.0 <= evaluation["reward_model_pairwise_accuracy"] <= 1.0
    report_dir = output("evaluate")
    for name in ("eval.json", "report.md", "generations.jsonl"):
        assert (report_dir / name).is_file(), name
    assert "reward_model_mean" in (report_dir / "report.md").read_text()

    # The policies are plain HF model directories: transformers alone loads them.
    for policy in ("sft", "dpo", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(output(policy))
        assert model.config.model_type == "gpt2" and model.config.n_layer == 2, policy
    tokenizer = AutoTokenizer.from_pretrained(output("sft"))
    assert tokenizer.eos_token == "<|endoftext|>"

    # The same files with LoRA adapters (GPT-2's linear layers are Conv1D): SFT and DPO
    # re-run, each published as an adapter that plain peft loads onto the user's model.
    from peft import AutoPeftModelForCausalLM

    lora = run_cli(tmp_path, "--config", "my.yaml", "--set", "adapter=lora", "--stages", "dpo")
    assert lora.returncode == 0, lora.stderr[-6000:]
    stages = json.loads(lora.stdout.strip().splitlines()[-1])["stages"]
    assert stages["data_prep"]["cached"] and not stages["sft"]["cached"] and not stages["dpo"]["cached"]
    for policy in ("sft", "dpo"):
        directory = tmp_path / stages[policy]["path"]
        adapter = json.loads((directory / "adapter_config.json").read_text())
        assert Path(adapter["base_model_name_or_path"]) == (tmp_path / "my-model").resolve()
        assert AutoPeftModelForCausalLM.from_pretrained(directory).config.model_type == "gpt2"


README_SECTION = "## Bring your own model and data"


def test_the_readme_shows_the_tested_yaml() -> None:
    """The README's my.yaml is the file this test runs, character for character."""
    readme = (REPO / "README.md").read_text()
    assert README_SECTION in readme
    section = readme.split(README_SECTION, 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == MY_YAML
