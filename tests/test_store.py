"""The content-addressed store: stage keys, atomic publish, validation of published outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline_lib.store import MANIFEST, Store, StoreError, library_versions, sha256_file, stage_key

KEY_INPUTS = {
    "stage": "dpo",
    "stage_config": {"seed": 42, "dpo": {"beta": 0.1, "top_k": 2}},
    "upstream_keys": {"sft": "a" * 64, "data_prep": "b" * 64},
    "data_fingerprint": "c" * 64,
    "stage_code_version": "d" * 64,
    "versions": {"torch": "2.13.0", "transformers": "5.24.0", "trl": "1.12.0", "datasets": "5.2.0"},
}


def key_with(**changes) -> str:
    return stage_key(**{**KEY_INPUTS, **changes})


def test_stage_key_is_stable_for_the_same_inputs() -> None:
    reordered_config = {"dpo": {"top_k": 2, "beta": 0.1}, "seed": 42}
    assert key_with() == key_with()
    assert key_with(stage_config=reordered_config) == key_with(), "dict order must not matter"


@pytest.mark.parametrize(
    "changes",
    [
        {"stage": "sft"},
        {"stage_config": {"seed": 42, "dpo": {"beta": 0.2, "top_k": 2}}},
        {"stage_config": {"seed": 7, "dpo": {"beta": 0.1, "top_k": 2}}},
        {"upstream_keys": {"sft": "e" * 64, "data_prep": "b" * 64}},
        {"upstream_keys": {"sft": "a" * 64}},
        {"data_fingerprint": "f" * 64},
        {"stage_code_version": "0" * 64},
        {"versions": {**KEY_INPUTS["versions"], "trl": "1.12.1"}},
    ],
    ids=["stage", "config", "seed", "upstream-key", "upstream-missing", "data", "code", "library-version"],
)
def test_stage_key_changes_with_each_input(changes: dict) -> None:
    assert key_with(**changes) != key_with()


def test_stage_key_defaults_to_the_installed_library_versions() -> None:
    without_versions = {name: value for name, value in KEY_INPUTS.items() if name != "versions"}
    assert stage_key(**without_versions) == key_with(versions=library_versions())


def make_partial(store: Store, stage: str = "sft", key: str = "k" * 64) -> Path:
    partial = store.begin(stage, key)
    (partial / "model.safetensors").write_bytes(b"weights")
    (partial / "nested").mkdir()
    (partial / "nested" / "card.md").write_text("card")
    (partial / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (partial / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (partial / "failed").mkdir()
    (partial / "failed" / "error.json").write_text("{}")
    return partial


def test_publish_renames_the_partial_directory_with_a_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    key = "k" * 64
    partial = make_partial(store, key=key)
    assert store.validate("sft", key) is not None, "nothing is published before publish"
    with pytest.raises(StoreError, match="not usable"):
        store.load("sft", key)

    output = store.publish("sft", key, {"metrics": {"train_loss": 1.5}})

    assert not partial.exists()
    assert output.path == store.path("sft", key) == tmp_path / "store" / "sft" / key
    assert not (output.path / "checkpoints").exists() and not (output.path / "failed").exists()
    manifest = json.loads((output.path / MANIFEST).read_text())
    assert manifest["files"] == {
        "model.safetensors": sha256_file(output.path / "model.safetensors"),
        "nested/card.md": sha256_file(output.path / "nested" / "card.md"),
    }
    assert (manifest["stage"], manifest["key"], manifest["metrics"]) == ("sft", key, {"train_loss": 1.5})
    assert manifest["versions"] == library_versions()
    assert store.validate("sft", key) is None
    assert store.load("sft", key).manifest == manifest


def test_begin_keeps_the_partial_directory_across_attempts(tmp_path: Path) -> None:
    store = Store(tmp_path)
    partial = make_partial(store)
    assert store.begin("sft", "k" * 64) == partial
    assert (partial / "checkpoints" / "checkpoint-2" / "optimizer.pt").is_file()


def test_republishing_moves_the_old_output_aside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = "k" * 64
    make_partial(store, key=key)
    store.publish("sft", key, {})
    (store.begin("sft", key) / "model.safetensors").write_bytes(b"new weights")

    store.publish("sft", key, {})

    assert (store.path("sft", key) / "model.safetensors").read_bytes() == b"new weights"
    stale = list((tmp_path / "sft").glob(f"{key}.stale-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda directory: (directory / MANIFEST).unlink(), "has no manifest.json"),
        (lambda directory: (directory / MANIFEST).write_text("{truncated"), "is not valid JSON"),
        (lambda directory: (directory / "nested" / "card.md").unlink(), "card.md is missing"),
        (
            lambda directory: (directory / "model.safetensors").write_bytes(b"weightz"),
            "model.safetensors does not match its checksum",
        ),
    ],
    ids=["missing-manifest", "corrupt-manifest", "missing-file", "corrupted-file"],
)
def test_validate_detects_damage(tmp_path: Path, damage, problem: str) -> None:
    store = Store(tmp_path)
    key = "k" * 64
    make_partial(store, key=key)
    output = store.publish("sft", key, {})

    damage(output.path)

    assert problem in store.validate("sft", key)
    with pytest.raises(StoreError, match="not usable"):
        store.load("sft", key)


def test_validate_rejects_a_manifest_of_another_key(tmp_path: Path) -> None:
    store = Store(tmp_path)
    make_partial(store, key="k" * 64)
    output = store.publish("sft", "k" * 64, {})
    output.path.rename(store.path("sft", "j" * 64))
    assert "records key" in store.validate("sft", "j" * 64)


@pytest.mark.parametrize("content", ["null", "[]", '"text"', "{", '{"key": "KEY", "files": null}', '{"key": "KEY", "files": {"a": 1}}'])
def test_an_unreadable_manifest_means_not_in_the_store(tmp_path: Path, content: str) -> None:
    store = Store(tmp_path)
    key = "k" * 64
    make_partial(store, key=key)
    output = store.publish("sft", key, {})
    (output.path / MANIFEST).write_text(content.replace("KEY", key))
    problem = store.validate("sft", key)
    assert problem and str(output.path / MANIFEST) in problem


def test_replaced_outputs_are_removed_once_nobody_can_be_reading_them(tmp_path: Path) -> None:
    store = Store(tmp_path)
    key = "k" * 64
    old = tmp_path / "sft" / f"{key}.stale-{int((time.time() - 7200) * 1000)}"
    recent = tmp_path / "sft" / f"{key}.stale-{int(time.time() * 1000)}"
    for directory in (old, recent):
        directory.mkdir(parents=True)
    make_partial(store, key=key)
    store.publish("sft", key, {})
    assert not old.exists() and recent.exists()


def test_an_adapter_whose_base_model_is_gone_is_not_usable(tmp_path: Path) -> None:
    """A LoRA stage publishes an adapter that names the full-weights directory it needs."""
    store = Store(tmp_path / "store")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    partial = store.begin("dpo", "a" * 64)
    (partial / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    store.publish("dpo", "a" * 64, {"metrics": {}})
    assert store.validate("dpo", "a" * 64) is None
    (base / "config.json").unlink()
    assert "LoRA adapter whose base model" in store.validate("dpo", "a" * 64)
