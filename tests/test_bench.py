"""bench.py runs end to end on a tiny model (its numbers are measurements, not tested for speed)."""

import json
import math
import os
import sys

import pytest

from conftest import REPO, gpt2_bpe_available, run_here, run_script


def test_bench_sample_runs_and_cache_changes_no_token(tmp_path):
    proc = run_here("bench.py", "sample", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
                    "--vocab_size=100", "--prompt_tokens=8", "--new_tokens=40", "--batch_sizes=1,3",
                    "--device=cpu", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["batch_size"] for row in result["rows"]] == [1, 3]
    assert all(row["same_tokens"] and row["cache_tokens_per_s"] > 0 for row in result["rows"])

    proc = run_here("bench.py", "smaple", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown subcommand 'smaple'" in proc.stderr and "nanoGPT" not in proc.stderr
    proc = run_here("bench.py", "--batch_size=12", cwd=tmp_path, check=False)  # nanoGPT's bench.py takes just these
    assert proc.returncode == 2 and proc.stderr.rstrip().endswith(
        "(timing training, as nanoGPT's bench.py: python bench.py train --batch_size=12)")
    proc = run_here("bench.py", "--help", cwd=tmp_path)  # the subcommands, with an example of each
    assert all(f"python bench.py {name}" in proc.stdout for name in ("sample", "train", "prepare"))
    # train's keys are train.py's, explained as train.py's --help explains them (they once came bare)
    proc = run_here("bench.py", "train", "--help", cwd=tmp_path)
    assert "--batch_size=12 (int)  # sequences per micro-step per process" in proc.stdout
    assert "--steps=20 (int)  # timed optimizer steps" in proc.stdout
    # under torchrun each rank timed a single process of its own (trial): refused, by rank 0, in one line
    for rank, said in (("0", "error: bench.py times one process on one device, and this is 2 processes of a torchrun "
                                 "launch; run it with python alone"), ("1", "")):
        proc = run_script("bench.py", "train", cwd=tmp_path, check=False,
                          env={"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank})
        assert proc.returncode == 2 and (said in proc.stderr if said else not proc.stderr.strip()), proc.stderr


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_bench_prepare_runs_every_row(tmp_path):
    proc = run_here("bench.py", "prepare", "--mb=0.4", "--bpe_mb=0.2", "--workdir=work",  # relative: a trial's
                    cwd=tmp_path)  # always failed, prepare.py run inside it and given its files by the same path
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]  # rows after the header
    names = [line.split(" | ")[0] for line in table]
    assert len(names) == 8 and sum("prepare.py" in n for n in names) == 4 and sum("ceiling" in n for n in names) == 2
    assert (tmp_path / "work" / "corpus.jsonl").exists()  # --workdir is kept
    proc = run_here("bench.py", "prepare", "--mb=0.4", "--bpe_mb=0.2", "--workdir=work", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--workdir=work is a file or a folder with files in it" in proc.stderr  # kept too

    proc = run_here("bench.py", "prepare", "--mb=1", "--bpe_mb=2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "need 0 < bpe_mb <= mb" in proc.stderr


def test_save_stall_bench_runs(tmp_path):
    proc = run_script("benchmarks/save_stall.py", "--repeats=1", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "save_stall" and result["model"] == "baby"
    assert all(result[key] > 0 for key in ("in the loop", "writer thread", "write", "alone", "during"))
    assert not list(tmp_path.iterdir())  # its checkpoints went to a temporary folder that is gone


def test_time_to_loss_bench(tmp_path, shakespeare_path):
    run_script("prepare.py", "shakespeare_char", f"--source={shakespeare_path}", cwd=tmp_path)
    tiny = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2",
            "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_interval=10", "--eval_iters=2",
            "--max_iters=30", "--dropout=0.0", "--plot=False", "--warmup_iters=0", "--log_interval=1"]
    config = os.path.join(REPO, tiny[0])
    # a little below an untrained model's loss, ln(vocabulary) (65 characters in tiny Shakespeare, fewer in the text
    # the tests write without it): reached after some training, never at step 0
    with open(tmp_path / "data/shakespeare_char/meta.json") as f:
        target = round(math.log(json.load(f)["vocab_size"]) - 0.15, 2)
    proc = run_script("benchmarks/time_to_loss.py", f"--target={target}", "--runs=1", config, *tiny[1:], cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["reached"] and result["val_loss"] <= target and result["step"] in (10, 20, 30)
    assert 0 < result["first_eval_s"] <= result["seconds"] and result["median_ms_per_step"] > 0
    assert set(os.listdir(tmp_path)) - {"generated.txt"} == {"data"}  # the run's out_dir was a temporary folder

    # 800 logged steps print more than a pipe holds (64 KB): train.py must not block on its own output
    proc = run_script("benchmarks/time_to_loss.py", "--target=0.1", "--runs=1", config, *tiny[1:],
                      "--max_iters=800", "--eval_interval=400", cwd=tmp_path, timeout=300)
    assert "val loss never reached 0.1" in proc.stdout and not json.loads(proc.stdout.splitlines()[-1])["reached"]


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory):
    """A small char dataset for the patched trees' train.py, prepared once."""
    folder = tmp_path_factory.mktemp("patch_data")
    (folder / "text.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    run_script("prepare.py", "shakespeare_char", "--source=text.txt", cwd=folder)
    return folder


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO, "benchmarks/experiments"))
                                        if n.endswith(".patch")))
def test_experiment_patch_applies_and_passes_its_tests(tmp_path, patch_data, name):
    """A patch waiting for a GPU measurement (benchmarks/experiments/) still applies to this tree the way
    benchmarks/gpu.sh applies it, the tests its `check:` line names pass with it, and its train.py still trains: the
    GPU session that measures it finds it ready."""
    import shutil
    import subprocess
    if shutil.which("patch") is None:
        pytest.skip("no patch command")
    with open(os.path.join(REPO, "benchmarks/experiments", name)) as f:
        text = f.read()
    checks = [line.split(":", 1)[1].split() for line in text.split("\ndiff ")[0].splitlines()
              if line.startswith("check:")]
    assert checks, f"{name}: its description (above the first diff) needs a line 'check: <pytest arguments>'"
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", "data", "out*", "__pycache__", ".*cache*"))
    proc = subprocess.run(["patch", "-p1", "--quiet", "--forward", "--batch"], input=text, cwd=tree,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{name} no longer applies; refresh it against this tree:\n{proc.stdout}"
    for args in checks:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=tree,
                              capture_output=True, text=True, check=False, timeout=600)
        assert proc.returncode == 0, f"{name}: pytest {' '.join(args)}\n{proc.stdout[-3000:]}"
    proc = subprocess.run([sys.executable, str(tree / "train.py"), "--dataset=shakespeare_char", "--device=cpu",
                           "--compile=False", "--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16",
                           "--batch_size=4", "--max_iters=20", "--eval_iters=2", "--log_interval=10",
                           "--plot=False", f"--out_dir={tmp_path / 'out'}"], cwd=patch_data, capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0 and "step 20 |" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
