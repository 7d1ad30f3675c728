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


def test_unchanged_files_are_not_re_read_but_a_changed_one_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached re-run must not hash every published model: size and mtime as recorded at
    publish mean unchanged; any write changes the mtime and brings the checksum back."""
    import pipeline_lib.store as store_module

    store = Store(tmp_path / "store")
    key = "k" * 64
    make_partial(store, key=key)
    output = store.publish("sft", key, {"metrics": {}})
    hashed: list[str] = []
    real_sha = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha(path))
    assert store.validate("sft", key) is None and hashed == []
    assert store.validate("sft", key, deep=True) is None and sorted(hashed) == ["card.md", "model.safetensors"]
    hashed.clear()
    time.sleep(0.01)
    (output.path / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, new content and mtime
    assert "does not match its checksum" in store.validate("sft", key)
    assert hashed == ["model.safetensors"]


def test_verify_finds_a_change_that_kept_size_and_mtime_and_moves_it_aside(tmp_path: Path) -> None:
    import os

    from pipeline_lib.store import verify

    store = Store(tmp_path / "store")
    for key in ("a" * 64, "b" * 64):
        make_partial(store, key=key)
        store.publish("sft", key, {"metrics": {}})
    weights = store.path("sft", "b" * 64) / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"WEIGHTS")  # bit rot: same size, and the old mtime put back
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert store.validate("sft", "b" * 64) is None  # the cheap check cannot see it
    results = verify(tmp_path / "store")
    assert results[f"sft/{'a' * 64}"] is None
    assert "does not match its checksum" in results[f"sft/{'b' * 64}"]
    assert not store.path("sft", "b" * 64).exists()  # moved aside: the next run trains it again
    assert store.validate("sft", "a" * 64) is None
