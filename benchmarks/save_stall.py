"""
How long an evaluation's checkpoint and loss plot hold the training loop up, written in the loop (async_save=False)
and on train.py's writer thread (async_save=True, the default), side by side in one process:

    python benchmarks/save_stall.py                 # the baby GPT of config/train_shakespeare_char.py (128 MB)
    python benchmarks/save_stall.py --model=gpt2    # GPT-2 small (124M, 1.5 GB with AdamW's state)

The model has taken one AdamW step, so the checkpoint holds everything train.py saves. "blocked" is the time the
loop's thread spends in the save and plot calls. While a background write runs, that thread goes on dispatching small
tensor ops, as a training loop launching a GPU's kernels does; "dispatch rate" compares its pace then with its pace
alone, which shows what the writer's share of the interpreter lock costs. On a CPU-only machine the writer also
competes with the training's own compute for the cores; on a GPU machine the cores are mostly idle.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import Writer, save_training_checkpoint, snapshot  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import plot_losses  # noqa: E402

MODELS = {"baby": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False),
          "gpt2": GPTConfig()}


def dispatch(until):
    """Small in-place tensor ops until until() is true; returns ops per second."""
    a, n, start = torch.ones(64), 0, time.perf_counter()
    while not until():
        for _ in range(100):
            a.add_(1.0)
        n += 100
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="baby")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = GPT(MODELS[args.model])
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    model(idx, idx)[1].backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 0}

    with tempfile.TemporaryDirectory() as out_dir:
        log_path, png_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "loss.png")
        with open(log_path, "w") as f:  # a 2,000-step log with an evaluation every 250 steps, as the baby GPT's
            for s in range(1, 2001):
                f.write(json.dumps({"step": s, "loss": 4 - s / 1000, "tokens": s * 16384}) + "\n")
                if s % 250 == 0:
                    f.write(json.dumps({"step": s, "val_loss": 4 - s / 1000, "tokens": s * 16384}) + "\n")
        plot_losses(log_path, png_path)  # matplotlib's import, once, outside the timings

        def save(st, writer, step):
            writer.submit(save_training_checkpoint, out_dir, st | {"step": step}, step, 2)
            writer.submit(plot_losses, log_path, png_path)

        results = {"in the loop": [], "writer thread": [], "write": [], "alone": [], "during": []}
        for rep in range(args.repeats):
            results["alone"].append(dispatch(lambda end=time.perf_counter() + 1.0: time.perf_counter() > end))
            t = time.perf_counter()
            save(state, Writer(background=False), 2 * rep)
            results["in the loop"].append(time.perf_counter() - t)

            writer, done = Writer(background=True), threading.Event()
            t = time.perf_counter()
            save(snapshot(state), writer, 2 * rep + 1)
            writer.submit(done.set)
            results["writer thread"].append(time.perf_counter() - t)
            results["during"].append(dispatch(done.is_set))
            results["write"].append(time.perf_counter() - t)
            writer.close()
        mb = os.path.getsize(os.path.join(out_dir, "ckpt.pt")) / 1e6

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{args.model}: a {mb:,.0f} MB checkpoint, median of {args.repeats}, torch {torch.__version__}")
    print(f"  training loop blocked per evaluation: {med['in the loop']:.3f} s writing in the loop, "
          f"{med['writer thread']:.3f} s with the writer thread ({med['in the loop'] / med['writer thread']:.1f}x "
          f"less); the background write took {med['write']:.3f} s")
    print(f"  dispatch rate during the background write: {med['during'] / med['alone']:.0%} of the rate alone")
    print(json.dumps({"bench": "save_stall", "model": args.model, **{k: round(v, 4) for k, v in med.items()}}))


if __name__ == "__main__":
    main()
