"""The code version in a stage key: the source of a module and of every project module it
imports, transitively, at any depth and inside functions too.

The stdlib's ``modulefinder`` reads the byte code of each module for its imports; it
searches only the project's own folder, so third-party code is covered by the library
versions in the key instead. Kept apart from the registry (the embedded task's data
fingerprint uses it too), so that this small module, not the DAG's code, is what every
stage's hash includes.
"""

from __future__ import annotations

import modulefinder
from functools import lru_cache
from pathlib import Path

from pipeline_lib.store import sha256_text

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def code_files(module_name: str, root: Path = PROJECT_ROOT) -> tuple[Path, ...]:
    """The project's source files (under ``root``) that ``module_name`` imports, itself included."""
    finder = modulefinder.ModuleFinder(path=[str(root)])
    finder.import_hook(module_name)
    files = {Path(module.__file__).resolve() for module in finder.modules.values() if module.__file__}
    return tuple(sorted(path for path in files if path.is_relative_to(root)))


def module_code_version(module_name: str, root: Path = PROJECT_ROOT) -> str:
    """Hash of the source of ``module_name`` and every project module it imports."""
    root = Path(root).resolve()
    parts = [f"{path.relative_to(root)}\n{path.read_text()}" for path in code_files(module_name, root)]
    return sha256_text("\n".join(parts))
