"""evaluate.py: strided perplexity against by-hand computations, HellaSwag scoring, train.py's val loss, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import REPO, generated_text, run_here, run_script
from distributed import Launch
from evaluate import strided_nll
from model import GPT, GPTConfig
from test_sample import CHARS, out_dir, tiny_model  # noqa: F401 (out_dir is a fixture: a tiny char checkpoint)
from tokendata import windows

SINGLE = Launch("single")


def tiny(block_size=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=50)).eval()


def nll_of(model, context, target):
    logits, _ = model(torch.tensor([context]))
    return -F.log_softmax(logits[0, -1], dim=-1)[target].item()


def evaluate_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_windows_score_every_token_once():
    assert windows(7, 4, 2) == [(0, 4, 4), (2, 6, 2)]
    assert windows(7, 4, 4) == [(0, 4, 4), (4, 6, 2)]
    assert windows(2, 4, 2) == [(0, 1, 1)]
    for n, window, stride in [(100, 16, 8), (101, 16, 5), (50, 16, 16), (17, 16, 1), (300, 32, 7)]:
        targets = []
        for begin, end, scored in windows(n, window, stride):
            assert 0 < end - begin <= window and 0 < scored <= end - begin
            if end - begin == window:  # a full window leaves at least window - stride tokens of context
                assert end - begin - scored >= window - stride or begin == 0
            targets += range(end + 1 - scored, end + 1)
        assert targets == list(range(1, n))


def test_stride_equal_to_window_is_the_non_overlapping_computation():
    model, tokens = tiny(), np.random.default_rng(0).integers(0, 50, 70)
    nll, count = strided_nll(model, tokens, 16, 16, 3, "cpu", torch.autocast("cpu", enabled=False), SINGLE)
    expected = 0.0
    for i in range(0, 69, 16):  # chunks of 17 tokens sharing one token: 16 predictions each (the last 5)
        end = min(i + 16, 69)
        x, y = torch.tensor(tokens[i:end])[None], torch.tensor(tokens[i + 1:end + 1])[None]
        _, loss = model(x, y)
        expected += loss.item() * y.numel()
    assert count == 69
    assert nll == pytest.approx(expected, rel=1e-5)


def test_strided_nll_by_hand():
    """Seven tokens, windows of 4 moving 2: the first window scores tokens 1-4, the second 5-6 from token 2 on."""
    model, t = tiny(), [5, 17, 3, 42, 8, 23, 11]
    by_hand = sum(nll_of(model, t[:j], t[j]) for j in (1, 2, 3, 4)) + sum(nll_of(model, t[2:j], t[j]) for j in (5, 6))
    nll, count = strided_nll(model, np.array(t), 4, 2, 2, "cpu", torch.autocast("cpu", enabled=False), SINGLE)
    assert count == 6 and nll == pytest.approx(by_hand, rel=1e-5)


def test_perplexity_of_a_text_file(out_dir):  # noqa: F811
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 3
    (out_dir / "verse.txt").write_text(text)
    proc = run_here("evaluate.py", "--out_dir=out", "--text=verse.txt", "--stride=10", "--batch_size=3",
                    "--device=cpu", cwd=out_dir)
    result = evaluate_json(proc)
    ids = np.array([CHARS.index(c) for c in text])  # no end-of-text: scored from the second character
    nll, count = strided_nll(tiny_model(), ids, 32, 10, 4, "cpu", torch.autocast("cpu", enabled=False), SINGLE)
    assert result["tokens"] == count == len(text) - 1 and (result["window"], result["stride"]) == (32, 10)
    assert result["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / (len(text) - 1), rel=1e-5)
    assert f"perplexity {result['perplexity']:.3f}" in proc.stdout
    # a byte-order mark first is not text: the same score (as prepare.py drops it)
    (out_dir / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    proc = run_here("evaluate.py", "--out_dir=out", "--text=bom.txt", "--stride=10", "--batch_size=3",
                    "--device=cpu", cwd=out_dir)
    assert evaluate_json(proc) == {**result, "source": "bom.txt"}


def test_perplexity_of_documents(out_dir):  # noqa: F811
    """A .jsonl --text is one document per line, as prepare.py reads it: end-of-text before each, as a prepared split
    holds them (a trial's was scored as its JSON, braces and field names, at 22 times the perplexity). Without an
    end-of-text token there is nothing to put between documents: refused, in one line."""
    from checkpoint import save_checkpoint
    eot = len(CHARS)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=eot + 1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    meta = {"tokenizer": {"type": "char", "chars": CHARS, "eot": True}, "vocab_size": eot + 1, "eot_id": eot}
    save_checkpoint(str(out_dir / "eot/ckpt.pt"), {"model": model.state_dict(), "model_args": args, "meta": meta})
    docs = ["ROMEO:\nBut soft!", "JULIET:\nAy me.", "What light through yonder window breaks?"]
    rows = [{"text": docs[0]}, {"text": None}, {"text": docs[1]}, {"text": ""}, {"text": docs[2]}]
    (out_dir / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_here("evaluate.py", "--out_dir=eot", "--text=docs.jsonl", "--stride=10", "--device=cpu",
                    cwd=out_dir)
    ids = np.array([i for doc in docs for i in [eot] + [CHARS.index(c) for c in doc]])
    nll, count = strided_nll(model, ids, 32, 10, 4, "cpu", torch.autocast("cpu", enabled=False), SINGLE)
    result = evaluate_json(proc)
    assert result["tokens"] == count == len(ids) - 1 and result["nll"] == pytest.approx(nll / count, rel=1e-5)
    proc = run_here("evaluate.py", "--out_dir=eot", "--text=docs.jsonl", "--text_field=story", "--device=cpu",
                    cwd=out_dir, check=False)
    assert proc.returncode == 2 and "docs.jsonl line 1: no 'story' field (it has: 'text')" in proc.stderr
    proc = run_here("evaluate.py", "--out_dir=out", "--text=docs.jsonl", "--device=cpu", cwd=out_dir, check=False)
    assert proc.returncode == 2 and "--text=docs.jsonl holds 3 documents, but this model's tokenizer has no " \
        "end-of-text token to put between them" in proc.stderr


def test_hellaswag_items_written_here(out_dir):  # noqa: F811
    items = [{"ctx": "ROMEO: What light", "endings": ["is yonder", "breaks", "ZZZZ QQQ", "is the east."], "label": 3},
             {"ctx": "JULIET:", "endings": ["Ay me!", "Oh", "Romeo, Romeo", "xx"], "label": 0},
             {"ctx": "Good night", "endings": ["good night", "parting is", "such sweet sorrow", "!"], "label": 2},
             {"ctx": "A plague", "endings": ["o both your houses", "on it", "Tybalt"], "label": 0}]
    (out_dir / "hs.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    proc = run_here("evaluate.py", "--out_dir=out", "--task=hellaswag", "--source=hs.jsonl", "--batch_size=2",
                    "--max_items=50", "--device=cpu", cwd=out_dir)
    # more items asked for than the file holds: all of them, said (a trial's --hellaswag_items=50 scored 3 quietly)
    assert "note: hs.jsonl holds 4 items, fewer than the 50 asked for: all of them are scored" in proc.stdout
    result = evaluate_json(proc)
    model, encode = tiny_model(), (lambda s: [CHARS.index(c) for c in s])
    by_mean = by_sum = 0
    for item in items:  # each ending on its own, token by token
        ctx = encode(item["ctx"])
        losses = []
        for ending in item["endings"]:
            end = encode(" " + ending)
            losses.append([nll_of(model, (ctx + end)[:len(ctx) + j], end[j]) for j in range(len(end))])
        choices = range(len(item["endings"]))  # the last item has 3 endings: they are scored among themselves
        by_mean += min(choices, key=lambda k: sum(losses[k]) / len(losses[k])) == item["label"]
        by_sum += min(choices, key=lambda k: sum(losses[k])) == item["label"]
    assert result["items"] == 4
    assert result["acc_norm"] == pytest.approx(by_mean / 4) and result["acc"] == pytest.approx(by_sum / 4)


def test_hellaswag_items_longer_than_the_block_are_named():
    """An item whose context and an ending exceed block_size + 1 tokens is cropped when scored: a note says how many
    (they used to be cut silently); every rank counts them all and takes every world_size-th item."""
    import hellaswag
    from tokenizer import CharTokenizer
    tokenizer = CharTokenizer("abcdefghij ")
    items = [("abc", ["de", "fghij"], 0, 1), ("abcdefgh", ["d", "e"], 1, 2), ("a", ["b", "c"], 0, 3)]
    # with the joining space: 3 + 6 = 9 tokens, 8 + 2 = 10, 1 + 2 = 3; block_size + 1 fit (the last is only a target)
    _, note = hellaswag.share(items, tokenizer, "hs", SINGLE, block_size=8)
    assert note == ("note: 1 of the 3 items is longer than the model's 8-token block_size: the start of its context "
                    "is cut off to fit")
    mine, note = hellaswag.share(items, tokenizer, "hs", Launch("torchrun", 1, 1, 2), block_size=7)
    assert note.startswith("note: 2 of the 3 items are longer than the model's 7-token block_size: the start of "
                           "their contexts is cut off")
    assert [ctx.tolist() for ctx, _, _ in mine] == [tokenizer.encode("abcdefgh")]  # rank 1 of 2: the second item
    assert hellaswag.share(items, tokenizer, "hs", SINGLE, block_size=9)[1] is None


def test_hellaswag_stops_when_asked():
    """train.py's Ctrl-C: asked between passes, a true stopping() abandons the scoring (None), on every rank alike."""
    import hellaswag
    from tokenizer import CharTokenizer
    tokenizer = CharTokenizer("abcdefghij ")
    items = [("abc", ["def", "ghi"], 0, n) for n in range(6)]
    mine, model = hellaswag.tokenize(items, tokenizer, "items"), tiny()
    off = torch.autocast("cpu", enabled=False)
    asked = []
    result = hellaswag.accuracy(model, mine, 2, "cpu", off, SINGLE, stopping=lambda: asked.append(1) or len(asked) > 1)
    assert result is None and len(asked) == 2  # one pass scored, then abandoned
    assert hellaswag.accuracy(model, mine, 2, "cpu", off, SINGLE, stopping=lambda: False)["items"] == 6


@pytest.mark.parametrize("evaluation", [["--eval_iters=3"],
                                        ["--eval_iters=3", "--eval_tokens=5000", "--eval_batch_size=8"]])
def test_val_loss_is_the_number_train_py_reported(tmp_path, evaluation):
    """Random batches, or the first eval_tokens tokens (train 5,000, val all of its 4,000: passes shaped by the
    train split). Bits per byte too, train.py's and evaluate.py's, of a text with 2- and 3-byte characters: for all
    of val, its loss in bits over the UTF-8 bytes of the characters it predicts."""
    text = generated_text(40_000).replace("sweet", "sw\u00e9et").replace("moon", "m\u2609on")
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    run_script("prepare.py", "shakespeare_char", "--source=text.txt", cwd=tmp_path)
    run_script("train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--n_layer=2",
               "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--dropout=0.0", *evaluation,
               "--max_iters=10", "--eval_interval=10", "--warmup_iters=2", "--lr_decay_iters=10",
               "--out_dir=out", cwd=tmp_path)
    with open(tmp_path / "out" / "log.jsonl") as f:
        reported = [json.loads(line) for line in f if "val_loss" in line][-1]
    assert reported["step"] == 10
    result = evaluate_json(run_here("evaluate.py", "--out_dir=out", "--task=val_loss", "--device=cpu",
                                    cwd=tmp_path))
    assert result["loss"] == pytest.approx(reported["val_loss"], abs=1e-6)
    assert result["step"] == 10  # which checkpoint was read: a run still training saves several (a trial)
    assert result["bits_per_byte"] == pytest.approx(reported["val_bpb"], abs=1e-6)
    if "--eval_tokens=5000" in evaluation:
        from tokendata import Dataset
        data = Dataset(str(tmp_path / "data/shakespeare_char"))
        chars = data.meta["tokenizer"]["chars"]
        shard = data.shards("val")[0]
        val = [chars[t] for t in shard.read(0, shard.num_tokens)]
        n_bytes = len("".join(val[1:]).encode("utf-8"))  # every character but the first is predicted
        assert n_bytes > len(val) + 20  # the multi-byte characters are in it
        assert reported["val_bpb"] == pytest.approx(reported["val_loss"] * (len(val) - 1) / math.log(2) / n_bytes,
                                                    rel=1e-6)
    assert (result["eval_iters"], result["batch_size"], result["block_size"]) == (3, 4, 32)
    assert result["eval_tokens"] == (5000 if "--eval_tokens=5000" in evaluation else 0)
    if "--eval_tokens=5000" not in evaluation:  # a run of 2 processes drew 2 sets of batches: say how to match it
        from checkpoint import load_checkpoint, save_checkpoint
        checkpoint = load_checkpoint(str(tmp_path / "out/ckpt.pt"))
        os.makedirs(tmp_path / "two")
        save_checkpoint(str(tmp_path / "two/ckpt.pt"), {**checkpoint, "rng": checkpoint["rng"] * 2})  # per rank
        said = run_here("evaluate.py", "--out_dir=two", "--task=val_loss", "--device=cpu", cwd=tmp_path).stdout
        assert "note: the run trained on 2 processes, each drawing its own evaluation batches; for the number its " \
            "log shows, run this on 2 (torchrun --standalone --nproc_per_node=2 evaluate.py ...)" in said
        assert "note:" not in run_here("evaluate.py", "--out_dir=out", "--task=val_loss", "--device=cpu",
                                       cwd=tmp_path).stdout
    if "--eval_tokens=5000" not in evaluation:  # its Hugging Face export: no training settings, windows of its context
        run_here("export.py", "--out_dir=out", cwd=tmp_path)
        hf = evaluate_json(run_here("evaluate.py", "--init_from=out-hf", "--task=val_loss", "--device=cpu",
                                    "--dataset=shakespeare_char", cwd=tmp_path))
        assert (hf["block_size"], hf["batch_size"], hf["eval_iters"]) == (32, 12, 200) and hf["step"] is None
        assert abs(hf["loss"] - result["loss"]) < 0.5  # the same weights, over other batches

    # and strided perplexity over the prepared split runs on the same data
    ppl = evaluate_json(run_here("evaluate.py", "--out_dir=out", "--dataset=shakespeare_char",
                                 "--block_size=32", "--stride=32", "--batch_size=64", "--device=cpu",
                                 cwd=tmp_path))
    meta = json.loads((tmp_path / "data/shakespeare_char/meta.json").read_text())
    assert ppl["tokens"] == sum(s["tokens"] for s in meta["shards"]["val"]) - 1
    if "--eval_tokens=5000" in evaluation:  # the dataset prepared again under its name, from other text: said
        (tmp_path / "other.txt").write_text(text[::-1], encoding="utf-8")
        run_script("prepare.py", "shakespeare_char", "--source=other.txt", "--tokenizer=out", cwd=tmp_path)
        said = run_here("evaluate.py", "--out_dir=out", "--task=val_loss", "--device=cpu", cwd=tmp_path).stdout
        assert "note: data/shakespeare_char's val split is not the one the run was evaluated on (its shards' " \
            "digests differ: prepared again since?), so this loss is over other tokens than its log's" in said


def test_ranks_split_the_work(out_dir):  # noqa: F811
    """Two gloo processes under torchrun report what one process does."""
    (out_dir / "verse.txt").write_text("Parting is such sweet sorrow, that I shall say good night till it be morrow.\n" * 4)
    args = ["--out_dir=out", "--text=verse.txt", "--stride=8", "--batch_size=2", "--device=cpu"]
    single = evaluate_json(run_here("evaluate.py", *args, cwd=out_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "evaluate.py"), *args], cwd=out_dir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = evaluate_json(proc)
    assert both["tokens"] == single["tokens"] and both["nll"] == pytest.approx(single["nll"], rel=1e-5)
    assert "2 process(es)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--task=ppl", "--batch_size=0"], "task='ppl': expected perplexity, hellaswag or val_loss"),
    (["--text=a.txt", "--dataset=b", "--block_size=8", "--stride=9"], "stride=9 is longer than the window"),
    (["--text=a.txt", "--split=test"], "--split=test goes with --dataset, not --text: the whole file is scored"),
    (["--text=nowhere.txt"], "cannot read --text=nowhere.txt"),
    (["--text=nowhere.jsonl"], "cannot read --text=nowhere.jsonl: no such file"),
    (["--text=verse.txt", "--out_dir=nowhere"], "no checkpoint at nowhere/ckpt.pt"),
    (["--task=hellaswag", "--source=missing.jsonl"], "--source=missing.jsonl does not exist"),
    (["--task=hellaswag", "--source=hs"], "--source=hs is a folder: name the validation jsonl file in it"),
    (["--task=hellaswag", "--source=hs/empty.jsonl"], "hs/empty.jsonl holds no HellaSwag items"),
    (["--task=hellaswag", "--source=hs/string.jsonl"], "hs/string.jsonl:2 is not a HellaSwag item"),
    (["--task=hellaswag", "--source=hs/label.jsonl"], "hs/label.jsonl:1 is not a HellaSwag item"),
    # a trial's: tracebacks, where a byte that is not UTF-8 or a label of 1e400 was read
    (["--task=hellaswag", "--source=hs/latin1.jsonl"], "hs/latin1.jsonl:2 is not a HellaSwag item"),
    (["--task=hellaswag", "--source=hs/inf.jsonl"], "hs/inf.jsonl:1 is not a HellaSwag item"),
    (["--task=hellaswag", "--source=hs/fraction.jsonl"], "hs/fraction.jsonl:2 is not a HellaSwag item"),
    (["--task=hellaswag", "--source=hs/true.jsonl"], "hs/true.jsonl:2 is not a HellaSwag item"),  # int() read 1
    # its endings' first tokens would have nothing before them: NaN scores, and argmin picking ending 0
    (["--task=hellaswag", "--source=hs/no_ctx.jsonl"], "has an empty ctx, and this model's tokenizer has no end-of"),
    (["--task=hellaswag", "--source=hs/oov.jsonl"], "hs/oov.jsonl:2: text has characters outside this model's"),
    # read as it is, as prepare.py reads it: the carriage returns this model never saw (they were once dropped)
    (["--text=crlf.txt"], "'\\r'; use only characters the training data contained (the carriage returns of Windows "
                          "line endings: convert the file, e.g. dos2unix)"),
    (["--dataset=no_such_data"], "python prepare.py no_such_data"),
    (["--text=verse.txt", "--dataset=shakespeare_char"], "one of --text=FILE or --dataset=NAME, not both"),
    # another task's options were once ignored without a word
    (["--task=val_loss", "--stride=5"], "--stride goes with --task=perplexity, not --task=val_loss"),
    (["--task=hellaswag", "--dataset=shakespeare_char"], "--dataset goes with --task=perplexity or --task=val_loss"),
])
def test_bad_input(out_dir, args, message):  # noqa: F811
    (out_dir / "verse.txt").write_text("ROMEO:\n")
    (out_dir / "crlf.txt").write_bytes(b"ROMEO:\r\nJULIET:\r\n")
    good = {"ctx": "JULIET:", "endings": ["Ay me!", "Oh"], "label": 0}
    (out_dir / "hs").mkdir()
    (out_dir / "hs/empty.jsonl").write_text("\n")
    # endings as one text would be scored letter by letter; a label past the endings would never be right
    (out_dir / "hs/string.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "endings": "Ay me!"}))
    (out_dir / "hs/label.jsonl").write_text(json.dumps({**good, "label": 9}))
    latin1 = json.dumps(good) + "\n" + json.dumps({**good, "ctx": "caf\u00e9"}, ensure_ascii=False)
    (out_dir / "hs/latin1.jsonl").write_bytes(latin1.encode("latin-1"))
    (out_dir / "hs/inf.jsonl").write_text(json.dumps(good).replace('"label": 0', '"label": 1e400'))
    for name, label in (("fraction", 1.7), ("true", True)):  # after an item with the Hub's label, digits
        (out_dir / f"hs/{name}.jsonl").write_text(json.dumps({**good, "label": "1"}) + "\n" +
                                                  json.dumps({**good, "label": label}))
    (out_dir / "hs/no_ctx.jsonl").write_text(json.dumps({**good, "ctx": "", "endings": ["A", "B"]}))
    (out_dir / "hs/oov.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "endings": ["Ay", "\u2603"]}))
    proc = run_here("evaluate.py", "--out_dir=out", "--device=cpu", *args, cwd=out_dir, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if "--batch_size=0" in args or "--stride=9" in args:  # every problem at once
        assert "batch_size=0 must be at least 1" in proc.stderr or "needs one of --text=FILE or" in proc.stderr


def test_hellaswag_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    """Offline, the download fails in one line that ends with the caller's advice, and leaves no file behind that
    could pass for the validation set."""
    import urllib.request

    import hellaswag
    from configurator import UserError

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    path = str(tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    with pytest.raises(UserError, match=r"could not download .*\(Name or service not known\); offline, put it here$"):
        hellaswag.fetch(path, "offline, put it here")
    assert os.listdir(tmp_path / "hellaswag") == []
