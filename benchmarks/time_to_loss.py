"""
Seconds from launching train.py to the first evaluation whose val loss is at or below a target: issue 8's measure
for small models ("val loss <= 1.47 within 30 s of launch", start-up and compilation included). Each run is a fresh
process with its own out_dir; the first run fills torch.compile's cache, later ones find it warm.

    python benchmarks/time_to_loss.py --target=1.47 --runs=2 config/train_shakespeare_char.py --compile_mode=reduce-overhead
    python benchmarks/time_to_loss.py --train=../other/train.py ...   # another train.py (a branch) the same way

Arguments other than the ones below go to train.py unchanged. A run is stopped once the target is reached (or ends
when train.py does). Prints a line per run and a JSON line per run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(log_path):
    """The complete lines of a log.jsonl being written."""
    if not os.path.exists(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def one_run(train_py, train_args, target, out_dir):
    log_path = os.path.join(out_dir, "log.jsonl")
    launched = time.time()
    # its output goes to a file, not a pipe: a pipe nobody reads until the end would block train.py once full
    output_path = os.path.join(os.path.dirname(out_dir), "train_output.txt")
    with open(output_path, "w") as output:
        proc = subprocess.Popen([sys.executable, train_py, *train_args, f"--out_dir={out_dir}"],
                                stdout=output, stderr=subprocess.STDOUT)
    reached = None
    while reached is None and proc.poll() is None:
        time.sleep(0.2)
        reached = next((r for r in records(log_path) if r.get("val_loss", float("inf")) <= target), None)
    proc.kill()
    proc.wait()
    if reached is None and proc.returncode not in (0, -9):
        with open(output_path, errors="replace") as f:
            sys.exit(f"train.py exited with code {proc.returncode}:\n{f.read()[-3000:]}")
    recs = records(log_path)
    evals = [r for r in recs if "val_loss" in r]
    step_ms = [r["ms"] for r in recs if "ms" in r][1:]  # the first includes compilation
    return {
        "reached": reached is not None,
        "seconds": round(reached["time"] - launched, 2) if reached else None,
        "step": reached["step"] if reached else None,
        "val_loss": reached["val_loss"] if reached else min((r["val_loss"] for r in evals), default=None),
        "first_eval_s": round(evals[0]["time"] - launched, 2) if evals else None,
        "median_ms_per_step": round(statistics.median(step_ms), 2) if step_ms else None,
        # every evaluation until the stop, as [step, val loss, seconds after launch]: the curve behind the verdict
        "evals": [[r["step"], round(r["val_loss"], 4), round(r["time"] - launched, 2)] for r in evals],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, required=True, help="val loss to reach")
    parser.add_argument("--runs", type=int, default=2, help="runs one after the other (the first fills the compile cache)")
    parser.add_argument("--train", default=os.path.join(REPO, "train.py"), help="the train.py to run")
    args, train_args = parser.parse_known_args()
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            result = one_run(args.train, train_args, args.target, os.path.join(tmp, "out"))
        if result["reached"]:
            print(f"run {i + 1}: val loss {result['val_loss']:.4f} <= {args.target} at step {result['step']}, "
                  f"{result['seconds']:.1f} s after launch (first evaluation at {result['first_eval_s']:.1f} s; "
                  f"{result['median_ms_per_step']} ms/step)")
        else:
            print(f"run {i + 1}: val loss never reached {args.target} (best {result['val_loss']})")
        print(json.dumps({"bench": "time_to_loss", "run": i + 1, "target": args.target, "train": args.train,
                          "args": train_args, **result}))


if __name__ == "__main__":
    main()
