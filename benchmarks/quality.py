"""Does the default run align? Run the whole flow with several seeds and check the targets.

Each seed is one complete ``python flows/rlhf.py`` run (data prep and evaluation included)
in its own fresh output root, so the wall time is what a user waits for on a fresh
machine, base-model conversion and Prefect's start included. The figures come from the
flow's last JSON line (``eval.json``): held-out prompts only, the VADER oracle as judge,
the reward model as the win-rate judge.

Prints one table of every metric as mean, standard deviation and range over the seeds,
then one line per target (met or not, with the mean figure; a target is met when the
mean over seeds clears it). Exits 0 when every target is met, 1 otherwise.

    . .venv/bin/activate
    python benchmarks/quality.py                        # default preset, seeds 0 1 2
    python benchmarks/quality.py --seeds 0 --set dpo.beta=0.2
    python benchmarks/quality.py --reuse                # re-print from finished runs

Results per seed go to ROOT/seed-N/quality.json; ``--reuse`` reads those instead of
running again (a seed without one still runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean, pstdev

REPO = Path(__file__).resolve().parents[1]
REFERENCE_POLICIES = ("base", "sft")  # every other policy in the evaluation is an aligned one
# (label, metric, comparison, threshold): the floors of the default preset.
TARGETS = (
    ("reward model accuracy on held-out pairs", "reward_model_accuracy", ">=", 0.85),
    ("DPO oracle gain over SFT", "dpo/oracle_gain", ">=", 0.25),
    ("PPO oracle gain over SFT", "ppo/oracle_gain", ">=", 0.15),
    ("DPO win rate vs SFT (reward model)", "dpo/win_rate", ">=", 0.65),
    ("PPO win rate vs SFT (reward model)", "ppo/win_rate", ">=", 0.65),
    ("DPO distinct-2 / SFT's", "dpo/distinct_2_ratio", ">=", 0.80),
    ("PPO distinct-2 / SFT's", "ppo/distinct_2_ratio", ">=", 0.80),
    ("DPO mean length / SFT's", "dpo/length_ratio", "within", (0.5, 2.0)),
    ("PPO mean length / SFT's", "ppo/length_ratio", "within", (0.5, 2.0)),
    # GRPO is judged as PPO is: the same reward model, prompts and budget of prompts.
    ("GRPO oracle gain over SFT", "grpo/oracle_gain", ">=", 0.15),
    ("GRPO win rate vs SFT (reward model)", "grpo/win_rate", ">=", 0.65),
    ("GRPO distinct-2 / SFT's", "grpo/distinct_2_ratio", ">=", 0.80),
    ("GRPO mean length / SFT's", "grpo/length_ratio", "within", (0.5, 2.0)),
    ("whole run, wall seconds", "wall_seconds", "<=", 900.0),
)


def seed_metrics(summary: dict, wall_seconds: float) -> dict[str, float]:
    """The figures the targets read, from the flow's summary of one run."""
    evaluation = summary["evaluation"]
    table = evaluation["policies"]
    sft = table["sft"]
    metrics = {"wall_seconds": wall_seconds, "reward_model_accuracy": evaluation["reward_model_pairwise_accuracy"]}
    for name, row in table.items():
        metrics[f"{name}/oracle_mean"] = row["oracle_mean"]
    for name in (name for name in table if name not in REFERENCE_POLICIES):
        row = table[name]
        metrics[f"{name}/oracle_gain"] = row["oracle_mean"] - sft["oracle_mean"]
        metrics[f"{name}/win_rate"] = row["win_rate_vs_sft"]
        metrics[f"{name}/kl_to_sft"] = row["kl_to_sft_mean"]
        metrics[f"{name}/distinct_2_ratio"] = row["distinct_2"] / sft["distinct_2"]
        metrics[f"{name}/length_ratio"] = row["mean_length_words"] / sft["mean_length_words"]
    return metrics


def stage_seconds(summary: dict) -> dict[str, float]:
    seconds = {}
    for name, stage in summary["stages"].items():
        manifest = Path(stage["path"]) / "manifest.json"
        if manifest.is_file():
            seconds[name] = json.loads(manifest.read_text()).get("timings", {}).get("seconds")
    return seconds


def run_seed(seed: int, root: Path, arguments: argparse.Namespace) -> dict:
    record_path = root / "quality.json"
    if arguments.reuse and record_path.is_file():
        return json.loads(record_path.read_text())
    shutil.rmtree(root, ignore_errors=True)  # a fresh root: nothing cached, the base model converted anew
    root.mkdir(parents=True)
    command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", arguments.preset, "--output-root", str(root),
               "--set", f"seed={seed}"]
    if arguments.config:
        command += ["--config", arguments.config]
    for override in arguments.overrides:
        command += ["--set", override]
    print(f"seed {seed}: {' '.join(command[1:])}", flush=True)
    started = time.time()
    with open(root / "flow.log", "w") as log:
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.time() - started
    (root / "flow.stdout").write_text(completed.stdout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"seed {seed}: the flow failed (exit {completed.returncode}); see {root / 'flow.log'}")
    summary = json.loads(lines[-1])
    record = {"seed": seed, "metrics": seed_metrics(summary, wall), "stage_seconds": stage_seconds(summary)}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"seed {seed}: done in {wall:.0f} s", flush=True)
    return record


def meets(comparison: str, threshold, value: float) -> bool:
    if comparison == ">=":
        return value >= threshold
    if comparison == "<=":
        return value <= threshold
    low, high = threshold
    return low <= value <= high


def report(records: list[dict]) -> bool:
    names = list(records[0]["metrics"])
    print(f"\n{'metric':<28}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}   per seed")
    for name in names:
        values = [record["metrics"][name] for record in records]
        per_seed = " ".join(f"{value:.3f}" for value in values)
        print(f"{name:<28}{fmean(values):>10.3f}{pstdev(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}   {per_seed}")
    stages = list(records[0]["stage_seconds"])
    if stages:
        print("\nstage seconds (mean over seeds): " + ", ".join(
            f"{stage} {fmean(r['stage_seconds'][stage] or 0 for r in records):.0f}" for stage in stages))
    print(f"\nTargets (mean over {len(records)} seed(s): {', '.join(str(r['seed']) for r in records)})")
    all_met = True
    for label, metric, comparison, threshold in TARGETS:
        if any(metric not in record["metrics"] for record in records):
            print(f"  n/a      {label}: the stage did not run")
            continue
        value = fmean(record["metrics"][metric] for record in records)
        met = meets(comparison, threshold, value)
        all_met &= met
        bound = f"in [{threshold[0]}, {threshold[1]}]" if comparison == "within" else f"{comparison} {threshold}"
        print(f"  {'MET    ' if met else 'NOT MET'}  {label}: {value:.3f} (target {bound})")
    return all_met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--config", help="YAML file over the preset, as the flow's --config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--output-root", type=Path, default=REPO / ".data" / "quality")
    parser.add_argument("--reuse", action="store_true", help="read finished seeds' quality.json instead of running them")
    arguments = parser.parse_args()
    records = [run_seed(seed, arguments.output_root / f"seed-{seed}", arguments) for seed in arguments.seeds]
    return 0 if report(records) else 1


if __name__ == "__main__":
    sys.exit(main())
