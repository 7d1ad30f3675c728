"""How much oracle score does each nat of KL buy? Sweep DPO's beta and PPO's kl_coef.

Every point is one ``python flows/rlhf.py --set dpo.beta=X --stages dpo,evaluate`` (or
``--set ppo.kl_coef=X --stages ppo,evaluate``) in one shared output root, so data prep,
SFT and the reward model train once, on the first point, and every later point finds
them in the store by key; only the swept stage and the evaluation run again. Each
evaluation judges base, SFT and the swept policy on the held-out prompts: the oracle's
mean (VADER, one response per prompt) and KL(policy || SFT) from responses sampled at
temperature 1 (``evaluate.kl_samples`` per prompt), each with its 95% paired-bootstrap
interval over prompts.

Prints a table (one row per point, base and SFT first) and writes ROOT/frontier.json and
ROOT/frontier.png (oracle score against sampled KL, DPO and PPO points joined in order of
their setting, base and SFT marked).

    . .venv/bin/activate
    python benchmarks/frontier.py --preset tiny                  # a couple of minutes
    python benchmarks/frontier.py                                # default preset, see README for the cost
    python benchmarks/frontier.py --beta 0.05 0.1 --kl-coef 0.25 --seed 1
    python benchmarks/frontier.py --reuse                        # re-print and re-plot finished points

Each point's summary goes to ROOT/points/<method>-<value>.json; ``--reuse`` reads those
instead of running again (a point without one still runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {  # method -> the setting swept, its marker and colour on the plot
    "dpo": ("beta", "o", "tab:blue"),
    "ppo": ("kl_coef", "^", "tab:green"),
}


def run_point(method: str, value: float, root: Path, arguments: argparse.Namespace) -> dict:
    """One flow run with the swept setting at ``value``; the flow's summary, plus its wall time."""
    setting = SWEEPS[method][0]
    record_path = root / "points" / f"{method}-{value:g}.json"
    if arguments.reuse and record_path.is_file():
        return json.loads(record_path.read_text())
    command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", arguments.preset, "--output-root", str(root),
               "--set", f"seed={arguments.seed}", "--set", f"{method}.{setting}={value}", "--stages", f"{method},evaluate"]
    for override in arguments.overrides:
        command += ["--set", override]
    print(f"{method} {setting}={value:g}: {' '.join(command[1:])}", flush=True)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(root / "points" / f"{method}-{value:g}.log", "w") as log:
        completed = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.time() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"{method} {setting}={value:g}: the flow failed (exit {completed.returncode}); see {log.name}")
    summary = json.loads(lines[-1])
    record = {"method": method, "setting": setting, "value": value, "wall_seconds": wall, "evaluation": summary["evaluation"],
              "stages": {name: {"cached": stage["cached"], "seconds": stage_seconds(stage["path"])} for name, stage in summary["stages"].items()}}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"{method} {setting}={value:g}: done in {wall:.0f} s", flush=True)
    return record


def stage_seconds(path: str) -> float | None:
    manifest = Path(path) / "manifest.json"
    return json.loads(manifest.read_text()).get("timings", {}).get("seconds") if manifest.is_file() else None


def frontier_points(records: list[dict]) -> list[dict]:
    """One point per swept run, after base and SFT (read from the first run: every run
    evaluates the same base and SFT with the same seed, so their figures are the same)."""
    first = records[0]["evaluation"]["policies"]
    points = [point(name, first[name]) for name in ("base", "sft")]
    for record in records:
        method = record["method"]
        _, marker, color = SWEEPS[method]
        row = record["evaluation"]["policies"][method]
        points.append({**point(f"{method} {record['setting']}={record['value']:g}", row), "method": method,
                       "value": record["value"], "marker": marker, "color": color, "wall_seconds": record["wall_seconds"],
                       "stage_seconds": record["stages"].get(method, {}).get("seconds"),
                       "evaluate_seconds": record["stages"].get("evaluate", {}).get("seconds")})
    return points


def point(name: str, row: dict) -> dict:
    """A policy's figures; ``distinct_2_ratio`` is its distinct-2 over SFT's (a collapse onto
    few openings shows there before the oracle notices)."""
    return {
        "distinct_2_ratio": row["distinct_2_ratio_to_sft"],
        "distinct_2_ratio_ci95": row["distinct_2_ratio_to_sft_ci95"],
        "name": name,
        "oracle": row["oracle_mean"],
        "oracle_gain": row["oracle_gain_vs_sft"],
        "oracle_gain_ci95": row["oracle_gain_vs_sft_ci95"],
        "win_rate": row["win_rate_vs_sft"],
        "win_rate_ci95": row["win_rate_vs_sft_ci95"],
        "kl": row["sampled_kl_to_sft"],
        "kl_ci95": row["sampled_kl_to_sft_ci95"],
    }


def print_table(points: list[dict], evaluation: dict) -> None:
    def with_interval(value, interval, sign: str = "+") -> str:
        if value is None:
            return "n/a"
        return f"{value:{sign}.3f} [{interval[0]:{sign}.3f}, {interval[1]:{sign}.3f}]" if interval else f"{value:{sign}.3f}"

    print(f"\n{'point':<22}{'oracle':>8}{'oracle gain vs SFT':>28}{'win rate vs SFT':>28}{'sampled KL to SFT':>28}"
          f"{'distinct-2/SFT':>28}{'stage s':>9}{'eval s':>8}{'wall s':>8}")
    for p in points:
        seconds = "".join(f"{p.get(key):>{width}.0f}" if p.get(key) is not None else f"{'':>{width}}"
                          for key, width in (("stage_seconds", 9), ("evaluate_seconds", 8), ("wall_seconds", 8)))
        print(f"{p['name']:<22}{p['oracle']:>8.3f}{with_interval(p['oracle_gain'], p['oracle_gain_ci95']):>28}"
              f"{with_interval(p['win_rate'], p['win_rate_ci95'], sign='-'):>28}{with_interval(p['kl'], p['kl_ci95']):>28}"
              f"{with_interval(p['distinct_2_ratio'], p['distinct_2_ratio_ci95'], sign='-'):>28}{seconds}")
    intervals, kl = evaluation.get("intervals") or {}, evaluation.get("sampled_kl") or {}
    print(f"\nBrackets: 95% paired bootstrap over {evaluation.get('held_out_prompts')} held-out prompts "
          f"({intervals.get('resamples')} resamples); KL from {kl.get('samples_per_prompt')} samples per prompt at "
          "temperature 1. Stage and eval seconds: the swept stage's and the evaluation's own time; wall: the whole flow run.")


def plot_frontier(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline_lib.stages.evaluate import frontier_axes

    figure, axes = plt.subplots(figsize=(7, 5))
    # Swept points are labelled by their setting alone; the legend names the setting.
    frontier_axes(axes, [{**p, "name": f"{p['value']:g}"} if p.get("method") else p for p in points], title)
    for method, (setting, _, color) in SWEEPS.items():
        swept = sorted((p for p in points if p.get("method") == method and p["kl"] is not None), key=lambda p: p["value"])
        if swept:
            axes.plot([p["kl"] for p in swept], [p["oracle"] for p in swept], color=color, alpha=0.5, label=f"{method} ({setting})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--beta", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.4], help="DPO betas (the preset's: 0.2)")
    parser.add_argument("--kl-coef", type=float, nargs="*", default=[0.12, 0.25, 0.5],
                        help="PPO kl_coef values (the preset's: 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--output-root", type=Path, default=REPO / ".data" / "frontier")
    parser.add_argument("--reuse", action="store_true", help="read finished points instead of running them again")
    arguments = parser.parse_args()
    if not arguments.beta and not arguments.kl_coef:
        parser.error("nothing to sweep: give --beta or --kl-coef values")
    sys.path.insert(0, str(REPO))
    arguments.output_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    records = [run_point("dpo", beta, arguments.output_root, arguments) for beta in arguments.beta]
    records += [run_point("ppo", coef, arguments.output_root, arguments) for coef in arguments.kl_coef]
    points = frontier_points(records)
    print_table(points, records[0]["evaluation"])
    if any(p["oracle"] is None for p in points):
        print("\nNo oracle on this task: no plot.")
    else:
        plot_frontier(points, arguments.output_root / "frontier.png", f"Oracle vs sampled KL ({arguments.preset}, seed {arguments.seed})")
        print(f"\nPlot: {arguments.output_root / 'frontier.png'}")
    (arguments.output_root / "frontier.json").write_text(json.dumps({"points": points, "seconds": time.time() - started}, indent=2))
    print(f"Sweep: {len(records)} points in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
