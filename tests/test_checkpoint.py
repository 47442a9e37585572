"""Exact resume, atomic and rolling checkpoints, corruption, preemption signals and bad steps."""

import contextlib
import json
import os
import signal
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import (CheckpointError, load_checkpoint, save_checkpoint, save_training_checkpoint, snapshot,
                        step_checkpoints)
from conftest import REPO, free_port, killed_at_replace, run_here, run_script
from test_distributed import prepare_tiny, run_torchrun, train_losses

ARGS = ["--dataset=shakespeare_char", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--batch_size=4", "--dropout=0.0", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=5", "--lr_decay_iters=40", "--plot=False"]


@pytest.fixture
def data_dir(tmp_path, prepared_shakespeare):
    """A folder of its own with data/shakespeare_char in it, a copy of the session's preparation."""
    prepare_tiny(tmp_path, prepared_shakespeare)
    return tmp_path


def train_here(capsys, *args):
    """train.py's main in this process, from its command-line arguments, in the working directory (a test's
    monkeypatch.chdir): what it printed. For tests of what a run does, without an interpreter start each (about 3 s);
    the exact-resume tests run train.py itself, in fresh processes, as users do."""
    import configurator
    import train
    capsys.readouterr()
    train.main(*configurator.parse(train.TrainConfig, list(args)))
    return capsys.readouterr().out


def log_records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_log_records_each_start(data_dir, monkeypatch, capsys):
    """log.jsonl tells what each stretch of a run was started with: every setting, and where each changed one came
    from, so a sweep's logs can be told apart and compared by themselves."""
    monkeypatch.chdir(data_dir)
    (data_dir / "fast.py").write_text("learning_rate = 3e-3\n")
    train_here(capsys, "fast.py", *ARGS, "--max_iters=4", "--eval_interval=2", "--out_dir=out")
    train_here(capsys, *ARGS, "--max_iters=6", "--eval_interval=2", "--out_dir=out", "--init_from=resume",
               "--learning_rate=1e-3")
    starts = [r for r in log_records(data_dir / "out") if "start" in r]
    assert [r["step"] for r in starts] == [0, 4]
    first, second = (r["start"] for r in starts)
    assert (first["config"]["learning_rate"], first["sources"]["learning_rate"]) == (3e-3, "fast.py")
    assert (second["config"]["learning_rate"], second["sources"]["learning_rate"]) == (1e-3, "command line")
    assert first["config"]["n_embd"] == 32 and "n_embd" in first["sources"] and "seed" not in first["sources"]
    assert first["world_size"] == 1 and first["torch"] == torch.__version__


def test_exact_resume(data_dir):
    """40 steps straight equal 17 steps, then a resume to 40, bit for bit; eval cadence does not matter."""
    run_script("train.py", *ARGS, "--max_iters=40", "--eval_interval=1000", "--out_dir=straight", cwd=data_dir)
    run_script("train.py", *ARGS, "--max_iters=17", "--eval_interval=5", "--out_dir=split", cwd=data_dir)
    out = run_script("train.py", *ARGS, "--max_iters=40", "--eval_interval=7", "--out_dir=split",
                     "--init_from=resume", cwd=data_dir)
    assert "resumed from split/ckpt.pt at step 17" in out.stdout
    assert "max_iters 17 -> 40" in out.stdout and "eval_interval 5 -> 7" in out.stdout
    straight, split = train_losses(data_dir / "straight"), train_losses(data_dir / "split")
    assert sorted(split) == list(range(1, 41))
    assert all(straight[s] == split[s] for s in range(1, 41)), [(s, straight[s], split[s]) for s in range(18, 41)]
    steps = [r["step"] for r in log_records(data_dir / "split") if "loss" in r]
    assert steps == list(range(1, 41))  # continued without duplicates


def test_epochs_resume_exactly_across_an_epoch(tmp_path, shakespeare_path):
    """data_order=epochs through train.py: a run stopped in its first epoch and resumed into its second trains what
    an uninterrupted one does, and log.jsonl says how far through the epochs each step is."""
    with open(shakespeare_path, encoding="utf-8") as f:
        (tmp_path / "small.txt").write_text(f.read(6000), encoding="utf-8")
    run_script("prepare.py", "small", "--source=small.txt", "--tokenizer=char", cwd=tmp_path)
    # about 5,400 train tokens: 168 windows of 32, an epoch in 10.5 steps of 16
    args = [*ARGS, "--dataset=small", "--batch_size=16", "--data_order=epochs", "--eval_interval=1000"]
    run_script("train.py", *args, "--max_iters=14", "--out_dir=straight", cwd=tmp_path)
    out = run_script("train.py", *args, "--max_iters=6", "--out_dir=split", cwd=tmp_path)
    assert "epochs of the train split" in out.stdout and "data_order=epochs: each window once per epoch" in out.stdout
    run_script("train.py", *args, "--max_iters=14", "--out_dir=split", "--init_from=resume", cwd=tmp_path)
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert all(straight[s] == split[s] for s in range(1, 15))
    with open(tmp_path / "data/small/meta.json") as f:
        windows = sum((s["tokens"] - 1) // 32 for s in json.load(f)["shards"]["train"])
    assert 10 * 16 < windows < 11 * 16  # the second epoch begins in step 11
    epochs = [r["epoch"] for r in log_records(tmp_path / "split") if "loss" in r]
    assert epochs == pytest.approx([16 * s / windows for s in range(1, 15)])
    # on other data (a resume may change the dataset), at the same fraction of the epoch, and said so
    (tmp_path / "half.txt").write_text((tmp_path / "small.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    run_script("prepare.py", "half", "--source=half.txt", "--tokenizer=small", cwd=tmp_path)  # its vocabulary
    out = run_script("train.py", *args, "--dataset=half", "--max_iters=15", "--out_dir=split", "--init_from=resume",
                     cwd=tmp_path).stdout
    assert f"note: the train split now has 84 windows, not {windows}: epoch 2 goes on at the same fraction of it" in out


def test_a_spike_is_skipped_and_training_goes_on(data_dir, monkeypatch, capsys):
    """skip_spikes: a step whose loss jumps fourfold, once the window of 10 steps is full, is not applied (the
    optimizer steps max_iters times, over one more batch); the run goes on and logs why it skipped."""
    import model as model_module

    real_forward, real_step = model_module.GPT.forward, torch.optim.AdamW.step
    calls, steps = {"n": 0}, []

    def spiky_forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 15:  # step 14's
                loss = loss * 4
        return logits, loss

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(model_module.GPT, "forward", spiky_forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    monkeypatch.chdir(data_dir)
    out = train_here(capsys, *ARGS, "--max_iters=30", "--eval_interval=100", "--skip_spikes=5", "--spike_window=10",
                     "--out_dir=out", "--plot=True")
    assert "step 14: a spike, loss " in out
    assert "plot: off" not in out and (data_dir / "out/loss.png").exists()  # its record once broke the plot (a trial)
    skipped = [r for r in log_records(data_dir / "out") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [14] and skipped[0]["spike"].startswith("loss ")
    assert calls["n"] == 31 and len(steps) == 30
    assert load_checkpoint(str(data_dir / "out"))["step"] == 30


def test_spike_rule_and_exact_resume(data_dir, monkeypatch, capsys):
    """skip_spikes set so low that ordinary noise trips it: each step's decision is the rule recomputed from log.jsonl
    (over the 5 steps before, skipped ones included), and a run stopped and resumed skips what the uninterrupted one
    does, since the windows are in the checkpoint. (In this process: what is tested is the rule and its state.)"""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--skip_spikes=1", "--spike_window=5", "--eval_interval=1000"]
    for more in (["--max_iters=40", "--out_dir=straight"], ["--max_iters=17", "--out_dir=split"],
                 ["--max_iters=40", "--out_dir=split", "--init_from=resume"]):
        train_here(capsys, *args, *more)
    records = [r for r in log_records(data_dir / "straight") if "grad_norm" in r]
    decisions = []
    for i, record in enumerate(records):
        before = records[i - 5:i] if i >= 5 else []
        z = [(record[k] - statistics.fmean(v)) / statistics.pstdev(v) for k in ("loss", "grad_norm")
             if (v := [r[k] for r in before])]
        decisions.append((any(x > 1 for x in z), bool(record.get("skipped"))))
    assert all(expected == skipped for expected, skipped in decisions), decisions
    assert 0 < sum(skipped for _, skipped in decisions) == len(decisions) - 40  # both ways; 40 steps taken
    straight, split = train_losses(data_dir / "straight"), train_losses(data_dir / "split")
    assert sorted(split) == list(range(1, 41)) and all(straight[s] == split[s] for s in range(1, 41))
    assert ([r["step"] for r in log_records(data_dir / "split") if r.get("skipped")] ==
            [r["step"] for r in records if r.get("skipped")])


def test_exact_resume_two_ranks(data_dir):
    """Two ranks, stopped and resumed: the same losses bit for bit, and the same final weights and AdamW state.
    The resumed half shards AdamW's state over the ranks (--shard_optimizer, ZeRO-1): it loads the unsharded
    checkpoint, takes the same steps, and gathers a whole optimizer state into its own final checkpoint. With rope,
    whose angles (buffers) DDP does not broadcast: every rank computes them alike."""
    args = [*ARGS, "--gradient_accumulation_steps=2", "--dropout=0.1",  # dropout: each rank's RNG must be restored
            "--rope=True"]
    run_torchrun(data_dir, *args, "--max_iters=30", "--eval_interval=1000", "--out_dir=straight")
    run_torchrun(data_dir, *args, "--max_iters=13", "--eval_interval=1000", "--out_dir=split")
    out = run_torchrun(data_dir, *args, "--max_iters=30", "--eval_interval=1000", "--out_dir=split",
                       "--init_from=resume", "--shard_optimizer=True")
    assert "its state sharded over the 2 processes (ZeRO-1)" in out.stdout
    straight, split = train_losses(data_dir / "straight"), train_losses(data_dir / "split")
    assert all(straight[s] == split[s] for s in range(1, 31))
    ends = [torch.load(data_dir / d / "ckpt.pt", weights_only=False) for d in ("straight", "split")]
    assert all(torch.equal(ends[0]["model"][k], ends[1]["model"][k]) for k in ends[0]["model"])
    states = [end["optimizer"]["state"] for end in ends]
    assert sorted(states[1]) == sorted(states[0]) == list(range(len(states[0])))
    assert all(torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in ("exp_avg", "exp_avg_sq"))


def test_muon_resumes_exactly_sharded_or_not(data_dir):
    """optimizer=muon on two ranks: a run whose first half shards Muon's and AdamW's states (ZeRO-1) and whose second
    half resumes unsharded matches an uninterrupted unsharded run bit for bit, losses, weights and both optimizers'
    states, and spike skips (set to trip on noise); a resume that asks for the other optimizer is refused in one line,
    the checkpoint untouched, while an evaluation of it takes the checkpoint's optimizer."""
    args = [*ARGS, "--gradient_accumulation_steps=2", "--dropout=0.1", "--optimizer=muon", "--eval_interval=1000",
            "--skip_spikes=1", "--spike_window=5"]  # spikes too: the ranks must skip alike, across the resume
    run_torchrun(data_dir, *args, "--max_iters=20", "--out_dir=straight")
    out = run_torchrun(data_dir, *args, "--max_iters=9", "--out_dir=split", "--shard_optimizer=True",
                       "--save_interval=4")  # gathered anew for each save: rank 0 lets each gathered copy go
    assert "optimizer: Muon for the blocks' weight matrices, AdamW for the rest, its state sharded over the 2" \
        in out.stdout
    before = (data_dir / "split/ckpt.pt").read_bytes()
    refused = run_here("train.py", *args, "--max_iters=20", "--out_dir=split", "--init_from=resume",
                       "--optimizer=adamw", cwd=data_dir, check=False)
    assert refused.returncode != 0 and "trained with optimizer='muon', this run asks for 'adamw'" in refused.stderr
    assert (data_dir / "split/ckpt.pt").read_bytes() == before
    run_torchrun(data_dir, *args, "--max_iters=20", "--out_dir=split", "--init_from=resume")
    straight, split = train_losses(data_dir / "straight"), train_losses(data_dir / "split")
    assert sorted(split) == list(range(1, 21)) and all(straight[s] == split[s] for s in range(1, 21))
    skips = [[r["step"] for r in log_records(data_dir / d) if r.get("skipped")] for d in ("straight", "split")]
    assert skips[0] == skips[1] and skips[0]
    ends = [torch.load(data_dir / d / "ckpt.pt", weights_only=False) for d in ("straight", "split")]
    assert all(torch.equal(ends[0]["model"][k], ends[1]["model"][k]) for k in ends[0]["model"])
    for name, keys in (("muon", ("momentum_buffer",)), ("adamw", ("exp_avg", "exp_avg_sq"))):
        states = [end["optimizer"][name]["state"] for end in ends]
        assert sorted(states[0]) == sorted(states[1]) and states[0]
        assert all(torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in keys)
    # an evaluation of the checkpoint needs no --optimizer: it takes the checkpoint's
    out = run_here("train.py", *[a for a in args if a != "--optimizer=muon"], "--out_dir=split", "--eval_only=True",
                   "--init_from=auto", cwd=data_dir)
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == 20


def test_cuda_rng_state_is_this_gpus_own(monkeypatch):
    """A checkpoint keeps each process's own GPU's random state, and a resume restores it onto the GPU the process
    uses now, however many GPUs it sees (the states of every visible GPU, saved before, failed to restore where fewer
    were visible). Older checkpoints' lists give this GPU's entry. torch.cuda is a stand-in: CI has no GPU."""
    import train
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.update({torch.device(device).index or 0: state}))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    saved = train.rng_state("cuda:3")  # local rank 3 of 4
    assert saved["cuda"] is states[3]
    train.set_rng_state(saved, "cuda:0")  # resumed where this rank's GPU is cuda:0 (a 1-GPU job, 4 nodes of 1)
    assert restored == {0: states[3]}
    for old, device, expected in [(states, "cuda:2", {2: states[2]}), (states, "cuda", {0: states[0]}),
                                  (states[:1], "cuda:2", {})]:  # fewer GPUs than its index: left as seeded
        restored.clear()
        train.set_rng_state({**saved, "cuda": old}, device)
        assert restored == expected
    assert train.rng_state("cpu")["cuda"] is None


def test_resume_refuses_other_model(data_dir):
    run_here("train.py", *ARGS, "--max_iters=3", "--eval_interval=3", "--out_dir=out", cwd=data_dir)
    proc = run_here("train.py", *ARGS, "--max_iters=6", "--n_layer=3", "--out_dir=out", "--init_from=resume",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "n_layer: checkpoint 2, now 3" in proc.stderr


def test_rope_model_trains_samples_resumes_and_grows_its_context(data_dir, monkeypatch, capsys):
    """--rope=True: the run learns, its checkpoint says rope and has no position table, sample.py writes from it,
    a resume that asks for learned positions is refused (the weights were trained for rotated queries and keys), and
    a new run from its weights may take a longer context."""
    monkeypatch.chdir(data_dir)
    train_here(capsys, *ARGS, "--rope=True", "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2",
               "--out_dir=out")
    evals = [r["val_loss"] for r in log_records("out") if "val_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.5, evals
    checkpoint = load_checkpoint("out")
    assert checkpoint["model_args"]["rope"] is True and not any("wpe" in k for k in checkpoint["model"])
    sample = run_here("sample.py", "--out_dir=out", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40",
                      "--device=cpu", cwd=data_dir)
    assert sample.stdout.startswith("ROMEO:") and len(sample.stdout) > 40
    proc = run_here("train.py", *ARGS, "--rope=False", "--max_iters=40", "--out_dir=out", "--init_from=resume",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "rope: checkpoint True, now False" in proc.stderr
    out = train_here(capsys, *ARGS, "--rope=True", "--block_size=64", "--max_iters=4", "--eval_interval=4",
                     "--init_from=out", "--out_dir=long")  # twice the context: a learned table could not grow
    assert "note: block_size=64 is longer than the 32 tokens out was trained on" in out
    longer = [r["val_loss"] for r in log_records("long") if "val_loss" in r]
    assert len(longer) == 2 and longer[0] < evals[0] - 0.5  # it starts from the trained weights
    assert load_checkpoint("long")["model_args"]["block_size"] == 64


def test_auto_resume(data_dir):
    out = run_here("train.py", *ARGS, "--max_iters=3", "--eval_interval=3", "--out_dir=out", "--init_from=auto",
                   cwd=data_dir)
    assert "resumed" not in out.stdout
    # where it looked, for a run started from another folder with a relative out_dir (trial)
    assert f"init_from=auto: no checkpoint at {data_dir / 'out/ckpt.pt'}: a new run starts from scratch" in out.stdout
    out = run_here("train.py", *ARGS, "--max_iters=5", "--eval_interval=5", "--out_dir=out", "--init_from=auto",
                   cwd=data_dir)
    assert "resumed from out/ckpt.pt at step 3" in out.stdout


def big_checkpoint(value):
    return {"model": {"w": torch.full((4_000_000,), float(value))}, "model_args": {}, "step": value}


def test_kill_during_save_keeps_previous(tmp_path):
    """kill -9 at random moments while a checkpoint is being written: the previous one always loads. The writer is
    killed after one or two complete saves (a slow disk once made every kill land in the second save, so every load
    found step 1 and the check that later saves replace earlier ones saw nothing)."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), big_checkpoint(0))
    writer = ("import sys; sys.path.insert(0, sys.argv[1]); import torch; from checkpoint import save_checkpoint\n"
              "for i in range(1, 10**6):\n"
              "    save_checkpoint(sys.argv[2], {'model': {'w': torch.full((4_000_000,), float(i))}, "
              "'model_args': {}, 'step': i})\n"
              "    print(i, flush=True)\n")
    for i, delay in enumerate((0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15)):  # a 16 MB save with fsync takes ~0.1 s
        saves = 1 + i % 2
        proc = subprocess.Popen([sys.executable, "-c", writer, REPO, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(saves):
            proc.stdout.readline()  # that many saves have completed; the next one is being written now
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ckpt = load_checkpoint(str(path))
        assert torch.equal(ckpt["model"]["w"], torch.full((4_000_000,), float(ckpt["step"])))
        assert ckpt["step"] >= saves


@pytest.mark.parametrize("n, target, saved", [(2, "best", 4), (1, "ckpt_00000004", 4), (2, "ckpt", 2)])
def test_kill_within_a_save_then_best_is_the_best(data_dir, n, target, saved):
    """A kill between a save's files (before the nth replace onto one of them: step 4's save, a better val loss than
    step 2's): the resume goes on from ckpt.pt, the last one complete, leaving nothing aside, and best.pt is the best
    ckpt.pt records. A kill just before best.pt's link left it at step 2, older and worse (trial): the resume links
    it, saying so."""
    args = [*ARGS, "--eval_interval=2", "--always_save_checkpoint=False", "--learning_rate=3e-3", "--warmup_iters=0",
            "--out_dir=out"]
    killed_at_replace(n, rf"out/{target}\.pt", "train.py", *args, "--max_iters=6", cwd=data_dir)
    out = run_here("train.py", *args, "--max_iters=4", "--init_from=auto", cwd=data_dir).stdout
    assert f"resumed from out/ckpt.pt at step {saved}" in out and not list(data_dir.glob("out/after_*"))
    # (the killed run may have logged step 6 before the kill on the writer thread: trimmed when a resume trains)
    evals = {r["step"]: r["val_loss"] for r in log_records(data_dir / "out") if "val_loss" in r and r["step"] <= 4}
    assert len(evals) == 3 and evals[4] < evals[2]  # the test's premise: step 4 is the better save
    assert load_checkpoint(str(data_dir / "out/best.pt"))["step"] == 4
    assert ("note: out/best.pt is now out/ckpt.pt's step 4, the best, which a killed save had not linked yet" in out) \
        == (saved == 4)


def test_out_dir_moved_while_training_stops_the_run(data_dir):
    """A run's folder moved away while it trains (mv out elsewhere): its next save made a new, empty folder by the old
    name, and the run went on in two, its log in one and its later checkpoints in the other (trial). It stops
    instead, saying so, and nothing is made at the old path."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--max_iters=100000", "--eval_interval=5",
           "--lr_decay_iters=100000", "--out_dir=out"]
    proc = subprocess.Popen(cmd, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("saved checkpoint out/ckpt.pt at step 5"):
                break
        os.rename(data_dir / "out", data_dir / "moved")
        assert proc.wait(timeout=120) == 2
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "error: out was moved or removed while this run was going, its checkpoints and log with it" in err, err
    assert not (data_dir / "out").exists() and (data_dir / "moved/ckpt_00000005.pt").exists()


def test_unfinished_checkpoint_files_are_removed(data_dir, monkeypatch, capsys):
    """What a kill -9 in a checkpoint write leaves (ckpt.pt.tmp<pid>, a numbered checkpoint's link not yet renamed)
    is removed by the next run in the folder, which holds its lock: a GPT-2 run killed by the out-of-memory killer
    left a file of gigabytes per kill (trial). Names that only resemble them stay."""
    monkeypatch.chdir(data_dir)
    train_here(capsys, *ARGS, "--max_iters=2", "--eval_interval=2", "--out_dir=out")
    for name in ("ckpt.pt.tmp4242", "ckpt_00000004.pt.tmplink", "best.pt.tmp17", "notes.pt.tmp1", "ckpt.pt.tmpx"):
        (data_dir / "out" / name).write_bytes(b"\0" * 1000)
    out = train_here(capsys, *ARGS, "--max_iters=3", "--eval_interval=3", "--out_dir=out", "--init_from=resume")
    assert "removed 3 unfinished checkpoint file(s) a killed run left in out (0.0 MiB): best.pt.tmp17, " \
           "ckpt.pt.tmp4242, ckpt_00000004.pt.tmplink" in out
    assert sorted(n for n in os.listdir("out") if ".tmp" in n) == ["ckpt.pt.tmpx", "notes.pt.tmp1"]
    assert "resumed from out/ckpt.pt at step 2" in out


def test_rolling_and_milestone_checkpoints(tmp_path):
    for step in range(100, 1100, 100):
        save_training_checkpoint(str(tmp_path), big_checkpoint(step) | {"step": step}, step, keep_last_n=2,
                                 keep_every=[(500, None)] if step < 700 else [(300, None), (500, None)])  # a resume
    # at 700 added 300
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt"))
    assert names == ["ckpt.pt", "ckpt_00000500.pt", "ckpt_00000600.pt", "ckpt_00000900.pt", "ckpt_00001000.pt"]
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 1000


def test_milestones_outlive_a_resume_without_keep_every(data_dir, monkeypatch, capsys):
    """Checkpoints kept "for good" stay when a resume leaves keep_every out (or changes it): it once took them for
    rolling ones and deleted them, with only "keep_every 20 -> 0" among the changed settings to say so. Later
    checkpoints follow the new setting (a trial's --keep_every=0 once went on keeping every multiple of the old one)."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=1000", "--save_interval=10", "--keep_last_n=2", "--out_dir=out"]
    train_here(capsys, *args, "--max_iters=40", "--keep_every=20")
    out = train_here(capsys, *args, "--max_iters=100", "--init_from=resume", "--keep_every=0")
    assert "note: the checkpoints kept for good so far (ckpt_00000020.pt, ckpt_00000040.pt) stay kept" in out
    assert sorted(s for s, _ in step_checkpoints("out")) == [20, 40, 90, 100]  # not 60 and 80
    out = train_here(capsys, *args, "--max_iters=120", "--init_from=resume")
    assert "kept for good" not in out  # nothing dropped this time
    train_here(capsys, *args, "--max_iters=150", "--init_from=resume", "--keep_every=30")  # 120 stays, 140 goes
    assert sorted(s for s, _ in step_checkpoints("out")) == [20, 40, 120, 140, 150]
    # the note only where such checkpoints exist (a trial's stopped before its first milestone)
    train_here(capsys, *args, "--max_iters=10", "--keep_every=50", "--out_dir=early")
    out = train_here(capsys, *args, "--max_iters=20", "--init_from=resume", "--out_dir=early")
    assert "kept for good" not in out


def test_corrupt_checkpoint_detected(tmp_path):
    for step in (100, 200):
        save_training_checkpoint(str(tmp_path), big_checkpoint(step), step, keep_last_n=5)
    os.unlink(tmp_path / "ckpt_00000200.pt")  # keep the 100 one as the fallback; ckpt.pt is step 200
    data = bytearray((tmp_path / "ckpt.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: torch.load alone does not notice
    (tmp_path / "ckpt.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt.*ckpt_00000100.pt \(step 100\) may be intact"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "ckpt.pt").write_bytes(bytes(data[:len(data) // 3]))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(str(tmp_path))


def test_corrupt_settings_detected(tmp_path):
    """A flipped byte in the pickled part, in a value that is no tensor (a setting, the vocabulary): torch.load reads
    it and the tensors' checksum (which covers the keys too) cannot see it (trial G); the archive's CRC-32 can. A
    byte flipped in the zip headers torch.load reads past is no traceback (a review found 33 such bytes), and
    archives written without CRCs still load."""
    path, state = tmp_path / "ckpt.pt", {"model": {"w": torch.ones(3)}, "model_args": {}, "config": {"dataset": "owt"}}
    save_checkpoint(str(path), state)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"owt", b"oxt"))
    assert torch.load(path, weights_only=False)["config"] == {"dataset": "oxt"}  # what went unnoticed
    with pytest.raises(CheckpointError, match="ckpt.pt is corrupt: its settings and vocabulary fail the checks"):
        load_checkpoint(str(path))
    for i in range(len(data)):  # a flipped byte anywhere (zip headers too): loaded or refused, never a traceback
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
        try:
            load_checkpoint(str(path))
        except CheckpointError:
            pass
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(str(path), state)
    finally:
        torch.serialization.set_crc32_options(before)
    assert load_checkpoint(str(path))["config"] == {"dataset": "owt"}


def test_fallback_hint_fits_the_checkpoint(tmp_path):
    """A bad numbered checkpoint that is not the run's latest: the one before it, to read as it is (a trial was told
    to ln it over the bad one's name and resume, from sample.py). Nothing before it: for ckpt.pt, train anew."""
    for step in (100, 200, 300):
        save_training_checkpoint(str(tmp_path), big_checkpoint(step), step, keep_last_n=5)
    (tmp_path / "ckpt_00000200.pt").write_bytes(b"garbage")  # ckpt.pt is step 300's, intact
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path / "ckpt_00000200.pt"))
    older = tmp_path / "ckpt_00000100.pt"
    assert str(error.value).endswith(f"the previous checkpoint {older} (step 100) may be intact: give {older} instead "
                                     f"(--init_from={older}; export.py: --out_dir={older})")
    (tmp_path / "best.pt").write_bytes(b"garbage")  # best.pt: not "previous" to anything, and no resume reads it
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path / "best.pt"))
    newest = tmp_path / "ckpt_00000300.pt"
    assert str(error.value).endswith(f"another checkpoint of the run, {newest} (step 300), may be intact: give "
                                     f"{newest} instead (--init_from={newest}; export.py: --out_dir={newest})")
    save_training_checkpoint(str(tmp_path / "one"), big_checkpoint(5), 5, keep_last_n=0)
    (tmp_path / "one" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no earlier checkpoint to fall back to: train anew, in another "
                                              "--out_dir or with this one's checkpoints deleted$"):
        load_checkpoint(str(tmp_path / "one"))


def test_fallback_hint_works_through_hard_links(tmp_path):
    """ckpt.pt is a hard link to the newest numbered checkpoint: the command the error suggests must not write the
    older checkpoint's bytes into the newer one's name."""
    for step in (100, 200):
        save_training_checkpoint(str(tmp_path), big_checkpoint(step), step, keep_last_n=5)
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")  # through the link: ckpt_00000200.pt is damaged too
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path))
    command = str(error.value).split("may be intact: ")[1].split(" and resume")[0]
    subprocess.run(command, shell=True, check=True)
    assert load_checkpoint(str(tmp_path))["step"] == 100
    assert (tmp_path / "ckpt_00000200.pt").read_bytes() == b"garbage"  # not a copy of step 100 under step 200's name


def test_a_missing_ckpt_pt_names_the_runs_other_checkpoints(tmp_path):
    """ckpt.pt deleted or moved, the numbered checkpoints and best.pt still there: not "train one first" (a trial),
    but the newest to give instead, and the link that resumes from it (which then works)."""
    for step in (100, 200):
        save_training_checkpoint(str(tmp_path), big_checkpoint(step), step, keep_last_n=5)
    os.unlink(tmp_path / "ckpt.pt")
    newest = tmp_path / "ckpt_00000200.pt"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(str(tmp_path))
    assert str(error.value) == (f"no checkpoint at {tmp_path}/ckpt.pt, but the run's other checkpoints are there: "
                                f"give {newest} instead (--init_from={newest}; export.py: --out_dir={newest}), or, "
                                f"to resume training from it, link it first: ln -f {newest} {tmp_path}/ckpt.pt")
    subprocess.run(str(error.value).split("link it first: ")[1], shell=True, check=True)
    assert load_checkpoint(str(tmp_path))["step"] == 200
    # a checkpoint of a later format: its keys may mean what this code cannot know
    torch.save({"format": 2, "weights": {}}, tmp_path / "new.pt")  # keys renamed, no checksum: still told apart
    with pytest.raises(CheckpointError, match=r"new.pt is a checkpoint of format 2, newer than this toolkit reads "
                                              r"\(1\): update the toolkit \(git pull\)"):
        load_checkpoint(str(tmp_path / "new.pt"))


def test_prefixes_stripped(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": {"_orig_mod.module.lm_head.weight": torch.ones(1),
                                                          "module.wte": torch.ones(1)}, "model_args": {}})
    assert set(load_checkpoint(str(tmp_path))["model"]) == {"lm_head.weight", "wte"}


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR1, 3), (signal.SIGTERM, 3), (signal.SIGINT, 130)])
def test_signal_saves_and_resumes(data_dir, sig, code):
    """Slurm's and torchrun's signals and Ctrl-C save at the next step boundary; Ctrl-C's exit code is the shell's,
    130, so that no requeueing script takes it for "run me again" (3)."""
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--max_iters=100000", "--lr_decay_iters=100000",
           "--eval_interval=100000", "--out_dir=out"]
    proc = subprocess.Popen(cmd, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 5 |"):
            break
    proc.send_signal(sig)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == code, rest
    assert f"stopping on {sig.name}" in rest and "Traceback" not in rest
    # not from scratch: that would be refused, since out holds a checkpoint now
    assert f"exiting with code {code}: run the same command with --init_from=auto to resume" in rest
    saved = torch.load(data_dir / "out/ckpt.pt", weights_only=False)["step"]
    assert saved >= 5
    out = run_here("train.py", *ARGS, "--max_iters=20", "--lr_decay_iters=100000", "--eval_interval=100000",
                   "--out_dir=out", "--init_from=resume", cwd=data_dir)
    assert f"resumed from out/ckpt.pt at step {saved}" in out.stdout


@pytest.mark.parametrize("nohup", [False, True])
def test_hangup_saves_or_goes_on(data_dir, nohup):
    """A lost ssh connection: the terminal hangs up, so writes to it fail (EIO), and SIGHUP comes. The run saves at
    the next step boundary and exits 3, as on SIGTERM, where it used to die with the steps since its last save. Under
    nohup (SIGHUP ignored) it goes on to its end, its output gone. The run writes to a dead terminal before the
    signal comes: it keeps training through that too."""
    import pty
    master, terminal = pty.openpty()
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, f"--max_iters={40 if nohup else 100000}",
           "--lr_decay_iters=100000", "--eval_interval=100000", "--out_dir=out"]
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None
    proc = subprocess.Popen(cmd, cwd=data_dir, stdout=terminal, stderr=terminal, preexec_fn=ignore)
    os.close(terminal)
    try:
        seen = b""
        while b"step 5 |" not in seen:
            seen += os.read(master, 4096)
        os.close(master)  # the hang-up
        while b'"step": 10,' not in (data_dir / "out/log.jsonl").read_bytes():  # printing into the dead terminal
            assert proc.poll() is None, "the run died on writing to a terminal that hung up"
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == (0 if nohup else 3)
    finally:
        proc.kill()
    saved = torch.load(data_dir / "out/ckpt.pt", weights_only=False)["step"]
    assert saved == 40 if nohup else saved >= 10
    assert max(r["step"] for r in log_records(data_dir / "out")) <= saved  # every logged step is in the checkpoint


def test_ctrl_c_cuts_an_evaluation_short(data_dir):
    """Ctrl-C during an evaluation (200 batches take minutes on a CPU) stops at the next batch, saves the step without
    that evaluation, and the resumed run evaluates it; resuming a finished run says there is nothing to train."""
    run_here("train.py", *ARGS, "--max_iters=5", "--eval_interval=5", "--out_dir=out", cwd=data_dir)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--max_iters=20", "--eval_interval=5",
           "--out_dir=out", "--init_from=auto", "--eval_iters=10000000"]  # an evaluation of hours at step 10
    proc = subprocess.Popen(cmd, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 10 |"):
                break
        time.sleep(1)  # into the evaluation
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()  # not left evaluating for hours when the evaluation was not cut short
    rest = proc.stdout.read()
    assert "step 10: evaluation abandoned to stop" in rest and "saved checkpoint out/ckpt.pt at step 10" in rest, rest
    assert "train loss" not in rest and "Traceback" not in rest
    out = run_here("train.py", *ARGS, "--max_iters=10", "--eval_interval=5", "--out_dir=out", "--init_from=auto",
                   cwd=data_dir).stdout
    assert "resumed from out/ckpt.pt at step 10" in out and "step 10: train loss" in out  # evaluated now
    out = run_here("train.py", *ARGS, "--max_iters=10", "--eval_interval=5", "--out_dir=out", "--init_from=auto",
                   cwd=data_dir).stdout
    assert "nothing to train: the checkpoint is at step 10 and max_iters is 10; raise --max_iters" in out
    assert "train loss" not in out  # step 10 was evaluated before this checkpoint
    assert out.rstrip().endswith("to train on")  # its last word: no compile or evaluation lines after it (a trial)


def test_max_runtime(data_dir):
    # the clock starts before the model is built: 3 s left no step on a busy machine
    proc = run_here("train.py", *ARGS, "--max_iters=100000", "--eval_interval=100000", "--max_runtime=0:00:10",
                    "--out_dir=out", cwd=data_dir, check=False)
    assert proc.returncode == 3 and "stopping on max_runtime" in proc.stdout
    assert load_checkpoint(str(data_dir / "out"))["step"] > 0


def test_bad_steps_skipped_then_stop(data_dir, monkeypatch, capsys):
    """A NaN loss never reaches the weights; enough of them in a row stop the run without saving."""
    import configurator
    import model as model_module
    import train

    real_forward = model_module.GPT.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (3, 4) or calls["n"] >= 8:  # two bad steps, then a lasting failure from step 7
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", flaky_forward)
    monkeypatch.chdir(data_dir)
    cfg, sources = configurator.parse(train.TrainConfig, [*ARGS, "--max_iters=30", "--eval_interval=100",
                                                          "--max_bad_steps=3", "--out_dir=out"])
    with pytest.raises(configurator.UserError, match="3 steps in a row up to step 5 had a non-finite loss"):
        train.main(cfg, sources)
    printed = capsys.readouterr().out
    assert "step 2: non-finite loss nan" in printed and "step 3 | loss" in printed  # skipped, then went on
    records = log_records(data_dir / "out")
    assert [r["step"] for r in records if r.get("skipped")] == [2, 2, 5, 5, 5]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN was ever logged as a step
    assert not os.path.exists(data_dir / "out/ckpt.pt")


@pytest.mark.parametrize("ending", ["done", "stop", "error"])
def test_model_is_gone_before_the_process_group(data_dir, monkeypatch, capsys, ending):
    """train.main leaves the process group only once the model is freed, however the run ends: freed after the group,
    the DDP reducer destroys it while holding the interpreter lock, and a gloo rank can hang at exit (it did, after
    a preemption stop under srun: the stop path left the group before raising SystemExit). Checked in one process,
    where the same code runs without DDP, by whether the model still exists when cleanup is called."""
    import weakref

    import model as model_module
    import train

    models, alive_at_cleanup = [], []
    real_init = model_module.GPT.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        models.append(weakref.ref(self))

    def failing_forward(self, *args, **kwargs):
        raise RuntimeError("a failing step")

    monkeypatch.setattr(model_module.GPT, "__init__", recording_init)
    if ending == "error":
        monkeypatch.setattr(model_module.GPT, "forward", failing_forward)
    monkeypatch.setattr(train, "cleanup_distributed",
                        lambda: alive_at_cleanup.append([m() is not None for m in models]))
    monkeypatch.chdir(data_dir)
    max_runtime = ["--max_runtime=0:00:01", "--max_iters=100000"] if ending == "stop" else ["--max_iters=3"]
    expected = {"done": contextlib.nullcontext(), "stop": pytest.raises(SystemExit, match="3"),
                "error": pytest.raises(RuntimeError, match="a failing step")}[ending]
    with expected:
        train_here(capsys, *ARGS, *max_runtime, "--eval_interval=100000", "--out_dir=out")
    assert len(models) == 1 and alive_at_cleanup == [[False]]


def test_snapshot_is_a_copy():
    """What a background write takes must not change when the next optimizer steps update the weights in place."""
    weights, step = torch.ones(3), torch.tensor(5.0)
    state = {"model": {"w": weights}, "optimizer": {"state": {0: {"step": step}}, "param_groups": [{"lr": 0.1}]},
             "rng": [(torch.zeros(2, dtype=torch.uint8), "MT19937")], "step": 7}
    copy = snapshot(state)
    weights.add_(1.0)
    step.add_(1.0)
    assert torch.equal(copy["model"]["w"], torch.ones(3)) and copy["optimizer"]["state"][0]["step"].item() == 5.0
    assert copy["optimizer"]["param_groups"] == [{"lr": 0.1}] and copy["step"] == 7
    assert isinstance(copy["rng"][0], tuple) and copy["rng"][0][1] == "MT19937"



def test_snapshot_keeps_tied_weights_one_tensor(tmp_path):
    """The embedding and the output layer share one weight; the background copy must not write it twice."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=64))
    state = {"model": model.state_dict(), "step": 1}
    copy = snapshot(state)["model"]
    assert copy["lm_head.weight"] is copy["transformer.wte.weight"]
    assert copy["transformer.h.0.attn.c_attn.weight"] is not copy["transformer.h.0.mlp.c_fc.weight"]
    save_checkpoint(tmp_path / "direct.pt", state)
    save_checkpoint(tmp_path / "copied.pt", {"model": copy, "step": 1})
    assert os.path.getsize(tmp_path / "copied.pt") == os.path.getsize(tmp_path / "direct.pt")


def test_writer_reports_every_failure_in_order():
    """Two background writes fail: the first error is raised, and the second is still there for the next call."""
    import threading

    from checkpoint import Writer
    go = threading.Event()

    def fail(message):
        go.wait()  # both are queued before either fails
        raise OSError(message)

    writer = Writer(background=True)
    writer.submit(fail, "first")
    writer.submit(fail, "second")
    writer.submit(lambda: None)
    go.set()
    with pytest.raises(OSError, match="first"):
        writer.wait()
    assert writer.failed()
    with pytest.raises(OSError, match="second"):
        writer.check()
    assert not writer.failed()
    writer.close()


@pytest.mark.parametrize("background", [True, False])
def test_writer_raises_a_failure_only_when_asked(background, capsys):
    """In either mode, submit never raises an earlier write's failure (train.py's rank 0 would stop alone there);
    failed() tells, and check() raises it. Closing for another error reports it, with no talk of waiting."""
    from checkpoint import Writer

    def fail():
        raise OSError("disk full")

    writer = Writer(background=background)
    writer.submit(fail)
    writer.wait(raise_error=False)
    assert writer.failed()
    written = []
    writer.submit(written.append, "plot")  # the failure stays pending; later writes still run
    writer.wait(raise_error=False)
    assert written == ["plot"] and writer.failed()
    with pytest.raises(OSError, match="disk full"):
        writer.check()
    assert not writer.failed()
    writer.submit(fail)
    writer.wait(raise_error=False)
    capsys.readouterr()
    writer.close(report_only=True)
    assert capsys.readouterr().err == "error: disk full\n"


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_checkpoint_write_stops_the_run(data_dir, async_save):
    """A checkpoint that cannot be written (here ckpt.pt is a folder) ends the run with one message, not silently,
    also when it is written in the background; no temporary file is left behind."""
    os.makedirs(data_dir / "out/ckpt.pt")
    proc = run_here("train.py", *ARGS, "--max_iters=8", "--eval_interval=2", f"--async_save={async_save}",
                    "--out_dir=out", cwd=data_dir, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: could not write a checkpoint to out" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(data_dir / "out")) == ["ckpt.pt", "log.jsonl", "train.lock"]
    assert "nothing was saved yet: free some space or fix the folder, then run the same command again" in proc.stderr


def test_failed_background_write_stops_the_run_at_once(data_dir):
    """The only checkpoint (step 2; the learning rate is 0 afterwards, so val loss never improves again and nothing
    else is submitted) fails on the writer thread: the run stops soon after, not after max_iters steps."""
    os.makedirs(data_dir / "out/ckpt.pt")
    proc = run_here("train.py", *ARGS, "--max_iters=300", "--eval_interval=2", "--warmup_iters=0",
                    "--lr_decay_iters=2", "--min_lr=0", "--always_save_checkpoint=False", "--out_dir=out",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "error: could not write a checkpoint to out" in proc.stderr, proc.stderr[-2000:]
    assert "saved checkpoint" not in proc.stdout
    assert max(r["step"] for r in log_records(data_dir / "out")) < 100


@pytest.mark.parametrize("async_save,max_iters,eval_interval", [(True, 300, 2), (False, 300, 2), (True, 4, 4)])
def test_failed_write_on_rank_0_stops_every_rank(data_dir, async_save, max_iters, eval_interval):
    """The same failure with two ranks, started by hand to see each one's exit: every rank stops at the same step,
    rank 0 with the message and rank 1 quietly with the same code, whether rank 0 writes in the background or in the
    loop. Rank 0 stopping alone would leave rank 1 waiting in its next collective (with NCCL, for the process group's
    whole timeout). With max_iters=4 the write that fails is the only one, of the final checkpoint: rank 1, done
    training, still exits with rank 0's code, not 0."""
    os.makedirs(data_dir / "out/ckpt.pt")
    port = free_port()
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, f"--max_iters={max_iters}",
           f"--eval_interval={eval_interval}",
           "--warmup_iters=0", "--lr_decay_iters=2", "--min_lr=0", "--always_save_checkpoint=False",
           "--gradient_accumulation_steps=2", f"--async_save={async_save}", "--out_dir=out"]
    procs = [subprocess.Popen(cmd, cwd=data_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for rank in (0, 1)]
    (out0, err0), (_, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert "error: could not write a checkpoint to out" in err0 and "Traceback" not in err0 + err1
    last = max(r["step"] for r in log_records(data_dir / "out"))
    assert last < 100 and "step 100 |" not in out0 and (max_iters > 4 or last == 4)


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_stops_the_run_with_a_message(data_dir, small_disk, async_save):
    """torch.save on a full disk raises a RuntimeError from its zip writer, not an OSError: the same message, and no
    temporary file left to fill the disk."""
    proc = run_here("train.py", *ARGS, "--max_iters=8", "--eval_interval=2", f"--async_save={async_save}",
                    f"--out_dir={small_disk}", cwd=data_dir, check=False)
    assert proc.returncode == 2 and f"error: could not write a checkpoint to {small_disk}" in proc.stderr, \
        proc.stderr[-2000:]
    assert "the disk is probably full (" in proc.stderr  # torch's own words say only "unexpected pos"
    assert "nothing was saved yet: free some space or fix the folder, then run the same command again" in proc.stderr
    # not resumed when there is nothing to resume (a trial was told to); when there is, said so
    import train
    (data_dir / "out").mkdir()
    (data_dir / "out/ckpt.pt").write_bytes(b"an earlier save")
    said = str(train.disk_error("could not write", OSError(28, "No space left on device"), data_dir / "out/ckpt.pt"))
    assert said.endswith(f"{data_dir}/out/ckpt.pt is a complete checkpoint (this save's, when only a link of it "
                         "failed): free some space or fix the folder, then resume with --init_from=resume")
    assert "Traceback" not in proc.stderr and sorted(os.listdir(small_disk)) == ["log.jsonl", "train.lock"]


def test_full_disk_while_logging_stops_the_run_with_a_message(data_dir, small_disk):
    """log.jsonl cannot grow on a full disk: the run stops at the next step boundary, in one line, as when a
    checkpoint cannot be written (on every rank: the same vote)."""
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # the disk is full
            pass
    proc = run_here("train.py", *ARGS, "--max_iters=100", "--eval_interval=50", f"--out_dir={small_disk}",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and f"error: could not append to {small_disk}/log.jsonl" in proc.stderr, \
        proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
    assert "step 1 |" not in proc.stdout  # stopped after the evaluation of step 0, whose record could not be written


def test_loss_plot_written(data_dir):
    """The plot of the run's log. The log of an earlier run there that saved no checkpoint (killed before its first
    save) is kept aside, not overwritten."""
    (data_dir / "out").mkdir()
    earlier = '{"step": 1, "loss": 9.0}\n' * 3
    for path in ("out/log.jsonl", "out/log.1.jsonl"):
        (data_dir / path).write_text(earlier)
    out = run_here("train.py", *ARGS, "--max_iters=4", "--eval_interval=2", "--plot=True", "--out_dir=out",
                   cwd=data_dir).stdout
    png = data_dir / "out/loss.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "note: out/log.jsonl of an earlier run that saved no checkpoint is kept as out/log.2.jsonl" in out
    assert (data_dir / "out/log.2.jsonl").read_text() == earlier
    assert [r["step"] for r in log_records(data_dir / "out") if "loss" in r] == [1, 2, 3, 4]


def test_empty_log_of_a_run_that_never_stepped_is_not_kept(data_dir, monkeypatch, capsys):
    """A run stopped before its first record leaves a log.jsonl with its start record at most (an out-of-memory in
    the first step, a Ctrl-C while compiling): the next one writes over it instead of keeping it aside as
    log.1.jsonl, one more with each such start (trial)."""
    monkeypatch.chdir(data_dir)
    (data_dir / "out").mkdir()
    for before in ("", json.dumps({"step": 0, "start": {}}) + "\n" + '{"step": 0, "st'):
        (data_dir / "out/log.jsonl").write_text(before)
        out = train_here(capsys, *ARGS, "--max_iters=1", "--eval_interval=1", "--out_dir=out")
        assert "kept as" not in out and sorted(os.listdir("out")) == ["ckpt.pt", "ckpt_00000001.pt", "log.jsonl",
                                                                       "train.lock"]
        assert ["start" in r for r in log_records("out")].count(True) == 1  # this run's, the earlier one's gone
        shutil.rmtree("out")
        os.mkdir("out")


def test_broken_matplotlib_turns_plotting_off(data_dir):
    """A matplotlib that is installed but fails to import (here one whose import raises) costs the plot, not the
    run: one message, and training goes on."""
    fake = data_dir / "fake_packages/matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libpng.so.16: cannot open shared object file')\n")
    proc = run_script("train.py", *ARGS, "--max_iters=6", "--eval_interval=2", "--plot=True", "--out_dir=out",
                      cwd=data_dir, env={"PYTHONPATH": str(data_dir / "fake_packages")})
    assert proc.stdout.count("plot: off (ImportError: libpng.so.16") == 1, proc.stdout[-2000:]
    assert "step 6: train loss" in proc.stdout and not (data_dir / "out/loss.png").exists()


def test_wandb_offline_resumes_same_run(data_dir):
    pytest.importorskip("wandb")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(data_dir))
    common = [sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--wandb_log=True", "--eval_interval=3",
              "--out_dir=out"]
    for extra in (["--max_iters=3"], ["--max_iters=6", "--init_from=resume"]):
        proc = subprocess.run(common + extra, cwd=data_dir, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(os.listdir(data_dir / "wandb"))
    run_ids = {name.rsplit("-", 1)[1] for name in runs if name.startswith("offline-run-")}
    assert len(run_ids) == 1, runs  # both runs logged to one wandb run
    assert torch.load(data_dir / "out/ckpt.pt", weights_only=False)["wandb_run_id"] in run_ids


def test_wandb_run_name(monkeypatch):
    """Runs without a name of their own are named by their out_dir's folder, where every one was 'run'."""
    import types

    import train
    started = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: started.append(kw["name"])))
    for out_dir, name in (("runs/lr3e-4/", ""), ("out", ""), ("out", "baseline")):
        train.start_wandb(train.TrainConfig(out_dir=out_dir, wandb_run_name=name), None)
    assert started == ["lr3e-4", "out", "baseline"]


def test_resume_applies_changed_settings(data_dir, shakespeare_path, monkeypatch, capsys):  # noqa: F811
    """weight_decay, beta1 and beta2 changed on resume are listed and are what AdamW then uses (the optimizer state
    loaded from the checkpoint carries the old ones; the no-decay group keeps none). A float32 run resumes in float16
    (its checkpoint has no loss scale) and back. With always_save_checkpoint=False
    a checkpoint is written only when the val loss beats the best: a resume that evaluates other tokens (here another
    batch_size, so other random batches) does not compare with the old best, which may be out of reach of the new
    estimate; its first evaluation sets the best anew, and saves. Unchanged settings keep the best; a dataset prepared
    anew under its name is other tokens too."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=4", "--always_save_checkpoint=False", "--out_dir=out"]
    train_here(capsys, *args, "--max_iters=4", "--weight_decay=0.1", "--beta2=0.95")
    same = train_here(capsys, *args, "--max_iters=4", "--init_from=auto", "--weight_decay=0.1", "--beta2=0.95")
    assert "measured on other tokens" not in same and "changed settings" not in same
    out = train_here(capsys, *args, "--max_iters=8", "--init_from=auto", "--batch_size=8", "--weight_decay=0.01",
                     "--beta1=0.8", "--beta2=0.99", "--dtype=float16")  # float32's scaler was off
    assert "weight_decay 0.1 -> 0.01" in out and "beta2 0.95 -> 0.99" in out
    assert "note: the val loss is now measured on other tokens (batch_size 4 -> 8)" in out, out
    # not "improved": there is nothing on this measure to improve on (a trial)
    assert "saved checkpoint out/ckpt.pt at step 8 (first val loss measured; also best.pt)" in out
    checkpoint = torch.load(data_dir / "out/ckpt.pt", weights_only=False)
    groups = checkpoint["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.01, (0.8, 0.99)), (0.0, (0.8, 0.99))]
    assert checkpoint["scaler"]["scale"] > 0  # float16 trains with a loss scale, saved for the next resume
    val = [r["val_loss"] for r in log_records(data_dir / "out") if r.get("step") == 8 and "val_loss" in r]
    assert checkpoint["best_val_loss"] == pytest.approx(val[0])
    with_tokens = train_here(capsys, *args, "--max_iters=8", "--init_from=auto", "--batch_size=8",
                             "--weight_decay=0.01", "--beta1=0.8", "--beta2=0.99",
                             "--eval_tokens=2000")  # nothing left to train: only the note
    assert "measured on other tokens (eval_tokens 0 -> 2000)" in with_tokens
    # prepared again from the same text (the same characters: the same vocabulary): the same tokens, no note; the
    # same tokens under another name (a copy), no note either (trial); then with val the text's last 20%: other tokens
    resume = [*args, "--max_iters=8", "--init_from=auto", "--batch_size=8", "--weight_decay=0.01", "--beta1=0.8",
              "--beta2=0.99"]
    prepare = ["prepare.py", "shakespeare_char", f"--source={shakespeare_path}"]
    run_script(*prepare, "--val_fraction=0.1", cwd=data_dir)
    assert "measured on other tokens" not in train_here(capsys, *resume)
    shutil.copytree(data_dir / "data/shakespeare_char", data_dir / "data/copy")
    again = train_here(capsys, *resume, "--dataset=copy")
    assert "dataset 'shakespeare_char' -> 'copy'" in again and "measured on other tokens" not in again
    run_script(*prepare, "--val_fraction=0.2", cwd=data_dir)
    assert "measured on other tokens (the val split of shakespeare_char was prepared anew)" in \
        train_here(capsys, *resume)
