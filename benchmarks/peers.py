"""The course's way against this pipeline: each training stage both ways, then the whole run.

    python benchmarks/peers.py                       # default preset, seed 0, .data/peers (~35 min on 2 cores)
    python benchmarks/peers.py --seed 3 --output-root /tmp/peers
    python benchmarks/peers.py --preset tiny --set tracking.mode=disabled     # the mechanics, in two minutes
    python benchmarks/peers.py --reuse               # re-print from ROOT/peers.json
    python benchmarks/peers.py --keep-flow           # stages again, over the finished flow run under ROOT
    python benchmarks/peers.py --keep-flow --resume  # only the stages ROOT/peers.json lacks

What runs, in order, under the output root:

1. ``flow/``: ``python flows/rlhf.py`` on the preset from a fresh root, timed: the whole
   pipeline this project's way (reward and DPO side by side, one core each).
2. ``ours/``: the pipeline's SFT, reward, DPO and PPO stages, one after another, each
   alone in a fresh process, on the flow's prepared data (``data_prep`` is linked in).
3. ``course/``: the same four stages as the course's scripts ran them, one TRL trainer
   each with TRL's defaults for that stage, on the same data, base model, epochs, learning
   rates, batch sizes and top-k layers (the course's ``TOP_K``):
   * SFT: ``SFTTrainer`` on the same conversations (as ours: the stage is TRL's trainer);
   * reward: ``RewardTrainer`` on per-pair batches (TRL's default 8 pairs a step) over the
     same pairs, laid out as ours (chat prompt, response, EOS), on the whole SFT model
     (ours keeps its bottom ``reward.num_layers`` layers and forwards each response once
     per prompt, with all the prompt's pairs in one step);
   * DPO: ``DPOTrainer`` with its reference model computing log-probabilities every step
     (TRL's default; ours computes them once, before training);
   * PPO: TRL's ``PPOTrainer`` with its default 4 PPO epochs, scoring rollouts with the
     course's reward model as it is (ours: 2 epochs, value model from its reward model,
     cut-off rollouts scored as closed by EOS).
4. ``oracle``: every SFT, DPO and PPO model of 2 and 3 answers the held-out prompts
   greedily (the evaluation's settings) and the oracle scores them; a policy's quality is
   its oracle gain over the SFT model it started from. The reward model's quality is its
   pairwise accuracy on the held-out pairs, computed the same way for both.

Each stage of 2 and 3 runs in a fresh process (``benchmarks/stages.py``'s harness): wall
seconds and peak RSS (importing torch, transformers and TRL included) are its own. The
whole pipeline the course's way is its stages one after another: the flow's data prep,
the four course stages, and the flow's evaluation (the same work both ways).

Prints a table per stage (seconds, peak MiB, quality, both ways, and the speed-up), then
the whole pipeline both ways; ``ROOT/peers.json`` holds every figure.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages as harness  # benchmarks/stages.py: one stage in a fresh process  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINING = ("sft", "reward", "dpo", "ppo")
POLICIES = ("sft", "dpo", "ppo")
QUALITY = {"reward": "pairwise_accuracy", "sft": "oracle_mean", "dpo": "oracle_gain", "ppo": "oracle_gain"}


# --- the course's stages: one bare TRL trainer each ------------------------------------


def _course_args(cfg, section, out: Path, batch_size: int | None = None) -> dict:
    """What the course's scripts set: the shared hyperparameters, no checkpoints, no tracking."""
    args = {
        "output_dir": str(out / "trainer"),
        "learning_rate": section.learning_rate,
        "num_train_epochs": section.num_train_epochs,
        "seed": cfg.seed,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "bf16": cfg.precision == "bf16",  # TRL's configs default to bf16, which a CPU-only machine refuses
    }
    if batch_size is not None:
        args["per_device_train_batch_size"] = batch_size
    return args


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def course_sft(cfg, root: Path, base: Path, out: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    from pipeline_lib.data.files import read_split
    from pipeline_lib.models import freeze_all_but_top_k, load_causal_lm, load_tokenizer
    from pipeline_lib.stages.sft import conversational

    section = cfg.sft
    tokenizer, model = load_tokenizer(base), load_causal_lm(base)
    freeze_all_but_top_k(model, section.top_k)
    rows = conversational(read_split(root / "data_prep", "sft_train"), cfg.model.system_prompt)
    args = SFTConfig(**_course_args(cfg, section, out, section.per_device_train_batch_size), max_length=section.max_length)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    loss = trainer.train().metrics["train_loss"]
    _save(trainer.model, tokenizer, out)
    return {"train_loss": loss}


def course_reward(cfg, root: Path, base: Path, out: Path) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline_lib.data.files import read_split
    from pipeline_lib.generation import scored_sequence_ids
    from pipeline_lib.models import freeze_all_but_top_k, load_sequence_classifier, load_tokenizer
    from pipeline_lib.stages.reward import pairwise_accuracy

    section, system_prompt, sft = cfg.reward, cfg.model.system_prompt, root / "sft"
    tokenizer = load_tokenizer(sft)
    model = load_sequence_classifier(sft, tokenizer.pad_token_id)  # every layer of SFT
    freeze_all_but_top_k(model, section.top_k)
    pairs = [
        {
            "chosen_ids": scored_sequence_ids(tokenizer, row["prompt"], row["chosen"], system_prompt),
            "rejected_ids": scored_sequence_ids(tokenizer, row["prompt"], row["rejected"], system_prompt),
        }
        for row in read_split(root / "data_prep", "reward_train")
    ]
    args = RewardConfig(**_course_args(cfg, section, out), max_length=section.max_length)  # TRL's 8 pairs a step
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    loss = trainer.train().metrics["train_loss"]
    accuracy = pairwise_accuracy(trainer.model, tokenizer, read_split(root / "data_prep", "reward_eval"), system_prompt)
    _save(trainer.model, tokenizer, out)
    return {"train_loss": loss, "pairwise_accuracy": accuracy, "train_pairs": len(pairs)}


def course_dpo(cfg, root: Path, base: Path, out: Path) -> dict:
    from trl import DPOConfig, DPOTrainer

    from pipeline_lib.data.files import read_split
    from pipeline_lib.models import freeze_all_but_top_k, load_causal_lm, load_tokenizer
    from pipeline_lib.stages.dpo import conversational_pairs

    section, sft = cfg.dpo, root / "sft"
    tokenizer, policy, reference = load_tokenizer(sft), load_causal_lm(sft), load_causal_lm(sft)
    freeze_all_but_top_k(policy, section.top_k)
    rows = conversational_pairs(read_split(root / "data_prep", "pairs_train"), cfg.model.system_prompt)
    args = DPOConfig(
        **_course_args(cfg, section, out, section.per_device_train_batch_size), beta=section.beta, max_length=section.max_length
    )  # precompute_ref_log_probs stays TRL's default (False): the reference runs every step
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)
    loss = trainer.train().metrics["train_loss"]
    _save(trainer.model, tokenizer, out)
    return {"train_loss": loss}


def course_ppo(cfg, root: Path, base: Path, out: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from pipeline_lib.data.files import read_prompts
    from pipeline_lib.generation import chat_prompt_ids
    from pipeline_lib.models import freeze_all_but_top_k, load_causal_lm, load_sequence_classifier, load_tokenizer

    section, sft, reward = cfg.ppo, root / "sft", root / "reward"
    tokenizer = load_tokenizer(sft)
    tokenizer.padding_side = "left"
    prompts = read_prompts(root / "data_prep", "prompts_train")
    rows = Dataset.from_list([{"input_ids": chat_prompt_ids(tokenizer, p, cfg.model.system_prompt)} for p in prompts])
    policy, reference = load_causal_lm(sft), load_causal_lm(sft)
    reward_model = load_sequence_classifier(reward, tokenizer.pad_token_id)
    value_model = load_sequence_classifier(reward, tokenizer.pad_token_id)
    reward_model.requires_grad_(False)
    freeze_all_but_top_k(policy, section.top_k)
    freeze_all_but_top_k(value_model, section.top_k)
    course = _course_args(cfg, section, out, section.per_device_train_batch_size)
    del course["num_train_epochs"]
    args = PPOConfig(
        **course, total_episodes=section.total_episodes, response_length=section.response_length,
        kl_coef=section.kl_coef, stop_token="eos", num_sample_generations=0,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, model=policy, ref_model=reference,
        reward_model=reward_model, value_model=value_model, train_dataset=rows,
    )  # fmt: skip
    trainer.train()
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    _save(trainer.model.policy, tokenizer, out)
    return {"first_reward_model_score": scores[0] if scores else None, "final_reward_model_score": scores[-1] if scores else None}


COURSE = {"sft": course_sft, "reward": course_reward, "dpo": course_dpo, "ppo": course_ppo}


def _course_stage(name: str, cfg, root: Path, out_name: str) -> dict:
    from pipeline_lib.data import sentiment_task
    from pipeline_lib.models import materialize_base_model
    from pipeline_lib.stages import training

    training.seed_everything(cfg.seed)
    base = materialize_base_model(cfg.model, root / "models", sentiment_task.corpus())
    shutil.rmtree(root / out_name, ignore_errors=True)
    return COURSE[name](cfg, root, base, root / out_name)


def _course_child(name: str, cfg, root: Path, queue, out_name: str) -> None:
    harness._child(name, cfg, root, queue, out_name, stage=_course_stage)


# --- quality: the oracle's judgement of every policy -----------------------------------


def _oracle_stage(name: str, cfg, root: Path, out_name: str) -> dict:
    """Oracle mean of greedy answers to the held-out prompts, per ``way/policy``."""
    from pipeline_lib.data import sentiment_task
    from pipeline_lib.data.files import read_prompts
    from pipeline_lib.generation import generate_responses
    from pipeline_lib.models import load_causal_lm, load_tokenizer

    prompts = read_prompts(root / "ours" / "data_prep", "prompts_eval")
    means = {}
    for way in ("ours", "course"):
        for policy in POLICIES:
            directory = root / way / policy
            if not (directory / "config.json").is_file():
                continue
            answers = generate_responses(
                load_causal_lm(directory), load_tokenizer(directory), prompts, cfg.evaluate.max_new_tokens,
                batch_size=cfg.evaluate.batch_size, system_prompt=cfg.model.system_prompt,
            )  # fmt: skip
            scores = [sentiment_task.oracle_score(texts[0]) for texts in answers]
            means[f"{way}/{policy}"] = sum(scores) / len(scores)
    return means


def _oracle_child(name: str, cfg, root: Path, queue, out_name: str) -> None:
    harness._child(name, cfg, root, queue, out_name, stage=_oracle_stage)


# --- the run ------------------------------------------------------------------------------


def run_flow(args, root: Path) -> dict:
    """The whole pipeline this project's way, from a fresh output root."""
    flow_root = root / "flow"
    shutil.rmtree(flow_root, ignore_errors=True)
    command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", args.preset, "--output-root", str(flow_root)]
    command += ["--set", f"seed={args.seed}", *[item for value in args.overrides for item in ("--set", value)]]
    print("flow:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with open(root / "flow.log", "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    wall = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"the flow failed (exit {returncode}); see {root / 'flow.log'}")
    seconds = {}
    for manifest in sorted((flow_root / "store").glob("*/*/manifest.json")):
        seconds[manifest.parent.parent.name] = json.loads(manifest.read_text())["timings"]["seconds"]
    return {"wall_s": wall, "stage_seconds": seconds, "data_prep": str(next((flow_root / "store" / "data_prep").glob("*/manifest.json")).parent)}


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def measure(args, cfg, root: Path) -> dict:
    flow_json = root / "flow.json"
    if args.keep_flow and flow_json.is_file():
        flow = json.loads(flow_json.read_text())
    else:
        flow = run_flow(args, root)
        flow_json.write_text(json.dumps(flow, indent=2))
    results: dict = {"preset": args.preset, "seed": args.seed, "overrides": args.overrides, "flow": flow, "ours": {}, "course": {}}
    if args.resume and (root / "peers.json").is_file():  # keep the stages that finished
        earlier = json.loads((root / "peers.json").read_text())
        for way in ("ours", "course"):
            results[way] = {name: result for name, result in earlier.get(way, {}).items() if not result.get("error")}
    for way in ("ours", "course"):
        (root / way).mkdir(parents=True, exist_ok=True)
        _link(Path(flow["data_prep"]), root / way / "data_prep")
        _link(root / "flow" / "models", root / way / "models")
    for name in TRAINING:
        for way, target in (("ours", None), ("course", _course_child)):
            if name in results[way]:
                continue
            shutil.rmtree(root / way / name, ignore_errors=True)  # never resume an earlier run's checkpoints
            result = harness.run_in_child(name, cfg, root / way, target=target)
            results[way][name] = result
            print(f"== {way} {name}: {result['wall_s']:.1f} s, {result['peak_rss_mib']:.0f} MiB", flush=True)
            if result["error"]:
                print(result["error"], file=sys.stderr)
                raise SystemExit(f"{way} {name} failed")
            (root / "peers.json").write_text(json.dumps(results, indent=2, default=str))
    oracle = harness.run_in_child("oracle", cfg, root, target=_oracle_child)
    if oracle["error"]:
        raise SystemExit(oracle["error"])
    results["oracle"] = oracle["metrics"]
    (root / "peers.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def quality(results: dict, way: str, stage: str) -> float | None:
    """The stage's quality figure: reward accuracy; SFT's oracle mean; a policy's oracle gain over its SFT."""
    if stage == "reward":
        return results[way]["reward"]["metrics"].get("pairwise_accuracy")
    oracle = results.get("oracle", {})
    mean = oracle.get(f"{way}/{stage}")
    if stage == "sft" or mean is None:
        return mean
    return mean - oracle[f"{way}/sft"]


def table(results: dict) -> list[str]:
    lines = [
        f"preset={results['preset']} seed={results['seed']} overrides={results['overrides']}",
        f"{'stage':<8}{'ours s':>8}{'course s':>10}{'speed-up':>10}{'ours MiB':>10}{'course MiB':>12}"
        f"{'quality':>22}{'ours':>9}{'course':>9}",
    ]
    for name in TRAINING:
        ours, course = results["ours"][name], results["course"][name]
        q_ours, q_course = quality(results, "ours", name), quality(results, "course", name)
        label = {"reward": "held-out accuracy", "sft": "oracle mean"}.get(name, "oracle gain vs SFT")
        fmt = lambda value: "-" if value is None else f"{value:+.3f}" if name in ("dpo", "ppo") else f"{value:.3f}"  # noqa: E731
        lines.append(
            f"{name:<8}{ours['wall_s']:>8.0f}{course['wall_s']:>10.0f}{course['wall_s'] / ours['wall_s']:>9.2f}x"
            f"{ours['peak_rss_mib']:>10.0f}{course['peak_rss_mib']:>12.0f}{label:>22}{fmt(q_ours):>9}{fmt(q_course):>9}"
        )
    flow = results["flow"]
    shared = sum(flow["stage_seconds"].get(stage, 0.0) for stage in ("data_prep", "evaluate"))
    course_total = shared + sum(results["course"][name]["wall_s"] for name in TRAINING)
    lines.append(
        f"whole pipeline: the flow {flow['wall_s']:.0f} s; the course's scripts one after another {course_total:.0f} s "
        f"(data prep and evaluation {shared:.0f} s, the same both ways, plus the four stages): {course_total / flow['wall_s']:.2f}x"
    )
    speedups = {name: results["course"][name]["wall_s"] / results["ours"][name]["wall_s"] for name in TRAINING}
    worse = [name for name in TRAINING if (quality(results, "ours", name) or 0.0) < (quality(results, "course", name) or 0.0)]
    lines.append(
        "aims: reward and DPO >= 1.5x faster: "
        + ", ".join(f"{name} {speedups[name]:.2f}x {'met' if speedups[name] >= 1.5 else 'MISSED'}" for name in ("reward", "dpo"))
        + f"; whole pipeline >= 1.5x: {course_total / flow['wall_s']:.2f}x {'met' if course_total >= 1.5 * flow['wall_s'] else 'MISSED'}"
        + f"; quality at least the course's on every stage: {'met' if not worse else 'MISSED on ' + ', '.join(worse)}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-root", type=Path, default=REPO / ".data" / "peers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--reuse", action="store_true", help="re-print from ROOT/peers.json")
    parser.add_argument("--keep-flow", action="store_true", help="reuse the finished flow run under ROOT (ROOT/flow.json)")
    parser.add_argument("--resume", action="store_true", help="with --keep-flow: keep the stages ROOT/peers.json has, run the rest")
    args = parser.parse_args()
    root = args.output_root.resolve()
    if args.reuse:
        results = json.loads((root / "peers.json").read_text())
    else:
        from pipeline_lib.config import load_config

        root.mkdir(parents=True, exist_ok=True)
        cfg = load_config(args.preset, overrides=[*args.overrides, f"seed={args.seed}", f"output_root={root / 'flow'}"])
        results = measure(args, cfg, root)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
