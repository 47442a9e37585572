import json
import os
import pickle
import re
import resource
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, generated_text, run_script
from configurator import UserError
from tokendata import BatchSampler, Dataset, Shard, TokenFileError, read_header, read_tokens, write_tokens


def test_header_round_trip(tmp_path):
    path = str(tmp_path / "t.bin")
    tokens = np.arange(1000) % 65535
    write_tokens(path, tokens)
    raw = np.fromfile(path, dtype="<i4", count=3)
    assert list(raw) == [20240520, 1, 1000]  # llm.c's header: magic, version, count
    assert os.path.getsize(path) == 1024 + 2 * 1000
    assert np.array_equal(read_tokens(path), tokens)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_uint32_and_overflow(tmp_path):
    path = str(tmp_path / "big.bin")
    tokens = np.array([0, 70000, 100257])
    with pytest.raises(TokenFileError, match="does not fit uint16"):
        write_tokens(path, tokens)
    assert not os.path.exists(path)
    write_tokens(path, tokens, np.dtype("<u4"))
    assert list(np.fromfile(path, dtype="<i4", count=2)) == [20240801, 7]
    assert read_header(path)[0] == np.dtype("<u4")
    assert np.array_equal(read_tokens(path), tokens)


def test_bad_header_refused(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.zeros(256 + 10, dtype="<i4").tobytes())
    with pytest.raises(TokenFileError, match="magic 0"):
        read_tokens(str(path))


def test_truncated_file_refused(tmp_path):
    path = str(tmp_path / "t.bin")
    write_tokens(path, np.arange(500))
    with open(path, "r+b") as f:
        f.truncate(1024 + 700)
    with pytest.raises(TokenFileError, match="truncated"):
        read_tokens(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(TokenFileError, match="shorter than"):
        read_tokens(path)


def test_nanogpt_layout(tmp_path):
    """nanoGPT's headerless train.bin / val.bin with a char meta.pkl load as a dataset."""
    chars = sorted(set("hello world"))
    np.arange(300, dtype=np.uint16).__mod__(len(chars)).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.arange(100, dtype=np.uint16).__mod__(len(chars)).astype(np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    data = Dataset(str(tmp_path))
    assert data.meta["vocab_size"] == len(chars)
    assert data.meta["tokenizer"] == {"type": "char", "chars": "".join(chars), "eot": False}
    shard, = data.shards("train")
    assert shard.num_tokens == 300 and shard.offset == 0
    assert list(shard.read(10, 5)) == [i % len(chars) for i in range(10, 15)]
    # a backup beside train.bin is no part of the split (a trial's was mixed into the batches); a copy cut short by
    # one byte is refused, where its half token used to be dropped unsaid
    np.zeros(500, dtype=np.uint16).tofile(tmp_path / "train_old_backup.bin")
    assert [s.path for s in Dataset(str(tmp_path)).shards("train")] == [str(tmp_path / "train.bin")]
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TokenFileError, match=r"val.bin holds 201 bytes, an odd number: not whole uint16 tokens"):
        Dataset(str(tmp_path)).shards("val")
    np.arange(100, dtype=np.uint16).__mod__(len(chars)).astype(np.uint16).tofile(tmp_path / "val.bin")
    # a vocabulary of words (nanoGPT's layout, one's own prepare script): nothing here could read or write its text
    words = ["the", "cat", " "] + list("abcdefgh")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(words), "itos": dict(enumerate(words)),
                                                      "stoi": {w: i for i, w in enumerate(words)}}))
    with pytest.raises(UserError, match=r"meta.pkl maps ids to 2 pieces of more than one character \('the', ...\), "
                                        r"not nanoGPT's char vocabulary"):
        Dataset(str(tmp_path))
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                                                      "stoi": {c: i for i, c in enumerate(chars)}}))
    # a damaged meta.pkl, or one without nanoGPT's keys, is one line, not pickle's traceback (a trial)
    whole = (tmp_path / "meta.pkl").read_bytes()
    for damaged in (whole[:len(whole) // 2], pickle.dumps({"vocab_size": len(chars), "chars": chars})):
        (tmp_path / "meta.pkl").write_bytes(damaged)
        with pytest.raises(UserError, match=r"meta.pkl is not nanoGPT's char vocabulary \(a dict with itos, stoi "
                                            r"and vocab_size: (UnpicklingError|EOFError|KeyError).*\); prepare the "
                                            r"dataset again"):
            Dataset(str(tmp_path))


def test_missing_dataset_message(tmp_path, monkeypatch):
    """A missing dataset folder says how to make it: a recipe's prepare.py command, or how to prepare one's own text;
    a misspelt name of a prepared folder there gets that folder."""
    with pytest.raises(UserError, match=r"data/shakespeare_char does not exist; prepare it first: "
                                        rf"python prepare.py shakespeare_char --out_root={tmp_path}/data$"):
        Dataset(str(tmp_path / "data/shakespeare_char"))
    with pytest.raises(UserError, match=r"'nothing_here' is not one of prepare.py's recipes \(python prepare.py "
                                        r"--list\); prepare your own text with python prepare.py nothing_here "
                                        rf"--source=PATH --out_root={tmp_path}/data$"):
        Dataset(str(tmp_path / "data/nothing_here"))
    monkeypatch.chdir(tmp_path)  # data/, relative: where prepare.py writes; here, not yet
    with pytest.raises(UserError, match=r"prepare it first: python prepare.py shakespeare_char \(there is no data/ "
                                        rf"in {tmp_path}: to use datasets prepared elsewhere, give --data_root="):
        Dataset("data/shakespeare_char")
    with pytest.raises(UserError, match=r"python prepare.py nothing_here --source=PATH --out_root=\.$"):
        Dataset(os.path.join(".", "nothing_here"))  # --data_root=.
    for name in ("shakespeare_char", "shakespeare", "notes"):  # prepared, and one that is not
        (tmp_path / "data" / name).mkdir(parents=True)
        if name != "notes":
            (tmp_path / "data" / name / "meta.json").write_text("{}")
    with pytest.raises(UserError, match=r"data/shakespeare_chr does not exist; did you mean shakespeare_char\? "
                                        r"\(prepared datasets there: shakespeare, shakespeare_char\)$"):
        Dataset(str(tmp_path / "data/shakespeare_chr"))


def test_sampler_deterministic_and_proportional(tmp_path):
    paths = []
    for i, n in enumerate((1000, 3000)):
        paths.append(str(tmp_path / f"s{i}.bin"))
        write_tokens(paths[-1], np.full(n, i))
    shards = [Shard(p) for p in paths]
    a = BatchSampler(shards, block_size=8, batch_size=4, seed=[1, 0, 0])
    b = BatchSampler(shards, block_size=8, batch_size=4, seed=[1, 0, 0])
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    state = a.state_dict()
    expected = a.next_batch()
    b.load_state_dict(state)
    assert np.array_equal(b.next_batch()[0], expected[0])
    # the second shard has 3x the windows of the first: about 3/4 of the rows come from it
    big = BatchSampler(shards, block_size=8, batch_size=4000, seed=0).next_batch()[0]
    share = (big[:, 0] == 1).mean()
    assert abs(share - 2992 / 3984) < 0.03


def test_targets_are_inputs_shifted(tmp_path):
    path = str(tmp_path / "s.bin")
    write_tokens(path, np.arange(500))
    x, y = BatchSampler([Shard(path)], block_size=16, batch_size=3, seed=0).next_batch()
    assert x.dtype == np.int64 and x.shape == (3, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1]) and np.array_equal(y, x + 1)


CHARS = "abcdefghij"


@pytest.mark.parametrize("edit, message", [
    (lambda m: "{not json", "cannot be read"),
    (lambda m: {k: v for k, v in m.items() if k != "shards"}, '"shards" is not a map'),
    (lambda m: {**m, "shards": {"train": ["train_000000.bin"]}}, '"shards" is not a map'),
    (lambda m: {k: v for k, v in m.items() if k != "vocab_size"}, "vocab_size None is not a positive whole number"),
    (lambda m: {**m, "vocab_size": "10"}, "vocab_size '10' is not a positive whole number"),
    (lambda m: {**m, "vocab_size": 40}, "has 10 characters, but vocab_size is 40"),
    (lambda m: {**m, "tokenizer": {"type": "sentencepiece"}}, "tokenizer {'type': 'sentencepiece'} is not"),
    (lambda m: {**m, "tokenizer": {"type": "bpe"}}, 'a bpe tokenizer needs "tokenizer_json"'),
    (lambda m: {k: v for k, v in m.items() if k != "tokenizer"}, "tokenizer None is not"),
    (lambda m: {**m, "tokenizer": {"type": "char", "chars": "aabcdefghi", "eot": False}}, "repeat a character"),
    (lambda m: {**m, "eot_id": 10}, "eot_id 10 is not an id of the vocabulary"),
    # a GPT-2 dataset's vocab_size edited, and an encoding tiktoken does not have (trained on, then unsampleable)
    (lambda m: {**m, "tokenizer": {"type": "tiktoken", "encoding": "gpt2"}, "vocab_size": 60000},
     "the tiktoken encoding 'gpt2' has 50,257 tokens, but vocab_size is 60,000"),
    (lambda m: {**m, "tokenizer": {"type": "tiktoken", "encoding": "gpt3"}}, "tiktoken has no encoding 'gpt3' (it "
                                                                             "has: gpt2, r50k_base, "),
])
def test_edited_meta_json_refused(tmp_path, edit, message):
    """A meta.json edited by hand or damaged is refused when the dataset is opened, naming what is wrong."""
    write_tokens(str(tmp_path / "train_000000.bin"), np.arange(100) % 10)
    meta = {"tokenizer": {"type": "char", "chars": CHARS, "eot": False}, "vocab_size": 10, "eot_id": None,
            "shards": {"train": [{"file": "train_000000.bin", "tokens": 100}]}}
    with pytest.raises(UserError, match="unfinished preparation"):  # prepare.py's shards, no meta.json yet
        Dataset(str(tmp_path))
    edited = edit(meta)
    (tmp_path / "meta.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(UserError, match=re.escape(message)):
        Dataset(str(tmp_path))


def test_first_preparation_still_running_is_unfinished(tmp_path):
    """prepare.py writes a dataset into unfinished/ until it is whole: a folder holding only that (a first run, killed)
    is an unfinished preparation, named as one, not a folder with no data."""
    (tmp_path / "unfinished").mkdir()
    write_tokens(str(tmp_path / "unfinished/train_000000.bin"), np.arange(100) % 10)
    with pytest.raises(UserError, match="unfinished preparation"):
        Dataset(str(tmp_path))


def test_dataset_name_before_a_folder_of_that_name(tmp_path, monkeypatch):
    """--dataset=NAME is data_root/NAME when that exists, even beside a folder NAME (an out_dir named like the
    dataset); a path is taken as given otherwise."""
    from tokendata import dataset_dir
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/tinystories")
    os.makedirs("tinystories")  # --out_dir=tinystories, say
    os.makedirs("elsewhere/mine")
    assert dataset_dir("tinystories", "data") == os.path.join("data", "tinystories")
    assert dataset_dir("elsewhere/mine", "data") == "elsewhere/mine"
    assert dataset_dir("missing", "data") == os.path.join("data", "missing")


def test_more_shards_than_the_open_file_limit(tmp_path):
    """A shard keeps its file open between reads; with more shards than the process may open (FineWeb's 100B tokens
    in 100M-token shards make 1,000; the usual limit is 1,024, macOS's 256) a run died mid-way of "Too many open
    files" (a trial). At most OPEN_SHARDS stay open, the least recently read closed first: 360 shards train under a
    limit of 100 files, and the closed ones read right when read again."""
    (tmp_path / "t.txt").write_text(generated_text(400_000))
    run_script("prepare.py", "many", "--source=t.txt", "--tokenizer=char", "--shard_size=1000", cwd=tmp_path)
    assert len(list((tmp_path / "data/many").glob("train_*.bin"))) == 360

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--dataset=many", "--device=cpu",
                           "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                           "--batch_size=16", "--max_iters=30", "--eval_interval=30", "--eval_iters=2",
                           "--sample_tokens=0", "--plot=False", "--out_dir=o"], cwd=tmp_path, preexec_fn=limit,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0 and "saved checkpoint o/ckpt.pt at step 30" in proc.stdout, proc.stderr[-2000:]
    import tokendata
    data = Dataset(str(tmp_path / "data/many"))
    shards = data.shards("train")
    first = [s.read(5, 10).copy() for s in shards]  # more than OPEN_SHARDS: the first ones closed
    assert len(Shard._open) == tokendata.OPEN_SHARDS and shards[0]._file is None and shards[-1]._file is not None
    again = [s.read(5, 10) for s in shards[:3]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and shards[0]._file is not None
    assert all(np.array_equal(f, read_tokens(s.path)[5:15]) for f, s in zip(first, shards))
    # the registry holds shards weakly: dropped, a shard goes with its file (a review found files of a dropped
    # dataset kept open, deleted ones taking their disk space until the process ended)
    import gc
    import weakref
    files = [weakref.ref(s._file) for s in shards if s._file is not None]  # a file object gone is a file closed
    del data, shards
    gc.collect()
    assert len(files) == tokendata.OPEN_SHARDS and all(f() is None for f in files)


def test_a_shard_replaced_while_read_is_refused(tmp_path):
    """prepare.py run again under a dataset's name while a run reads it: the shards the run had not opened yet (or
    had closed, past OPEN_SHARDS) held the other text, mixed into its batches without a word, and a shard the new
    preparation lacks was a traceback (a trial). A file that is not the one the run started with is refused."""
    paths = [str(tmp_path / f"train_{i:06d}.bin") for i in range(3)]
    for path in paths:
        write_tokens(path, np.arange(100) % 7)
    shards = [Shard(p, headered=True, vocab_size=7) for p in paths]
    assert list(shards[0].read(3, 4)) == [3, 4, 5, 6]
    write_tokens(paths[1], np.arange(100) % 5)  # the same size, another file in its place
    os.remove(paths[2])
    for shard in shards[1:]:
        with pytest.raises(TokenFileError, match=r"train_00000[12].bin has changed since this run started reading it "
                                                 r"\(the dataset prepared again\?\); its batches would mix two "
                                                 r"datasets: resume once the preparation is done"):
            shard.read(0, 4)
        assert shard._file is None and id(shard) not in Shard._open
    assert list(shards[0].read(3, 4)) == [3, 4, 5, 6]  # the one it holds open reads as it was
