"""bench.py runs end to end on a tiny model (its numbers are measurements, not tested for speed)."""

import json

from conftest import run_script


def test_bench_sample_runs_and_cache_changes_no_token(tmp_path):
    proc = run_script("bench.py", "sample", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                      "--vocab_size=100", "--prompt_tokens=8", "--new_tokens=40", "--batch_sizes=1,3",
                      "--device=cpu", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["batch_size"] for row in result["rows"]] == [1, 3]
    assert all(row["same_tokens"] and row["cache_tokens_per_s"] > 0 for row in result["rows"])

    proc = run_script("bench.py", "smaple", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown subcommand 'smaple'" in proc.stderr
