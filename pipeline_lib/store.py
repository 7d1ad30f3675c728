"""Content-addressed stage outputs: ``<root>/<stage>/<key>/`` plus its ``manifest.json``.

* ``stage_key`` is the contract of the architecture: sha256 over the stage name, its
  config, its upstream keys, the data fingerprint, the source of the stage's own
  modules (``registry.code_version``) and the versions of the ML libraries. Same key, same work.
* Work in progress lives in ``<key>.partial/`` (the trainer's checkpoints included, so
  an interrupted stage resumes) and is published by one ``os.rename``: a reader sees
  either nothing or a complete output.
* A directory is only ever used when its manifest exists and every file it lists has
  the checksum it recorded (``validate``). A file whose size and modification time are
  still those recorded at publish is taken as unchanged without re-reading it (a cached
  re-run would otherwise hash every published model on every plan);
  ``validate(deep=True)``, or ``python -m pipeline_lib.store verify``, re-hashes all.

The manifest replaces the original scripts' ``training_info.pt``: JSON, not pickle.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.errors import StoreError

MANIFEST = "manifest.json"
TRACKED_LIBRARIES = ("torch", "transformers", "trl", "datasets", "peft", "accelerate")
# Directories inside a partial output that are scratch, never published.
SCRATCH_DIRS = ("checkpoints", "failed", "launch")
# A replaced output is kept this long after it was moved aside, for readers still using it.
STALE_GRACE_SECONDS = 3600.0


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in TRACKED_LIBRARIES}


def stage_key(
    stage: str,
    stage_config: dict[str, Any],
    upstream_keys: dict[str, str],
    data_fingerprint: str,
    stage_code_version: str,
    versions: dict[str, str] | None = None,
) -> str:
    payload = {
        "stage": stage,
        "config": stage_config,
        "upstream": upstream_keys,
        "data": data_fingerprint,
        "code": stage_code_version,
        "versions": versions if versions is not None else library_versions(),
    }
    return sha256_text(canonical_json(payload))


def file_stats(directory: Path) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file but the manifest: the cheap check of ``validate``."""
    return {
        str(path.relative_to(directory)): [path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def file_checksums(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


@dataclass(frozen=True)
class StageOutput:
    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def begin(self, stage: str, key: str) -> Path:
        """The work directory for a stage; kept across attempts so training can resume."""
        partial = self.partial_path(stage, key)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def validate(self, stage: str, key: str, deep: bool = False) -> str | None:
        """None if the published output is complete and intact, else why it is not.
        ``deep`` re-hashes every file even when its size and mtime are unchanged."""
        directory = self.path(stage, key)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            return f"{directory} has no {MANIFEST}"
        # Whatever is in the file, an unreadable manifest means "not in the store", never a crash.
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (ValueError, OSError) as error:
            return f"{manifest_path} is not valid JSON: {error}"
        if not isinstance(manifest, dict):
            return f"{manifest_path} holds a {type(manifest).__name__}, not a manifest object"
        if manifest.get("key") != key:
            return f"{manifest_path} records key {manifest.get('key')!r}, expected {key!r}"
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(value, str) for value in files.values()):
            return f"{manifest_path} has no valid file list"
        stats = manifest.get("stats") if isinstance(manifest.get("stats"), dict) else {}
        for name, expected in files.items():
            file_path = directory / name
            if not file_path.is_file():
                return f"{file_path} is missing"
            stat = file_path.stat()
            if not deep and stats.get(name) == [stat.st_size, stat.st_mtime_ns]:
                continue
            if sha256_file(file_path) != expected:
                return f"{file_path} does not match its checksum"
        # A LoRA adapter is only usable beside the full-weights directory it was trained on.
        adapter_config = directory / "adapter_config.json"
        if adapter_config.is_file():
            try:
                base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            except ValueError:
                return f"{adapter_config} is not valid JSON"
            if not base or not (Path(base) / "config.json").is_file():
                return f"{directory} is a LoRA adapter whose base model {base} is gone"
        return None

    def load(self, stage: str, key: str) -> StageOutput:
        problem = self.validate(stage, key)
        if problem:
            raise StoreError(f"{stage} output {key[:12]} is not usable: {problem}")
        directory = self.path(stage, key)
        return StageOutput(stage, key, directory, json.loads((directory / MANIFEST).read_text()))

    def publish(self, stage: str, key: str, manifest: dict[str, Any]) -> StageOutput:
        """Write the manifest into the partial directory and rename it into place atomically."""
        partial = self.partial_path(stage, key)
        for scratch in SCRATCH_DIRS:
            shutil.rmtree(partial / scratch, ignore_errors=True)
        full_manifest = {
            **manifest,
            "stage": stage,
            "key": key,
            "files": file_checksums(partial),
            "stats": file_stats(partial),
            "versions": library_versions(),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (partial / MANIFEST).write_text(json.dumps(full_manifest, indent=2, sort_keys=True, default=str))
        final = self.path(stage, key)
        if final.exists():
            # A stale or broken output under the same key: move it aside, never delete a
            # directory someone may still be reading.
            final.rename(final.with_name(f"{key}.stale-{int(time.time() * 1000)}"))
        os.rename(partial, final)
        self.remove_stale(stage)
        return StageOutput(stage, key, final, full_manifest)

    def remove_stale(self, stage: str, older_than_seconds: float = STALE_GRACE_SECONDS) -> list[Path]:
        """Delete outputs moved aside by ``publish`` once nobody can still be reading them."""
        removed = []
        for stale in (self.root / stage).glob("*.stale-*"):
            try:
                moved_at = int(stale.name.rsplit("-", 1)[1]) / 1000
            except ValueError:
                continue
            if time.time() - moved_at > older_than_seconds:
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        return removed


def verify(root: Path) -> dict[str, str | None]:
    """Re-hash every published output under ``root`` (a store); move the broken ones aside
    (as ``publish`` moves a replaced output) so the next run trains them again. Returns
    ``{"stage/key": problem or None}``."""
    store = Store(root)
    found: dict[str, str | None] = {}
    for directory in sorted(Path(root).glob("*/*")):
        if not directory.is_dir() or "." in directory.name:  # .partial, .stale-*
            continue
        stage, key = directory.parent.name, directory.name
        problem = store.validate(stage, key, deep=True)
        found[f"{stage}/{key}"] = problem
        if problem:
            directory.rename(directory.with_name(f"{key}.stale-{int(time.time() * 1000)}"))
    return found


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Re-hash every published stage output; move broken ones aside.")
    parser.add_argument("command", choices=["verify"])
    parser.add_argument("--output-root", type=Path, default=Path(".data"), help="the run's output_root")
    arguments = parser.parse_args()
    results = verify(arguments.output_root / "store")
    for name, problem in results.items():
        print(f"{'ok    ' if problem is None else 'BROKEN'}  {name}" + (f": {problem} (moved aside)" if problem else ""))
    sys.exit(1 if any(results.values()) else 0)
