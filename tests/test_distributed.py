"""Launch detection, gradient accumulation and DDP equivalence (CPU, gloo)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, free_port, run_script
from distributed import detect_launch, expand_nodelist


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[03-05,07]", ["node03", "node04", "node05", "node07"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a[1-2],b7,c[009-011]", ["a1", "a2", "b7", "c009", "c010", "c011"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("localhost", ["localhost"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    """dtype=auto: bfloat16 on Ampere and newer, float16 (with loss scaling) on a V100 or T4, whose bf16 torch only
    emulates and by default reports as supported. torch.cuda is a stand-in: CI has no GPU."""
    import torch
    from distributed import pick_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert pick_dtype("auto", "cuda") == expected
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("float16", "cuda") == "float16"


def test_attention_order():
    """The chosen backend first, then flash, memory-efficient (both before cuDNN, which plans anew for each of
    decoding's shapes: a masked call that flash refuses goes to the memory-efficient kernel), cuDNN and math."""
    from distributed import fast_kernels
    orders = {name: fast_kernels("cuda", name)[1] for name in ("flash", "cudnn", "efficient")}
    assert {name: note.replace("_attention", "") for name, note in orders.items()} == {
        "flash": "attention: flash > efficient > cudnn > math; TF32 on",
        "cudnn": "attention: cudnn > flash > efficient > math; TF32 on",
        "efficient": "attention: efficient > flash > cudnn > math; TF32 on"}
    assert fast_kernels("cpu", "flash")[1] == "attention: PyTorch's scaled_dot_product_attention for this device"


def test_single_process():
    assert detect_launch({}).mode == "single" and not detect_launch({}).distributed


def test_torchrun():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    launch = detect_launch(env)
    assert (launch.mode, launch.rank, launch.local_rank, launch.world_size) == ("torchrun", 3, 1, 8)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 29500)


def slurm_env(**extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "node[03-05,07]"}
    env.update(extra)
    return env


def test_srun():
    launch = detect_launch(slurm_env())
    assert (launch.mode, launch.rank, launch.local_rank, launch.world_size) == ("slurm", 5, 1, 8)
    assert launch.master_addr == "node03"
    assert launch.master_port == 20000 + 4242  # derived from the job id: the same on every task
    assert detect_launch(slurm_env(MASTER_PORT="12345", MASTER_ADDR="head")).master_port == 12345
    assert detect_launch(slurm_env(MASTER_ADDR="head")).master_addr == "head"


def test_srun_torchrun_is_torchrun():
    """torchrun started by srun: torchrun's own variables describe the process, not Slurm's task ids."""
    env = slurm_env(SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="1",
                    RANK="9", LOCAL_RANK="1", WORLD_SIZE="16", MASTER_ADDR="node03", MASTER_PORT="29400")
    launch = detect_launch(env)
    assert (launch.mode, launch.rank, launch.world_size) == ("torchrun", 9, 16)


def test_salloc_and_batch_shell_run_single():
    # an interactive salloc shell, or the batch script's own shell: allocation variables but no srun step
    env = slurm_env()
    del env["SLURM_STEP_ID"], env["SLURM_STEP_NUM_TASKS"]
    assert detect_launch(env).mode == "single"
    # a one-task srun step is one process
    assert detect_launch(slurm_env(SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1", SLURM_PROCID="0")).mode == "single"


def prepare_tiny(tmp_path, prepared_shakespeare):
    """data/shakespeare_char in tmp_path: a copy of the session's preparation (conftest.prepared_shakespeare)."""
    shutil.copytree(prepared_shakespeare, tmp_path / "data")


COMMON = ["--dataset=shakespeare_char", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2",
          "--n_embd=32", "--block_size=32", "--dropout=0.0", "--max_iters=10", "--eval_interval=1000",
          "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=10", "--plot=False"]


def train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_gradient_accumulation_equals_big_batch(tmp_path, prepared_shakespeare):
    prepare_tiny(tmp_path, prepared_shakespeare)
    run_script("train.py", *COMMON, "--batch_size=8", "--out_dir=big", cwd=tmp_path)
    run_script("train.py", *COMMON, "--batch_size=2", "--gradient_accumulation_steps=4", "--out_dir=accum",
               cwd=tmp_path)
    big, accum = train_losses(tmp_path / "big"), train_losses(tmp_path / "accum")
    assert sorted(big) == list(range(1, 11))
    for step in big:
        assert abs(big[step] - accum[step]) < 1e-5, (step, big[step], accum[step])


def test_backend_key(monkeypatch):
    """nanoGPT's backend key: 'auto', 'nccl' or 'gloo'; nccl is refused for a CPU run, in words, before anything is
    set up (MASTER_PORT once stayed in this process's environment, and later tests' processes met on it)."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    import configurator
    import train
    from configurator import UserError
    from distributed import Launch, init_distributed
    cfg, _ = configurator.parse(train.TrainConfig, ["--backend=mpi"])
    assert "backend='mpi': expected 'auto', 'nccl', 'gloo'" in train.validate(cfg)
    with pytest.raises(UserError, match="backend=nccl runs on CUDA GPUs, and this run's device is cpu: use "
                                        "--backend=gloo or auto"):
        init_distributed(Launch("torchrun", 0, 0, 2), "cpu", "nccl")
    assert "MASTER_PORT" not in os.environ

def run_torchrun(tmp_path, *args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", os.path.join(REPO, "train.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, prepared_shakespeare):
    """The same training steps, and with eval_tokens the same evaluation (3,001 tokens: 94 windows, the last one
    short, 47 a rank), HellaSwag's items shared out (3 a rank) included."""
    from conftest import write_hellaswag
    prepare_tiny(tmp_path, prepared_shakespeare)
    write_hellaswag(tmp_path / "data/hellaswag/hellaswag_val.jsonl")
    args = [*COMMON, "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_tokens=3001", "--hellaswag=True"]
    run_script("train.py", *args, "--out_dir=one", cwd=tmp_path)
    out = run_torchrun(tmp_path, *args, "--out_dir=two", "--backend=gloo")  # nanoGPT's key, as its users type it
    assert "launch: torchrun, 2 process(es)" in out.stdout
    assert "4 sequences x 32 tokens x 2 processes x 1 micro-steps" in out.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 11))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    evals = {}
    for run in ("one", "two"):
        with open(tmp_path / run / "log.jsonl") as f:
            evals[run] = [(r["step"], r["train_loss"], r["val_loss"], r["hellaswag"])
                          for r in map(json.loads, f) if "val_loss" in r]
    assert [e[0] for e in evals["two"]] == [0, 10]
    assert np.allclose(evals["one"], evals["two"], rtol=0, atol=1e-5), evals


def test_a_signal_to_one_rank_stops_every_rank_alike(tmp_path, prepared_shakespeare):
    """Ctrl-C's SIGINT reaching rank 1 alone (a terminal's process group, a kill by pid): every rank stops at the same
    step for that reason, and every rank exits with its code, 130, not the requeue code 3 for the ranks that saw no
    signal (under srun, the code decides whether the job is requeued)."""
    import re
    import signal
    import time
    prepare_tiny(tmp_path, prepared_shakespeare)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 os.path.join(REPO, "train.py"), *COMMON, "--batch_size=4",
                                 "--gradient_accumulation_steps=2", "--max_iters=100000", "--lr_decay_iters=100000",
                                 "--out_dir=run"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            log, deadline, rank1 = tmp_path / "run/log.jsonl", time.time() + 120, None
            while time.time() < deadline and proc.poll() is None and rank1 is None:
                time.sleep(0.2)
                if log.exists() and log.read_text().count('"loss"') >= 5:
                    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split():
                        with open(f"/proc/{pid}/environ", "rb") as f:
                            if b"RANK=1" in f.read().split(b"\0"):
                                rank1 = int(pid)
            assert rank1 is not None, (tmp_path / "out.txt").read_text()[-3000:]
            os.kill(rank1, signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    printed = (tmp_path / "out.txt").read_text()
    assert "(stopping on SIGINT)" in printed and "exiting with code 130" in printed, printed[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(\d+)", printed)  # torchrun's report of each failed rank
    assert len(codes) >= 2 and set(codes) == {"130"}, printed[-3000:]


def test_a_config_error_is_said_once_under_torchrun(tmp_path):
    """Every rank finds the same typo; the first says it, the others exit with the same code in silence."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "train.py"), "--bach_size=4", "--device=cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: unknown option --bach_size") == 1, proc.stderr[-3000:]


def test_total_batch_size_must_divide(tmp_path, prepared_shakespeare):
    prepare_tiny(tmp_path, prepared_shakespeare)
    proc = run_script("train.py", *COMMON, "--batch_size=4", "--total_batch_size=1000", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "total_batch_size=1,000 tokens is not a multiple of batch_size 4 x block_size 32 x 1 processes = 128" \
        in proc.stderr


CLEANUP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
from distributed import Launch, cleanup_distributed, init_distributed
launch = Launch("torchrun", int(sys.argv[2]), int(sys.argv[2]), 2, "127.0.0.1", int(sys.argv[3]))
init_distributed(launch, "cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
model(torch.ones(1, 2)).sum().backward()
from torch.distributed.optim import ZeroRedundancyOptimizer  # as train.py's shard_optimizer: after the group exists
optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
optimizer.step()
optimizer.consolidate_state_dict(to=0)
del model, optimizer
cleanup_distributed()
print(json.dumps(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_cleanup_frees_the_process_group(tmp_path):
    """After DDP and ZeRO, destroy_process_group must free the gloo group and stop its threads. Left alive (DDP
    imports torch.distributed.nn, and shard_optimizer ZeroRedundancyOptimizer's module, whose functions keep the group
    as a default argument), they are torn down during interpreter shutdown, where a gloo thread taking the interpreter
    lock aborts the process ('terminate called without an active exception', seen at the end of a 2-rank Slurm job,
    and of a sharded 2-rank run in CI)."""
    port = free_port()
    script = tmp_path / "cleanup.py"
    script.write_text(CLEANUP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), REPO, str(rank), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        threads = json.loads(out.strip().splitlines()[-1])
        assert not [name for name in threads if "gloo" in name], threads
