"""benchmarks/gpu.py at its CPU-sized setting: the four variants run and report sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
VARIANTS = ("sft_full", "sft_lora", "sft_lora_bf16", "dpo_full", "dpo_lora", "dpo_lora_bf16")


def run_benchmark(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_cpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu-bench") / "results.json"
    completed = run_benchmark("--size", "tiny", "--device", "cpu", "--parts", "steps", "--steps", "2", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    report = json.loads(last_line)
    assert json.loads(out.read_text()) == report  # --out holds the same results as the last line
    return completed, report


def test_reports_every_variant_with_throughput(tiny_cpu):
    completed, report = tiny_cpu
    assert report["device"] == "cpu" and "CPU" in report["device_name"]
    assert "device=cpu" in completed.stdout  # the table says which device gave the numbers
    assert "default" not in report["parts"]
    variants = report["parts"]["steps"]["variants"]
    assert set(variants) == set(VARIANTS)
    for name, row in variants.items():
        assert row["tokens_per_s"] > 0, name
        assert row["peak_memory_mib"] > 0, name
        assert row["mfu"] is None, name  # no MFU on CPU
        assert row["loss_first"] == row["loss_first"] and row["loss_last"] == row["loss_last"], name  # not NaN
        assert name in completed.stdout


def test_lora_trains_far_fewer_parameters(tiny_cpu):
    variants = tiny_cpu[1]["parts"]["steps"]["variants"]
    for method in ("sft", "dpo"):
        full, lora = variants[f"{method}_full"], variants[f"{method}_lora"]
        assert full["trainable_params"] == full["base_params"]
        assert 0 < lora["trainable_params"] < full["trainable_params"] / 3


def test_lora_dpo_needs_no_reference_copy(tiny_cpu):
    variants = tiny_cpu[1]["parts"]["steps"]["variants"]
    assert variants["dpo_full"]["reference_copies"] == 1
    assert variants["dpo_lora"]["reference_copies"] == variants["dpo_lora_bf16"]["reference_copies"] == 0
    assert variants["sft_full"]["reference_copies"] == variants["sft_lora"]["reference_copies"] == 0


def test_cuda_requested_without_cuda_exits_2():
    completed = run_benchmark("--device", "cuda", "--parts", "steps", timeout=60)
    assert completed.returncode == 2
    assert "CUDA" in completed.stderr
    assert not completed.stdout.strip()  # no work done, no results printed


def test_lora_adapter_dtypes(tiny_cpu):
    """peft's default keeps adapters in float32 over bf16 weights; lora_bf16 keeps the model's dtype."""
    variants = tiny_cpu[1]["parts"]["steps"]["variants"]
    for method in ("sft", "dpo"):
        assert variants[f"{method}_full"]["trainable_dtype"] == "bfloat16"
        assert variants[f"{method}_lora"]["trainable_dtype"] == "float32"
        assert variants[f"{method}_lora_bf16"]["trainable_dtype"] == "bfloat16"
        assert variants[f"{method}_lora_bf16"]["trainable_params"] == variants[f"{method}_lora"]["trainable_params"]
