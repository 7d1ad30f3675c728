"""Shared fixtures: the ``tiny`` preset and its 4-layer base model, built once per session.

Tests never reach the network or a wandb server: tracking is disabled and the hub is
offline for everything started from here (subprocesses inherit the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any test imports torch, wandb, transformers or datasets.
os.environ["WANDB_MODE"] = "disabled"
# The tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
# spin-waiting makes training 3x slower: one thread per process unless the caller says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline_lib.config import PipelineConfig, load_config  # noqa: E402
from pipeline_lib.data import sentiment_task  # noqa: E402
from pipeline_lib.models import materialize_base_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep datasets' Arrow cache of test files out of the user's ~/.cache (subprocesses too)."""
    import datasets.config

    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    datasets.config.HF_DATASETS_CACHE = cache
    return cache


def benchmark_script(name: str):
    """A script of benchmarks/ loaded as a module (they are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def harness():
    """One Prefect test harness (a temporary server) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_config(tmp_path: Path) -> PipelineConfig:
    """A fresh tiny config per test, writing under tmp_path and ignoring any developer ``.env``.

    Function-scoped because configs validate on assignment and a test may change one.
    """
    return load_config("tiny", overrides=[f"output_root={tmp_path}"], env_file=None)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of the seeded 4-layer Llama and its tokenizer; tests must not write into it."""
    model_section = load_config("tiny", env_file=None).model
    return materialize_base_model(model_section, tmp_path_factory.mktemp("models"), sentiment_task.corpus())


# --- A real Prefect server and the served rlhf/retrain deployment (test_deployments, test_ui);
# one of each per session, helpers in tests/conftest_server.py.
@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    from conftest_server import running_server

    with running_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture(scope="session")
def retrain_service(prefect_server, tmp_path_factory: pytest.TempPathFactory):
    from conftest_server import served_retrain

    with served_retrain(prefect_server, tmp_path_factory.mktemp("retrain")) as served:
        yield served
