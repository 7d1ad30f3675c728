"""Hub models and datasets, offline: a dry run never downloads, validates the config, lists
what a real run would download and says its keys are provisional; a real run that cannot
download them fails before any stage with exit 2, naming each. No training here.

The ``tldr`` preset reads the hub model HuggingFaceTB/SmolLM2-360M-Instruct and the hub
datasets trl-lib/tldr-preference and trl-lib/tldr; conftest sets HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.rlhf import main
from pipeline_lib import plan as plan_module
from pipeline_lib.config import load_config
from pipeline_lib.data import sources

MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"
DATASETS = ["trl-lib/tldr-preference", "trl-lib/tldr"]


@pytest.fixture(autouse=True)
def offline():
    assert sources.hub_offline(), "these tests expect HF_HUB_OFFLINE=1 (tests/conftest.py sets it)"


def run_main(tmp_path: Path, capsys, *args: str) -> tuple[int, list[str], str, dict]:
    code = main(["--preset", "tldr", "--output-root", str(tmp_path / "out"), *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, lines, captured.err, json.loads(lines[-1])


def test_tldr_dry_run_offline_lists_the_downloads_and_provisional_keys(tmp_path: Path, capsys) -> None:
    code, lines, err, summary = run_main(tmp_path, capsys, "--dry-run")
    assert code == 0, err
    assert summary["status"] == "dry-run"
    assert set(summary["stages"]) >= {"data_prep", "sft", "reward", "dpo", "ppo", "evaluate"}
    assert all(stage["status"] == "will run" for stage in summary["stages"].values())

    downloads = summary["downloads"]
    assert [(item["kind"], item["name"], item["revision"]) for item in downloads] == [
        ("model", MODEL, None), ("dataset", DATASETS[0], None), ("dataset", DATASETS[1], None)
    ]
    assert [item["setting"] for item in downloads] == ["model.name", "data.source", "data.sft_source"]
    assert all(item["local"] is None and item["resolved"] is None and "offline" in item["problem"] for item in downloads)

    # Every stage key holds the data fingerprint, which needs the hub: provisional, said so.
    assert summary["data_fingerprint"].startswith("unresolved:")
    assert summary["provisional_keys"] and all(name in summary["provisional_keys"][0] for name in DATASETS)
    assert all("provisional key" in line for line in lines[:-1])

    note = next(line for line in err.splitlines() if line.startswith("dry run:"))
    assert "would download" in note and "offline" in note and "provisional" in note
    assert all(name in note for name in [MODEL, *DATASETS])
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_a_dry_run_shows_a_pinned_revision_and_resolves_that_source(tmp_path: Path, capsys) -> None:
    code, _, err, summary = run_main(tmp_path, capsys, "--dry-run", "--set", "data.revision=v1.0", "--set", "model.revision=main")
    assert code == 0, err
    assert [(item["name"], item["revision"]) for item in summary["downloads"]] == [
        (MODEL, "main"), (DATASETS[0], "v1.0"), (DATASETS[1], None)
    ]
    # The pinned source fingerprints offline; data.sft_source has no revision setting.
    assert "trl-lib/tldr-preference@v1.0" in err
    assert DATASETS[1] in summary["provisional_keys"][0] and "tldr-preference" not in summary["provisional_keys"][0]


def test_tldr_real_run_offline_exits_2_naming_what_it_cannot_download(tmp_path: Path, capsys) -> None:
    code, _, err, summary = run_main(tmp_path, capsys)
    assert code == 2, err
    assert summary["status"] == "invalid"
    for name in (MODEL, *DATASETS):
        assert name in err and name in summary["error"]
    assert "cannot download" in summary["error"] and "offline" in summary["error"]
    assert not (tmp_path / "out" / "store").exists()
    assert not (tmp_path / "out").exists(), "nothing is written before the checks pass"


def test_a_model_already_downloaded_to_the_output_root_is_not_a_download(tmp_path: Path, capsys) -> None:
    converted = tmp_path / "out" / "models" / MODEL.replace("/", "--")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    code, _, err, summary = run_main(tmp_path, capsys, "--dry-run")
    assert code == 0, err
    model = summary["downloads"][0]
    assert model["name"] == MODEL and model["local"] == str(converted) and model["problem"] is None

    code, _, err, summary = run_main(tmp_path, capsys)
    assert code == 2
    assert all(name in summary["error"] for name in DATASETS) and MODEL not in summary["error"]
    assert not (tmp_path / "out" / "store").exists()


def test_local_sources_need_no_downloads_and_their_keys_are_final(tmp_path: Path, capsys) -> None:
    code = main(["--preset", "tiny", "--output-root", str(tmp_path / "out"), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["downloads"] == [] and summary["provisional_keys"] == []
    assert not summary["data_fingerprint"].startswith("unresolved")
    assert "dry run:" not in captured.err


def test_a_missing_hub_dataset_fails_even_a_dry_run_when_the_hub_answers(tmp_path: Path, capsys, monkeypatch) -> None:
    """Online, 'no such dataset' is final: exit 2 naming it (the hub is faked; no network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    class Info:
        sha = "0123456789abcdef0123456789abcdef01234567"

    def dataset_info(self, name, **kwargs):
        if name.startswith("nobody/"):
            error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(error, f"404: {name}")
            raise error
        return Info()

    monkeypatch.setattr(sources, "hub_offline", lambda: False)
    monkeypatch.setattr(HfApi, "model_info", lambda self, name, **kwargs: Info())
    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    code, _, err, summary = run_main(tmp_path, capsys, "--dry-run", "--set", "data.sft_source=nobody/no-such-dataset")
    assert code == 2
    assert "data.sft_source: nobody/no-such-dataset: no such dataset on the hub" in err
    assert summary["status"] == "invalid"


def test_hub_downloads_reads_no_network_and_names_each_setting() -> None:
    config = load_config("tldr", env_file=None)
    found = plan_module.hub_downloads(config)
    assert [(item.kind, item.setting, item.name, item.split) for item in found] == [
        ("model", "model.name", MODEL, None), ("dataset", "data.source", DATASETS[0], "train"),
        ("dataset", "data.sft_source", DATASETS[1], "train"),
    ]
    assert all(item.resolved is None and item.problem is None for item in found)
    assert plan_module.hub_downloads(load_config("tiny", env_file=None)) == []


def test_a_cached_hub_dataset_offline_still_needs_its_revision_pinned(tmp_path: Path, capsys, monkeypatch) -> None:
    """In the local datasets cache (faked here) it can be read offline, but its current
    revision is unknown: a real run fails before work asking for data.revision; a dry run
    reports the cached copy and plans with provisional keys."""
    monkeypatch.setattr(sources, "_dataset_in_local_cache", lambda name, revision: True)
    converted = tmp_path / "out" / "models" / MODEL.replace("/", "--")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    no_sft = ("--set", "data.sft_source=null")

    code, _, err, summary = run_main(tmp_path, capsys, "--dry-run", *no_sft)
    assert code == 0, err
    assert [item["local"] for item in summary["downloads"]] == [str(converted), "datasets cache"]
    assert "would use the local copy" in err and "would download" not in err
    assert "a real run now would fail before any stage" in err
    assert summary["data_fingerprint"].startswith("unresolved:")

    code, _, err, summary = run_main(tmp_path, capsys, *no_sft)
    assert code == 2
    assert DATASETS[0] in summary["error"] and "pin data.revision" in summary["error"]
    assert not (tmp_path / "out" / "store").exists()


# Runs flows/rlhf.py as a user would, then says which heavy libraries the run imported.
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['flows/rlhf.py'] + sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as end:\n    print('exit', end.code, file=sys.stderr)\n"
    "print('imported:', sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'prefect') if m in sys.modules), file=sys.stderr)"
)


@pytest.mark.parametrize("args", [["--help"], ["--preset", "tldr", "--dry-run"], ["--preset", "default", "--dry-run"]])
def test_help_and_dry_run_never_import_torch(tmp_path: Path, args: list[str]) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", PROBE, *args, *(["--output-root", str(tmp_path)] if "--dry-run" in args else [])]
    finished = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert "exit 0" in finished.stderr, finished.stderr[-2000:]
    imported = finished.stderr.splitlines()[-1]
    assert "torch" not in imported and "transformers" not in imported, imported
    if args == ["--help"]:  # nothing but the settings: not even Prefect
        assert imported == "imported: []"
