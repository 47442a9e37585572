"""train.py's evaluation: passes of one shape that give the loss of the batches one by one."""

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from configurator import UserError
from conftest import REPO, run_here, run_script
from model import GPT, GPTConfig
from test_checkpoint import ARGS, data_dir, log_records, train_here  # noqa: F401 (a fixture)


def test_eval_passes_one_shape_same_loss(data_dir, monkeypatch, capsys):  # noqa: F811
    """batch_size 4 and eval_iters 6: eval_batch_size 16 would allow 4 batches per pass, but 6 = 4 + 2 would end
    with a smaller pass (torch.compile would compile again), so passes take 3; the loss is the same either way.
    (train.main in this process: four eval_only runs without four interpreter starts.)"""
    monkeypatch.chdir(data_dir)
    val_loss = {}
    for eval_batch_size, passes in ((0, "6 passes of 4 sequences"), (16, "2 passes of 12 sequences"),
                                    (24, "1 pass of 24 sequences"), (32, "1 pass of 24 sequences")):
        out = train_here(capsys, *ARGS, "--eval_iters=6", f"--eval_batch_size={eval_batch_size}", "--eval_only=True",
                         f"--out_dir=out{eval_batch_size}")
        assert f"evaluation: 6 batches per split, in {passes}" in out
        # a note says why 16 gives passes of 12 sequences, not 16 (32, one pass of all 24, needs none)
        assert ("allows 4 batches a pass, but only 3 divides eval_iters=6" in out) == (eval_batch_size == 16)
        val_loss[eval_batch_size] = json.loads(out.strip().splitlines()[-1])["val_loss"]
        assert not (data_dir / f"out{eval_batch_size}").exists()  # eval_only writes nothing
    assert abs(val_loss[16] - val_loss[0]) < 1e-5 and abs(val_loss[24] - val_loss[0]) < 1e-5
    assert 3.0 < val_loss[0] < 5.0  # an untrained model on 65 characters: about ln 65 = 4.17


def shards_of(tmp_path, name, counts, vocab_size):
    """Shards of consecutive ids (mod vocab_size), `counts` tokens each, and the whole sequence they hold."""
    from tokendata import Shard, write_tokens
    tokens = np.arange(sum(counts)) % vocab_size
    shards, begin = [], 0
    for i, count in enumerate(counts):
        path = str(tmp_path / f"{name}_{i:06d}.bin")
        write_tokens(path, tokens[begin:begin + count])
        shards.append(Shard(path, vocab_size=vocab_size))
        begin += count
    return shards, tokens


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_tokens_predict_every_token_once(tmp_path, world_size):
    """eval_tokens: all ranks' windows together predict each of a split's first eval_tokens tokens but the first
    exactly once, from the tokens before it in its window (across shard boundaries too); every pass of every rank and
    split has one shape, and every rank runs as many passes of a split."""
    from distributed import Launch
    from train import TrainConfig, evaluation_sets
    vocab = 60_000  # ids are positions: a target says which token it is
    shards = {"train": shards_of(tmp_path, "train", [300, 500], vocab)[0],
              "val": shards_of(tmp_path, "val", [150, 7], vocab)[0]}
    cfg = TrainConfig(batch_size=2, block_size=16, eval_tokens=700, eval_batch_size=4)
    targets, shapes = {"train": [], "val": []}, set()
    for rank in range(world_size):
        launch = Launch("torchrun", rank, rank, world_size)
        sets, described = evaluation_sets(shards, cfg, launch, lambda x, y: (x, y))
        assert "train 700 tokens in" in described and "val 157 tokens (all of it) in" in described
        for split, batches in sets.items():
            passes = list(batches)
            shapes |= {x.shape for x, _ in passes} | {y.shape for _, y in passes}
            assert len(passes) == sets[split].passes
            for x, y in passes:
                for row_x, row_y in zip(x, y):
                    scored = row_y >= 0
                    # every scored target follows its input: the ids are consecutive positions
                    assert (row_y[scored] == row_x[scored] + 1).all()
                    assert (np.flatnonzero(scored) == np.arange(scored.sum())).all()  # from the window's start
                    targets[split] += row_y[scored].tolist()
    assert len(shapes) == 1 and shapes.pop()[1] == 16
    assert sorted(targets["train"]) == list(range(1, 700))
    assert sorted(targets["val"]) == list(range(1, 157))


def test_eval_tokens_loss_is_the_mean_over_every_token(tmp_path):
    """The loss over EvalWindows is the plain mean of every predicted token's loss, window by window."""
    from distributed import Launch
    from tokendata import windows
    from train import EvalWindows, estimate_loss
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.0))
    tokens = np.random.default_rng(0).integers(0, 11, size=53)
    batches = EvalWindows(tokens, windows(53, 8, 8), 8, Launch("single"), rows=4,
                          to_device=lambda x, y: (torch.from_numpy(x), torch.from_numpy(y)))
    loss, bits_per_byte = estimate_loss(model, batches, nullcontext(), Launch("single"))
    assert bits_per_byte is None  # no byte lengths given
    model.eval()
    with torch.no_grad():
        ends = [(b, min(b + 8, 52)) for b in range(0, 52, 8)]  # the last window: 4 inputs, 4 targets
        total = sum(F.cross_entropy(model(torch.tensor(tokens[b:e])[None], all_logits=True)[0][0],
                                    torch.tensor(tokens[b + 1:e + 1]), reduction="sum") for b, e in ends)
    assert loss == pytest.approx(total.item() / 52, rel=1e-6)


@pytest.mark.parametrize("damage", ["unfinished", "no_header", "id_outside_vocab", "meta_edited"])
def test_damaged_dataset_refused_in_one_line(data_dir, damage):  # noqa: F811
    """A dataset train.py cannot trust stops it before the first step, in one line with exit code 2, instead of a
    model built on the wrong vocabulary, header bytes read as tokens, or an IndexError at some later step."""
    folder = data_dir / "data/shakespeare_char"
    shard = folder / "train_000000.bin"
    meta = json.loads((folder / "meta.json").read_text())
    if damage == "unfinished":  # a killed or failed prepare.py: shards, no meta.json
        (folder / "meta.json").unlink()
    elif damage == "no_header":
        with open(shard, "r+b") as f:
            f.write(b"\0\0\0\0")
    elif damage == "id_outside_vocab":
        tokens = np.fromfile(shard, dtype="<u2", offset=1024)
        tokens[::16] = meta["vocab_size"]  # one past the last id, in every window
        with open(shard, "r+b") as f:
            f.seek(1024)
            f.write(tokens.tobytes())
    else:
        meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:30]
        (folder / "meta.json").write_text(json.dumps(meta))
    proc = run_here("train.py", *ARGS, "--max_iters=2", cwd=data_dir, check=False)
    message = {"unfinished": "is an unfinished preparation: it holds train_000000.bin but no meta.json",
               "no_header": "train_000000.bin: header magic 0",
               "id_outside_vocab": f"is id {meta['vocab_size']}, outside the vocabulary of {meta['vocab_size']}",
               "meta_edited": f"the char tokenizer has 30 characters, but vocab_size is {meta['vocab_size']}"}[damage]
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (data_dir / "out/ckpt.pt").exists()
    if damage == "id_outside_vocab":  # evaluate.py's perplexity over the split reads every token: the same check
        model_args = dict(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=meta["vocab_size"])
        save_checkpoint(str(data_dir / "model/ckpt.pt"), {"model": GPT(GPTConfig(**model_args)).state_dict(),
                                                          "model_args": model_args, "meta": meta})
        proc = run_here("evaluate.py", "--out_dir=model", "--dataset=shakespeare_char", "--split=train",
                        "--device=cpu", cwd=data_dir, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_resume_survives_a_partial_last_log_line(tmp_path):
    """A run killed while writing log.jsonl (or stopped by a full disk) leaves half a line: resuming drops it."""
    from train import trim_log
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    trim_log(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_resume_into_another_dataset_folder_needs_the_same_tokenizer():
    """Data moved, or training continued on other text: another dataset folder resumes, reported as a changed
    setting; a different tokenizer is refused (the model's ids would mean other things)."""
    from train import TrainConfig, check_resume
    char = {"type": "char", "chars": "ab", "eot": False}
    checkpoint = {"config": {"dataset": "shakespeare_char", "data_root": "data"}, "meta": {"tokenizer": char}}
    said = []
    check_resume(checkpoint, TrainConfig(dataset="/elsewhere/shakespeare_char"), {"tokenizer": char}, said.append)
    assert said == ["resuming with changed settings: dataset 'shakespeare_char' -> '/elsewhere/shakespeare_char'"]
    # a setting derived from another names it (a trial took a re-derived lr_decay_iters for one it never gave)
    said.clear()
    checkpoint["config"].update(max_iters=100, lr_decay_iters=100)
    check_resume(checkpoint, TrainConfig(dataset="shakespeare_char", max_iters=300, lr_decay_iters=300),
                 {"tokenizer": char}, said.append, {"max_iters": "command line", "lr_decay_iters": "max_iters"})
    assert said == ["resuming with changed settings: max_iters 100 -> 300, lr_decay_iters 100 -> 300 (follows "
                    "max_iters)"]
    with pytest.raises(UserError, match=r"cannot resume: out reads a 2-character vocabulary, but data/owt was "
                                        r"tokenized with the tiktoken encoding 'gpt2'; tokenize the text as the model "
                                        r"reads, beside it: python prepare.py owt --tokenizer=out "
                                        r"--out_root=data-out "):
        check_resume(checkpoint, TrainConfig(dataset="owt"), {"tokenizer": {"type": "tiktoken", "encoding": "gpt2"}},
                     said.append)


def test_resume_checks_the_shape_the_model_has():
    """The shape a resume must keep is the model's (model_args), not the config's: a run from --init_from once saved
    the default 12 layers in its config for a 2-layer model, and its true shape was refused."""
    from train import TrainConfig, check_resume
    char = {"type": "char", "chars": "ab", "eot": False}
    checkpoint = {"config": {"n_layer": 12, "n_embd": 768}, "meta": {"tokenizer": char},
                  "model_args": {"n_layer": 2, "n_head": 12, "n_embd": 48, "block_size": 1024, "bias": True}}
    said = []
    check_resume(checkpoint, TrainConfig(n_layer=2, n_embd=48), {"tokenizer": char}, said.append)
    assert said == []  # nor reported as changed settings
    with pytest.raises(UserError, match=r"n_layer: checkpoint 2, now 12; n_embd: checkpoint 48, now 768; rope: "
                                        r"checkpoint False, now True"):
        check_resume(checkpoint, TrainConfig(rope=True), {"tokenizer": char}, said.append)


def test_resume_on_other_train_tokens_by_the_same_name_says_so(data_dir, monkeypatch, capsys):  # noqa: F811
    """A resume from another folder, whose relative data_root holds another dataset by the same name (or one
    prepared anew with the same val split): the changed settings list nothing, and a trial's run trained on other
    tokens without a word. The train split's digests, in the checkpoint, tell it."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=100", f"--out_dir={data_dir / 'out'}"]
    train_here(capsys, *args, "--max_iters=2")
    assert "not the one the run trained on" not in train_here(capsys, *args, "--max_iters=3", "--init_from=auto")
    shutil.copytree("data", "elsewhere/data")
    meta_path = data_dir / "elsewhere/data/shakespeare_char/meta.json"
    meta = json.loads(meta_path.read_text())
    meta["shards"]["train"][0]["sha256"] = "0" * 64  # another preparation's train split, val's the same
    meta_path.write_text(json.dumps(meta))
    monkeypatch.chdir(data_dir / "elsewhere")
    out = train_here(capsys, *args, "--max_iters=4", "--init_from=auto")
    assert f"note: the train split in {data_dir / 'elsewhere/data/shakespeare_char'} is not the one the run trained " \
        "on (its shards' digests differ: another folder by that name, or the dataset prepared anew)" in out
    assert "measured on other tokens" not in out  # val is the same


def test_evaluate_takes_a_data_root_given_as_the_default(data_dir, monkeypatch, capsys):  # noqa: F811
    """A run trained under --data_root=elsewhere, whose data came back to data/: evaluate.py --data_root=data reads
    it there. The default given by hand was taken for no setting, and the run's old root read (a trial)."""
    monkeypatch.chdir(data_dir)
    shutil.copytree("data", "elsewhere")
    train_here(capsys, *ARGS, "--max_iters=2", "--eval_interval=2", "--data_root=elsewhere", "--out_dir=out")
    shutil.rmtree("elsewhere")
    proc = run_here("evaluate.py", "--out_dir=out", "--task=val_loss", "--device=cpu", "--data_root=data",
                    cwd=data_dir)
    logged = [r["val_loss"] for r in log_records("out") if r.get("step") == 2 and "val_loss" in r]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(logged[0], abs=1e-6)


def test_model_settings_are_gptconfigs_own():
    """Every model setting reaches the model, with GPTConfig's default: a researcher's new GPTConfig field (trial)
    was taken on the command line and saved in the config, but not passed to the model, and a default changed in
    model.py was undone by train.py's copy of it."""
    from dataclasses import fields

    from train import MODEL_KEYS, SHAPE_KEYS, TrainConfig, model_config
    assert set(MODEL_KEYS) == {f.name for f in fields(GPTConfig)} - {"vocab_size"} and "dropout" not in SHAPE_KEYS
    defaults = TrainConfig()
    assert all(getattr(defaults, f.name) == f.default for f in fields(GPTConfig) if f.name in MODEL_KEYS)
    others = {"block_size": 64, "n_layer": 3, "n_head": 4, "n_embd": 64, "dropout": 0.1, "bias": False, "rope": True,
              "qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "n_kv_head": 2, "norm": "rmsnorm",
              "logit_softcap": 15.0, "embed_norm": True}
    assert set(others) == set(MODEL_KEYS)  # a new field: give it a value other than its default here
    config = model_config(TrainConfig(**others), vocab_size=70)
    assert {k: getattr(config, k) for k in MODEL_KEYS} == others and config.vocab_size == 70


def test_a_checkpoint_of_another_model_py_is_refused(data_dir, monkeypatch, capsys):  # noqa: F811
    """A checkpoint whose model sets a field this model.py does not know (a fork's, trained on a branch) was read as
    another model, its setting dropped: resumed, sampled, evaluated and exported without a word (trial). Each script
    refuses it now, naming the setting."""
    monkeypatch.chdir(data_dir)
    train_here(capsys, *ARGS, "--max_iters=2", "--eval_interval=2", "--out_dir=out")
    checkpoint = load_checkpoint("out/ckpt.pt")
    save_checkpoint("out/ckpt.pt", {**checkpoint, "model_args": {**checkpoint["model_args"], "parallel_block": True}})
    for script, *args in (("train.py", *ARGS, "--max_iters=4", "--out_dir=out", "--init_from=auto"),
                          ("train.py", *ARGS, "--max_iters=4", "--out_dir=new", "--init_from=out"),
                          ("sample.py", "--out_dir=out", "--device=cpu", "--max_new_tokens=2", "--num_samples=1"),
                          ("evaluate.py", "--out_dir=out", "--task=val_loss", "--device=cpu"),
                          ("export.py", "--out_dir=out")):
        proc = run_here(script, *args, cwd=data_dir, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (script, proc.stderr[-2000:])
        assert "'s model sets parallel_block=True, which this model.py does not know: it was trained by other code" \
            in proc.stderr, (script, proc.stderr)
    assert not os.path.exists("new") and not os.path.exists("out-hf")


def test_failed_plot_leaves_no_half_written_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from train import plot_losses

    def full_disk(self, path, **kwargs):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full_disk)
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "tokens": 10}) + "\n")
    with pytest.raises(OSError):
        plot_losses(str(tmp_path / "log.jsonl"), str(tmp_path / "loss.png"))
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_earlier_run_is_never_overwritten(data_dir):  # noqa: F811
    """A second run from scratch in the same out_dir is refused before it touches anything (its first save would
    replace ckpt.pt, and the older numbered checkpoints would outlive its own); --init_from=auto continues instead.
    --eval_only writes nothing there: no second record of the step in log.jsonl, the losses as JSON on stdout; it
    evaluates the checkpoint's model without its shape given again."""
    args = [*ARGS, "--max_iters=4", "--eval_interval=2", "--out_dir=out"]
    run_here("train.py", *args, cwd=data_dir)
    def files():  # train.lock names the last process to run there, refused or not
        return {name: (data_dir / "out" / name).read_bytes() for name in os.listdir(data_dir / "out")
                if name != "train.lock"}

    before = files()
    assert sorted(before) == ["ckpt.pt", "ckpt_00000002.pt", "ckpt_00000004.pt", "log.jsonl"]

    def unchanged():
        return files() == before

    for init_from in ("scratch", "gpt2"):  # fine-tuning is a new run too (refused before any download)
        proc = run_here("train.py", *args, f"--init_from={init_from}", cwd=data_dir, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "error: out holds the checkpoints of an earlier run: continue it with --init_from=auto" in proc.stderr
        assert unchanged()

    shapeless = [a for a in args if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    proc = run_here("train.py", *shapeless, "--init_from=resume", "--eval_only=True", cwd=data_dir)  # its shape
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and unchanged()
    # no training's words for an evaluation: no length, nor eval_only among the changed settings (a trial)
    assert "resumed from out/ckpt.pt at step 4" in proc.stdout
    assert "length:" not in proc.stdout and "resuming with changed settings" not in proc.stdout
    fresh = run_here("train.py", *args, "--eval_only=True", cwd=data_dir).stdout  # from scratch: it says so
    assert "note: eval_only evaluates freshly initialised weights (init_from=scratch); --init_from=auto" in fresh
    with open(data_dir / "out/log.jsonl") as f:
        assert [r["val_loss"] for r in map(json.loads, f) if r["step"] == 4 and "val_loss" in r] == \
            [pytest.approx(result["val_loss"], abs=1e-6)]  # the same evaluation, logged once

    (data_dir / "out/ckpt.pt").unlink()  # only numbered checkpoints: the way back is named
    proc = run_here("train.py", *args, cwd=data_dir, check=False)
    assert proc.returncode == 2 and "ln -f out/ckpt_00000004.pt out/ckpt.pt and --init_from=auto" in proc.stderr
    os.link(data_dir / "out/ckpt_00000004.pt", data_dir / "out/ckpt.pt")
    out = run_here("train.py", *[a for a in args if a != "--max_iters=4"], "--max_iters=6", "--init_from=auto",
                   cwd=data_dir).stdout
    assert "resumed from out/ckpt.pt at step 4" in out and "step 6: train loss" in out


def test_stop_flag_ctrl_c_twice(monkeypatch):
    """The first Ctrl-C asks for a save at the next step boundary; a second stops at once. The handlers that were
    there before are back afterwards (pytest's own, here), except after leaving(): then SIGTERM and SIGUSR1 are
    ignored."""
    import signal
    from train import StopFlag
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    said = []
    with StopFlag(say_now=said.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT" and "Ctrl-C again: stop now" in said[0]
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal keeps the first one's reason
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopFlag(say_now=said.append) as stop:  # Slurm's SIGTERM first: the next Ctrl-C is still the first
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGTERM" and "Ctrl-C again: stop now" in said[-1]
        with pytest.raises(KeyboardInterrupt):  # and the second stops, as it says (it once never did)
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    # once the ranks have agreed to stop, a launcher's SIGTERM to the ranks still exiting must not kill them
    try:
        with StopFlag() as stop:
            stop.leaving()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_stop_with_nothing_new_to_save(data_dir):  # noqa: F811
    """A stop before the first step (Ctrl-C while compiling, here a max_runtime already past) saves nothing, so the
    same command can start again; a stop right after resuming does not write the same checkpoint again."""
    args = [*ARGS, "--max_iters=8", "--eval_interval=4", "--out_dir=out"]
    proc = run_here("train.py", *args, "--max_runtime=0.001", cwd=data_dir, check=False)
    assert proc.returncode == 3 and "stopping on max_runtime: nothing trained yet" in proc.stdout, proc.stderr
    assert ("exiting with code 3: nothing trained to resume; the same command starts anew (slurm/train.sbatch "
            "requeues itself, unless the job was cancelled)") in proc.stdout
    assert not os.path.exists(data_dir / "out/ckpt.pt")
    run_here("train.py", *args, "--max_iters=4", cwd=data_dir)
    mtime = os.path.getmtime(data_dir / "out/ckpt.pt")
    proc = run_here("train.py", *args, "--init_from=auto", "--max_runtime=0.001", cwd=data_dir, check=False)
    assert proc.returncode == 3 and "stopping on max_runtime: saved already" in proc.stdout, proc.stderr
    assert os.path.getmtime(data_dir / "out/ckpt.pt") == mtime


def test_a_second_run_in_the_same_out_dir_is_refused(data_dir):  # noqa: F811
    """While a run goes on (here before its first checkpoint, which the earlier-run check could not see), another
    train.py in its out_dir is refused, from scratch or resuming; once the first has ended, resuming works."""
    args = [*ARGS, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--out_dir=out"]
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=data_dir,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 3 |"):
                break
        for init_from in ("scratch", "auto"):
            proc = run_here("train.py", *args, f"--init_from={init_from}", "--max_iters=5", cwd=data_dir,
                            check=False)
            assert proc.returncode == 2 and "error: another train.py is running in out (process " \
                f"{first.pid} on" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        first.send_signal(signal.SIGTERM)
        first.stdout.read()
        assert first.wait(timeout=60) == 3
    finally:
        first.kill()
    out = run_here("train.py", *args, "--init_from=auto", "--max_iters=1", cwd=data_dir).stdout
    assert "resumed from out/ckpt.pt" in out


def test_tokens_seen_are_counted_across_a_batch_size_change(data_dir, monkeypatch, capsys):  # noqa: F811
    """log.jsonl's tokens (the plot's x axis) after a resume with another batch size: counted on, not step x the new
    tokens per step (which went backwards); the run's length at start is counted the same way."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=4", "--out_dir=out"]
    train_here(capsys, *args, "--batch_size=8", "--max_iters=4")
    out = train_here(capsys, *args, "--batch_size=4", "--max_iters=8", "--init_from=resume")
    assert f"length: 8 steps = {8 * 32 * 4 + 4 * 32 * 4:,} tokens," in out
    with open(data_dir / "out/log.jsonl") as f:
        tokens = {r["step"]: r["tokens"] for r in map(json.loads, f) if "loss" in r}
    assert tokens == {s: 8 * 32 * min(s, 4) + 4 * 32 * max(s - 4, 0) for s in range(1, 9)}


def test_wandb_that_cannot_start_is_one_line(data_dir, tmp_path):  # noqa: F811
    """No API key and no offline mode: wandb's error in one line with what to do, and no out_dir begun (not even
    the lock's)."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--max_iters=2", "--out_dir=out",
                           "--wandb_log=True"], cwd=data_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: wandb could not start a run (" in proc.stderr, proc.stderr[-2000:]
    assert "WANDB_MODE=offline" in proc.stderr and "Traceback" not in proc.stderr
    assert not (data_dir / "out").exists()


def test_hellaswag_at_each_evaluation(data_dir):  # noqa: F811
    """--hellaswag scores the items at each evaluation: the accuracy logged at the last step is what evaluate.py
    reports for the checkpoint of that step. An item the model's tokenizer cannot write stops the run at start-up,
    named by its line, before any training."""
    from conftest import write_hellaswag
    path = write_hellaswag(data_dir / "data/hellaswag/hellaswag_val.jsonl")
    run_here("train.py", *ARGS, "--max_iters=6", "--eval_interval=3", "--hellaswag=True", "--hellaswag_items=5",
             "--out_dir=out", cwd=data_dir)
    with open(data_dir / "out/log.jsonl") as f:
        evaluations = [r for r in map(json.loads, f) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6] and all("hellaswag" in r for r in evaluations)
    proc = run_here("evaluate.py", "--out_dir=out", "--task=hellaswag", f"--source={path}", "--max_items=5",
                    "--device=cpu", "--batch_size=3", cwd=data_dir)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["items"] == 5 and result["acc_norm"] == pytest.approx(evaluations[-1]["hellaswag"])

    write_hellaswag(path, extra=[{"ctx": "ROMEO:", "endings": ["a snowman \u2603", "night"], "label": 1}])
    proc = run_here("train.py", *ARGS, "--max_iters=6", "--hellaswag=True", "--out_dir=out2", cwd=data_dir,
                    check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "hellaswag_val.jsonl:7: text has characters outside this model's" in proc.stderr, proc.stderr
    assert "step 1 |" not in proc.stdout and not (data_dir / "out2/ckpt.pt").exists()


def test_samples_at_evaluations(data_dir):  # noqa: F811
    """--sample_tokens: a sample at each evaluation after step 0, printed and logged, the one sample.py draws from
    that step's checkpoint with its default settings and seed; and sampling leaves training untouched (dropout on:
    a draw from the global random state would change the masks that follow). A prompt the tokenizer cannot write
    stops the run before any training."""
    args = [*ARGS, "--max_iters=6", "--eval_interval=3", "--dropout=0.1"]
    proc = run_here("train.py", *args, "--sample_tokens=20", "--sample_start=ROMEO:", "--out_dir=out",
                    cwd=data_dir)
    samples = [r for r in log_records(data_dir / "out") if "sample" in r]
    assert [r["step"] for r in samples] == [3, 6] and all(r["sample"].startswith("ROMEO:") for r in samples)
    assert f"step 6: sample\n{samples[-1]['sample']}\n---" in proc.stdout and "step 0: sample" not in proc.stdout
    drawn = run_here("sample.py", "--out_dir=out", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=20",
                     "--device=cpu", cwd=data_dir).stdout
    assert drawn.split("\n---------------")[0] == samples[-1]["sample"]

    run_here("train.py", *args, "--out_dir=plain", cwd=data_dir)
    trained = [torch.load(data_dir / d / "ckpt.pt", weights_only=False)["model"] for d in ("out", "plain")]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[1])
    losses = [[r for r in log_records(data_dir / d) if "loss" in r or "val_loss" in r] for d in ("out", "plain")]
    assert ([[r.get("loss"), r.get("val_loss")] for r in losses[0]] ==
            [[r.get("loss"), r.get("val_loss")] for r in losses[1]])

    proc = run_here("train.py", *args, "--sample_tokens=20", "--sample_start=ROMEO#", "--out_dir=bad",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--sample_start: text has characters outside this model's" in proc.stderr, proc.stderr
    assert "step 1 |" not in proc.stdout


def test_lr_schedules():
    """lr_at: the same warmup for every schedule, then down to min_lr at lr_decay_iters and min_lr after, never up;
    cosine and linear from the end of warmup (half way at the middle, apart at the quarter), wsd flat at
    learning_rate until the last cooldown_frac of lr_decay_iters, then linear."""
    from train import TrainConfig, lr_at, validate
    base = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110)
    lrs = {s: [lr_at(step, TrainConfig(lr_schedule=s, **base)) for step in range(130)] for s in ("cosine", "linear",
                                                                                                  "wsd")}
    for lr in lrs.values():
        assert lr[:11] == pytest.approx([1e-3 * (k + 1) / 11 for k in range(10)] + [1e-3])
        assert lr[110:] == [1e-4] * 20 and all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lrs["cosine"][60] == pytest.approx(5.5e-4) and lrs["linear"][60] == pytest.approx(5.5e-4)
    assert lrs["cosine"][35] == pytest.approx(1e-4 + 9e-4 * (1 + 2 ** -0.5) / 2)
    assert lrs["linear"][35] == pytest.approx(1e-4 + 9e-4 * 0.75)
    assert lrs["wsd"][10:89] == [1e-3] * 79 and lrs["wsd"][99] == pytest.approx(5.5e-4)  # cooldown from step 88
    assert validate(TrainConfig(lr_schedule="step", cooldown_frac=0)) == [
        "lr_schedule='step': expected 'cosine', 'linear', 'wsd'", "cooldown_frac=0 must be in (0, 1]"]


def test_optimizer_and_spike_settings_validated(monkeypatch):
    """A misspelt optimizer, Muon on a PyTorch without it (before 2.9), and spike settings that could never skip or
    make no sense are each refused before any work."""
    from train import TrainConfig, validate
    assert validate(TrainConfig(optimizer="Muon", skip_spikes=-1, spike_window=1)) == [
        "skip_spikes=-1 must be 0 (off) or a number of standard deviations",
        "spike_window=1 must be at least 2 (a standard deviation needs two steps)",
        "optimizer='Muon': expected 'adamw', 'muon'"]
    assert validate(TrainConfig(optimizer="muon")) == []
    monkeypatch.delattr(torch.optim, "Muon")
    assert validate(TrainConfig(optimizer="muon")) == [
        f"optimizer=muon needs torch.optim.Muon, from PyTorch 2.9 on (this is {torch.__version__})"]


def test_accumulation_steps_that_total_batch_size_overrides(data_dir, monkeypatch, capsys):  # noqa: F811
    """total_batch_size decides the micro-steps: a gradient_accumulation_steps asked for on the command line beside it
    that disagrees is refused (it was silently ignored); one from a config file gets a note."""
    monkeypatch.chdir(data_dir)
    proc = run_here("train.py", *ARGS, "--total_batch_size=256", "--gradient_accumulation_steps=8",
                    "--max_iters=1", "--out_dir=refused", cwd=data_dir, check=False)
    assert proc.returncode == 2 and ("gradient_accumulation_steps=8 (command line) is not used: "
                                     "total_batch_size=256 makes it 2; give --total_batch_size=0") in proc.stderr
    (data_dir / "recipe.py").write_text("gradient_accumulation_steps = 8\n")
    out = train_here(capsys, "recipe.py", *ARGS, "--total_batch_size=256", "--max_iters=1", "--out_dir=noted")
    assert "note: gradient_accumulation_steps=8 (recipe.py) is not used: total_batch_size=256 makes it 2" in out
    assert "x 2 micro-steps = 256 tokens per optimizer step" in out


def test_wall_times_read_as_slurm_writes_them():
    """max_runtime: the forms of Slurm's --time with days read as Slurm reads them (the clock after the days starts
    at hours: '1-5' was once 1 day and 5 seconds), and a bare number as seconds, as documented."""
    from train import parse_duration
    assert [parse_duration(t) for t in ("3:55:00", "55:00", "90", "1-5", "1-5:30", "1-05:30:15", "0-0:00:30", "")] \
        == [14100, 3300, 90, 104400, 106200, 106215, 30, None]
    assert parse_duration("0") is parse_duration("0:00:00") is None  # no limit, as 0 is elsewhere (once: stop at once)
    for bad in ("x", "1:2:3:4", "-5", "a-5", "5:-1"):
        with pytest.raises(ValueError, match="expected"):
            parse_duration(bad)


def test_rope_needs_an_even_head_size():
    from train import TrainConfig, validate
    assert validate(TrainConfig(rope=True, n_embd=30, n_head=2)) == [
        "rope rotates pairs of dimensions: the head size n_embd/n_head=15 must be even"]
    assert validate(TrainConfig(rope=True)) == [] and validate(TrainConfig(n_embd=30, n_head=2)) == []


def test_shape_from_weights():
    """What a run on given weights trains: their shape. A config file's shape gives way with a note, the command
    line's is refused; block_size is kept where it is set and the weights can take it (fit_context crops it, or
    refuses a longer one on the command line), and a checkpoint of before rope reads as rope=False."""
    from train import TrainConfig, shape_from_weights
    model_args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "bias": False, "vocab_size": 65}
    recipe = {k: "config/x.py" for k in ("n_layer", "n_head", "block_size")}
    notes = []
    cfg, sources = shape_from_weights(TrainConfig(n_layer=6, n_head=4, block_size=256, rope=True),
                                      {**recipe, "rope": "config/x.py"}, model_args, "pre", notes.append)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.bias, cfg.rope) == (2, 4, 64, 64, False, False)
    assert notes == ["note: the model's shape comes from pre: block_size=64, not 256 (config/x.py), n_layer=2, not 6 "
                     "(config/x.py), rope=False, not True (config/x.py)"]  # the recipe's own model, continued
    assert sources["n_embd"] == sources["block_size"] == "the weights of pre"
    assert shape_from_weights(TrainConfig(), {}, model_args, "pre", notes.append)[0].block_size == 64
    for block_size, rope, where in ((32, False, "config/x.py"), (256, True, "config/x.py"),
                                    (256, False, "command line")):
        cfg, _ = shape_from_weights(TrainConfig(block_size=block_size), {"block_size": where},
                                    {**model_args, "rope": rope}, "pre", notes.append)
        assert cfg.block_size == block_size  # cropped, grown with rope, or refused by fit_context
    with pytest.raises(UserError, match=r"pre's weights fix the model's shape: --n_embd=128 \(pre has 64\), "
                                        r"--bias=True \(pre has False\); leave these settings out"):
        shape_from_weights(TrainConfig(n_embd=128, bias=True), {"n_embd": "command line", "bias": "command line"},
                           model_args, "pre", notes.append)


def test_init_from_a_checkpoint_starts_a_new_run_from_its_weights(data_dir, monkeypatch, capsys):  # noqa: F811
    """--init_from=<a checkpoint or its folder>: the weights of another run (its shape too), with a fresh optimizer,
    step count and schedule, in a new out_dir: its step-0 val loss is the one the old run logged for those weights.
    A longer context than the checkpoint's, another shape asked for on the command line, or a dataset of another
    tokenizer, is refused before any training."""
    monkeypatch.chdir(data_dir)
    train_here(capsys, *ARGS, "--max_iters=6", "--eval_interval=3", "--out_dir=pre")
    pre = {r["step"]: r["val_loss"] for r in log_records(data_dir / "pre") if "val_loss" in r}
    for source, steps in (("pre", 6), ("pre/ckpt_00000003.pt", 3)):
        out = train_here(capsys, *ARGS, "--max_iters=2", "--eval_interval=2", f"--init_from={source}",
                         "--out_dir=fine", "--learning_rate=1e-4")
        assert f"initialised from the weights of {source} (its step {steps});" in out
        fine = [r for r in log_records(data_dir / "fine") if "val_loss" in r]
        assert [r["step"] for r in fine] == [0, 2] and fine[0]["val_loss"] == pytest.approx(pre[steps], abs=1e-6)
        shutil.rmtree(data_dir / "fine")
    # the shape comes from the weights, block_size too when not given, and the new run's config says so: resuming
    # it with that shape works (its config once kept the defaults, 12 layers, and refused the true ones)
    short = [a for a in ARGS if not a.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
    train_here(capsys, *short, "--max_iters=2", "--eval_interval=2", "--init_from=pre", "--out_dir=fine")
    saved = torch.load(data_dir / "fine/ckpt.pt", weights_only=False)
    assert {k: saved["config"][k] for k in ("n_layer", "n_embd", "block_size")} == {"n_layer": 2, "n_embd": 32,
                                                                                   "block_size": 32}
    assert "resumed from fine/ckpt.pt at step 2" in train_here(capsys, *ARGS, "--max_iters=4", "--out_dir=fine",
                                                                "--init_from=resume")
    # and without it, as the run began: the shape it leaves out is the checkpoint's (it was the default 12 layers)
    out = train_here(capsys, *short, "--max_iters=6", "--out_dir=fine", "--init_from=auto")
    assert "resumed from fine/ckpt.pt at step 4" in out and "n_layer = 2  <- the weights of fine/ckpt.pt" in out
    # a config file's from-scratch shape gave way to the weights at the start: it gives way at a resume too (the same
    # command with --init_from=auto was refused, and a Slurm requeue of it failed every time)
    (data_dir / "recipe.py").write_text("n_layer = 3\nn_head = 4\nn_embd = 64\nblock_size = 16\n")
    first = train_here(capsys, "recipe.py", *short, "--max_iters=2", "--init_from=pre", "--out_dir=ft")
    assert "note: the model's shape comes from pre: n_layer=2, not 3 (recipe.py)" in first
    out = train_here(capsys, "recipe.py", *short, "--max_iters=3", "--init_from=pre", "--out_dir=ft",
                     "--init_from=auto")
    assert "resumed from ft/ckpt.pt at step 2" in out
    assert "note: the model's shape comes from ft/ckpt.pt: n_layer=2, not 3 (recipe.py)" in out
    # a requeued job goes on with its own run though its command says to begin from other weights
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    out = train_here(capsys, "recipe.py", *short, "--max_iters=4", "--init_from=pre", "--out_dir=ft")
    assert "requeued job (restart 1): resuming from ft/ckpt.pt, not --init_from=pre" in out
    assert "resumed from ft/ckpt.pt at step 3" in out
    # so does a job of slurm/train.sbatch submitted again, once ended (the script sets the variable)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    monkeypatch.setenv("GPT_RESUME_RUN", "1")
    out = train_here(capsys, "recipe.py", *short, "--max_iters=5", "--init_from=pre", "--out_dir=ft")
    assert "GPT_RESUME_RUN=1 (slurm/train.sbatch): resuming from ft/ckpt.pt, not --init_from=pre" in out
    assert "resumed from ft/ckpt.pt at step 4" in out
    monkeypatch.delenv("GPT_RESUME_RUN")

    proc = run_here("train.py", *ARGS, "--block_size=64", "--max_iters=2", "--init_from=pre", "--out_dir=long",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "block_size=64 exceeds pre's context of 32 tokens" in proc.stderr
    proc = run_here("train.py", *ARGS, "--n_layer=3", "--max_iters=2", "--init_from=pre", "--out_dir=deeper",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "pre's weights fix the model's shape: --n_layer=3 (pre has 2)" in proc.stderr
    (data_dir / "digits.txt").write_text("0123456789 \n" * 2000)
    run_script("prepare.py", "digits", "--source=digits.txt", "--tokenizer=char", cwd=data_dir)
    proc = run_here("train.py", *ARGS, "--dataset=digits", "--max_iters=2", "--init_from=pre", "--out_dir=out_digits",
                    cwd=data_dir, check=False)
    assert proc.returncode == 2 and "pre reads a " in proc.stderr, proc.stderr
    assert "data/digits was tokenized with a 12-character vocabulary (12 ids); tokenize the text as the model reads, " \
           f"beside it: python prepare.py digits --tokenizer=pre --out_root=data-pre --source={data_dir}/digits.txt " \
           "(and the other options data/digits was prepared with), then give --dataset=data-pre/digits" in proc.stderr
    assert "Traceback" not in proc.stderr and "step 1 |" not in proc.stdout


def test_save_interval_saves_between_evaluations(data_dir):  # noqa: F811
    """--save_interval: checkpoints every N steps without an evaluation, besides those at evaluations, and one that
    resumes trains on as the uninterrupted run did."""
    out = run_here("train.py", *ARGS, "--max_iters=7", "--eval_interval=1000", "--save_interval=3",
                   "--keep_last_n=5", "--out_dir=out", cwd=data_dir).stdout
    assert "at step 3 (save_interval=3)" in out and "at step 6 (save_interval=3)" in out
    assert sorted(p.name for p in (data_dir / "out").glob("ckpt_*.pt")) == [f"ckpt_0000000{s}.pt" for s in (3, 6, 7)]
    assert [r["step"] for r in log_records(data_dir / "out") if "val_loss" in r] == [0, 7]  # no evaluation added
    os.makedirs(data_dir / "again")
    os.link(data_dir / "out/ckpt_00000003.pt", data_dir / "again/ckpt.pt")
    run_here("train.py", *ARGS, "--max_iters=7", "--eval_interval=1000", "--init_from=resume", "--out_dir=again",
             cwd=data_dir)
    losses = [{r["step"]: r["loss"] for r in log_records(data_dir / d) if "loss" in r} for d in ("out", "again")]
    assert losses[1] == {s: losses[0][s] for s in range(4, 8)}


def test_one_batch_is_learned_by_heart(data_dir, monkeypatch, capsys):  # noqa: F811
    """data_order=one_batch, the debugging check: the same batch every step, so the training loss falls close to 0
    while the val loss, on other text, rises above where it began."""
    monkeypatch.chdir(data_dir)
    train_here(capsys, *ARGS, "--data_order=one_batch", "--max_iters=100", "--lr_decay_iters=100",
               "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=10", "--eval_interval=100", "--out_dir=out")
    records = log_records(data_dir / "out")
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 100 and max(losses[-10:]) < 0.1 < 3 < losses[0]
    assert len(val) == 2 and val[1] > val[0]


# the schedule left to its default, lr_decay_iters=0: it ends with the run
FREE_ARGS = [a for a in ARGS if not a.startswith("--lr_decay_iters=")] + ["--eval_interval=1000"]


def test_run_length_in_tokens(data_dir, monkeypatch, capsys):  # noqa: F811
    """--max_tokens: the steps that reach it (128 tokens a step here, the last step may pass it), the learning rate
    decayed over them; a resume at another batch size counts on from the tokens already seen."""
    import train
    monkeypatch.chdir(data_dir)
    out = train_here(capsys, *FREE_ARGS, "--max_tokens=1000", "--out_dir=out")
    assert "max_iters = 8  <- max_tokens" in out and "lr_decay_iters = 8  <- max_iters" in out
    assert "length: 8 steps = 1,024 tokens (max_tokens=1,000)" in out
    cfg = train.TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=5, max_iters=8, lr_decay_iters=8)
    steps = [r for r in log_records("out") if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in steps] == [(s, 128 * s) for s in range(1, 9)]
    assert [r["lr"] for r in steps] == pytest.approx([train.lr_at(s, cfg) for s in range(8)])
    # 1,024 seen, 2,000 asked: 976 more at 256 a step is 3.8, so 4 steps to step 12 and 2,048 tokens
    out = train_here(capsys, *FREE_ARGS, "--max_tokens=2000", "--batch_size=8", "--init_from=resume", "--out_dir=out")
    assert "length: 12 steps = 2,048 tokens (max_tokens=2,000)" in out
    assert "max_iters 8 -> 12" in out and "lr_decay_iters 8 -> 12" in out
    new = train.lr_at(8, train.TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=5, lr_decay_iters=12))
    assert f"note: the schedule changed (lr_decay_iters 8 -> 12): the learning rate at step 8 is {new:.3g}, not " \
           "6e-05; --lr_decay_iters=8 keeps the checkpoint's" in out  # not given: maybe a default an update changed
    assert [r["tokens"] for r in log_records("out") if "loss" in r][-4:] == [1280, 1536, 1792, 2048]
    out = train_here(capsys, *FREE_ARGS, "--max_tokens=2000", "--batch_size=8", "--init_from=resume", "--out_dir=out")
    assert "max_iters is 12 (from max_tokens=2,000); raise --max_tokens to train on" in out


def test_told_apart():
    from train import told_apart
    assert told_apart(1.00004e-4, 1.00001e-4) == ("0.000100004", "0.000100001")
    assert told_apart(6e-4, 6e-5) == ("0.0006", "6e-05") and told_apart(0.1 + 0.2, 0.3) == \
        ("0.30000000000000004", "0.29999999999999999")  # as many digits for both


def test_run_length_per_parameter(data_dir, monkeypatch, capsys):  # noqa: F811
    """--tokens_per_param: tokens = the ratio x the parameter count train.py prints (that of the model it builds)."""
    monkeypatch.chdir(data_dir)
    params = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)).get_num_params()
    steps = -(-int(0.05 * params) // 128)
    out = train_here(capsys, *FREE_ARGS, "--tokens_per_param=0.05", "--out_dir=out")
    assert f"model: {params / 1e6:.2f}M parameters" in out
    assert f"length: {steps} steps = {steps * 128:,} tokens (tokens_per_param=0.05 x {params:,} parameters)" in out
    assert [r["step"] for r in log_records("out") if "loss" in r] == list(range(1, steps + 1))


def test_run_length_given_twice(data_dir, monkeypatch, capsys, tmp_path):  # noqa: F811
    """The later word on the run's length wins (the command line over a config file), with a note; two in one place
    are refused. A config file's lr_decay_iters that no longer ends the run gets a note."""
    import configurator
    import train
    monkeypatch.chdir(data_dir)
    (tmp_path / "steps.py").write_text("max_iters = 6\nlr_decay_iters = 6\n")
    (tmp_path / "tokens.py").write_text("max_tokens = 600\n")
    out = train_here(capsys, str(tmp_path / "steps.py"), *FREE_ARGS, "--max_tokens=1000", "--out_dir=a")
    assert "note: max_iters=6 (" in out and "gives way to max_tokens (command line)" in out
    assert "max_iters = 8  <- max_tokens" in out
    assert "note: the schedule ends at lr_decay_iters=6 (" in out and "the last 2 steps are at min_lr" in out
    out = train_here(capsys, str(tmp_path / "tokens.py"), *FREE_ARGS, "--max_iters=5", "--out_dir=b")
    assert "note: max_tokens=600 (" in out and "is not used: max_iters (command line) gives the run's length" in out
    assert [r["step"] for r in log_records("b") if "loss" in r] == [1, 2, 3, 4, 5]
    # two config files: a recipe's schedule, a file of one's own with a shorter run; the recipe's end is noted
    (tmp_path / "short.py").write_text("max_iters = 4\n")
    out = train_here(capsys, str(tmp_path / "steps.py"), str(tmp_path / "short.py"), *FREE_ARGS, "--out_dir=e")
    assert "note: the schedule ends at lr_decay_iters=6 (" in out and "the run stops before the learning rate " \
        "is down to min_lr" in out
    with pytest.raises(UserError, match=r"the run's length is given twice, max_iters=3 \(command line\) and "
                                        r"max_tokens=1000 \(command line\): keep one"):
        train_here(capsys, *FREE_ARGS, "--max_iters=3", "--max_tokens=1000", "--out_dir=c")
    cfg, _ = configurator.parse(train.TrainConfig, ["--max_tokens=1e6", "--tokens_per_param=20"])
    assert any("both give the run's length" in p for p in train.validate(cfg))
    # eval_iters is not used with eval_tokens, so not checked either (a trial's --eval_iters=0 was refused)
    for extra, problems in ((["--eval_tokens=1000"], []), ([], ["eval_iters=0 must be at least 1"])):
        assert train.validate(configurator.parse(train.TrainConfig, ["--eval_iters=0", *extra])[0]) == problems
    out = train_here(capsys, *FREE_ARGS, "--max_tokens=500", "--warmup_iters=10", "--out_dir=d")  # 4 steps
    assert "note: the run ends inside its warmup (max_iters=4, warmup_iters=10): the learning rate only rises, to " \
        "36% of learning_rate at the last step, and never decays" in out  # step 3's: 4/11 (once "all the way")
    assert "lr_decay_iters = 10  <- warmup_iters" in out  # not "<- max_iters", which is 4 (trial)
    # nanoGPT's habit of giving both keys, in a run shorter than the default warmup: what to change instead
    cfg, _ = configurator.parse(train.TrainConfig, ["--max_iters=50", "--lr_decay_iters=50"])
    assert "lr_decay_iters=50 is shorter than warmup_iters=2000: lower --warmup_iters (to 5, say), or leave " \
        "lr_decay_iters out (0: the schedule ends with the run, and a run shorter than its warmup is all warmup)" \
        in train.validate(cfg)
    assert [r["lr"] for r in log_records("d") if "loss" in r] == pytest.approx([6e-4 * s / 11 for s in (1, 2, 3, 4)])


def test_best_model_kept_apart_from_the_latest(data_dir, monkeypatch, capsys):  # noqa: F811
    """always_save_checkpoint=False: an evaluation saves only when the val loss improves, and that save is also
    best.pt. save_interval's saves (ckpt.pt, for resuming) and keep_last_n's deletions leave it alone (a trial lost
    the best model this way: its numbered checkpoint was rotated out and ckpt.pt held the last, worst weights)."""
    monkeypatch.chdir(data_dir)
    # one batch learned by heart at a high rate: the val loss, on other text, gets worse after the first evaluations
    out = train_here(capsys, *ARGS, "--data_order=one_batch", "--learning_rate=1e-2", "--min_lr=1e-3",
                     "--max_iters=60", "--lr_decay_iters=60", "--eval_interval=10", "--save_interval=5",
                     "--keep_last_n=1", "--always_save_checkpoint=False", "--out_dir=out")
    val = {r["step"]: r["val_loss"] for r in log_records("out") if "val_loss" in r and r["step"] > 0}
    best_step = min(val, key=val.get)
    assert best_step < 60, val  # else there is nothing for the test to see
    best, latest = load_checkpoint("out/best.pt"), load_checkpoint("out/ckpt.pt")
    assert (best["step"], latest["step"]) == (best_step, 60)
    assert best["best_val_loss"] == pytest.approx(val[best_step])
    assert not os.path.exists(f"out/ckpt_{best_step:08d}.pt")  # rotated out, as keep_last_n=1 says
    assert f"at step {best_step} (val loss improved; also best.pt)" in out
    assert "at step 60 (save_interval=5; the best val loss stays in best.pt)" in out
    note = ("note: out/ckpt.pt is the run's latest state; its best val loss is in out/best.pt "
            "(always_save_checkpoint=False): --init_from=out/best.pt for that one")
    proc = run_here("sample.py", "--out_dir=out", "--device=cpu", "--max_new_tokens=5", "--num_samples=1",
                    cwd=data_dir)
    assert note in proc.stderr
    proc = run_here("sample.py", "--init_from=out/best.pt", "--device=cpu", "--max_new_tokens=5", "--num_samples=1",
                    cwd=data_dir)
    assert "note:" not in proc.stderr
    # resumed with another batch size: the val loss is measured on other batches, and the best starts anew; the old
    # best stays, aside, not replaced by whatever the first new evaluation finds (an evaluation alone moves nothing)
    train_here(capsys, *ARGS, "--batch_size=8", "--eval_only=True", "--init_from=auto", "--out_dir=out")
    assert load_checkpoint("out/best.pt")["step"] == best_step and not os.path.exists("out/best_before_00000060.pt")
    out = train_here(capsys, *ARGS, "--data_order=one_batch", "--learning_rate=1e-2", "--min_lr=1e-3",
                     "--max_iters=70", "--lr_decay_iters=60", "--eval_interval=10", "--save_interval=5",
                     "--keep_last_n=1", "--always_save_checkpoint=False", "--out_dir=out", "--batch_size=8",
                     "--init_from=resume")
    assert "note: out/best.pt, the best on the old measure, is kept as out/best_before_00000060.pt" in out
    assert load_checkpoint("out/best_before_00000060.pt")["step"] == best_step
    assert load_checkpoint("out/best.pt")["step"] == 70


def test_nanochat_architecture_trains_resumes_and_samples(data_dir, monkeypatch, capsys):  # noqa: F811
    """--rope --qk_norm --mlp=relu2 --tie_embeddings=False --n_kv_head=1 --norm=rmsnorm --logit_softcap=15
    --embed_norm (nanochat's model, less its optimizer and initialisation): it learns, resumes as that model without the keys
    repeated, refuses another one at resume, samples, and is not exported as GPT-2."""
    monkeypatch.chdir(data_dir)
    arch = ["--rope=True", "--qk_norm=True", "--mlp=relu2", "--tie_embeddings=False", "--n_kv_head=1",
            "--norm=rmsnorm", "--logit_softcap=15", "--embed_norm=True"]
    out = train_here(capsys, *ARGS, *arch, "--max_iters=30", "--eval_interval=30", "--learning_rate=1e-2",
                     "--out_dir=out")
    losses = [r["loss"] for r in log_records("out") if "loss" in r]
    assert max(losses[-5:]) < losses[0] - 0.5, losses
    assert "; GPT-2 but for rope=True, qk_norm=True, mlp='relu2', tie_embeddings=False, n_kv_head=1, " \
        "norm='rmsnorm', logit_softcap=15.0, embed_norm=True" in out
    ckpt = load_checkpoint("out/ckpt.pt")
    assert {k: ckpt["model_args"][k] for k in ("qk_norm", "mlp", "tie_embeddings", "n_kv_head", "norm",
                                                "logit_softcap", "embed_norm")} == \
        {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False, "n_kv_head": 1, "norm": "rmsnorm",
         "logit_softcap": 15.0, "embed_norm": True}
    assert not torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["transformer.wte.weight"])
    out = train_here(capsys, *ARGS, "--max_iters=32", "--eval_interval=32", "--out_dir=out", "--init_from=resume")
    assert "resumed from out/ckpt.pt at step 30" in out and "mlp = 'relu2'  <- the weights of out/ckpt.pt" in out
    with pytest.raises(UserError, match=r"mlp: checkpoint 'relu2', now 'gelu'"):
        train_here(capsys, *ARGS, "--mlp=gelu", "--max_iters=34", "--out_dir=out", "--init_from=resume")
    proc = run_here("sample.py", "--out_dir=out", "--device=cpu", "--max_new_tokens=20", "--num_samples=1",
                    cwd=data_dir)
    assert len(proc.stdout) > 20
    proc = run_script("export.py", "--out_dir=out", cwd=data_dir, check=False)
    assert proc.returncode == 2 and "GPT-2 cannot express this model (rope=True, qk_norm=True, mlp='relu2', " \
        "tie_embeddings=False, n_kv_head=1, norm='rmsnorm', logit_softcap=15.0, embed_norm=True)" in proc.stderr
    import configurator
    import train
    cfg, _ = configurator.parse(train.TrainConfig, ["--mlp=relu", "--norm=rms", "--n_kv_head=5",
                                                    "--logit_softcap=-1"])
    problems = train.validate(cfg)
    for problem in ("mlp='relu': expected 'gelu', 'relu2'", "norm='rms': expected 'layernorm', 'rmsnorm'",
                    "n_kv_head=5 must divide n_head=12", "logit_softcap=-1.0 cannot be negative"):
        assert any(problem in p for p in problems), (problem, problems)


def test_training_outlives_the_reader_of_its_output(data_dir):  # noqa: F811
    """`train.py ... | head`: the reader goes away, the run does not; its records are in log.jsonl, its checkpoints
    saved (a trial's run ended at once, silently, with nothing saved since the last evaluation)."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *ARGS, "--max_iters=60",
                             "--eval_interval=30", "--out_dir=out"], cwd=data_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in stderr, stderr
    assert [r["step"] for r in log_records(data_dir / "out") if "loss" in r][-1] == 60
    assert load_checkpoint(str(data_dir / "out/ckpt.pt"))["step"] == 60


def test_a_config_file_the_run_never_read_cannot_resume_it(data_dir, monkeypatch, capsys):  # noqa: F811
    """A sweep whose points share an out_dir: the next point's config file, with another shape, once resumed the
    first point's model under its own name with a note, and exited 0 (a trial). A resume goes on with the run's model
    whatever the config files it read say (the quickstart's shape given on the command line, resumed with its config
    file alone), but refuses another shape from a config file it never read."""
    monkeypatch.chdir(data_dir)
    (data_dir / "small.py").write_text("n_layer = 1\nn_embd = 32\n")
    (data_dir / "big.py").write_text("n_layer = 2\nn_embd = 64\nbeta2 = 0.99\n")
    args = [a for a in ARGS if not a.startswith(("--n_layer", "--n_embd"))] + ["--eval_interval=4", "--out_dir=out"]
    train_here(capsys, "small.py", *args, "--max_iters=4", "--init_from=auto")
    with pytest.raises(UserError, match=r"cannot resume out/ckpt.pt with n_layer=2 \(big.py\), n_embd=64 \(big.py\): "
                                        r"its run trained n_layer=1, n_embd=32, and none of its settings came from "
                                        r"that config file \(they came from small.py\); another experiment belongs "
                                        r"in another --out_dir \(to resume this run, give its shape on the command "
                                        r"line\)"):
        train_here(capsys, "big.py", *args, "--max_iters=8", "--init_from=auto")
    assert "resumed from out/ckpt.pt at step 4" in train_here(capsys, "small.py", *args, "--max_iters=6",
                                                               "--init_from=auto")
    # its own config file (beta2 is its) with the shape the command line gave: goes on, with the note it always had
    train_here(capsys, "big.py", *args, "--n_layer=1", "--n_embd=32", "--max_iters=4", "--out_dir=own")
    out = train_here(capsys, "big.py", *args, "--max_iters=6", "--out_dir=own", "--init_from=auto")
    assert "note: the model's shape comes from own/ckpt.pt: n_layer=1, not 2 (big.py), n_embd=32, not 64 " \
        "(big.py)" in out and "resumed from own/ckpt.pt at step 4" in out


def test_going_back_to_an_earlier_checkpoint_sets_the_later_ones_aside(data_dir, monkeypatch, capsys):  # noqa: F811
    """ckpt.pt linked back to an earlier checkpoint (the README's way back) and resumed: keep_last_n kept the
    abandoned branch's higher steps and deleted the new branch's own, and a fallback hint named the abandoned ones (a
    trial). The later checkpoints, best.pt among them, and the log past the step move whole to after_<step>/."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=2", "--keep_last_n=3", "--always_save_checkpoint=False", "--out_dir=out"]
    train_here(capsys, *args, "--max_iters=10")
    branch = {name: (data_dir / "out" / name).read_bytes() for name in os.listdir(data_dir / "out")
              if name.startswith("ckpt_0000001") or name == "best.pt" and load_checkpoint("out/best.pt")["step"] > 8}
    os.remove("out/ckpt.pt")
    os.link("out/ckpt_00000008.pt", "out/ckpt.pt")  # back to step 8
    out = train_here(capsys, *args, "--max_iters=12", "--learning_rate=1e-4", "--always_save_checkpoint=True",
                     "--init_from=resume")  # a save at every evaluation: whether the loss improves or not
    assert "note: the run had gone past step 8 (ckpt_00000010.pt" in out and "that branch is moved to out/after_" \
        "00000008, with its log" in out
    moved = data_dir / "out/after_00000008"
    assert {name: (moved / name).read_bytes() for name in branch} == branch
    assert [r["step"] for r in log_records(moved) if "val_loss" in r] == [10]
    assert [s for s, _ in step_checkpoints("out")] == [8, 10, 12]  # the new branch's, kept in its place
    assert load_checkpoint("out/ckpt_00000010.pt")["config"]["learning_rate"] == 1e-4
    steps = [r["step"] for r in log_records("out") if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 12 and len(steps) == len(set(steps))


def test_a_copy_without_hard_links_tells_checkpoints_apart(data_dir, monkeypatch, capsys):  # noqa: F811
    """A run copied without its hard links (cp -r, shutil.copytree): ckpt.pt and best.pt of one save are two files.
    The scripts no longer say the best is elsewhere when it is not, and going back to an earlier checkpoint sets
    the later branch's best.pt aside with it (a trial: both went by inode)."""
    monkeypatch.chdir(data_dir)
    args = [*ARGS, "--eval_interval=2", "--always_save_checkpoint=False", "--learning_rate=3e-3", "--warmup_iters=0"]
    train_here(capsys, *args, "--max_iters=6", "--out_dir=out")
    assert load_checkpoint("out/best.pt")["step"] == 6  # the last save is the best: ckpt.pt and best.pt are one
    shutil.copytree("out", "copy")  # every link a file of its own
    assert not os.path.samefile("copy/ckpt.pt", "copy/best.pt")
    said = run_here("sample.py", "--out_dir=copy", "--device=cpu", "--max_new_tokens=2", "--num_samples=1",
                    cwd=data_dir).stderr
    assert "its best val loss is in" not in said
    os.remove("copy/ckpt.pt")
    shutil.copy("copy/ckpt_00000004.pt", "copy/ckpt.pt")  # back to step 4, by a copy too
    out = train_here(capsys, *args, "--max_iters=6", "--learning_rate=1e-6", "--init_from=auto", "--out_dir=copy")
    assert "note: the run had gone past step 4 (ckpt_00000006.pt, best.pt)" in out
    assert load_checkpoint("copy/after_00000004/best.pt")["step"] == 6


def test_keep_every_off_the_save_steps_is_said(data_dir, monkeypatch, capsys):  # noqa: F811
    """Checkpoints are written at evaluations and save_interval's steps only: keep_every=3 with evaluations every 2
    steps kept steps 6 and 12 of 12 without a word (a trial asked for 50 and got 100 and 200). A note says which come,
    and what keeps each multiple."""
    monkeypatch.chdir(data_dir)
    out = train_here(capsys, *ARGS, "--max_iters=12", "--eval_interval=2", "--keep_every=3", "--keep_last_n=1",
                     "--out_dir=out")
    assert "note: keep_every=3 keeps the saves that fall on its multiples, and saves come every 2 steps " \
        "(eval_interval): the first kept is at step 6; --save_interval=3 keeps each multiple" in out
    assert [s for s, _ in step_checkpoints("out")] == [6, 12]
    out = train_here(capsys, *ARGS, "--max_iters=12", "--eval_interval=2", "--keep_every=3", "--keep_last_n=1",
                     "--save_interval=3", "--out_dir=each")
    assert "keep_every=3 keeps" not in out and [s for s, _ in step_checkpoints("each")] == [3, 6, 9, 12]
