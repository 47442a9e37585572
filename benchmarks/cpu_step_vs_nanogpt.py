"""
Per-step CPU time of train.py's step against the same step computed the way nanoGPT computes it, side by side in one
process (a ratio holds on a noisy machine, an absolute time does not).

nanoGPT's step at the same settings differs from ours in: exact-erf GELU (GPT-2 used the tanh approximation, which we
keep), an output layer exactly vocab_size wide (we pad vocabularies of 1,024 or more to a multiple of 64: not the
65 characters here, so both are unpadded), and PyTorch's default per-tensor AdamW on CPU (we use the fused kernel).
The reference below is our model with those choices switched to nanoGPT's; everything else (data, batch, model
size, clipping) is identical.

    python prepare.py shakespeare_char && python benchmarks/cpu_step_vs_nanogpt.py
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from tokendata import BatchSampler, Dataset  # noqa: E402
from train import Prefetcher, accumulate_gradients, to_device  # noqa: E402

# the laptop settings of issue 2's "done when" command
SETTINGS = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False)
BATCH_SIZE, LR, BETAS = 12, 1e-3, (0.9, 0.99)


@dataclass
class UnpaddedConfig(GPTConfig):
    @property
    def padded_vocab_size(self):
        return self.vocab_size


def build(data, reference):
    torch.manual_seed(0)
    config_cls = UnpaddedConfig if reference else GPTConfig
    model = GPT(config_cls(vocab_size=data.meta["vocab_size"], **SETTINGS))
    if reference:
        for block in model.transformer.h:
            block.mlp.gelu = nn.GELU()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0}],
                                      lr=LR, betas=BETAS)
    else:
        optimizer = model.configure_optimizers(0.1, LR, BETAS)
    sampler = BatchSampler(data.shards("train"), SETTINGS["block_size"], BATCH_SIZE, seed=0)
    batches = Prefetcher(sampler, lambda x, y: to_device(x, y, "cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    autocast = torch.autocast("cpu", enabled=False)

    def step():
        accumulate_gradients(model, batches, 1, autocast, scaler, optimizer, 1.0, False)
    return step


def main():
    data = Dataset(os.path.join("data", "shakespeare_char"))
    steps = {"ours": build(data, reference=False), "nanoGPT-equivalent": build(data, reference=True)}
    for step in steps.values():  # warm up, and move past the first steps' transients
        for _ in range(20):
            step()
    times = {name: [] for name in steps}
    for _ in range(15):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            times[name].append((time.perf_counter() - t0) / 10 * 1000)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; shakespeare_char, batch {BATCH_SIZE}, "
          f"{SETTINGS}")
    for name, ms in medians.items():
        print(f"  {name:20s} {ms:6.1f} ms/step (median of 15 rounds of 10 steps, interleaved)")
    print(f"  ours / nanoGPT-equivalent = {medians['ours'] / medians['nanoGPT-equivalent']:.3f}")


if __name__ == "__main__":
    main()
