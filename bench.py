"""
Benchmarks: the numbers behind the README's claims, one subcommand each (measurements, not timed tests).

    python bench.py sample                    # tokens/s generating with and without the KV cache
    python bench.py sample --device=cuda --batch_sizes=1,8,64 --compile=True   # also the compiled static-cache step
    python bench.py sample --help             # every key of a subcommand
    python bench.py train config/gpt2_124m.py --batch_size=32 --total_batch_size=0 --profile=True
                                              # ms/step, tokens/s, MFU, peak memory of train.py's optimizer step
    python bench.py prepare --mb=50 --bpe_mb=20   # prepare.py MB/s and peak RSS, 1 process vs all cores

Each prints a table, then one JSON line for scripts. Each times one process on one device: run it with python, not
under torchrun or srun.
"""

import json
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import configurator
from distributed import Launch, detect_launch, fast_kernels, init_distributed, pick_device, pick_dtype
from generate import generate
from model import ARCH_OPTIONS, GPT, GPTConfig, head_problems, peak_flops_for
from tokendata import BatchSampler, Dataset, dataset_dir
from train import (Prefetcher, TrainConfig, accumulate_gradients, micro_steps_per_rank, model_config, to_device,
                   validate as validate_train_config)


@dataclass
class SampleBenchConfig:
    n_layer: int = 12  # the model: GPT-2 small (124M) by default; its weights are random, which speed ignores
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    rope: bool = False  # rotary position embeddings instead of the learned position table (train.py's rope)
    n_kv_head: int = 0  # key/value heads (train.py's n_kv_head): fewer than n_head shrinks the KV cache; 0: n_head
    prompt_tokens: int = 64  # prompt length
    new_tokens: int = 256  # tokens generated per sequence
    batch_sizes: str = "1,8"  # comma-separated batch sizes to measure
    compile: bool = False  # also measure decoding through the compiled step on a static cache (sample.py --compile)
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
    problems += configurator.too_small(cfg, ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"), 1)
    return problems + head_problems(cfg.n_embd, cfg.n_head, cfg.rope, cfg.n_kv_head)


def bench_sample(cfg, sources):
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, rope=cfg.rope, n_kv_head=cfg.n_kv_head)).eval().to(device)
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    options = ", ".join(f"{k}={v}" for k, v in model.config.departures().items())
    print(f"{model.get_num_params() / 1e6:.3g}M-parameter GPT{f' ({options})' if options else ''}, "
          f"{cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens, greedy; {device} ({name}), {dtype}, "
          f"torch {torch.__version__}")

    def timed(prompts, n, **how):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            out = generate(model, prompts, n, temperature=0, **how)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    modes = {"cache": {}, "no_cache": {"use_cache": False}}
    if cfg.compile:
        modes["compiled"] = {"compile": True}
    rows = []
    for B in batch_sizes(cfg.batch_sizes):
        prompts = torch.randint(0, cfg.vocab_size, (B, cfg.prompt_tokens)).tolist()
        row, tokens = {"batch_size": B}, []
        for key, how in modes.items():
            # warm-up: kernels, allocator, first-call overheads; the compiled step at the timed run's shapes, so
            # its compilation happens here (and is reported)
            _, first = timed(prompts, cfg.new_tokens if key == "compiled" else 4, **how)
            if key == "compiled":
                row["compiled_first_seconds"] = first
            out, seconds = timed(prompts, cfg.new_tokens, **how)
            assert all(len(r) == cfg.new_tokens for r in out)  # no stop tokens: every row ran the full length
            row[f"{key}_tokens_per_s"] = B * cfg.new_tokens / seconds
            row[f"{key}_seconds"] = seconds
            tokens.append(out)
        row["speedup"] = row["cache_tokens_per_s"] / row["no_cache_tokens_per_s"]
        row["same_tokens"] = all(out == tokens[0] for out in tokens)
        rows.append(row)
        compiled = (f"compiled {row['compiled_tokens_per_s']:9,.1f} tokens/s ({row['compiled_seconds']:.1f} s; "
                    f"first call {row['compiled_first_seconds']:.1f} s) | " if cfg.compile else "")
        print(f"batch {B:>3}: with cache {row['cache_tokens_per_s']:9,.1f} tokens/s ({row['cache_seconds']:.1f} s) | "
              f"without {row['no_cache_tokens_per_s']:9,.1f} tokens/s ({row['no_cache_seconds']:.1f} s) | "
              f"{row['speedup']:.1f}x | {compiled}same tokens: {'yes' if row['same_tokens'] else 'no'}", flush=True)
    print(json.dumps({"bench": "sample", "device": device, "device_name": name, "dtype": dtype,
                      "torch": torch.__version__, "rope": cfg.rope, "n_kv_head": model.config.n_kv_head,
                      "prompt_tokens": cfg.prompt_tokens,
                      "new_tokens": cfg.new_tokens, "rows": rows}))


@dataclass
class TrainBenchConfig(TrainConfig):
    steps: int = 20  # timed optimizer steps (after the warm-up)
    warmup: int = 5  # untimed steps first (the first one includes torch.compile)
    profile: bool = False  # also break one step down into attention, linear layers, loss, optimizer and data
    synthetic: bool = True  # random tokens; False: batches from --dataset, as train.py draws them


def validate_train(cfg):
    problems = validate_train_config(cfg)
    if cfg.steps < 1 or cfg.warmup < 0:
        problems.append("steps must be at least 1 and warmup at least 0")
    return problems


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or device}, {torch.get_num_threads()} threads"


def bench_train(cfg, sources):
    """ms/step of train.py's own optimizer step (accumulate_gradients) on one process, without evaluation or I/O."""
    device = init_distributed(Launch("single"), pick_device(cfg.device))
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    grad_accum, batch_explain = micro_steps_per_rank(cfg, 1)
    data_dir = dataset_dir(cfg.dataset, cfg.data_root)
    if cfg.synthetic:
        vocab_size = 50257 if cfg.dataset == "openwebtext" else Dataset(data_dir).meta["vocab_size"]
        sampler = SyntheticSampler(vocab_size, cfg.block_size, cfg.batch_size, cfg.seed)
    else:
        data = Dataset(data_dir)
        vocab_size = data.meta["vocab_size"]
        sampler = BatchSampler(data.shards("train"), cfg.block_size, cfg.batch_size, seed=[cfg.seed, 0])
    kernels, kernels_note = fast_kernels(device, cfg.attention)
    with kernels:
        return run_train_bench(cfg, device, dtype, grad_accum, batch_explain, vocab_size, sampler, kernels_note)


def run_train_bench(cfg, device, dtype, grad_accum, batch_explain, vocab_size, sampler, kernels_note):
    device_type = device.split(":")[0]
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, vocab_size)).to(device)
    model.fused_loss, model.recompute = cfg.fused_loss, cfg.recompute
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           muon=cfg.optimizer == "muon")
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    autocast = torch.autocast(device_type=device_type, dtype=getattr(torch, dtype), enabled=(dtype != "float32"))
    use_compile = cfg.compile if cfg.compile is not None else device_type == "cuda"
    step_model = torch.compile(model, mode=cfg.compile_mode) if use_compile else model
    batches = Prefetcher(sampler, lambda x, y: to_device(x, y, device))

    def sync():
        if device_type == "cuda":
            torch.cuda.synchronize()

    def one_step():
        accumulate_gradients(step_model, batches, grad_accum, autocast, scaler, optimizer, cfg.grad_clip, False)

    # said before the timing, which takes minutes where a step does (GPT-2 small on a CPU): not a silent wait
    params_m = round(model.get_num_params() / 1e6, 2)
    print(f"train: {batch_explain}; {params_m}M parameters on {device_name(device)}, "
          f"{dtype}, compile {cfg.compile_mode if use_compile else 'off'}, fused loss "
          f"{'on' if cfg.fused_loss else 'off'}{', recompute on' if cfg.recompute else ''}"
          f"{', Muon' if cfg.optimizer == 'muon' else ''}"
          f"{''.join(f', {k}={v}' for k, v in model.config.departures().items())}; {kernels_note}", flush=True)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    timed = sorted(times[cfg.warmup:])
    ms = 1000 * timed[len(timed) // 2]
    # the same number of steps back to back, waiting for the device once at the end (each step above is waited for on
    # both sides): the gap between the two is host time a loop could hide by queueing the next step while the device
    # runs this one, which it can only do where the step itself never waits for the device
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        one_step()
    sync()
    ms_back_to_back = 1000 * (time.perf_counter() - t0) / cfg.steps
    tokens_per_step = cfg.batch_size * cfg.block_size * grad_accum
    peak = cfg.peak_flops or (peak_flops_for(torch.cuda.get_device_name(device)) if device_type == "cuda" else None)
    mfu = model.estimate_mfu(tokens_per_step / (ms / 1000), peak)
    result = {
        "bench": "train", "device": device_name(device), "torch": torch.__version__, "dtype": dtype,
        "compile": cfg.compile_mode if use_compile else False, "attention": cfg.attention,
        "fused_loss": cfg.fused_loss, "recompute": cfg.recompute, "optimizer": cfg.optimizer,
        **{k: getattr(cfg, k) for k in ARCH_OPTIONS},
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "block_size": cfg.block_size, "batch_size": cfg.batch_size,
        "grad_accum": grad_accum,
        "params_M": params_m,
        "ms_per_step": round(ms, 2), "tokens_per_sec": round(tokens_per_step / (ms / 1000)),
        "ms_per_step_back_to_back": round(ms_back_to_back, 2),
        "mfu": round(mfu, 4) if mfu else None,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device_type == "cuda" else None,
        "first_step_s": round(times[0], 2),  # includes torch.compile when it is on
    }
    memory = "-" if result["peak_memory_GiB"] is None else f"{result['peak_memory_GiB']} GiB"
    print(f"  {ms:.1f} ms/step (median of {cfg.steps}) | {result['tokens_per_sec']:,} tokens/s | "
          f"mfu {f'{mfu:.1%}' if mfu else '-'} | peak memory {memory} | "
          f"first step {times[0]:.1f} s")
    print(f"  {ms_back_to_back:.1f} ms/step back to back ({cfg.steps} steps, one wait for the device at the end)")
    if cfg.profile:
        result["profile_ms"] = profile_step(one_step, sync, device_type)
    print(json.dumps(result))
    return result


class SyntheticSampler:
    """Random tokens in the BatchSampler interface: measures the model, not the disk."""

    def __init__(self, vocab_size, block_size, batch_size, seed):
        self.shape, self.vocab_size = (batch_size, block_size + 1), vocab_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        rows = self.rng.integers(0, self.vocab_size, size=self.shape, dtype=np.int64)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {}


# which operator (CPU) or kernel (GPU) names count towards which part of a step, in --profile; the first match wins
PROFILE_PARTS = {
    "attention": ("attention", "sdpa", "flash", "fmha", "cudnn", "attn"),
    "loss": ("cross_entropy", "log_softmax", "logsumexp", "nll_loss", "scatter", "gather"),
    "linear layers": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "gemm", "nvjet",
                      "cutlass", "xmma"),
    "optimizer": ("adam", "optimizer", "clip_grad", "foreach", "multi_tensor"),
    "activation (GELU)": ("gelu",),
    "layer norm": ("layer_norm",),
    "data": ("pin_memory", "aten::copy_", "aten::_to_copy", "numpy", "memcpy"),
}


def profile_step(one_step, sync, device_type, steps=3):
    """
    Time per part of a training step, averaged over a few steps, from torch.profiler: on a GPU each kernel's time
    (compiled code runs fused Triton kernels named after the operations they fuse), on a CPU each operator's self
    time. Also prints the kernels or operators that take the most.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    use_device = device_type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_device else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        sync()
    if use_device:  # kernels only: an operator's device time is its kernels', which would count twice
        events = [(e.key, e.self_device_time_total) for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    parts = {name: 0.0 for name in PROFILE_PARTS}
    total = 0.0
    for key, us in events:
        total += us
        for name, patterns in PROFILE_PARTS.items():
            if any(p in key.lower() for p in patterns):
                parts[name] += us
                break
    parts["other"] = total - sum(parts.values())
    ms = {name: round(us / 1000 / steps, 2) for name, us in parts.items()}
    print(f"  profile ({'GPU' if use_device else 'CPU'} time per step, {total / 1000 / steps:.1f} ms in all): " +
          " | ".join(f"{name} {v:.1f} ms" for name, v in ms.items()))
    for key, us in sorted(events, key=lambda e: -e[1])[:12]:
        print(f"    {us / 1000 / steps:7.2f} ms  {key[:110]}")
    return ms


@dataclass
class PrepareBenchConfig:
    mb: float = 300  # corpus size in MB of text (the char tokenizer runs on all of it)
    bpe_mb: float = 100  # GPT-2 BPE runs on the first this many MB
    workdir: str = ""  # where the corpus and outputs go, kept afterwards; '' is a temp folder, removed at the end


def validate_prepare(cfg):
    return [] if 0 < cfg.bpe_mb <= cfg.mb else [f"need 0 < bpe_mb <= mb, got bpe_mb={cfg.bpe_mb}, mb={cfg.mb}"]


def bench_prepare(cfg, sources):
    from benchmarks.prepare_bench import run_bench  # its own script too; see its docstring for what it measures
    run_bench(cfg)


SUBCOMMANDS = {"sample": (SampleBenchConfig, bench_sample, validate_sample),
               "train": (TrainBenchConfig, bench_train, validate_train),
               "prepare": (PrepareBenchConfig, bench_prepare, validate_prepare)}


def main(argv):
    if argv and argv[0] in ("--help", "-h"):
        print(__doc__.strip())
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        given = f"unknown subcommand {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        # nanoGPT's bench.py takes its settings alone: here they follow what is timed
        train = f" (timing training, as nanoGPT's bench.py: python bench.py train {' '.join(argv)})" \
            if argv and (argv[0].startswith("--") or argv[0].endswith(".py")) else ""
        print(f"error: {given}usage: python bench.py {{{','.join(SUBCOMMANDS)}}} [--key=value ...]{train}",
              file=sys.stderr)
        sys.exit(2)
    cls, run, validate = SUBCOMMANDS[argv[0]]
    launch = detect_launch()
    if launch.distributed:  # each rank would time its own single process, all on one GPU: not a DDP figure
        if launch.rank == 0:
            print(f"error: bench.py times one process on one device, and this is {launch.world_size} processes of a "
                  f"{launch.mode} launch; run it with python alone (the figures are per GPU)", file=sys.stderr)
        sys.exit(2)
    configurator.run(run, cls, validate, argv=argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
