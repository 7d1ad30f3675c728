"""Benchmark going past one process: SFT on 1 and 2 processes, and the whole run on each task runner.

Two parts, both on the ``default`` preset unless told otherwise:

* ``steps``: the SFT stage run the way the flow runs it, on one process (the fork-server
  child, ``pipeline_lib/launch.py``) and on ``launch.num_processes=2`` (``accelerate
  launch``, DDP over gloo on CPU), for ``--sft-steps`` optimizer steps from the same
  data. Prints seconds per step, training examples per second (two processes take twice
  the examples per step: the per-device batch is the same) and the stage's wall time,
  start-up included. Data prep runs once into the output root and is reused.
* ``runners``: the whole pipeline, ``python flows/rlhf.py``, into a fresh output root per
  runner (``execution.runner=process``, then ``ray``: a local Ray started for the run),
  and the ratio of the wall times.

    python benchmarks/scale.py                          # both parts (about 20 minutes on 2 cores)
    python benchmarks/scale.py --part steps --sft-steps 8
    python benchmarks/scale.py --part runners --preset tiny

Figures go to ROOT/scale.json too. On a machine shared with other work every figure
moves; compare the ratios printed in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sft_steps(preset: str, root: Path, steps: int, overrides: list[str], repeats: int = 2) -> list[dict]:
    from pipeline_lib import registry
    from pipeline_lib.config import load_config
    from pipeline_lib.data import sentiment_task
    from pipeline_lib.distributed import run_stage_distributed
    from pipeline_lib.launch import run_stage_process
    from pipeline_lib.models import materialize_base_model

    base_config = load_config(preset, overrides=[f"output_root={root}", "tracking.mode=disabled", *overrides])
    base = materialize_base_model(base_config.model, root / "models", sentiment_task.corpus())
    data = root / "data_prep"
    if not (data / "manifest-bench.json").is_file():  # prepared once, reused by later runs of this benchmark
        shutil.rmtree(data, ignore_errors=True)
        run_stage_process("data_prep", base_config.model_dump(mode="json"), {"base_model": base}, data, root / "running")
        (data / "manifest-bench.json").write_text(json.dumps({"preset": preset, "seed": base_config.seed}))
    rows: dict[int, dict] = {}
    # Alternating 1, 2, 1, 2, ...: a neighbour's load on a shared machine hits both alike;
    # the fastest of each is kept.
    for processes in (1, 2) * repeats:
        config = load_config(
            preset,
            overrides=[
                f"output_root={root}", "tracking.mode=disabled", *overrides,
                f"sft.max_steps={steps}", f"sft.save_steps={steps * 10}", f"launch.num_processes={processes}",
            ],
        )  # fmt: skip
        out = root / f"sft-{processes}p"
        shutil.rmtree(out, ignore_errors=True)
        run = run_stage_distributed if processes > 1 else run_stage_process
        inputs = registry.stage_inputs("sft", {"data_prep": data}, base)
        started = time.perf_counter()
        metrics = run("sft", config.model_dump(mode="json"), inputs, out, root / "running")
        wall = time.perf_counter() - started
        runtime = next(entry["train_runtime"] for entry in json.loads((out / "log_history.json").read_text()) if "train_runtime" in entry)
        examples = steps * config.sft.per_device_train_batch_size * config.sft.gradient_accumulation_steps * processes
        row = {
            "processes": processes, "seconds_per_step": runtime / steps, "examples_per_second": examples / runtime,
            "stage_wall_seconds": wall, "train_loss": metrics.get("train_loss"),
        }  # fmt: skip
        if processes not in rows or row["seconds_per_step"] < rows[processes]["seconds_per_step"]:
            rows[processes] = row
    return [rows[1], rows[2]]


def whole_runs(preset: str, root: Path, overrides: list[str]) -> list[dict]:
    rows = []
    for runner in ("process", "ray"):
        out = root / f"run-{runner}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", preset, "--output-root", str(out),
                   "--set", f"execution.runner={runner}", "--set", "tracking.mode=disabled"]  # fmt: skip
        for override in overrides:
            command += ["--set", override]
        environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
        wall = time.perf_counter() - started
        summary = json.loads(finished.stdout.strip().splitlines()[-1]) if finished.stdout.strip() else {}
        if finished.returncode != 0:
            print(finished.stderr[-3000:], file=sys.stderr)
        rows.append({"runner": runner, "wall_seconds": wall, "status": summary.get("status", f"exit {finished.returncode}")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["steps", "runners", "all"], default="all")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--output-root", type=Path, default=REPO / ".data" / "scale")
    parser.add_argument("--sft-steps", type=int, default=8, help="optimizer steps of SFT timed per process count")
    parser.add_argument("--repeats", type=int, default=2, help="runs per process count, alternating; the fastest is kept")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    root = args.output_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {"preset": args.preset, "cpu_cores": os.cpu_count()}
    if args.part in ("steps", "all"):
        rows = report["sft_steps"] = sft_steps(args.preset, root, args.sft_steps, args.overrides, args.repeats)
        print(f"\nSFT, {args.sft_steps} steps ({args.preset}), per process count:")
        print(f"{'processes':>9} {'s/step':>8} {'examples/s':>11} {'stage wall s':>13} {'train loss':>11}")
        for row in rows:
            print(f"{row['processes']:>9} {row['seconds_per_step']:>8.2f} {row['examples_per_second']:>11.2f} "
                  f"{row['stage_wall_seconds']:>13.1f} {row['train_loss']:>11.4f}")  # fmt: skip
        one, two = rows
        print(f"throughput ratio (2 processes / 1): {two['examples_per_second'] / one['examples_per_second']:.2f}x")
    if args.part in ("runners", "all"):
        rows = report["runners"] = whole_runs(args.preset, root, args.overrides)
        print(f"\nWhole run ({args.preset}), per task runner:")
        for row in rows:
            print(f"{row['runner']:>8}: {row['wall_seconds']:7.1f} s  {row['status']}")
        process, ray = rows
        print(f"Ray overhead: {100 * (ray['wall_seconds'] / process['wall_seconds'] - 1):+.1f}% of the process runner's wall time")
    (root / "scale.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
