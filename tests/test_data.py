"""Data: schema normalisation, validation messages, local files, splits, fingerprints, CLI, data prep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.data import sentiment_task
from pipeline_lib.data.files import read_jsonl
from pipeline_lib.data.schemas import DataValidationError, normalize_rows
from pipeline_lib.data.sources import load_rows, source_fingerprint, split_rows, take_percent
from pipeline_lib.errors import ConfigError
from pipeline_lib.stages import data_prep

REPO_ROOT = Path(__file__).resolve().parent.parent

TLDR_ROWS = [
    {"prompt": "SUBREDDIT: r/cats\nPOST: My cat ignores me.\nTL;DR:", "chosen": " Cat ignores me.", "rejected": " Dogs."},
    {"prompt": "SUBREDDIT: r/diy\nPOST: The shelf fell.\nTL;DR:", "chosen": " Shelf fell down.", "rejected": " Wood."},
    {"prompt": "SUBREDDIT: r/food\nPOST: Burnt the rice.\nTL;DR:", "chosen": " Rice burnt.", "rejected": " I cook."},
]


def numbered_pairs(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"Post {index}. TL;DR:", "chosen": f"Good {index}", "rejected": f"Bad {index}"} for index in range(count)]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- schema normalisation -----------------------------------------------------------


def test_prompt_chosen_rejected_pairs_pass_through() -> None:
    schema, pairs = normalize_rows(TLDR_ROWS, "pairs", "tldr.jsonl")
    assert schema == "prompt_chosen_rejected"
    assert pairs == TLDR_ROWS


def test_conversational_pairs_with_a_prompt_column() -> None:
    rows = [
        {
            "prompt": "What is 2+2?",
            "chosen": [user("What is 2+2?"), assistant("4")],
            "rejected": [user("What is 2+2?"), assistant("5")],
        }
    ]
    assert normalize_rows(rows, "pairs", "ultrafeedback") == (
        "conversational",
        [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}],
    )


def test_conversational_pairs_without_a_prompt_column_take_the_shared_turns() -> None:
    context = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Name a colour.")]
    rows = [{"chosen": [*context, assistant("Blue.")], "rejected": [*context, assistant("No.")]}]
    schema, pairs = normalize_rows(rows, "pairs", "ultrafeedback")
    assert schema == "conversational"
    # The system turn is dropped; several turns become role-tagged lines.
    assert pairs == [{"prompt": "user: Hi\nassistant: Hello!\nuser: Name a colour.", "chosen": "Blue.", "rejected": "No."}]


def test_conversational_pairs_with_different_prompts_are_rejected() -> None:
    rows = [{"chosen": [user("A?"), assistant("a")], "rejected": [user("B?"), assistant("b")]}]
    with pytest.raises(DataValidationError, match=r"row 0.*different prompts"):
        normalize_rows(rows, "pairs", "ultrafeedback")


def test_anthropic_hh_transcripts_split_at_the_last_shared_assistant_turn() -> None:
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Which pet should I get?\n\nAssistant:"
    rows = [{"chosen": shared + " A dog is loyal.", "rejected": shared + " A rock."}]
    schema, pairs = normalize_rows(rows, "pairs", "hh-rlhf")
    assert schema == "transcript"
    assert pairs == [
        {
            "prompt": "Human: Hi\n\nAssistant: Hello.\n\nHuman: Which pet should I get?\n\nAssistant:",
            "chosen": "A dog is loyal.",
            "rejected": "A rock.",
        }
    ]


def test_sft_from_prompt_completion() -> None:
    rows = [{"prompt": "Summarise: the cat sat.", "completion": "A cat sat."}]
    assert normalize_rows(rows, "sft", "tldr") == ("prompt_completion", rows)


def test_sft_from_messages() -> None:
    rows = [{"messages": [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello, how can I help?")]}]
    assert normalize_rows(rows, "sft", "chat") == (
        "messages",
        [{"prompt": "Hi", "completion": "Hello, how can I help?"}],
    )


def test_sft_from_the_chosen_side_of_pairs() -> None:
    schema, rows = normalize_rows(TLDR_ROWS, "sft", "tldr-preference")
    assert schema == "pairs"
    assert rows == [{"prompt": row["prompt"], "completion": row["chosen"]} for row in TLDR_ROWS]

    transcript = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
    assert normalize_rows(transcript, "sft", "hh")[1] == [{"prompt": "Human: Hi\n\nAssistant:", "completion": "Hello."}]


# --- validation errors name the source, row and field ---------------------------------


def test_missing_column_is_named() -> None:
    rows = [{"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataValidationError, match=r"pairs\.jsonl: missing column\(s\) \['rejected'\]"):
        normalize_rows(rows, "pairs", "pairs.jsonl")
    with pytest.raises(DataValidationError, match=r"sft\.jsonl: missing columns"):
        normalize_rows([{"text": "x"}], "sft", "sft.jsonl")


def test_field_missing_from_one_row_names_row_and_field() -> None:
    rows = [*TLDR_ROWS, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataValidationError, match=r"row 3, field 'rejected': is missing"):
        normalize_rows(rows, "pairs", "pairs.jsonl")


@pytest.mark.parametrize(
    "bad_row, expected",
    [
        ({"prompt": "p", "chosen": "   ", "rejected": "b"}, r"row 3, field 'chosen': is empty"),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, r"row 3, field 'prompt': is empty \(null\)"),
        ({"prompt": "p", "chosen": 42, "rejected": "b"}, r"row 3, field 'chosen': is not text \(int\)"),
        ({"prompt": "p", "chosen": "same", "rejected": " same "}, r"row 3, field 'rejected': is identical to chosen"),
    ],
    ids=["empty", "null", "not-text", "identical"],
)
def test_invalid_field_names_source_row_and_field(bad_row: dict, expected: str) -> None:
    with pytest.raises(DataValidationError, match=expected) as raised:
        normalize_rows([*TLDR_ROWS, bad_row], "pairs", "comparisons.jsonl")
    assert str(raised.value).startswith("comparisons.jsonl: 1 invalid row(s)")


def test_every_invalid_row_is_reported_at_once() -> None:
    rows = [{"prompt": "p", "chosen": "", "rejected": "b"}, TLDR_ROWS[0], {"prompt": "p", "chosen": "a", "rejected": "a"}]
    with pytest.raises(DataValidationError) as raised:
        normalize_rows(rows, "pairs", "comparisons.jsonl")
    assert [(problem.row, problem.field) for problem in raised.value.problems] == [(0, "chosen"), (2, "rejected")]


def test_no_rows_is_an_error() -> None:
    with pytest.raises(DataValidationError, match="empty.jsonl: no rows"):
        normalize_rows([], "pairs", "empty.jsonl")


def test_too_few_rows_for_the_split_or_percentage() -> None:
    with pytest.raises(DataValidationError, match=r"1 rows are too few to hold out 20"):
        split_rows([{"i": 0}], 20, seed=42)
    fewer = r"pairs_train \(data.train_percent\): 10% of 10 rows is 1, fewer than the 2 needed"
    with pytest.raises(DataValidationError, match=fewer):
        take_percent(list(range(10)), 10, "pairs_train (data.train_percent)", minimum=2)
    assert take_percent(list(range(10)), 50, "pairs_train") == [0, 1, 2, 3, 4]


# --- local files ---------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_local_files_load_and_normalise(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"pairs{suffix}", TLDR_ROWS)

    rows = load_rows(str(path))
    assert rows == TLDR_ROWS
    assert normalize_rows(rows, "pairs", str(path)) == ("prompt_chosen_rejected", TLDR_ROWS)
    assert load_rows(str(path), max_rows=2) == TLDR_ROWS[:2]


def test_conversational_jsonl_loads_through_datasets(tmp_path: Path) -> None:
    rows = [
        {"chosen": [user("Hi?"), assistant("Hello.")], "rejected": [user("Hi?"), assistant("Bye.")]},
        {"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    schema, pairs = normalize_rows(load_rows(str(path)), "pairs", str(path))
    assert schema == "conversational"
    assert pairs[1] == {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def test_row_with_a_null_field_in_a_file_is_named(tmp_path: Path) -> None:
    rows = [*TLDR_ROWS, {"prompt": "p", "chosen": "a"}]  # datasets fills the missing field with null
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"pairs\.jsonl: 1 invalid row.*\n  row 3, field 'rejected': is empty"):
        normalize_rows(load_rows(str(path)), "pairs", str(path))


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("broken.json", b"{not json", r"broken\.json: unreadable json file"),
        ("broken.parquet", b"not parquet at all", r"broken\.parquet: unreadable parquet file"),
        ("notes.txt", b"hello", r"notes\.txt: unsupported file type '\.txt'"),
    ],
)
def test_unreadable_file_is_named(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataValidationError, match=expected):
        load_rows(str(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"missing\.jsonl: file does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataValidationError, match=r"missing\.jsonl: file does not exist"):
        source_fingerprint(str(tmp_path / "missing.jsonl"))


def test_changed_file_changes_fingerprint_and_is_read_fresh(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "pairs.jsonl", TLDR_ROWS)
    first = source_fingerprint(str(path))
    assert load_rows(str(path))[0]["chosen"] == TLDR_ROWS[0]["chosen"]
    stat = path.stat()

    write_rows(path, TLDR_ROWS)
    assert source_fingerprint(str(path)) == first, "same content, same fingerprint"

    edited = [{**TLDR_ROWS[0], "chosen": " Cat loves me."}, *TLDR_ROWS[1:]]
    write_rows(path, edited)
    # Keep the old mtime, as cp -p or rsync -t would: only the content says the file changed.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source_fingerprint(str(path)) != first
    assert load_rows(str(path))[0]["chosen"] == " Cat loves me."


def test_embedded_fingerprint_is_stable() -> None:
    assert source_fingerprint("embedded:sentiment") == source_fingerprint("embedded:sentiment")
    assert source_fingerprint("embedded:sentiment") != source_fingerprint("embedded:other")


# --- splits --------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = [{"id": index} for index in range(50)]
    train, held_out = split_rows(rows, 20, seed=42)

    assert (len(train), len(held_out)) == (40, 10)
    assert split_rows(rows, 20, seed=42) == (train, held_out)
    ids_train, ids_held_out = {row["id"] for row in train}, {row["id"] for row in held_out}
    assert not ids_train & ids_held_out
    assert ids_train | ids_held_out == set(range(50))
    assert train == sorted(train, key=lambda row: row["id"]), "rows keep their file order"

    _, other_held_out = split_rows(rows, 20, seed=43)
    assert {row["id"] for row in other_held_out} != ids_held_out


# --- the CLI -------------------------------------------------------------------------


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline_lib.data", *arguments],
        capture_output=True, text=True, cwd=REPO_ROOT, env=environment, timeout=120,
    )


def test_cli_describes_a_valid_file(tmp_path: Path) -> None:
    rows = numbered_pairs(10)
    path = write_rows(tmp_path / "pairs.jsonl", rows)

    result = run_cli(str(path))

    assert result.returncode == 0, result.stderr
    assert "schema: prompt_chosen_rejected (pairs)" in result.stdout
    assert "rows: 10 (train 8, held out 2; holdout 20%, seed 42)" in result.stdout
    example = json.loads(result.stdout.split("example:\n", 1)[1])
    assert example in rows


def test_cli_names_the_bad_row_and_exits_non_zero(tmp_path: Path) -> None:
    rows = [*TLDR_ROWS, {"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = write_rows(tmp_path / "pairs.jsonl", rows)

    result = run_cli(str(path), "--kind", "pairs")

    assert result.returncode == 2
    assert f"{path}: 1 invalid row(s)" in result.stderr
    assert "row 3, field 'rejected': is identical to chosen" in result.stderr
    assert "example:" not in result.stdout


def test_cli_embedded_task_shows_prompt_counts_and_a_template_pair() -> None:
    result = run_cli("embedded:sentiment")

    assert result.returncode == 0, result.stderr
    assert "prompts: train 240, held out 48" in result.stdout
    pair = json.loads(result.stdout.split("example template pair:\n", 1)[1])
    assert set(pair) == {"prompt", "chosen", "rejected"}
    assert sentiment_task.subject_of(pair["prompt"]) in pair["chosen"]


# --- data prep -----------------------------------------------------------------------

DATA_PREP_FILES = {
    "sft_train.jsonl", "sft_eval.jsonl", "pairs_train.jsonl", "pairs_eval.jsonl", "reward_train.jsonl",
    "reward_eval.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl", "data_card.json",
}


def test_data_prep_template_pairs_keep_held_out_subjects_unseen(tiny_config, tmp_path: Path) -> None:
    out_dir = tmp_path / "data"
    metrics = data_prep.run(tiny_config, {}, out_dir)

    assert {path.name for path in out_dir.iterdir()} == DATA_PREP_FILES
    assert metrics["rows_pairs_train"] == tiny_config.data.num_prompts == 32
    assert metrics["rows_prompts_eval"] == tiny_config.data.num_eval_prompts == 8
    pairs = read_jsonl(out_dir / "pairs_train.jsonl")
    assert all(pair["chosen"] != pair["rejected"] for pair in pairs)
    sft = read_jsonl(out_dir / "sft_train.jsonl")
    assert sft == [{"prompt": pair["prompt"], "completion": pair["chosen"]} for pair in pairs]

    def subjects(name: str) -> set[str]:
        return {sentiment_task.subject_of(row["prompt"]) for row in read_jsonl(out_dir / name)}

    train_subjects, eval_subjects = subjects("prompts_train.jsonl"), subjects("prompts_eval.jsonl")
    assert len(train_subjects) == 32 and len(eval_subjects) == 8
    assert not train_subjects & eval_subjects
    card = json.loads((out_dir / "data_card.json").read_text())
    assert card["schema"] == "embedded (template pairs)"
    assert card["counts"]["reward_eval"] == 8


def test_data_prep_on_a_local_file_splits_and_applies_percentages(tmp_path: Path) -> None:
    from pipeline_lib.config import load_config

    rows = numbered_pairs(20)
    path = write_rows(tmp_path / "pairs.csv", rows)
    config = load_config(
        "tiny", env_file=None, overrides=[f"data.source={path}", "data.train_percent=50", f"output_root={tmp_path}"]
    )

    data_prep.run(config, {}, tmp_path / "data")

    expected_train, expected_eval = split_rows(rows, 20, seed=config.seed)
    assert read_jsonl(tmp_path / "data" / "pairs_eval.jsonl") == expected_eval
    assert read_jsonl(tmp_path / "data" / "pairs_train.jsonl") == expected_train[:8]
    assert read_jsonl(tmp_path / "data" / "reward_train.jsonl") == expected_train
    assert json.loads((tmp_path / "data" / "data_card.json").read_text())["schema"] == "prompt_chosen_rejected"


def test_ranking_samples_keeps_the_widest_gaps_first() -> None:
    samples = [
        "It was wonderful, a real delight.",  # clearly positive
        "It was fine.",
        "It was awful and boring.",  # clearly negative
        "It was awful and boring.",  # a duplicate is one sample
        "It opened in May.",  # neutral: 0.0
    ]
    scores = {text: sentiment_task.oracle_score(text) for text in samples}
    best, worst = max(scores, key=scores.get), min(scores, key=scores.get)

    [only] = sentiment_task.rank_samples("p", samples, margin=0.3)
    assert (only["chosen"], only["rejected"]) == (best, worst)
    assert only["chosen_score"] - only["rejected_score"] == pytest.approx(scores[best] - scores[worst])

    pairs = sentiment_task.rank_samples("p", samples, margin=0.3, max_pairs=10)
    gaps = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
    assert gaps == sorted(gaps, reverse=True) and min(gaps) >= 0.3
    assert len({(pair["chosen"], pair["rejected"]) for pair in pairs}) == len(pairs)
    assert all(scores[pair["chosen"]] > scores[pair["rejected"]] for pair in pairs)
    assert len(pairs) > 1  # 4 distinct samples with spread sentiment give several pairs
    assert sentiment_task.rank_samples("p", ["Same.", "Same."], margin=0.0) == []


SAMPLES = ["It was wonderful, a real delight.", "It was fine.", "It opened in May.", "It was awful and boring."]


def _prepare_from_samples(tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **data_updates):
    """Run data prep with every prompt's samples replaced by ``SAMPLES``: (config, out_dir, generate options)."""
    from pipeline_lib import generation

    seen = {}

    def fake_generate(model, tokenizer, prompts, **options):
        seen.update(options)
        seen.setdefault("samples_per_call", []).append(options["num_return_sequences"])
        return [list(SAMPLES) for _ in prompts]

    monkeypatch.setattr(generation, "generate_responses", fake_generate)
    monkeypatch.setattr("pipeline_lib.models.load_causal_lm", lambda *args, **kwargs: None)
    monkeypatch.setattr("pipeline_lib.models.load_tokenizer", lambda path: None)
    update = {"pair_source": "sample", "pair_margin": 0.3, "reward_pairs_per_prompt": 6, **data_updates}
    config = tiny_config.model_copy(
        update={"data": tiny_config.data.model_copy(update=update), "model": tiny_config.model.model_copy(update={"system_prompt": ""})}
    )
    out_dir = tmp_path / "data"
    data_prep.run(config, {"base_model": tmp_path}, out_dir)
    return config, out_dir, seen


def test_sampled_pairs_give_dpo_the_widest_pair_and_the_reward_model_every_pair(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pair_source=sample: the oracle ranks each prompt's samples; DPO gets (best, worst),
    the reward model up to reward_pairs_per_prompt pairs, SFT the best sample once."""
    samples = SAMPLES
    config, out_dir, seen = _prepare_from_samples(tiny_config, tmp_path, monkeypatch)

    expected = sentiment_task.rank_samples("p", samples, 0.3, 6)
    assert len(expected) > 1
    pairs = read_jsonl(out_dir / "pairs_train.jsonl")
    reward_pairs = read_jsonl(out_dir / "reward_train.jsonl")
    prompts = read_jsonl(out_dir / "prompts_train.jsonl")
    assert len(pairs) == len(prompts) == 32
    assert len(reward_pairs) == 32 * len(expected)
    assert all((pair["chosen"], pair["rejected"]) == (expected[0]["chosen"], expected[0]["rejected"]) for pair in pairs)
    assert [(p["chosen"], p["rejected"]) for p in reward_pairs[: len(expected)]] == [(e["chosen"], e["rejected"]) for e in expected]
    assert read_jsonl(out_dir / "sft_train.jsonl") == [
        {"prompt": row["prompt"], "completion": expected[0]["chosen"]} for row in prompts
    ]
    assert seen["system_prompt"] == "" and seen["num_return_sequences"] == config.data.samples_per_prompt


def test_held_out_prompts_draw_their_own_number_of_samples(tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.eval_samples_per_prompt: held-out prompts are sampled that many times (training
    prompts samples_per_prompt times), and their reward pairs rank every sample drawn."""
    config, out_dir, seen = _prepare_from_samples(tiny_config, tmp_path, monkeypatch, eval_samples_per_prompt=6)
    assert seen["samples_per_call"] == [config.data.samples_per_prompt, 6] and config.data.samples_per_prompt != 6
    _, _, default = _prepare_from_samples(tiny_config, tmp_path / "default", monkeypatch)
    assert default["samples_per_call"] == [config.data.samples_per_prompt] * 2
    held_out = read_jsonl(out_dir / "reward_eval.jsonl")
    assert len(held_out) == len(read_jsonl(out_dir / "prompts_eval.jsonl")) * len(sentiment_task.rank_samples("p", SAMPLES, 0.3, 6))


def test_extra_reward_eval_prompts_judge_the_reward_model_alone_on_subjects_no_other_prompt_mentions(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.extra_reward_eval_prompts: more held-out prompts whose sampled pairs join the
    reward model's held-out pairs only; every other file is as it was without them."""
    _, plain_dir, plain_seen = _prepare_from_samples(tiny_config, tmp_path / "plain", monkeypatch, eval_samples_per_prompt=6)
    config, out_dir, seen = _prepare_from_samples(
        tiny_config, tmp_path / "extra", monkeypatch, eval_samples_per_prompt=6, extra_reward_eval_prompts=5
    )
    # the extra prompts are sampled as many times as the other held-out prompts, in a call of their own
    assert seen["samples_per_call"] == plain_seen["samples_per_call"] + [6]
    for name in DATA_PREP_FILES - {"reward_eval.jsonl", "data_card.json"}:
        assert (out_dir / name).read_text() == (plain_dir / name).read_text(), name
    plain, extended = read_jsonl(plain_dir / "reward_eval.jsonl"), read_jsonl(out_dir / "reward_eval.jsonl")
    per_prompt = len(sentiment_task.rank_samples("p", SAMPLES, 0.3, 6))
    assert extended[: len(plain)] == plain and len(extended) == len(plain) + 5 * per_prompt

    def subjects(rows) -> set[str]:
        return {sentiment_task.subject_of(row["prompt"]) for row in rows}

    extra = subjects(extended[len(plain) :])
    assert len(extra) == 5
    assert not extra & (subjects(read_jsonl(out_dir / "prompts_train.jsonl")) | subjects(read_jsonl(out_dir / "prompts_eval.jsonl")))
    assert json.loads((out_dir / "data_card.json").read_text())["counts"]["reward_eval"] == len(extended)

    # template pairs (no sampling) take the extra prompts too
    template = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"extra_reward_eval_prompts": 3})})
    data_prep.run(template, {}, tmp_path / "template")
    counts = json.loads((tmp_path / "template" / "data_card.json").read_text())["counts"]
    assert (counts["pairs_eval"], counts["reward_eval"]) == (8, 11)
    # too many subjects in all is refused, naming the three settings
    train, held_out, reward_only = sentiment_task.build_prompts(32, 8, seed=3, num_reward_eval=5)
    assert (train, held_out) == sentiment_task.build_prompts(32, 8, seed=3)[:2] and len(reward_only) == 5
    with pytest.raises(ConfigError, match="extra_reward_eval_prompts.*asked for 32 \\+ 8 \\+ 4000"):
        sentiment_task.build_prompts(32, 8, seed=3, num_reward_eval=4000)


def test_word_prefixes_cut_at_word_boundaries_and_never_keep_the_whole_text() -> None:
    text = "It was wonderful, a real delight."  # 6 words
    assert sentiment_task.word_prefixes(text, [0.5, 0.75]) == ["It was wonderful,", "It was wonderful, a"]
    assert sentiment_task.word_prefixes(text, [0.01]) == ["It"]  # at least one word
    assert sentiment_task.word_prefixes(text, [0.99]) == ["It was wonderful, a real"]
    assert sentiment_task.word_prefixes("Fine.", [0.5]) == []  # one word has no proper prefix


def test_prefix_pairs_join_the_reward_training_pairs_only(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.reward_prefix_fractions: training prompts' reward pairs rank samples and their
    prefixes together; DPO, SFT and every held-out pair see whole samples only."""
    _, plain_dir, _ = _prepare_from_samples(tiny_config, tmp_path / "plain", monkeypatch)
    _, out_dir, _ = _prepare_from_samples(
        tiny_config, tmp_path / "prefixed", monkeypatch, reward_prefix_fractions=[0.5], reward_pairs_per_prompt=12
    )
    prefixes = [prefix for text in SAMPLES for prefix in sentiment_task.word_prefixes(text, [0.5])]
    assert "It was wonderful," in prefixes
    expected = sentiment_task.rank_samples("p", SAMPLES + prefixes, 0.3, 12)
    reward_train = read_jsonl(out_dir / "reward_train.jsonl")
    prompts = read_jsonl(out_dir / "prompts_train.jsonl")
    assert len(reward_train) == len(prompts) * len(expected)
    assert [(row["chosen"], row["rejected"]) for row in reward_train[: len(expected)]] == [
        (pair["chosen"], pair["rejected"]) for pair in expected
    ]
    pairs = {(row["chosen"], row["rejected"]) for row in reward_train}
    assert ("It was wonderful,", "It was awful and boring.") in pairs  # a prefix against another sample
    assert ("It was", "It was awful and boring.") in pairs  # a sample against its own prefix: only the cut words differ
    for name in ("pairs_train", "pairs_eval", "sft_train", "sft_eval", "reward_eval"):
        assert (out_dir / f"{name}.jsonl").read_text() == (plain_dir / f"{name}.jsonl").read_text(), name


def test_a_lower_reward_pair_margin_adds_closer_training_pairs_and_leaves_the_held_out_pairs_as_they_were(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.reward_pair_margin: the reward model's training pairs are ranked at that margin;
    DPO, SFT and the held-out pairs that judge the reward model keep pair_margin."""
    _, plain_dir, _ = _prepare_from_samples(tiny_config, tmp_path / "plain", monkeypatch, reward_pairs_per_prompt=100)
    _, out_dir, _ = _prepare_from_samples(
        tiny_config, tmp_path / "close", monkeypatch, reward_pairs_per_prompt=100, reward_pair_margin=0.05
    )
    plain = read_jsonl(plain_dir / "reward_train.jsonl")
    close = read_jsonl(out_dir / "reward_train.jsonl")
    gaps = [row["chosen_score"] - row["rejected_score"] for row in close]
    assert min(gaps) >= 0.05 and any(gap < 0.3 for gap in gaps)  # pairs pair_margin (0.3) would have dropped
    assert {(r["chosen"], r["rejected"]) for r in plain} < {(r["chosen"], r["rejected"]) for r in close}
    assert len(close) == len(read_jsonl(out_dir / "prompts_train.jsonl")) * len(sentiment_task.rank_samples("p", SAMPLES, 0.05, 100))
    for name in ("pairs_train", "pairs_eval", "sft_train", "sft_eval", "reward_eval"):
        assert (out_dir / f"{name}.jsonl").read_text() == (plain_dir / f"{name}.jsonl").read_text(), name
