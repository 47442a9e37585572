"""
Hugging Face in and out (issue 7), offline: tiny random GPT2LMHeadModels built here stand in for the Hub's GPT-2s,
and transformers itself is the reference for everything we export.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from checkpoint import save_checkpoint
from configurator import UserError, parse
from conftest import generated_text, gpt2_bpe_available, killed_at_replace, run_here, run_script
from hf import check_dataset_tokenizer, hf_tokenizer_meta, load_hf_gpt2, save_hf_gpt2, to_hf_state_dict
from model import GPT, GPTConfig
from tokendata import GPT2_META
from tokenizer import CharTokenizer, TiktokenTokenizer

transformers.logging.set_verbosity_error()  # loading bars and advice about generation settings


def random_hf_gpt2(**config):
    """A GPT2LMHeadModel with every parameter random, biases and LayerNorms included, so no mapping slip hides."""
    args = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50)
    args.update(config)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**args, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2)  # LayerNorm gains near 1
    return model.eval()


def our_logits(model, idx):
    logits, _ = model.eval()(idx, all_logits=True)
    return logits


def hf_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx).logits


@pytest.mark.parametrize("config, overrides", [
    (dict(), dict()),
    (dict(n_embd=48, n_head=3, vocab_size=100), dict()),  # n_embd not a multiple of 64, vocab padded to 128
    (dict(n_embd=40, n_head=5, n_layer=3, activation_function="gelu_pytorch_tanh"), dict()),
    (dict(n_positions=32), dict(block_size=12)),  # the position table cropped
])
def test_import_matches_transformers(tmp_path, config, overrides):
    hf_model = random_hf_gpt2(**config)
    hf_model.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), **overrides)
    T = overrides.get("block_size", hf_model.config.n_positions)
    assert ours.config.block_size == T and ours.transformer.wpe.weight.shape[0] == T
    idx = torch.randint(0, hf_model.config.vocab_size, (3, T))
    expected = hf_logits(hf_model, idx)
    assert (our_logits(ours, idx) - expected).abs().max().item() < 1e-4
    assert expected.abs().max().item() > 1.0  # the weights are not so small that any mapping would pass


def test_import_legacy_layout(tmp_path):
    """The Hub's GPT-2 files: pytorch_model.bin, keys without 'transformer.', causal-mask buffers among them."""
    hf_model = random_hf_gpt2()
    hf_model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_hf_gpt2(str(tmp_path), dropout=0.1)
    assert ours.config.dropout == 0.1
    idx = torch.randint(0, 50, (2, 16))
    assert (our_logits(ours, idx) - hf_logits(hf_model, idx)).abs().max().item() < 1e-4


def test_import_refusals(tmp_path):
    random_hf_gpt2().save_pretrained(tmp_path / "ok")
    with pytest.raises(UserError, match="exceeds .* context of 16 tokens"):
        load_hf_gpt2(str(tmp_path / "ok"), block_size=32)
    random_hf_gpt2(activation_function="relu", tie_word_embeddings=False).save_pretrained(tmp_path / "relu")
    with pytest.raises(UserError, match="activation_function 'relu'.*untied lm_head"):  # every problem at once
        load_hf_gpt2(str(tmp_path / "relu"))
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "n_head": 3}))
    with pytest.raises(UserError, match="n_embd=32 is not divisible by n_head=3"):
        load_hf_gpt2(str(tmp_path / "ok"))
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(UserError, match="do not fit a GPT-2 of this config: missing transformer.h.2"):
        load_hf_gpt2(str(tmp_path / "ok"))
    os.remove(tmp_path / "ok" / "model.safetensors")
    with pytest.raises(UserError, match="has no weights"):
        load_hf_gpt2(str(tmp_path / "ok"))
    with pytest.raises(UserError, match="neither a folder nor one of gpt2"):
        load_hf_gpt2("gpt3")
    for path in (str(tmp_path / "nowhere"), "./nowhere", "runs/out/hf"):  # a path, not a Hub repository to download
        with pytest.raises(UserError, match="no such folder"):
            load_hf_gpt2(path)
    with pytest.raises(UserError, match="config.json is a file, neither a Hugging Face model folder"):
        load_hf_gpt2(str(tmp_path / "ok" / "config.json"))
    (tmp_path / "model.pth").write_bytes(b"a torch.save'd checkpoint, named otherwise")  # a trial's rename
    with pytest.raises(UserError, match=r"model.pth is a file, .* nor a checkpoint ending in .pt; a checkpoint of "
                                        r"this toolkit's or nanoGPT's saved under another name is read once renamed"):
        load_hf_gpt2(str(tmp_path / "model.pth"))


@pytest.mark.parametrize("bias", [True, False])
def test_import_export_round_trip(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=bias))
    meta = {"tokenizer": CharTokenizer(chr(32 + i) for i in range(50)).meta(), "vocab_size": 50, "eot_id": None}
    save_hf_gpt2(model, meta, tmp_path / "hf")
    back = load_hf_gpt2(str(tmp_path / "hf"))
    original, loaded = model.state_dict(), back.state_dict()
    for key, value in original.items():  # padded vocabulary rows are not weights: they are never used
        rows = slice(0, 50) if key in ("transformer.wte.weight", "lm_head.weight") else slice(None)
        assert torch.equal(value[rows], loaded[key][rows]), key
    extra = set(loaded) - set(original)
    assert bool(extra) != bias and all(not loaded[k].any() for k in extra)  # bias=False: zero biases
    assert hf_tokenizer_meta(str(tmp_path / "hf")) == meta


def test_trained_model_exported_by_command_line(tmp_path):
    """A char model trained a few steps, saved as train.py saves it, exported by export.py: transformers' model,
    tokenizer and pipeline agree with ours."""
    text = generated_text(20_000)
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=48, block_size=32, vocab_size=tokenizer.vocab_size, bias=False)
    torch.manual_seed(0)
    model = GPT(config)  # bias=False, as config/train_shakespeare_char.py trains
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(20):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[i:i + 33] for i in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # it learned: the weights are no longer the initial ones
    meta = {"tokenizer": tokenizer.meta(), "vocab_size": tokenizer.vocab_size, "eot_id": None}
    save_checkpoint(str(tmp_path / "out" / "ckpt.pt"),
                    {"model": model.state_dict(), "model_args": dataclasses.asdict(config), "meta": meta})

    out = run_script("export.py", "--out_dir=out", "--hf_dir=hf", cwd=tmp_path)
    assert "zero biases for bias=False" in out.stdout
    # one checkpoint file of a run: exported beside the run (out-ckpt-hf), not into a folder inside it named ckpt.pt-hf
    assert "wrote out-ckpt-hf:" in run_here("export.py", "--out_dir=out/ckpt.pt", cwd=tmp_path).stdout
    # from inside the run: beside it too, by its name (not a hidden '.-hf' inside it)
    assert f"wrote {tmp_path / 'out'}-hf:" in run_here("export.py", "--out_dir=.", cwd=tmp_path / "out").stdout
    assert os.path.isfile(tmp_path / "out-hf" / "config.json") and not os.path.exists(tmp_path / "out" / ".-hf")
    modes = {os.stat(tmp_path / "hf" / name).st_mode & 0o777 for name in ("config.json", "model.safetensors")}
    assert len(modes) == 1, modes  # the weights as readable as the rest (safetensors alone writes 0600)

    ours = model.eval()
    hf_dir = str(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf_model.config.vocab_size == ours.config.vocab_size  # no padded rows
    idx = torch.randint(0, ours.config.vocab_size, (2, 32))
    assert (our_logits(ours, idx) - hf_logits(hf_model, idx)).abs().max().item() < 1e-4

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "ROMEO:\nthe night  the day . love\n"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    # no token_type_ids: transformers 4 returned zeros, which GPT-2 adds as token 0's embedding (a trial's
    # model(**tok(text)) was off by 7 in the logits); the file says so for every version
    assert json.loads((tmp_path / "hf/tokenizer_config.json").read_text())["model_input_names"] == \
        ["input_ids", "attention_mask"]
    encoded = hf_tokenizer(text[:32], return_tensors="pt")  # within the context
    assert list(encoded) == ["input_ids", "attention_mask"]
    assert (hf_model(**encoded).logits - hf_model(input_ids=encoded.input_ids).logits).abs().max().item() == 0
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer_meta(hf_dir) == meta  # so --init_from=hf fine-tunes on the same data

    generate = transformers.pipeline("text-generation", model=hf_dir)
    text = generate("ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
    # no length given: the model's context bounds it (transformers 5's pipeline asked 256 new tokens of a 32-token
    # model, past its position table: an IndexError)
    text = generate("ROMEO:", do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) == config.block_size

    # sample.py reads the folder with its own char tokenizer: the same text as from the checkpoint
    args = ["--start=ROMEO:", "--temperature=0", "--num_samples=1", "--max_new_tokens=20", "--device=cpu"]
    from_hf = run_here("sample.py", "--init_from=hf", *args, cwd=tmp_path).stdout
    from_checkpoint = run_here("sample.py", "--out_dir=out", *args, cwd=tmp_path).stdout
    assert from_hf == from_checkpoint and from_hf.startswith("ROMEO:")


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_nanogpt_gpt2_checkpoint_exports_the_real_vocabulary(tmp_path):
    """nanoGPT records GPT-2's vocabulary as 50,304 ids, its padding included: exported, the folder holds the 50,257
    real ones (as GPT-2's does), transformers computes our logits over them, and the folder loads back here."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).eval()
    args = {**dataclasses.asdict(model.config), "vocab_size": 50304}
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    os.makedirs(tmp_path / "nano")
    torch.save({"model": state, "model_args": args, "iter_num": 100, "config": {}}, tmp_path / "nano/ckpt.pt")
    run_here("export.py", "--out_dir=nano", "--hf_dir=hf", cwd=tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert hf_model.config.vocab_size == 50257
    idx = torch.randint(0, 50257, (2, 16))
    assert (our_logits(model, idx) - hf_logits(hf_model, idx)).abs().max().item() < 1e-4
    assert hf_tokenizer_meta(str(tmp_path / "hf")) == GPT2_META  # and the toolkit loads its export back
    assert (our_logits(load_hf_gpt2(str(tmp_path / "hf")), idx) - our_logits(model, idx)).abs().max().item() < 1e-5


def test_padded_vocabulary_imports(tmp_path):
    """An embedding with rows past its tokenizer's ids, padded to a multiple of 64 (transformers'
    resize_token_embeddings(pad_to_multiple_of=64), as nanoGPT pads GPT-2's to 50,304): the tokenizer's vocabulary,
    the rest padding that is never sampled, and the logits over the real ids are transformers' own. Rows that are no
    such padding, and a tokenizer this toolkit cannot read, are refused saying why (a trial was told only that its
    tokenizer could not be told)."""
    from tokenizer import BPETokenizer
    text = generated_text(30_000)
    bpe = BPETokenizer.train([text[i:i + 5000] for i in range(0, len(text), 5000)], 1000, show_progress=False)
    n = bpe.vocab_size  # as many as the text gives, up to 1,000
    rows = n // 64 * 64 + 64
    hf = random_hf_gpt2(vocab_size=rows)
    hf.save_pretrained(tmp_path / "padded")
    (tmp_path / "padded/tokenizer.json").write_text(bpe.json)
    assert hf_tokenizer_meta(str(tmp_path / "padded")) == {"tokenizer": bpe.meta(), "vocab_size": n,
                                                             "eot_id": bpe.eot_id}
    model = load_hf_gpt2(str(tmp_path / "padded"))
    assert model.config.vocab_size == n
    idx = torch.randint(0, n, (2, 16))
    assert (our_logits(model, idx) - hf_logits(hf, idx)[..., :n]).abs().max().item() < 1e-4
    out = run_here("sample.py", "--init_from=padded", "--start=the", "--max_new_tokens=5", "--device=cpu",
                   cwd=tmp_path)
    assert out.stdout.startswith("the")
    for odd in (rows + 1, rows + 128):  # not a multiple of 64; more than padding
        random_hf_gpt2(vocab_size=odd).save_pretrained(tmp_path / "odd")
        (tmp_path / "odd/tokenizer.json").write_text(bpe.json)
        with pytest.raises(UserError, match=rf"cannot tell which tokenizer .*odd uses \(the bpe tokenizer has {n} "
                                            rf"tokens, but vocab_size is {odd}\)"):
            hf_tokenizer_meta(str(tmp_path / "odd"))


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_a_bpe_of_its_own_is_not_taken_for_gpt2s(tmp_path):
    """A folder whose tokenizer has GPT-2's 50,257 tokens under other ids would read and write wrong text with GPT-2's
    BPE: refused in one line. GPT-2's own vocab.json, or none at all (weights only), reads as GPT-2's."""
    from hf import gpt2_bpe_files
    random_hf_gpt2(vocab_size=50257, n_layer=1, n_embd=16).save_pretrained(tmp_path / "own")
    assert hf_tokenizer_meta(str(tmp_path / "own")) == GPT2_META  # no tokenizer files
    vocab, merges = gpt2_bpe_files()
    (tmp_path / "own/vocab.json").write_text(vocab)
    (tmp_path / "own/merges.txt").write_text(merges)
    assert hf_tokenizer_meta(str(tmp_path / "own")) == GPT2_META
    random_hf_gpt2(vocab_size=50304, n_layer=1, n_embd=16).save_pretrained(tmp_path / "own")  # nanoGPT's padding
    assert hf_tokenizer_meta(str(tmp_path / "own")) == GPT2_META
    assert load_hf_gpt2(str(tmp_path / "own")).config.vocab_size == 50257
    ids = json.loads(vocab)
    ids["\u0120the"], ids["\u0120of"] = ids["\u0120of"], ids["\u0120the"]  # " the" and " of", byte-level
    (tmp_path / "own/vocab.json").write_text(json.dumps(ids))
    with pytest.raises(UserError, match="own's tokenizer has 50,257 tokens, as GPT-2's, but other ids for them"):
        hf_tokenizer_meta(str(tmp_path / "own"))


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_gpt2_tokenizer_export(tmp_path, shakespeare_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257))
    save_hf_gpt2(model, GPT2_META, tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = TiktokenTokenizer("gpt2")
    with open(shakespeare_path, encoding="utf-8") as f:
        text = f.read()[:50_000] + " Hello  world\n\n\t héllo 你好 🤖 it's 1234567 . , don't"
    ids = ours.encode(text)
    assert hf_tokenizer(text).input_ids == ids
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == 50256
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.eos_token_id == 50256
    # merges.txt is byte for byte GPT-2's vocab.bpe, where tiktoken's cache holds that file
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    files = [os.path.join(cache, name) for name in os.listdir(cache)] if os.path.isdir(cache) else []
    for original in [open(path, "rb").read() for path in files]:
        if original.startswith(b"#version: 0.2"):
            assert (tmp_path / "hf" / "merges.txt").read_bytes() == original
    text = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))(
        "Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello") and len(text) > len("Hello")


@pytest.mark.parametrize("again", [False, True])
def test_killed_export_leaves_what_the_next_one_removes(tmp_path, again):
    """An export killed before its last rename (no handler runs) leaves its partial folder, and one that was
    replacing an earlier export leaves that export set aside too (and no hf_dir): each as large as a model, which
    nothing removed (trial). The next export to that folder that succeeds removes them, saying so; one that fails
    leaves them (the set-aside export may be the only one); a live process's, another machine's, a folder holding
    other files, and a user's own copy stay."""
    chars = "\n abcdefghijklmnopqrstuvwxyz"
    for name, rope in (("out", False), ("rope", True)):  # rope: an export refused
        config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=len(chars), rope=rope)
        meta = {"tokenizer": {"type": "char", "chars": chars, "eot": False}, "vocab_size": len(chars), "eot_id": None}
        save_checkpoint(str(tmp_path / name / "ckpt.pt"),
                        {"model": GPT(config).state_dict(), "model_args": dataclasses.asdict(config), "meta": meta})
    if again:
        run_here("export.py", "--out_dir=out", "--hf_dir=hf", cwd=tmp_path)
    killed_at_replace(1, "hf", "export.py", "--out_dir=out", "--hf_dir=hf", cwd=tmp_path)
    left = sorted(p for p in os.listdir(tmp_path) if p.startswith("hf"))
    host = socket.gethostname()
    assert [re.sub(r"\d+$", "", p) for p in left] == [f"hf.partial-export.{host}."] + \
        [f"hf.replaced-export.{host}."] * again
    assert run_here("export.py", "--out_dir=rope", "--hf_dir=hf", cwd=tmp_path, check=False).returncode == 2
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("hf")) == left  # kept: the export failed
    ended = subprocess.Popen(["true"])
    ended.wait()
    kept = [f"hf.partial-export.{host}.{os.getppid()}",  # a live process's: an export under way
            f"hf.partial-export.another-node.{ended.pid}",  # on a shared file system: its process is not ours to see
            f"hf.replaced-export.{host}.{ended.pid}",  # with a file an export does not write
            "hf.old2024"]  # a user's copy
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / kept[2] / "notes.txt").write_text("mine")
    out = run_here("export.py", "--out_dir=out", "--hf_dir=hf", cwd=tmp_path).stdout
    assert all(f"note: removed {tmp_path / p}, what an export killed before it finished left" in out for p in left)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("hf")) == sorted(["hf", *kept])
    # into a folder that does not exist yet: made, and nothing to look for beside it (it was a traceback once)
    assert "wrote new/sub/hf:" in run_here("export.py", "--out_dir=out", "--hf_dir=new/sub/hf", cwd=tmp_path).stdout


def test_export_refusals_leave_nothing_behind(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    meta = {"tokenizer": CharTokenizer("abcdefghijklmnopqrst").meta(), "vocab_size": 20, "eot_id": None}
    bad_meta = {"tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"}, "vocab_size": 20, "eot_id": None}
    with pytest.raises(UserError, match="no Hugging Face tokenizer for the tiktoken encoding 'cl100k_base'"):
        save_hf_gpt2(model, bad_meta, tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # no folder that looks complete, no temporary one either
    # a description sample.py refuses (a trial's, from a word-level meta.pkl): its tokenizer.json mapped characters
    # to ids past the model's vocabulary, and transformers crashed on them
    words = {"tokenizer": {"type": "char", "chars": "the cat sat", "eot": False}, "vocab_size": 20, "eot_id": None}
    with pytest.raises(UserError, match=r"the checkpoint's tokenizer is unusable \(the char tokenizer's chars repeat "
                                        r"a character\): no Hugging Face tokenizer can be written for it"):
        save_hf_gpt2(model, words, tmp_path / "hf")
    assert os.listdir(tmp_path) == []

    save_hf_gpt2(model, meta, tmp_path / "hf")
    first = (tmp_path / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="no Hugging Face tokenizer"):  # a failed re-export keeps the old one whole
        save_hf_gpt2(model, bad_meta, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(2.0)
    save_hf_gpt2(model, meta, tmp_path / "hf")  # re-exporting replaces a previous export
    assert load_hf_gpt2(str(tmp_path / "hf")).transformer.ln_f.weight.eq(2.0).all()
    # a link to the folder (on bigger storage, say): the swap would put a folder in its place and the link aside,
    # then fail on rmtree of the link (a trial's traceback)
    os.symlink(tmp_path / "hf", tmp_path / "link")
    with pytest.raises(UserError, match=rf"link is a symbolic link: give the folder it points to, "
                                        rf"--hf_dir={tmp_path / 'hf'}$"):
        save_hf_gpt2(model, meta, tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["hf", "link"]


def test_export_into_a_full_disk_or_a_mount_point(tmp_path, monkeypatch):
    """A full disk is an OSError (one line from every script), not safetensors' own error's traceback, and leaves the
    earlier export whole; a mount point (a container's volume), which the swap into place cannot rename, is refused
    before anything is written, with the folder inside it to give (both tracebacks in a trial)."""
    import errno

    import safetensors.torch
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    meta = {"tokenizer": CharTokenizer("abcdefghijklmnopqrst").meta(), "vocab_size": 20, "eot_id": None}
    save_hf_gpt2(model, meta, tmp_path / "hf")
    first = (tmp_path / "hf" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as error:
        save_hf_gpt2(model, meta, tmp_path / "hf")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"] and (tmp_path / "hf" / "model.safetensors").read_bytes() == first
    monkeypatch.undo()
    mounted = str(tmp_path / "volume")
    monkeypatch.setattr(os.path, "ismount", lambda path: os.path.normpath(path) == mounted)  # mounting needs root
    with pytest.raises(UserError, match=f"{mounted} is a mount point, which an export cannot replace: give a folder "
                                        f"inside it, --hf_dir={mounted}/model"):
        save_hf_gpt2(model, meta, mounted)
    assert sorted(os.listdir(tmp_path)) == ["hf"]

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files an export does not write \\(notes.txt\\)"):
        save_hf_gpt2(model, meta, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    with pytest.raises(UserError, match="mine/notes.txt is a file, not a folder: choose another --hf_dir"):
        save_hf_gpt2(model, meta, tmp_path / "mine" / "notes.txt")


def test_import_takes_gpt2s_options_not_model_pys(monkeypatch):
    """A GPT-2 imported, or a checkpoint that names no options (nanoGPT's, and older ones of this toolkit), is GPT-2's
    model whatever defaults a fork gives GPTConfig (review: a fork defaulting to a logit softcap imported GPT-2 with
    one, logits off by up to 222)."""
    import checkpoint
    import hf
    import model

    @dataclasses.dataclass
    class Fork(GPTConfig):
        logit_softcap: float = 15.0

    monkeypatch.setattr(hf, "GPTConfig", Fork)
    monkeypatch.setattr(model, "GPTConfig", Fork)  # where model_from_checkpoint takes it from
    config = hf.config_from_hf({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 8,
                                "vocab_size": 20})
    assert isinstance(config, Fork) and config.departures() == {}
    args = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "bias": True, "vocab_size": 20, "dropout": 0.0}
    nano = {"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args}  # as nanoGPT saves them
    assert checkpoint.model_from_checkpoint(nano, "nano").config.departures() == {}
    assert Fork(**args).departures() == {"logit_softcap": 15.0}  # the fork's own default, where none is given


def test_export_refuses_what_gpt2_cannot_express():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, rope=True))
    with pytest.raises(UserError, match="GPT-2 cannot express this model \\(rope=True\\)"):
        save_hf_gpt2(model, GPT2_META, "never-written")
    assert not os.path.exists("never-written")


def test_export_checks_gpt2_not_this_model_py(tmp_path, monkeypatch):
    """What GPT-2 is comes from GPT-2, not from model.py, which a researcher's fork changes (trial): a weight a
    changed block adds, or one it reshapes, is refused, where the layout made from model.py itself took it in and
    transformers dropped it; and a default changed to relu2 does not make GPT-2's GELU a departure, nor relu2 GPT-2."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    model = GPT(config)
    model.transformer.h[1].res_gain = torch.nn.Parameter(torch.ones(1))  # a fork's new weight
    with pytest.raises(UserError, match=r"GPT-2 cannot express this model \(transformer\.h\.1\.res_gain\)"):
        save_hf_gpt2(model, GPT2_META, tmp_path / "never-written")
    model = GPT(config)
    model.transformer.h[0].mlp.c_fc = torch.nn.Linear(16, 32)  # a fork's narrower MLP, no field saying so
    model.transformer.h[0].mlp.c_proj = torch.nn.Linear(32, 16)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight of shape \(32, 16\), not \(64, 16\)"):
        save_hf_gpt2(model, GPT2_META, tmp_path / "never-written")
    del model.transformer.h[0].ln_2  # a fork's block without its second norm
    with pytest.raises(UserError, match=r"no transformer\.h\.0\.ln_2\.bias, no transformer\.h\.0\.ln_2\.weight"):
        save_hf_gpt2(model, GPT2_META, tmp_path / "never-written")
    monkeypatch.setattr(GPTConfig.__dataclass_fields__["mlp"], "default", "relu2")
    assert GPT(config).config.departures() == {}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8, vocab_size=20)).state_dict()
    assert set(to_hf_state_dict(GPT(config))) == set(gpt2) - {"lm_head.weight"}  # written tied
    with pytest.raises(UserError, match=r"cannot express this model \(mlp='relu2'\)"):
        to_hf_state_dict(GPT(dataclasses.replace(config, mlp="relu2")))
    assert not os.path.exists(tmp_path / "never-written")


def test_export_in_half_precision(tmp_path):
    """--dtype=bfloat16 writes half-size weights that say so in config.json; reading them back (ours, transformers')
    gives exactly the weights rounded to bfloat16. A weight too large for float16 is refused, nothing written."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50)
    model = GPT(config)
    meta = {"tokenizer": CharTokenizer(chr(32 + i) for i in range(50)).meta(), "vocab_size": 50, "eot_id": None}
    checkpoint = {"model": model.state_dict(), "model_args": dataclasses.asdict(config), "meta": meta}
    save_checkpoint(str(tmp_path / "out" / "ckpt.pt"), checkpoint)
    run_here("export.py", "--out_dir=out", "--hf_dir=hf32", cwd=tmp_path)
    out = run_here("export.py", "--out_dir=out", "--hf_dir=hf16", "--dtype=bfloat16", cwd=tmp_path)
    assert "bfloat16 weights" in out.stdout
    from safetensors import safe_open
    with safe_open(str(tmp_path / "hf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sizes = [os.path.getsize(tmp_path / d / "model.safetensors") for d in ("hf16", "hf32")]
    assert 0.45 < sizes[0] / sizes[1] < 0.55

    back = load_hf_gpt2(str(tmp_path / "hf16")).state_dict()
    for key, value in model.state_dict().items():
        rows = slice(0, 50) if key in ("transformer.wte.weight", "lm_head.weight") else slice(None)
        assert torch.equal(back[key][rows], value[rows].to(torch.bfloat16).float()), key
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf16"), torch_dtype=torch.float32)
    rounded = GPT(config)
    rounded.load_state_dict(back)
    idx = torch.randint(0, 50, (2, 16))
    assert (our_logits(rounded, idx) - hf_logits(hf_model, idx)).abs().max().item() < 1e-4

    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = 1e6
    checkpoint["model"] = model.state_dict()
    save_checkpoint(str(tmp_path / "big" / "ckpt.pt"), checkpoint)
    proc = run_here("export.py", "--out_dir=big", "--hf_dir=hf_big", "--dtype=float16", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "transformer.h.1.mlp.c_fc.weight has weights too large for float16" in proc.stderr
    assert not (tmp_path / "hf_big").exists()
    assert run_here("export.py", "--out_dir=big", "--hf_dir=hf_big", "--dtype=bfloat16", cwd=tmp_path).returncode == 0


def test_export_command_line_errors(tmp_path):
    proc = run_here("export.py", "--out_dir=nowhere", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no checkpoint at nowhere/ckpt.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_here("export.py", "--out_dir=nowhere", "--dtype=int8", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "dtype='int8': expected one of float32, bfloat16, float16" in proc.stderr


def test_finetune_config_and_tokenizer_check():
    from train import TrainConfig
    cfg, _ = parse(TrainConfig, [os.path.join(os.path.dirname(__file__), "..", "config", "finetune_shakespeare.py")])
    assert cfg.init_from == "gpt2" and cfg.dataset == "shakespeare"
    assert hf_tokenizer_meta("gpt2-xl") == GPT2_META  # known without a download
    check_dataset_tokenizer("gpt2", "data/shakespeare", GPT2_META)
    char_meta = {"tokenizer": {"type": "char", "chars": "abc", "eot": False}, "vocab_size": 3, "eot_id": None}
    with pytest.raises(UserError, match=r"gpt2-medium reads the tiktoken encoding 'gpt2' \(50257 ids\), but data/sc "
                                        r"was tokenized with a 3-character vocabulary \(3 ids\); tokenize the text as "
                                        r"the model reads, beside it: python prepare.py sc --tokenizer=gpt2 "
                                        r"--out_root=data-gpt2 "):
        check_dataset_tokenizer("gpt2-medium", "data/sc", char_meta)


@pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")
def test_train_finetunes_from_hf_folder(tmp_path, shakespeare_path):
    """train.py --init_from=<Hugging Face folder> starts from those weights (GPT-2 BPE data, cropped block)."""
    hf_model = random_hf_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf_model.save_pretrained(tmp_path / "hf-tiny")
    run_script("prepare.py", "shakespeare", f"--source={shakespeare_path}", cwd=tmp_path)
    out = run_here("train.py", "--dataset=shakespeare", "--init_from=hf-tiny", "--device=cpu", "--compile=False",
                   "--block_size=32", "--batch_size=4", "--max_iters=4", "--eval_interval=4", "--eval_iters=2",
                   "--warmup_iters=1", "--out_dir=out", "--plot=False", cwd=tmp_path)
    assert "initialised from hf-tiny" in out.stdout
    ckpt = torch.load(tmp_path / "out/ckpt.pt", weights_only=False)
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["model_args"]["block_size"] == 32
    assert (ckpt["config"]["n_layer"], ckpt["config"]["n_embd"]) == (2, 32)  # the shape trained, not the defaults
    start = hf_model.state_dict()["transformer.h.0.mlp.c_fc.weight"].t()
    moved = (ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] - start).abs().max().item()
    assert 0 < moved < 0.05  # fine-tuned from the imported weights, not trained from a fresh init


@pytest.mark.parametrize("early_stopping, length_penalty", [(True, 1.0), (True, 0.0), (False, 2.0), (False, -1.0)])
def test_beam_search_matches_transformers(tmp_path, early_stopping, length_penalty):
    """On the same weights, with end-of-text likely (8 tokens), our beam search returns transformers' hypotheses and
    scores, best first; --early_stopping=False is transformers' early_stopping='never' (the exact bound)."""
    from generate import Stop, beam_search
    hf_model = random_hf_gpt2(vocab_size=8, n_positions=32)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(str(tmp_path / "hf")).eval()
    for seed in range(4):
        prompt = torch.randint(1, 8, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        found = beam_search(ours, prompt, 10, 3, length_penalty, early_stopping, Stop(ids=[0]))
        out = hf_model.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, max_new_tokens=10,
                                do_sample=False, length_penalty=length_penalty,
                                early_stopping=True if early_stopping else "never", eos_token_id=0, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True)
        theirs = []
        for seq, score in zip(out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()):
            end = seq.index(0) if 0 in seq else len(seq)  # the end-of-text and the padding after it
            theirs.append((score, seq[:end]))
        assert [tokens for _, tokens in found] == [tokens for _, tokens in theirs], (seed, found, theirs)
        assert [score for score, _ in found] == pytest.approx([score for score, _ in theirs], abs=1e-4)
