"""Sampling speed against this machine's limit: data prep's sampling of the base model.

    python benchmarks/sampling.py                          # default preset, 64 of its training prompts
    python benchmarks/sampling.py --prompts 128 --set data.sample_batch_size=16

On the preset's base model, data prep settings (samples per prompt, new tokens,
temperature, system prompt) and training prompts, it prints:

* new tokens/s of data prep's sampler (``generation.generate_responses``: inverse-CDF
  sampling, length-sorted batches of ``data.sample_batch_size`` prompts) and of what it
  replaced (transformers' ``generate(do_sample=True)``, whose ``torch.multinomial`` draws
  one exponential variate per vocabulary entry, 16 prompts a batch); a new token is one a
  row produced up to and including its EOS;
* the limit. A decoding step cannot be faster than running every linear layer of the
  model once at the batch's rows: its weights are read from memory and multiplied.
  Timing exactly those matmuls (the model's own layers, random activations, same rows)
  gives the fastest step this machine does, and rows / that time is the limit in new
  tokens/s. Attention over a few dozen cached positions, norms and sampling are left
  out, so the limit is generous. Also printed: the matmuls' GFLOP/s and the weight
  bytes over the measured memory read bandwidth (the floor if compute were free).

``benchmarks/stages.py`` prints the same section for the run it benchmarks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASELINE_PROMPTS_PER_BATCH = 16  # what data prep used before the sampler


def new_tokens(generated, eos_id: int) -> int:
    """Tokens each row produced, up to and including its first EOS."""
    total = 0
    for row in generated.tolist():
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total


def _baseline(model, tokenizer, prompt_ids, data, batch_size: int, seed: int) -> tuple[int, float]:
    import torch

    from pipeline_lib.generation import _left_pad

    torch.manual_seed(seed)
    count, start = 0, time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(prompt_ids), batch_size):
            ids, mask = _left_pad(prompt_ids[first : first + batch_size], tokenizer.pad_token_id)
            output = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=data.sample_max_new_tokens,
                num_return_sequences=data.samples_per_prompt, do_sample=True, temperature=data.sample_temperature,
                top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            count += new_tokens(output[:, ids.shape[1] :], tokenizer.eos_token_id)
    return count, time.perf_counter() - start


def _ours(model, tokenizer, prompt_ids, data, batch_size: int, seed: int) -> tuple[int, float]:
    import torch

    from pipeline_lib.generation import _by_length, _decode

    count, start = 0, time.perf_counter()
    with torch.no_grad():
        for number, batch in enumerate(_by_length(prompt_ids, batch_size)):
            generated = _decode(
                model, tokenizer, [prompt_ids[i] for i in batch], data.sample_max_new_tokens,
                data.sample_temperature, data.samples_per_prompt, seed + number,
            )  # fmt: skip
            count += new_tokens(generated, tokenizer.eos_token_id)
    return count, time.perf_counter() - start


def step_limit(model, rows: int, repeats: int = 3) -> dict:
    """The fastest decoding step of ``rows`` rows: every linear layer once, timed."""
    import torch

    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    inputs = [torch.randn(rows, layer.in_features, dtype=layer.weight.dtype) for layer in linears]
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in linears)
    flops_per_row = sum(2 * layer.in_features * layer.out_features for layer in linears)
    with torch.no_grad():
        for layer, x in zip(linears, inputs):  # warm-up
            layer(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for layer, x in zip(linears, inputs):
                layer(x)
            best = min(best, time.perf_counter() - start)
        big = torch.ones(256 * 1024 * 1024 // 4)  # 256 MiB, well past the caches
        big.sum()
        start = time.perf_counter()
        for _ in range(4):
            big.sum()
        read_gbs = 4 * big.numel() * 4 / (time.perf_counter() - start) / 1e9
    return {
        "rows": rows,
        "step_s": best,
        "limit_tokens_s": rows / best,
        "gflops": rows * flops_per_row / best / 1e9,
        "weight_mb": weight_bytes / 1e6,
        "read_gbs": read_gbs,
        "memory_floor_s": weight_bytes / (read_gbs * 1e9),
    }


def measure(cfg, base_model_dir: Path, num_prompts: int) -> dict:
    """Tokens/s of data prep's sampler and of the one it replaced, each against its limit."""
    import torch

    from pipeline_lib.data import sentiment_task
    from pipeline_lib.generation import chat_prompt_ids
    from pipeline_lib.models import load_causal_lm, load_tokenizer, torch_dtype

    data = cfg.data
    tokenizer = load_tokenizer(base_model_dir)
    model = load_causal_lm(base_model_dir, cfg.model.trust_remote_code, torch_dtype(cfg.precision)).eval()
    prompts, _, _ = sentiment_task.build_prompts(data.num_prompts, data.num_eval_prompts, cfg.seed)
    prompt_ids = [chat_prompt_ids(tokenizer, prompt, cfg.model.system_prompt) for prompt in prompts[:num_prompts]]
    runs = {}
    for name, sample, batch_size in (
        ("generate(do_sample=True)", _baseline, BASELINE_PROMPTS_PER_BATCH),
        ("data prep's sampler", _ours, data.sample_batch_size),
    ):
        tokens, seconds = sample(model, tokenizer, prompt_ids, data, batch_size, cfg.seed)
        rows = min(batch_size, len(prompt_ids)) * data.samples_per_prompt
        limit = step_limit(model, rows)
        runs[name] = {
            "prompts_per_batch": batch_size, "new_tokens": tokens, "seconds": seconds,
            "tokens_s": tokens / seconds, "limit": limit, "fraction_of_limit": tokens / seconds / limit["limit_tokens_s"],
        }  # fmt: skip
    return {"threads": torch.get_num_threads(), "precision": cfg.precision, "prompts": len(prompt_ids), "runs": runs}


def print_report(report: dict) -> None:
    print(
        f"\nsampling: {report['prompts']} prompts, {report['precision']}, {report['threads']} threads "
        "(limit: every linear layer once per step at the batch's rows)"
    )
    print(f"{'sampler':<26}{'batch rows':>11}{'new tokens/s':>14}{'limit tok/s':>13}{'of limit':>10}{'matmul GFLOP/s':>16}{'weights/read s':>16}")
    for name, run in report["runs"].items():
        limit = run["limit"]
        print(
            f"{name:<26}{limit['rows']:>11}{run['tokens_s']:>14.0f}{limit['limit_tokens_s']:>13.0f}"
            f"{run['fraction_of_limit']:>10.0%}{limit['gflops']:>16.0f}{limit['memory_floor_s']:>16.3f}"
        )
    runs = list(report["runs"].values())
    if len(runs) == 2:
        print(f"speed-up: {runs[1]['tokens_s'] / runs[0]['tokens_s']:.2f}x new tokens/s; "
              f"weights {runs[1]['limit']['weight_mb']:.0f} MB, memory read {runs[1]['limit']['read_gbs']:.1f} GB/s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--prompts", type=int, default=64, help="training prompts to sample (default 64)")
    parser.add_argument("--models", type=Path, default=Path(".data/bench/models"), help="where the base model is converted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    from pipeline_lib.config import load_config
    from pipeline_lib.data import sentiment_task
    from pipeline_lib.models import materialize_base_model

    cfg = load_config(args.preset, overrides=args.overrides)
    base = materialize_base_model(cfg.model, args.models.resolve(), sentiment_task.corpus())
    print_report(measure(cfg, base, args.prompts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
