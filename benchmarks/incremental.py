"""Benchmark what re-runs cost: a full run, a fully cached re-run, one changed setting, --help, --dry-run.

Runs ``python flows/rlhf.py`` as a user would, into a fresh output root (``--output-root``,
wiped first unless ``--keep``), with Prefect's temporary server (``PREFECT_API_URL`` unset):

1. the full run of the preset;
2. the same command again: every stage cached;
3. ``--set dpo.beta=<other>``: DPO and evaluation re-run, the rest cached; its cost beyond
   the two stages' own training time (their manifests' ``timings.seconds``) is the
   overhead of planning, imports, the flow and the cached stages;
4. ``--help`` and ``--dry-run``, and whether either imported torch.

Prints each figure and its ratio to the full run. Targets (issue "cheap re-runs"): cached
re-run <= 3% of the full run; the changed setting costs DPO + evaluation + <= 5%; --help
<= 3 s without torch.

    python benchmarks/incremental.py                                 # default preset, about 9 minutes on 2 cores
    python benchmarks/incremental.py --preset tiny --output-root /tmp/inc
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
FLOW = REPO / "flows" / "rlhf.py"
# Runs flows/rlhf.py's main() and reports whether torch got imported on the way.
PROBE = (
    "import runpy, sys; sys.argv = ['flows/rlhf.py'] + sys.argv[1:]\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
)


def timed(arguments: list[str], probe: bool = False) -> tuple[float, dict, str]:
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    command = [sys.executable, "-c", PROBE, *arguments] if probe else [sys.executable, str(FLOW), *arguments]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    lines = finished.stdout.strip().splitlines()
    summary = {}
    if lines and lines[-1].startswith("{"):
        summary = json.loads(lines[-1])
    if finished.returncode not in (0,):
        print(finished.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(arguments)}: exit {finished.returncode}")
    return seconds, summary, finished.stderr


def stage_seconds(summary: dict, names: tuple[str, ...]) -> float:
    total = 0.0
    for name in names:
        manifest = json.loads((Path(summary["stages"][name]["path"]) / "manifest.json").read_text())
        total += manifest["timings"]["seconds"]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--output-root", type=Path, default=REPO / ".data" / "incremental")
    parser.add_argument("--beta", type=float, default=0.3, help="the changed setting: dpo.beta=BETA (must differ from the preset's)")
    parser.add_argument("--keep", action="store_true", help="keep the output root (the 'full run' is then whatever is left to do)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    root = args.output_root.resolve()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    common = ["--preset", args.preset, "--output-root", str(root), *[item for o in args.overrides for item in ("--set", o)]]

    full, summary, _ = timed(common)
    cached, again, _ = timed(common)
    assert all(stage["cached"] for stage in again["stages"].values()), "the re-run was not fully cached"
    changed, beta_summary, _ = timed([*common, "--set", f"dpo.beta={args.beta}"])
    rerun = [name for name, stage in beta_summary["stages"].items() if not stage["cached"]]
    trained = stage_seconds(beta_summary, tuple(rerun))
    help_seconds, _, help_err = timed(["--help"], probe=True)
    dry_seconds, _, dry_err = timed([*common, "--dry-run"], probe=True)

    def torch_line(stderr: str) -> str:
        return next((line for line in stderr.splitlines() if line.startswith("torch imported")), "torch imported: ?")

    rows = [
        ("full run", full, None),
        ("cached re-run", cached, "target <= 3%"),
        (f"--set dpo.beta={args.beta} (re-ran {', '.join(rerun)})", changed, None),
        (f"  of which {', '.join(rerun)} trained/evaluated", trained, None),
        ("  overhead beyond those stages", changed - trained, "target <= 5%"),
        (f"--help ({torch_line(help_err)})", help_seconds, "target <= 3 s"),
        (f"--dry-run ({torch_line(dry_err)})", dry_seconds, None),
    ]
    print(f"\nRe-run costs ({args.preset}, {os.cpu_count()} cores):")
    for label, seconds, target in rows:
        print(f"{label:<58} {seconds:8.1f} s  {100 * seconds / full:6.1f}% of the full run" + (f"   ({target})" if target else ""))
    report = {label: {"seconds": seconds, "fraction_of_full": seconds / full} for label, seconds, _ in rows}
    root.mkdir(parents=True, exist_ok=True)
    (root / "incremental.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
