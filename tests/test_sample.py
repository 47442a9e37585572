"""sample.py through its real command line (in this process, as run_here runs it, but where only a process of its own
will do), on a tiny char-level checkpoint the test writes itself."""

import os
import subprocess
import sys
import types

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import REPO, run_here
from generate import generate
from model import GPT, GPTConfig

CHARS = "\n !,.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TINY_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(CHARS), dropout=0.0)


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_ARGS)).eval()
    with torch.no_grad():  # large position embeddings: varied greedy text from an untrained model
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture
def out_dir(tmp_path):
    meta = {"tokenizer": {"type": "char", "chars": CHARS, "eot": False}, "vocab_size": len(CHARS), "eot_id": None}
    save_checkpoint(str(tmp_path / "out" / "ckpt.pt"),
                    {"model": tiny_model().state_dict(), "model_args": TINY_ARGS, "meta": meta})
    return tmp_path


def sample(out_dir, *args, check=True):
    return run_here("sample.py", "--out_dir=out", "--device=cpu", *args, cwd=out_dir, check=check)


def decode(ids):
    return "".join(CHARS[i] for i in ids)


def samples_of(stdout):
    return [s.strip("\n") for s in stdout.split("---------------")[:-1]]


def test_greedy_stop_and_stream(out_dir):
    prompt = "ROMEO:"
    expected = decode(generate(tiny_model(), [[CHARS.index(c) for c in prompt]], 60, temperature=0)[0])
    out = sample(out_dir, f"--start={prompt}", "--temperature=0", "--max_new_tokens=60", "--num_samples=2",
                 "--verbose")
    assert samples_of(out.stdout) == [prompt + expected] * 2  # the script decodes what generate.py generates
    assert "tokens/s" in out.stderr
    assert "note: greedy decoding writes the same text 2 times; for different samples give a --temperature" in out.stderr
    assert "more than the model's context" not in out.stderr
    long = sample(out_dir, "--start=" + "ROMEO: " * 6, "--max_new_tokens=2", "--num_samples=1").stderr
    assert "note: the prompt's 42 tokens are more than the model's context: each new token is predicted from the " \
           "last 32 only" in long
    named = sample(out_dir, "--init_from=out/ckpt.pt", "--max_new_tokens=2", "--num_samples=1").stderr
    assert "note: --out_dir=out is not used: --init_from=out/ckpt.pt names the model" in named  # sample() gives both

    stop = expected[10:12]
    cut = prompt + expected[:expected.index(stop)]
    out = sample(out_dir, f"--start={prompt}", "--temperature=0", "--max_new_tokens=60", "--num_samples=1",
                 f"--stop={stop}")
    assert samples_of(out.stdout) == [cut]
    streamed = sample(out_dir, f"--start={prompt}", "--temperature=0", "--max_new_tokens=60", "--num_samples=1",
                      f"--stop={stop}", "--stream")
    assert streamed.stdout == out.stdout == cut + "\n---------------\n"  # a lone sample ends as without --stream

    # several samples: the first streamed, then the others; the same samples, printed the same way, as without
    args = [f"--start={prompt}", "--temperature=1.0", "--max_new_tokens=30", "--num_samples=3", "--seed=7"]
    assert sample(out_dir, *args, "--stream").stdout == sample(out_dir, *args).stdout


def test_seed_reproduces_and_beams(out_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    args = ["--start=FILE:prompt.txt", "--max_new_tokens=30", "--num_samples=3", "--temperature=1.0"]
    first, again = sample(out_dir, *args, "--seed=5"), sample(out_dir, *args, "--seed=5")
    assert first.stdout == again.stdout and len(set(samples_of(first.stdout))) > 1
    beams = sample(out_dir, "--start=A", "--max_new_tokens=10", "--num_beams=3", "--num_samples=2",
                   "--stop=[\"\\n\\n\", 1]")
    texts = samples_of(beams.stdout)
    assert len(texts) == 2 and texts[0] != texts[1] and all(t.startswith("A") for t in texts)
    assert "note:" not in beams.stderr
    # settings the decoding never reads are named, not quietly dropped (a trial's --temperature with beams)
    told = sample(out_dir, "--start=A", "--max_new_tokens=10", "--num_beams=3", "--num_samples=2",
                  "--stop=[\"\\n\\n\", 1]", "--temperature=0.7", "--top_p=0.9", "--seed=5")
    assert told.stdout == beams.stdout
    assert "note: beam search does not use --temperature, --top_p, --seed" in told.stderr
    told = sample(out_dir, "--start=A", "--max_new_tokens=5", "--num_samples=1", "--length_penalty=2")
    assert "note: sampling does not use --length_penalty" in told.stderr
    # the checkpoint named as train.py's --init_from takes it, its folder or its file, from anywhere
    for init_from in ("out", "out/ckpt.pt"):
        named = run_here("sample.py", f"--init_from={init_from}", "--out_dir=elsewhere", "--device=cpu", *args,
                           "--seed=5", cwd=out_dir)
        assert named.stdout.replace(init_from, "out") == first.stdout


def test_compiled_decoding_gives_the_same_text(out_dir):
    """--compile=True: a real torch.compile (inductor on CPU) of the decoding step, on the static KV cache."""
    prompt = "ROMEO:"
    expected = decode(generate(tiny_model(), [[CHARS.index(c) for c in prompt]], 40, temperature=0)[0])
    out = sample(out_dir, f"--start={prompt}", "--temperature=0", "--max_new_tokens=40", "--num_samples=2",
                 "--compile=True", "--verbose")
    assert samples_of(out.stdout) == [prompt + expected] * 2  # past block_size (32) too, where decoding recomputes
    assert "compiled" in out.stderr


def test_stop_escapes():
    """A shell hands --stop="\\n\\n" over as backslashes and n's: they mean newlines (in a JSON list, JSON says so)."""
    from sample import parse_stop
    assert parse_stop(r"\n\n") == (["\n\n"], [])
    assert parse_stop(r"a\tb\\n") == (["a\tb\\n"], [])  # an escaped backslash stays one backslash, before an n
    assert parse_stop(r'["\n\n", 50256]') == (["\n\n"], [50256])


@pytest.mark.parametrize("args, message", [
    (["--start="], "--start is empty and this tokenizer has no end-of-text token"),
    (["--start=FILE:empty.txt"], "--start=FILE:empty.txt is empty and this tokenizer has no end-of-text token to "
                                 "start from; give --start=\"some text\""),  # the file named (a trial)
    (["--start=ROMEO#"], "--start: text has characters outside this model's"),
    (["--start=A\\nB"], "the text is taken as it is: for a newline, type one ($'a\\nb' in bash) or use FILE:path"),
    (["--max_new_tokens=0", "--top_p=0", "--stop=[\"a\", 1.5]", "--stream", "--num_beams=2"],
     "max_new_tokens=0 must be at least 1"),
    (["--out_dir=nowhere"], "no checkpoint at nowhere/ckpt.pt"),
    (["--out_dir=latin1.txt"], "latin1.txt is a file, not a run's folder (nor a .pt checkpoint): give the folder"),
    (["--out_dir=hf"], "no checkpoint at hf/ckpt.pt: hf holds a Hugging Face model; give --init_from=hf to sample"),
    (["--init_from=out/ckpt_1.pt"], "no checkpoint file out/ckpt_1.pt; did you mean out/ckpt.pt? (out holds ckpt.pt)"),
    (["--start=FILE:missing.txt"], "cannot read the --start file missing.txt"),
    (["--start=FILE:latin1.txt"], "cannot read the --start file latin1.txt: byte 3 is not UTF-8"),
    (["--stop=[\"\\n\", 59]"], "token id 59 is not in this model's vocabulary of 59 ids (0 to 58)"),
    (["--stop=[-1]"], "token id -1 is not in this model's vocabulary"),
    (["--stop=[\"\"]"], "an empty string would never stop a sample"),
    (["--seed=-1"], "seed=-1 cannot be negative"),
    ([os.path.join(REPO, "config/train_shakespeare_char.py")], "a config for train.py? give sample.py the run's --out_dir"),
    (["--stop=END@"], "no sample could ever end on 'END@': text has characters outside this model's"),
    (["--num_beams=2"], "num_samples=3 (its default) is more than num_beams=2 hypotheses: pass --num_samples=2 or "
                        "fewer for the best ones"),
    (["--num_beams=60", "--num_samples=1"], "num_beams=60 is more than the model's 59 tokens"),  # a trial's OOM
])
def test_bad_input(out_dir, args, message):
    (out_dir / "latin1.txt").write_bytes("café".encode("latin-1"))
    (out_dir / "empty.txt").write_text("")
    (out_dir / "hf").mkdir(exist_ok=True)  # an export, given as a run
    (out_dir / "hf" / "config.json").write_text("{}")
    proc = sample(out_dir, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if "--top_p=0" in args:  # every problem at once
        for problem in ("top_p=0.0 must be in (0, 1]", "may hold only strings and token ids",
                        "stream=True cannot show beam search"):
            assert problem in proc.stderr


def test_gpt2_weights_come_from_hf_py(monkeypatch):
    """--init_from=gpt2... takes the weights and the tokenizer from hf.py (issue 7), imported only then."""
    import inference

    calls = []
    fake = types.ModuleType("hf")
    fake.load_hf_gpt2 = lambda name, **overrides: calls.append(name) or tiny_model()
    fake.hf_tokenizer_meta = lambda name: calls.append(name) or {
        "tokenizer": {"type": "char", "chars": CHARS, "eot": False}, "vocab_size": len(CHARS), "eot_id": None}
    monkeypatch.setitem(sys.modules, "hf", fake)
    model, tokenizer, train_config = inference.load_model("gpt2-medium", "out", "cpu")
    assert calls == ["gpt2-medium"] * 2 and train_config is None and not model.training
    assert tokenizer.decode(tokenizer.encode("ROMEO:")) == "ROMEO:" and tokenizer.vocab_size == len(CHARS)


def test_nanogpt_checkpoint_samples_with_its_datasets_vocabulary(out_dir):
    """A ckpt.pt nanoGPT wrote (no tokenizer in it, an unpadded vocabulary, `_orig_mod.` prefixes, iter_num, and the
    causal-mask buffers it kept before PyTorch 2) samples with the characters of its dataset's meta.pkl, as nanoGPT's
    own sample.py does, and gives the text our checkpoint of the same weights gives. Without that meta.pkl it is one
    line, naming where it looked; train.py will not resume it."""
    import pickle
    rows = len(CHARS)
    state = {"_orig_mod." + k: (v[:rows] if k in ("transformer.wte.weight", "lm_head.weight") else v)
             for k, v in tiny_model().state_dict().items()}
    block = TINY_ARGS["block_size"]
    state.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(block, block).tril().view(1, 1, block, block)
                  for i in range(TINY_ARGS["n_layer"])})
    (out_dir / "nano").mkdir()
    torch.save({"model": state, "optimizer": {}, "model_args": dict(TINY_ARGS), "iter_num": 250, "best_val_loss": 1.5,
                "config": {"dataset": "nano_char", "n_layer": 2}}, out_dir / "nano/ckpt.pt")
    (out_dir / "data/nano_char").mkdir(parents=True)
    with open(out_dir / "data/nano_char/meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": rows, "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}},
                    f)
    args = ["--start=ROMEO:", "--temperature=0", "--max_new_tokens=40", "--num_samples=1"]
    nano = sample(out_dir, *args, "--out_dir=nano")
    assert nano.stdout == sample(out_dir, *args).stdout and nano.stderr.startswith("nano (step 250): ")

    for split in ("train", "val"):  # nanoGPT's headerless uint16 files
        (torch.arange(200) % rows).to(torch.int16).numpy().tofile(out_dir / f"data/nano_char/{split}.bin")
    proc = run_here("train.py", "--out_dir=nano", "--init_from=resume", "--dataset=nano_char", "--device=cpu",
                    cwd=out_dir, check=False)
    assert proc.returncode == 2 and "holds no training state to resume (a nanoGPT checkpoint?)" in proc.stderr
    proc = run_here("train.py", "--out_dir=nano", "--dataset=nano_char", "--device=cpu", cwd=out_dir, check=False)
    assert proc.returncode == 2 and "nano/ckpt.pt is a nanoGPT checkpoint, which holds no training state to resume: " \
        "train on from its weights in another --out_dir with --init_from=nano/ckpt.pt" in proc.stderr  # not auto

    (out_dir / "data/nano_char/meta.pkl").unlink()
    proc = sample(out_dir, *args, "--out_dir=nano", check=False)
    assert proc.returncode == 2 and "the checkpoint in nano does not say which tokenizer it was trained with, and " \
        "its dataset folder data/nano_char holds no meta.pkl or meta.json that fits it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_cut_short_by_its_reader(out_dir):
    """`sample.py | head -1`: the reader goes away, and the samples stop without a traceback, with the code a shell
    gives a process ended by SIGPIPE. The samples (400 kB) are more than a pipe holds (64 kB on Linux): sample.py
    cannot finish before the reader closes, however late (it did, once, on a loaded machine, and exited 0)."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), "--out_dir=out", "--device=cpu",
                             "--num_samples=2000", "--max_new_tokens=200"], cwd=out_dir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
