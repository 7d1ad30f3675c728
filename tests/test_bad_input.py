"""Bad input is rejected before any stage starts: exit 2, a message naming the field, file
or row, the JSON summary as the last line of standard output, and nothing in the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.rlhf import main


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


PAIR = '{"prompt": "Review a film.", "chosen": "Loved it.", "rejected": "Hated it."}\n'
BAD_DATA = {
    "empty file": ("pairs.jsonl", "", "pairs.jsonl"),
    "binary file": ("pairs.jsonl", bytes(range(256)) * 4, "pairs.jsonl"),
    "missing column": ("pairs.jsonl", '{"prompt": "a", "chosen": "b"}\n' * 10, "rejected"),
    "empty strings": ("pairs.jsonl", PAIR * 9 + '{"prompt": "a", "chosen": "", "rejected": "c"}\n', "row 9"),
    "identical sides": ("pairs.jsonl", PAIR * 9 + '{"prompt": "a", "chosen": "same", "rejected": "same"}\n', "row 9"),
    "csv with wrong columns": ("pairs.csv", "question,answer\nq,a\n" * 5, "pairs.csv"),
    "a 1 MB response": ("pairs.jsonl", PAIR * 9 + json.dumps({"prompt": "a", "chosen": "x" * 1_000_000, "rejected": "b"}) + "\n", "row 9, field 'chosen'"),
}


def run_main(tmp_path: Path, capsys, *args: str) -> tuple[int, str, dict]:
    code = main(["--preset", "tiny", "--output-root", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    return code, captured.err, json.loads(captured.out.strip().splitlines()[-1])


def assert_rejected_before_work(tmp_path: Path, code: int, err: str, summary: dict, named: str) -> None:
    assert code == 2, err
    assert named in err, err
    assert summary["status"] == "invalid" and named in summary["error"]
    assert not (tmp_path / "out" / "store").exists()


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_file_exits_2_naming_it(tmp_path: Path, capsys, case: str) -> None:
    name, content, named = BAD_DATA[case]
    source = write(tmp_path / name, content)
    code, err, summary = run_main(tmp_path, capsys, "--set", f"data.source={source}")
    assert_rejected_before_work(tmp_path, code, err, summary, named)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--set", "data.source=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
        (["--set", "sed=7"], "sed"),
        (["--set", "sft.top_k=9"], "sft.top_k"),
        (["--set", "grpo.num_generations=3"], "num_generations"),
        (["--set", "model.name=/nonexistent/model"], "model.name"),
        (["--stages", "kto"], "kto"),
        (["--set", "data.num_prompts=100000"], "data.num_prompts"),
        (["--set", "data.source=embedded:nosuch"], "embedded:nosuch"),
        (["--set", "data.source=nobody/no-such-dataset"], "nobody/no-such-dataset"),
    ],
)
def test_bad_settings_exit_2_naming_them(tmp_path: Path, capsys, args: list[str], named: str) -> None:
    code, err, summary = run_main(tmp_path, capsys, *args)
    assert_rejected_before_work(tmp_path, code, err, summary, named)


def test_an_output_root_that_is_a_file_exits_2(tmp_path: Path, capsys) -> None:
    write(tmp_path / "out", "not a directory")
    code, err, summary = run_main(tmp_path, capsys)
    assert code == 2 and "output_root" in err and summary["status"] == "invalid"
    assert (tmp_path / "out").read_text() == "not a directory"
