"""GPU benchmark: the whole default run's wall time, and SFT / DPO step throughput at 1B scale.

Part "default": one complete ``python flows/rlhf.py --preset default --set output_root=ROOT``
in a subprocess (the pipeline trains on CUDA whenever torch sees it; ``--device cpu`` hides
the GPUs from it). Reports its wall seconds and the evaluation figures from the flow's
last JSON line. About 10 minutes on CPU; ``--skip-default`` (or ``--parts steps``) skips it.

Part "steps": a randomly initialised, seeded Llama-shaped model built from a config (1b:
TinyLlama-1.1B's shape; tiny: hidden 64, 2 layers, vocab 1024, for CPU tests) runs six
variants, each on a freshly built model: SFT and DPO, each as full fine-tuning and as LoRA
(r=16, alpha=32, all-linear) twice, with peft's float32 adapters (its default) and with
adapters in the model's dtype (``lora_bf16``). Per variant: policy tokens/s, peak memory, trainable
parameters, the model copies resident for DPO's reference, and MFU. Synthetic random tokens;
warm-up steps are excluded from the timing, which is bracketed by torch.cuda.synchronize().
A minimal explicit loop (AdamW, the model held in the chosen precision, no autocast) is
used rather than TRL's trainers: their dataloaders, logging, callbacks and reference
log-prob precomputation add per-step overhead and hide what is being timed; here each step
is exactly one forward/backward/optimizer step.

Conventions:
  * tokens: tokens through the policy per step; SFT batch*seq, DPO 2*batch*seq (chosen and
    rejected, concatenated into one forward).
  * N: parameters of the base model excluding the input embedding table (a lookup, no
    FLOPs); lm_head is included (a matmul). LoRA adapter FLOPs are ignored (~1% of N).
    Attention's quadratic term is ignored.
  * model FLOPs per policy token: full 6N (forward 2N, activation grads 2N, weight grads 2N);
    LoRA 4N (frozen base weights need no weight grads); DPO adds 2N for the reference
    forward. So SFT full 6N, SFT LoRA 4N, DPO full 8N, DPO LoRA 6N.
  * MFU = model FLOPs/s / the GPU's peak dense bf16 FLOPs/s (table below, matched on the
    GPU name; ``--peak-tflops`` overrides). Null on CPU, on an unknown GPU, or in fp32.
  * peak memory: CUDA torch.cuda.max_memory_allocated, reset per variant (the previous
    variant's model is freed first). CPU: peak RSS of the whole process (getrusage
    ru_maxrss, torch included), reset per variant through /proc/self/clear_refs when allowed.
  * DPO's reference: full fine-tuning keeps a frozen copy of the policy; LoRA reuses the
    policy with its adapter disabled (peft's ``disable_adapter()``), so no second copy.
    ``reference_copies`` counts the extra copies actually resident (distinct parameter
    storage of every model the variant holds, in units of the base model).

    . .venv/bin/activate
    python benchmarks/gpu.py                                  # both parts, 1b on CUDA
    python benchmarks/gpu.py --parts steps --steps 10 --batch-size 8 --seq-len 512
    python benchmarks/gpu.py --size tiny --device cpu --parts steps --out /tmp/gpu.json

Prints tables, then one JSON line with everything (also written to ``--out``). Exits 2
when CUDA is asked for but unavailable, 1 when the default run fails.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s; first substring match wins.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("B200", 2250),
    ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165),
)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}
DEFAULTS = {"1b": (4, 1024), "tiny": (4, 64)}  # batch size, sequence length
# "lora": peft's default, adapters in float32 (autocast_adapter_dtype=True) over bf16 base
# weights, each adapted layer's input cast to float32; "lora_bf16": adapters in the model's
# own dtype. On an H100 the first was slower than full fine-tuning; the pair shows how much
# of that the float32 adapters cost.
VARIANTS = (("sft", "full"), ("sft", "lora"), ("sft", "lora_bf16"), ("dpo", "full"), ("dpo", "lora"), ("dpo", "lora_bf16"))
FLOPS_PER_TOKEN = {("sft", "full"): 6, ("sft", "lora"): 4, ("sft", "lora_bf16"): 4,
                   ("dpo", "full"): 8, ("dpo", "lora"): 6, ("dpo", "lora_bf16"): 6}  # x N


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return float(tflops)
    return None


def build_model(size: str, seq_len: int, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[size], max_position_embeddings=max(seq_len, 2048), use_cache=False,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def resident_copies(models, base_numel: int) -> int:
    """How many base-model-sized parameter sets the given models hold between them."""
    storage = {p.data_ptr(): p.numel() for model in models for p in model.parameters()}
    return round(sum(storage.values()) / base_numel)


def sequence_logps(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, prompt_len - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1).sum(-1)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the process's RSS high-water mark, which ru_maxrss reads
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(method: str, mode: str, args, dtype: torch.dtype, peak_flops: float | None) -> dict:
    from peft import LoraConfig, get_peft_model

    device, batch, seq = args.device, args.batch_size, args.seq_len
    reset_peak(device)
    model = build_model(args.size, seq, dtype, device, args.seed)
    base_numel = sum(p.numel() for p in model.parameters())
    n_flops = base_numel - model.get_input_embeddings().weight.numel()
    reference, reference_models = None, []
    if mode.startswith("lora"):
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=mode == "lora")
        reference_models = [model]  # the policy itself, adapter disabled
    elif method == "dpo":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        reference_models = [model, reference]
    copies = resident_copies(reference_models, base_numel) - 1 if method == "dpo" else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4 if mode.startswith("lora") else 1e-5, fused=device == "cuda")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    vocab, prompt_len = model.config.vocab_size, seq // 2

    def step() -> torch.Tensor:
        if method == "sft":
            ids = torch.randint(vocab, (batch, seq), generator=generator).to(device)
            loss = model(input_ids=ids, labels=ids).loss
        else:  # DPO's sigmoid loss; chosen and rejected share the prompt
            prompt = torch.randint(vocab, (batch, prompt_len), generator=generator)
            responses = torch.randint(vocab, (2 * batch, seq - prompt_len), generator=generator)
            ids = torch.cat([prompt.repeat(2, 1), responses], 1).to(device)
            policy = sequence_logps(model, ids, prompt_len)
            with torch.no_grad():
                if reference is not None:
                    ref = sequence_logps(reference, ids, prompt_len)
                else:
                    with model.disable_adapter():
                        ref = sequence_logps(model, ids, prompt_len)
            margin = (policy - ref)[:batch] - (policy - ref)[batch:]
            loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = []
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            sync(device)
            started = time.perf_counter()
        losses.append(step())
    sync(device)
    elapsed = time.perf_counter() - started
    tokens = args.steps * batch * seq * (2 if method == "dpo" else 1)
    achieved = FLOPS_PER_TOKEN[method, mode] * n_flops * tokens / elapsed
    result = {
        "method": method, "mode": mode, "steps": args.steps, "step_ms": 1000 * elapsed / args.steps,
        "tokens_per_s": tokens / elapsed, "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak_flops if peak_flops else None,
        "peak_memory_mib": peak_mib(device), "trainable_params": sum(p.numel() for p in trainable),
        "base_params": base_numel, "trainable_dtype": str(trainable[0].dtype).removeprefix("torch."), "flops_params_n": n_flops, "flops_per_token": f"{FLOPS_PER_TOKEN[method, mode]}N",
        "reference_copies": copies, "loss_first": losses[0].float().item(), "loss_last": losses[-1].float().item(),
    }
    del model, reference, reference_models, optimizer, trainable, losses
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_steps(args, device_name: str) -> tuple[dict, str | None]:
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    note = None
    if args.device == "cpu":
        peak, note = None, "CPU: MFU not defined; peak memory is process RSS"
    elif args.peak_tflops:
        peak = args.peak_tflops * 1e12
    elif args.precision != "bf16":
        peak, note = None, "fp32: the peak table is bf16, so MFU is null (use --peak-tflops)"
    else:
        table = peak_tflops(device_name)
        peak = table * 1e12 if table else None
        note = None if table else f"unknown GPU {device_name!r}: MFU null (use --peak-tflops)"
    results = {}
    for method, mode in VARIANTS:
        print(f"== steps: {method} {mode} ...", file=sys.stderr, flush=True)
        results[f"{method}_{mode}"] = run_variant(method, mode, args, dtype, peak)
    return {"peak_tflops": peak / 1e12 if peak else None, "variants": results}, note


def run_default(args) -> dict:
    root = Path(args.output_root) if args.output_root else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    command = [sys.executable, str(REPO / "flows" / "rlhf.py"), "--preset", args.preset, "--set", f"output_root={root}"]
    print(f"== default: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(root / "flow.log", "w") as log:
        completed = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else {}
    ok = completed.returncode == 0 and bool(summary.get("evaluation"))
    if ok and not args.output_root:
        shutil.rmtree(root, ignore_errors=True)
    return {"ok": ok, "exit_code": completed.returncode, "wall_s": wall, "status": summary.get("status"),
            "evaluation": summary.get("evaluation"), "log": None if ok and not args.output_root else str(root / "flow.log")}


def print_tables(report: dict) -> None:
    print(f"device={report['device']} ({report['device_name']})")
    default = report["parts"].get("default")
    if default:
        print(f"\ndefault preset: {'ok' if default['ok'] else 'FAILED'} in {default['wall_s']:.1f} s (exit {default['exit_code']})"
              + (f", log {default['log']}" if default["log"] else ""))
        evaluation = default["evaluation"] or {}
        if evaluation.get("policies"):
            print(f"reward model pairwise accuracy: {evaluation['reward_model_pairwise_accuracy']:.3f}")
            for name, row in evaluation["policies"].items():
                print(f"  {name:<6}" + "  ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
    steps = report["parts"].get("steps")
    if steps:
        print(f"\nsteps: size={report['size']} precision={report['precision']} batch={report['batch_size']} "
              f"seq_len={report['seq_len']}, timed steps per variant after warm-up")
        print(f"{'variant':<15}{'tokens/s':>12}{'step ms':>10}{'peak MiB':>10}{'trainable':>14}{'ref copies':>11}"
              f"{'TFLOP/s':>9}{'MFU':>8}")
        for name, row in steps["variants"].items():
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            print(f"{name:<15}{row['tokens_per_s']:>12.0f}{row['step_ms']:>10.1f}{row['peak_memory_mib']:>10.0f}"
                  f"{row['trainable_params']:>14,}{row['reference_copies']:>11}{row['model_tflops_per_s']:>9.2f}{mfu:>8}")
    for note in report["notes"]:
        print(f"note: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="default,steps", help="comma-separated: default, steps")
    parser.add_argument("--skip-default", action="store_true", help="skip the default-preset run (~10 min on CPU)")
    parser.add_argument("--preset", default="default", help="the preset the 'default' part runs")
    parser.add_argument("--output-root", help="output root for the default run (default: a temp dir, removed on success)")
    parser.add_argument("--size", choices=SHAPES, help="model shape (default: 1b on CUDA, tiny on CPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the timed ones")
    parser.add_argument("--batch-size", type=int, help="sequences per step (DPO: pairs); default 4")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024 for 1b, 64 for tiny)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (overrides the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON results here")
    args = parser.parse_args()
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if unknown := set(parts) - {"default", "steps"}:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if args.skip_default and "default" in parts:
        parts.remove("default")
    if args.steps < 1 or args.warmup < 0:  # the timing needs at least one step
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but CUDA is not available (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, built with CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        print(f"error: {torch.cuda.get_device_name()} does not support bf16; use --precision fp32", file=sys.stderr)
        return 2
    args.size = args.size or ("1b" if args.device == "cuda" else "tiny")
    default_batch, default_seq = DEFAULTS[args.size]
    args.batch_size, args.seq_len = args.batch_size or default_batch, args.seq_len or default_seq
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    report = {"device": args.device, "device_name": device_name, "precision": args.precision, "size": args.size,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "torch": torch.__version__, "parts": {}, "notes": []}
    if "default" in parts:
        report["parts"]["default"] = run_default(args)
    if "steps" in parts:
        report["parts"]["steps"], note = run_steps(args, device_name)
        report["notes"] += [note] if note else []
    print_tables(report)
    line = json.dumps(report, default=str)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return 1 if report["parts"].get("default", {"ok": True})["ok"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
