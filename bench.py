"""
Benchmarks: the numbers behind the README's claims, one subcommand each (measurements, not timed tests).

    python bench.py sample                    # tokens/s generating with and without the KV cache (issue 6)
    python bench.py sample --device=cuda --batch_sizes=1,8,32
    python bench.py sample --help             # every key of a subcommand

Each prints a table, then one JSON line for scripts.
"""

import json
import platform
import sys
import time
from dataclasses import dataclass

import torch

import configurator
from configurator import UserError
from distributed import pick_device, pick_dtype
from generate import generate
from model import GPT, GPTConfig


@dataclass
class SampleBenchConfig:
    n_layer: int = 12  # the model: GPT-2 small (124M) by default; its weights are random, which speed ignores
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    prompt_tokens: int = 64  # prompt length
    new_tokens: int = 256  # tokens generated per sequence
    batch_sizes: str = "1,8"  # comma-separated batch sizes to measure
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'mps'
    dtype: str = "auto"  # 'auto' (bfloat16 on recent GPUs, float32 on CPU), 'float32', 'bfloat16', 'float16'
    seed: int = 1337


def batch_sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    return sizes if sizes and min(sizes) > 0 else None


def validate_sample(cfg):
    problems = []
    if batch_sizes(cfg.batch_sizes) is None:
        problems.append(f"batch_sizes={cfg.batch_sizes!r}: expected positive integers separated by commas, e.g. 1,8")
    if cfg.prompt_tokens < 1 or cfg.new_tokens < 1:
        problems.append("prompt_tokens and new_tokens must be at least 1")
    if cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    return problems


def bench_sample(cfg, sources):
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size)).eval().to(device)
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"{model.get_num_params() / 1e6:.0f}M-parameter GPT, {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new "
          f"tokens, greedy; {device} ({name}), {dtype}, torch {torch.__version__}")

    def timed(prompts, use_cache, n):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            out = generate(model, prompts, n, temperature=0, use_cache=use_cache)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    rows = []
    for B in batch_sizes(cfg.batch_sizes):
        prompts = torch.randint(0, cfg.vocab_size, (B, cfg.prompt_tokens)).tolist()
        row = {"batch_size": B}
        for use_cache in (True, False):
            timed(prompts, use_cache, 4)  # warm-up: kernels, allocator, first-call overheads
            out, seconds = timed(prompts, use_cache, cfg.new_tokens)
            assert all(len(r) == cfg.new_tokens for r in out)  # no stop tokens: every row ran the full length
            key = "cache" if use_cache else "no_cache"
            row[f"{key}_tokens_per_s"] = B * cfg.new_tokens / seconds
            row[f"{key}_seconds"] = seconds
            row[f"{key}_tokens"] = out
        row["speedup"] = row["cache_tokens_per_s"] / row["no_cache_tokens_per_s"]
        row["same_tokens"] = row.pop("cache_tokens") == row.pop("no_cache_tokens")
        rows.append(row)
        print(f"batch {B:>3}: with cache {row['cache_tokens_per_s']:9,.1f} tokens/s ({row['cache_seconds']:.1f} s) | "
              f"without {row['no_cache_tokens_per_s']:9,.1f} tokens/s ({row['no_cache_seconds']:.1f} s) | "
              f"{row['speedup']:.1f}x | same tokens: {'yes' if row['same_tokens'] else 'no'}", flush=True)
    print(json.dumps({"bench": "sample", "device": device, "device_name": name, "dtype": dtype,
                      "torch": torch.__version__, "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                      "rows": rows}))


SUBCOMMANDS = {"sample": (SampleBenchConfig, bench_sample, validate_sample)}


def main(argv):
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"error: {given}usage: python bench.py {{{','.join(SUBCOMMANDS)}}} [--key=value ...]",
              file=sys.stderr)
        sys.exit(2)
    cls, run, validate = SUBCOMMANDS[argv[0]]
    configurator.run(run, cls, validate, argv=argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
