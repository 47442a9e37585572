"""train.py's evaluation: passes of one shape that give the loss of the batches one by one."""

import json
import os

import numpy as np
import pytest

from checkpoint import save_checkpoint
from conftest import run_script
from model import GPT, GPTConfig
from test_checkpoint import ARGS, data_dir  # noqa: F401 (a fixture)


def test_eval_passes_one_shape_same_loss(data_dir):  # noqa: F811
    """batch_size 4 and eval_iters 6: eval_batch_size 16 would allow 4 batches per pass, but 6 = 4 + 2 would end
    with a smaller pass (torch.compile would compile again), so passes take 3; the loss is the same either way."""
    val_loss = {}
    for eval_batch_size, passes in ((0, "6 passes of 4 sequences"), (16, "2 passes of 12 sequences"),
                                    (24, "1 pass of 24 sequences"), (32, "1 pass of 24 sequences")):
        out = run_script("train.py", *ARGS, "--eval_iters=6", f"--eval_batch_size={eval_batch_size}",
                         "--eval_only=True", f"--out_dir=out{eval_batch_size}", cwd=data_dir).stdout
        assert f"evaluation: 6 batches per split, in {passes}" in out
        # a note says why 16 gives passes of 12 sequences, not 16 (32, one pass of all 24, needs none)
        assert ("allows 4 batches a pass, but only 3 divides eval_iters=6" in out) == (eval_batch_size == 16)
        with open(data_dir / f"out{eval_batch_size}/log.jsonl") as f:
            val_loss[eval_batch_size] = json.loads(f.readline())["val_loss"]
    assert abs(val_loss[16] - val_loss[0]) < 1e-5 and abs(val_loss[24] - val_loss[0]) < 1e-5
    assert 3.0 < val_loss[0] < 5.0  # an untrained model on 65 characters: about ln 65 = 4.17


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
    proc = run_script("train.py", *ARGS, "--max_iters=2", cwd=data_dir, check=False)
    message = {"unfinished": "is an unfinished preparation: it holds train_000000.bin but no meta.json",
               "no_header": "train_000000.bin: header magic 0",
               "id_outside_vocab": f"is id {meta['vocab_size']}, outside the vocabulary of {meta['vocab_size']}",
               "meta_edited": "the char tokenizer has 30 characters, but vocab_size is 65"}[damage]
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (data_dir / "out/ckpt.pt").exists()
    if damage == "id_outside_vocab":  # evaluate.py's perplexity over the split reads every token: the same check
        model_args = dict(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=meta["vocab_size"])
        save_checkpoint(str(data_dir / "model/ckpt.pt"), {"model": GPT(GPTConfig(**model_args)).state_dict(),
                                                          "model_args": model_args, "meta": meta})
        proc = run_script("evaluate.py", "--out_dir=model", "--dataset=shakespeare_char", "--split=train",
                          "--device=cpu", cwd=data_dir, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_resume_survives_a_partial_last_log_line(tmp_path):
    """A run killed while writing log.jsonl (or stopped by a full disk) leaves half a line: resuming drops it."""
    from train import trim_log
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    trim_log(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_resume_accepts_the_same_dataset_named_another_way(tmp_path, monkeypatch):
    from configurator import UserError
    from train import TrainConfig, check_resume
    (tmp_path / "data/shakespeare_char").mkdir(parents=True)
    (tmp_path / "data/other").mkdir()
    monkeypatch.chdir(tmp_path)
    checkpoint = {"config": {"dataset": "shakespeare_char", "data_root": "data"}, "meta": {}}
    for name in ("data/shakespeare_char", str(tmp_path / "data/shakespeare_char"), "shakespeare_char/"):
        check_resume(checkpoint, TrainConfig(dataset=name), {}, print)
    with pytest.raises(UserError, match="dataset: checkpoint 'shakespeare_char', now 'other'"):
        check_resume(checkpoint, TrainConfig(dataset="other"), {}, print)


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
