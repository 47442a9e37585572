"""prepare -> train -> sample through the real command lines, as the README runs them."""

import json
import os

import pytest

from conftest import gpt2_bpe_available, run_here, run_script

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32",
        "--batch_size=8", "--dropout=0.0", "--eval_iters=5", "--log_interval=10", "--warmup_iters=5"]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_char_pipeline(tmp_path, shakespeare_path):
    run_script("prepare.py", "shakespeare_char", f"--source={shakespeare_path}", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/shakespeare_char/meta.json").read_text())
    assert meta["tokenizer"]["type"] == "char" and meta["vocab_size"] == len(meta["tokenizer"]["chars"])
    assert sum(s["tokens"] for split in meta["shards"].values() for s in split) == meta["source"]["characters"]

    out = run_script("train.py", "config/train_shakespeare_char.py", *TINY, "--max_iters=80",
                     "--lr_decay_iters=80", "--eval_interval=40", "--out_dir=out", "--data_root=data",
                     cwd=tmp_path)
    assert "error" not in out.stderr.lower()
    evals = [r for r in read_log(tmp_path / "out") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 40, 80]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    assert (tmp_path / "out/ckpt.pt").exists()

    sample = run_script("sample.py", "--out_dir=out", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=50",
                        "--device=cpu", cwd=tmp_path)
    texts = [t for t in sample.stdout.split("---------------") if t.strip()]
    assert sample.stderr.startswith("out (step 80): ")  # which checkpoint of a run (still training, maybe) it read
    assert len(texts) == 2 and all(t.strip().startswith("ROMEO:") and len(t.strip()) >= 50 for t in texts)

    resumed = run_script("train.py", "config/train_shakespeare_char.py", *TINY, "--max_iters=100",
                         "--lr_decay_iters=100", "--eval_interval=40", "--out_dir=out", "--init_from=resume",
                         cwd=tmp_path)
    assert "resumed from out/ckpt.pt at step 80" in resumed.stdout
    assert max(r["step"] for r in read_log(tmp_path / "out")) == 100


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_bpe_pipeline(tmp_path, shakespeare_path):
    run_script("prepare.py", "shakespeare", f"--source={shakespeare_path}", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/shakespeare/meta.json").read_text())
    assert meta["tokenizer"] == {"type": "tiktoken", "encoding": "gpt2"} and meta["eot_id"] == 50256
    out = run_script("train.py", "--dataset=shakespeare", *TINY, "--max_iters=10", "--eval_interval=10",
                     "--out_dir=out", cwd=tmp_path).stdout
    assert "step 10: train loss" in out and "bits per byte)" in out
    sample = run_script("sample.py", "--out_dir=out", "--start=Hello", "--num_samples=1", "--max_new_tokens=10",
                        "--device=cpu", cwd=tmp_path)
    assert sample.stdout.startswith("Hello")

    # a node without the BPE files and no way to download them (a cluster's compute node) still trains: only the
    # bits per byte and the samples, which need the tokenizer, are off, and a note says so
    os.makedirs(tmp_path / "no_cache")
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "no_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}
    out = run_script("train.py", "--dataset=shakespeare", *TINY, "--max_iters=2", "--eval_interval=2",
                     "--sample_tokens=8", "--out_dir=offline", cwd=tmp_path, env=offline).stdout
    assert "note: without the dataset's tokenizer (could not load the 'gpt2' BPE files" in out
    assert "no bits per byte are reported and no samples drawn" in out
    assert "step 2: train loss" in out and "bits per byte)" not in out and "sample" not in out.split("step 0:")[1]


@pytest.mark.parametrize("args, message", [
    (["--batch_sise=4"], "unknown option --batch_sise (did you mean 'batch_size'"),
    (["--n_layer=two"], "--n_layer=two: expected int"),
    (["--n_embd=100", "--n_head=3", "--dropout=1.5", "--total_batch_size=1000"],
     "n_embd=100 is not divisible by n_head=3"),
    (["--dataset=no_such_data"], "python prepare.py no_such_data"),
    (["--dataset="], "dataset='' names no dataset: give --dataset=NAME (prepared under data_root) or its folder"),
    (["--dataset=data/no_such_data"], "dataset folder data/no_such_data does not exist"),  # not data/data/...
    (["--dataset=a_run"], "a_run is a training run's folder, not a dataset"),
    (["--init_from=resum"], "; did you mean 'resume'?"),
    # zeros once ended in a ZeroDivisionError; a negative grad_clip trained the model backwards
    (["--n_head=0", "--batch_size=0", "--grad_clip=-1", "--beta1=1.5", "--max_runtime=-5", "--eval_tokens=-5"],
     "n_head=0 must be at least 1"),
    (["--device=cuda:x"], "device='cuda:x': expected auto, cpu, cuda, cuda:N or mps"),
    (["--out_dir=", "--seed=-1"], "out_dir is empty: name the folder"),
])
def test_train_bad_input(tmp_path, args, message):
    (tmp_path / "a_run").mkdir()
    (tmp_path / "a_run/ckpt.pt").write_bytes(b"")
    proc = run_here("train.py", "--device=cpu", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    if "--dropout=1.5" in args:  # every cross-field problem is reported at once, the batch arithmetic's too
        assert "dropout=1.5" in proc.stderr and "total_batch_size=1,000 tokens is not a multiple of" in proc.stderr
    if "--n_head=0" in args:
        for problem in ("batch_size=0 must be at least 1", "grad_clip=-1.0 cannot be negative",
                        "beta1=1.5 must be in [0, 1)", "max_runtime='-5': expected", "eval_tokens=-5 must be 0"):
            assert problem in proc.stderr
    if "--seed=-1" in args:
        assert "seed=-1 cannot be negative" in proc.stderr


def test_nanogpt_finetuning_config_is_accepted(tmp_path):
    """nanoGPT's config/finetune_shakespeare.py as it is: learning_rate 3e-5 with decay_lr=False leaves min_lr (6e-5
    by default) unused, so it is no reason to refuse the run; with decay it is."""
    (tmp_path / "finetune.py").write_text("learning_rate = 3e-5\ndecay_lr = False\n")
    proc = run_here("train.py", "finetune.py", "--device=cpu", "--dataset=nowhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "python prepare.py nowhere" in proc.stderr  # past validation, to the dataset
    proc = run_here("train.py", "finetune.py", "--decay_lr=True", "--device=cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "min_lr=6e-05 is above learning_rate=3e-05" in proc.stderr


def test_config_file_typo(tmp_path):
    (tmp_path / "my.py").write_text("learning_rat = 1e-3\n")
    proc = run_here("train.py", "my.py", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown key 'learning_rat'" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_without_checkpoint(tmp_path):
    proc = run_here("sample.py", "--out_dir=nowhere", "--device=cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no checkpoint at nowhere/ckpt.pt" in proc.stderr


def test_prepare_bad_source(tmp_path):
    proc = run_script("prepare.py", "mytext", "--source=missing/*.txt", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    (tmp_path / "empty.txt").write_text("  \n")
    proc = run_script("prepare.py", "mytext", "--source=empty.txt", "--tokenizer=char", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "holds no text" in proc.stderr
    assert not (tmp_path / "data/mytext/meta.json").exists()


def test_trained_bpe_pipeline(tmp_path, shakespeare_path):
    """prepare.py --tokenizer=bpe:N -> train -> sample -> export: the model carries its BPE everywhere; transformers
    reads the exported tokenizer as ours does, and the folder samples the same text as the checkpoint."""
    from transformers import AutoTokenizer

    from hf import hf_tokenizer_meta
    from tokenizer import tokenizer_from_meta
    run_script("prepare.py", "shk", f"--source={shakespeare_path}", "--tokenizer=bpe:1024", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/shk/meta.json").read_text())
    assert meta["tokenizer"]["type"] == "bpe" and meta["vocab_size"] == 1024 and meta["eot_id"] == 1023
    out = run_script("train.py", "--dataset=shk", *TINY, "--max_iters=30", "--eval_interval=30", "--out_dir=out",
                     "--sample_tokens=16", cwd=tmp_path).stdout
    assert "step 30: train loss" in out and "bits per byte)" in out

    args = ["--start=ROMEO:", "--temperature=0", "--num_samples=1", "--max_new_tokens=20", "--device=cpu"]
    from_checkpoint = run_script("sample.py", "--out_dir=out", *args, cwd=tmp_path).stdout
    assert from_checkpoint.startswith("ROMEO:") and len(from_checkpoint) > len("ROMEO:") + 20

    run_script("export.py", "--out_dir=out", "--hf_dir=hf", cwd=tmp_path)
    ours, theirs = tokenizer_from_meta(meta), AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "ROMEO:\nWhat light through yonder window breaks? caf\u00e9 1234\n"
    assert theirs(text).input_ids == ours.encode(text) and theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eot_id
    theirs.save_pretrained(tmp_path / "saved_again")  # adds a template that adds nothing: still the same tokenizer
    (tmp_path / "saved_again/config.json").write_text((tmp_path / "hf/config.json").read_text())
    assert hf_tokenizer_meta(str(tmp_path / "saved_again")) == {k: meta[k] for k in ("tokenizer", "vocab_size",
                                                                                       "eot_id")}
    from_hf = run_script("sample.py", "--init_from=hf", *args, cwd=tmp_path).stdout
    assert from_hf == from_checkpoint
