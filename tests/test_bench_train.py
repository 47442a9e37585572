"""bench.py train times train.py's own step; a smoke test of its output, not a timed test."""

import json

from conftest import run_here


def test_bench_train_reports_a_json_line(tmp_path):
    out = run_here("bench.py", "train", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32",
                   "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=2", "--steps=3",
                   "--warmup=1", "--profile=True", cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "train" and result["grad_accum"] == 2 and result["ms_per_step"] > 0
    assert abs(result["tokens_per_sec"] - 4 * 16 * 2 / (result["ms_per_step"] / 1000)) <= 0.01 * result["tokens_per_sec"]
    assert result["ms_per_step_back_to_back"] > 0 and "ms/step back to back (3 steps" in out.stdout
    assert result["profile_ms"]["linear layers"] > 0 and result["mfu"] is None  # no peak FLOP/s known for a CPU
    assert "2 sequences" not in out.stdout and "4 sequences x 16 tokens x 1 processes x 2 micro-steps" in out.stdout


def test_bench_train_bad_key(tmp_path):
    proc = run_here("bench.py", "train", "--stepz=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "did you mean 'steps'" in proc.stderr
