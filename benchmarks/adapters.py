"""What LoRA saves: peak memory, time and trainable parameters of a stage, full vs top-k vs LoRA.

Data prep and SFT run once (the preset's own settings; reused from ROOT when already
there), then the chosen stage (default: DPO) runs once per variant, each in a fresh child
process (spawn) whose peak RSS is its own (getrusage ru_maxrss; importing torch,
transformers and TRL accounts for about 0.6 GiB of every figure):

* ``full``: every weight trains (top_k 0); a second frozen copy of SFT is the reference;
* ``top_k``: the preset's top_k layers train; the reference is still a second copy;
* ``lora``: LoRA adapters on the preset's top_k layers; the reference is the policy with
  its adapter disabled (no second copy);
* ``lora_all``: LoRA on every layer (top_k 0), same reference.

    . .venv/bin/activate
    python benchmarks/adapters.py                          # default preset, DPO, .data/adapters
    python benchmarks/adapters.py --stage sft --set sft.max_steps=10
    python benchmarks/adapters.py --preset tiny --output-root /tmp/a --set tracking.mode=disabled

Prints one row per variant and writes ROOT/adapters.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages import run_in_child  # noqa: E402  (benchmarks/stages.py: one stage in a fresh process)

VARIANTS = {
    "full": ["{stage}.adapter=none", "{stage}.top_k=0"],
    "top_k": ["{stage}.adapter=none"],
    "lora": ["{stage}.adapter=lora"],
    "lora_all": ["{stage}.adapter=lora", "{stage}.top_k=0"],
}
UPSTREAM = ("data_prep", "sft")


def in_child(name: str, out_name: str, cfg, root: Path) -> dict:
    result = run_in_child(name, cfg, root, out_name)
    if result["error"]:
        raise SystemExit(f"{out_name} failed:\n{result['error']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--stage", default="dpo", choices=("sft", "dpo"))
    parser.add_argument("--output-root", type=Path, default=Path(".data/adapters"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    from pipeline_lib.config import load_config

    root = args.output_root.resolve()
    base_overrides = [*args.overrides, f"output_root={root}"]
    cfg = load_config(args.preset, overrides=base_overrides)
    for stage in UPSTREAM[: UPSTREAM.index(args.stage) if args.stage in UPSTREAM else len(UPSTREAM)]:
        if not (root / stage).is_dir():
            print(f"== {stage} (once, reused by every variant)", flush=True)
            in_child(stage, stage, cfg, root)
    rows = {}
    for variant in args.variants:
        overrides = [override.format(stage=args.stage) for override in VARIANTS[variant]]
        variant_cfg = load_config(args.preset, overrides=[*base_overrides, *overrides])
        result = in_child(args.stage, f"{args.stage}-{variant}", variant_cfg, root)
        metrics = result["metrics"]
        rows[variant] = {
            "wall_s": round(result["wall_s"], 1),
            "peak_rss_mib": round(result["peak_rss_mib"]),
            "trainable_parameters": metrics.get("trainable_parameters"),
            "total_parameters": metrics.get("total_parameters"),
            "train_loss": metrics.get("train_loss"),
            "final_reward_margin": metrics.get("final_reward_margin"),
        }
        print(f"== {variant}: {rows[variant]}", flush=True)
    (root / "adapters.json").write_text(json.dumps({"preset": args.preset, "stage": args.stage, "variants": rows}, indent=2))
    print(f"\npreset={args.preset} stage={args.stage} overrides={args.overrides}")
    print(f"{'variant':<10}{'wall s':>8}{'peak MiB':>10}{'trainable':>14}{'train loss':>12}{'margin':>9}")
    for variant, row in rows.items():
        margin = row["final_reward_margin"]
        print(
            f"{variant:<10}{row['wall_s']:>8.1f}{row['peak_rss_mib']:>10}{row['trainable_parameters'] or 0:>14,}"
            f"{row['train_loss'] or float('nan'):>12.4f}{margin if margin is not None else float('nan'):>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
