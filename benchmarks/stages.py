"""Benchmark every pipeline stage directly (no Prefect): wall time, peak memory, key metrics.

Runs, in order and each into its own directory under the output root: the base model,
then every declared stage in DAG order (data_prep, sft, reward, dpo, ppo, ..., evaluate;
evaluation judges the base model and every policy stage). Each stage runs in a fresh child process (multiprocessing,
spawn), so its peak RSS is its own: the child reports getrusage(RUSAGE_SELF).ru_maxrss,
which includes importing torch/transformers/TRL (about 0.5-0.7 GiB of the figure).
Stage directories are wiped first, so trainers never resume from an earlier run's
checkpoints; the converted base model under ROOT/models is kept and reused.

Prints a table (stage, wall seconds, peak RSS MiB, key metrics), then the eval table
from evaluate/eval.json, then data prep's sampling speed in new tokens/s against this
machine's limit (benchmarks/sampling.py; --no-sampling skips it); ROOT/bench.json is rewritten after every stage. --from-stage
reruns from that stage on, reusing earlier stages' outputs; --resume keeps stage directories
(trainers then resume from their checkpoints, so wall times cover only the remainder).

    . .venv/bin/activate
    python benchmarks/stages.py                                   # default preset, .data/bench
    python benchmarks/stages.py --preset tiny --output-root /tmp/b --set tracking.mode=disabled
    python benchmarks/stages.py --set dpo.beta=0.3 --set ppo.total_episodes=128
    python benchmarks/stages.py --from-stage dpo --resume --config my.yaml
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from queue import Empty

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_lib import registry  # noqa: E402

STAGES = ("base_model", *registry.stage_names())
SAMPLING_PROMPTS = 64  # training prompts sampled by the sampling section


def key_metrics(name: str) -> tuple[str, ...]:
    if name == "base_model":
        return ()
    declared = registry.stage(name)
    if declared.judges_policies:  # one oracle figure per policy
        return (*declared.key_metrics, *(f"{policy}/oracle_mean" for policy in registry.policy_names()))
    return declared.key_metrics


def _stage(name: str, cfg, root: Path, out_name: str):
    from pipeline_lib.data import sentiment_task
    from pipeline_lib.models import materialize_base_model

    base = materialize_base_model(cfg.model, root / "models", sentiment_task.corpus())
    if name == "base_model":
        return {"path": str(base)}
    if name == "sampling":
        import sampling  # benchmarks/sampling.py, beside this script

        return sampling.measure(cfg, base, SAMPLING_PROMPTS)
    earlier = {stage: root / stage for stage in STAGES[1 : STAGES.index(name)]}
    return registry.stage(name).run(cfg, registry.stage_inputs(name, earlier, base), root / out_name)


def _child(name: str, cfg, root: Path, queue, out_name: str, stage=None) -> None:
    """Run ``stage(name, cfg, root, out_name)`` (default: the pipeline's own stage) and put
    its metrics, error and peak RSS on ``queue``."""
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    try:
        metrics, error = (stage or _stage)(name, cfg, root, out_name), None
    except BaseException:  # report and let the parent decide
        metrics, error = {}, traceback.format_exc()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    queue.put({"metrics": metrics, "error": error, "peak_rss_mib": rss_mib})


def run_in_child(name: str, cfg, root: Path, out_name: str | None = None, target=None) -> dict:
    """Run one stage (inputs: the earlier stages' directories under ``root``) into
    ``root/out_name`` (default: its name) in a fresh process; its metrics, error, peak RSS
    and wall seconds. ``target`` replaces this module's ``_child`` (same arguments; it must
    put one such result on the queue), as ``benchmarks/peers.py`` does for TRL's bare trainers."""
    queue = mp.get_context("spawn").Queue()
    start = time.perf_counter()
    process = mp.get_context("spawn").Process(target=target or _child, args=(name, cfg, root, queue, out_name or name))
    process.start()
    while True:  # read before join (a full pipe would block the child); notice a killed child
        try:
            result = queue.get(timeout=2)
            break
        except Empty:
            if not process.is_alive():
                result = {"metrics": {}, "error": f"child died, exit code {process.exitcode}", "peak_rss_mib": 0.0}
                break
    process.join()
    result["wall_s"] = time.perf_counter() - start
    return result


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--output-root", type=Path, default=Path(".data/bench"))
    parser.add_argument("--config", type=Path, help="YAML file layered over the preset (load_config's config_file)")
    parser.add_argument("--from-stage", choices=STAGES, default=STAGES[0], help="reuse the outputs of earlier stages")
    parser.add_argument("--resume", action="store_true", help="keep stage directories: trainers resume from checkpoints")
    parser.add_argument("--no-sampling", action="store_true", help="skip the sampling section (tokens/s against the limit)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    from pipeline_lib.config import load_config

    root = args.output_root.resolve()
    cfg = load_config(args.preset, args.config, overrides=[*args.overrides, f"output_root={root}"])
    todo = STAGES[STAGES.index(args.from_stage) :]
    for stage in [] if args.resume else [s for s in todo if s != "base_model"]:
        shutil.rmtree(root / stage, ignore_errors=True)
    rows, start_all = [], time.perf_counter()
    for name in todo:
        result = run_in_child(name, cfg, root)
        rows.append({"stage": name, **result})
        print(f"== {name}: {result['wall_s']:.1f} s, {result['peak_rss_mib']:.0f} MiB", flush=True)
        summary = {"preset": args.preset, "config": str(args.config), "overrides": args.overrides, "stages": rows}
        (root / "bench.json").write_text(json.dumps(summary, indent=2, default=str))
        if result["error"]:
            print(result["error"], file=sys.stderr)
            break
    total = time.perf_counter() - start_all

    print(f"\npreset={args.preset} config={args.config} overrides={args.overrides}")
    print(f"{'stage':<11}{'wall s':>8}{'peak MiB':>10}  key metrics")
    for row in rows:
        keys = key_metrics(row["stage"])
        shown = ", ".join(f"{k}={_fmt(row['metrics'].get(k))}" for k in keys) or ("FAILED" if row["error"] else "")
        print(f"{row['stage']:<11}{row['wall_s']:>8.1f}{row['peak_rss_mib']:>10.0f}  {shown}")
    print(f"{'total':<11}{total:>8.1f}")
    eval_json = root / "evaluate" / "eval.json"
    if eval_json.is_file():
        results = json.loads(eval_json.read_text())
        policies = results["policies"]
        metrics = list(next(iter(policies.values())))
        print(f"\nreward model pairwise accuracy: {results['reward_model_pairwise_accuracy']:.3f} "
              f"({results['held_out_pairs']} held-out pairs, {results['held_out_prompts']} prompts)")
        print(f"{'policy':<8}" + "".join(f"{m:>20}" for m in metrics))
        for name, row in policies.items():
            print(f"{name:<8}" + "".join(f"{_fmt(row[m]):>20}" for m in metrics))
    if not args.no_sampling and not rows[-1]["error"]:
        import sampling  # benchmarks/sampling.py, beside this script

        result = run_in_child("sampling", cfg, root)
        if result["error"]:
            print(result["error"], file=sys.stderr)
            return 1
        sampling.print_report(result["metrics"])
    return 1 if rows[-1]["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
