"""prepare.py at scale (issue 3), through its command line: exact tokens, determinism across worker counts, resume
after a kill, every source format, uint32 vocabularies, and each bad input the issue names."""

import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, generated_text, gpt2_bpe_available, killed_at_replace, run_script
from tokendata import read_tokens

needs_bpe = pytest.mark.skipif(not gpt2_bpe_available(), reason="GPT-2 BPE files not available offline")


def stories(n, seed=0, long_every=0):
    """n generated documents of a few lines each (every long_every-th one ~300k characters, so it is cut in pieces)."""
    rng = random.Random(seed)
    words = ("once upon a time there was little girl named lily she loved to play in the park with her dog "
             "one day saw big red ball and said mom can I have it happy sad tree sun café naïve").split()
    docs = []
    for i in range(n):
        lines = 300 * 60 if long_every and i % long_every == long_every - 1 else rng.randint(1, 8)
        docs.append("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))).capitalize() + "."
                              for _ in range(lines)))
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")


def split_tokens(data_dir, split):
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.concatenate([read_tokens(str(data_dir / s["file"])) for s in meta["shards"][split]])


def shard_bytes(data_dir):
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.suffix == ".bin"}


def test_shakespeare_char_tokens_unchanged(tmp_path, shakespeare_path):
    """The first 90% of characters are train, the rest val, one id per sorted character: nanoGPT's shakespeare_char,
    whatever the shard size and worker count."""
    run_script("prepare.py", "shakespeare_char", f"--source={shakespeare_path}", "--shard_size=300000",
               "--num_proc=2", cwd=tmp_path)
    text = open(shakespeare_path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    data = tmp_path / "data/shakespeare_char"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "char", "chars": "".join(chars), "eot": False}
    assert [s["tokens"] for s in meta["shards"]["train"]][:-1] == [300000] * (n // 300000)
    assert split_tokens(data, "train").tolist() == [stoi[c] for c in text[:n]]
    assert split_tokens(data, "val").tolist() == [stoi[c] for c in text[n:]]
    assert not [p for p in os.listdir(data) if "resume" in p or ".tmp" in p]


@needs_bpe
def test_shakespeare_bpe_tokens_unchanged(tmp_path, shakespeare_path):
    """Text cut into pieces for the workers encodes to exactly the tokens of the whole text."""
    import tiktoken
    run_script("prepare.py", "shakespeare", f"--source={shakespeare_path}", "--num_proc=2", cwd=tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    text = open(shakespeare_path, encoding="utf-8").read()
    n = int(len(text) * 0.9)
    assert split_tokens(tmp_path / "data/shakespeare", "train").tolist() == enc.encode_ordinary(text[:n])
    assert split_tokens(tmp_path / "data/shakespeare", "val").tolist() == enc.encode_ordinary(text[n:])


def test_same_bytes_whatever_num_proc(tmp_path):
    """Many documents (one long enough to be cut in pieces), small shards: 1 and 3 workers write identical files,
    and the documents come back in order, split between train and val, separated by the end-of-text id."""
    docs = stories(3000, long_every=2000)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    for n in (1, 3):
        run_script("prepare.py", "docs", "--source=docs.jsonl", "--tokenizer=char", "--shard_size=50000",
                   "--val_fraction=0.05", f"--num_proc={n}", f"--out_root=out{n}", cwd=tmp_path)
    one, three = tmp_path / "out1/docs", tmp_path / "out3/docs"
    assert shard_bytes(one) == shard_bytes(three) and len(shard_bytes(one)) > 10
    assert (one / "meta.json").read_text() == (three / "meta.json").read_text()

    meta = json.loads((one / "meta.json").read_text())
    chars, eot = meta["tokenizer"]["chars"], meta["eot_id"]
    assert meta["tokenizer"]["eot"] and eot == len(chars) == meta["vocab_size"] - 1
    decoded = {split: "".join(chars[i] if i != eot else "\0" for i in split_tokens(one, split)).split("\0")
               for split in ("train", "val")}
    assert decoded["train"][0] == docs[1]  # document 0 always goes to val
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert decoded["train"] == [d for d in docs if d in set(decoded["train"])]  # stream order kept
    assert 0.02 < len(decoded["val"]) / len(docs) < 0.08
    assert meta["source"]["documents"] == {"val": len(decoded["val"]), "train": len(decoded["train"])}


def test_trained_bpe(tmp_path):
    """--tokenizer=bpe:N: the same files whatever the number of workers; every document back exactly, end-of-text
    between them; learned from the train split only (a word only val holds gets no merges) and from at most
    --bpe_train_chars of it."""
    from tokenizer import tokenizer_from_meta
    docs = stories(3000, long_every=2000)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    write_jsonl(tmp_path / "val.jsonl", ["zyzzyva " * 200] * 3 + docs[:20])
    args = ["docs", "--source=docs.jsonl", "--val_source=val.jsonl", "--tokenizer=bpe:1000", "--shard_size=20000"]
    runs = {n: run_script("prepare.py", *args, f"--num_proc={n}", f"--out_root=out{n}", cwd=tmp_path).stdout
            for n in (1, 3)}
    one, three = tmp_path / "out1/docs", tmp_path / "out3/docs"
    assert shard_bytes(one) == shard_bytes(three) and len(shard_bytes(one)) > 10
    assert (one / "meta.json").read_text() == (three / "meta.json").read_text()
    learned = re.search(r"\nlearned a (\d+)-token BPE from [\d,]+ characters of the train split \(all of it\)",
                        runs[1])
    size = int(learned.group(1))  # these stories have too few words for 1000; the run says so
    assert size < 1000 and f"note: 1,000 tokens asked for, but this text holds pairs for {size} only" in runs[1]

    meta = json.loads((one / "meta.json").read_text())
    tokenizer = tokenizer_from_meta(meta)
    assert meta["vocab_size"] == tokenizer.vocab_size == size and meta["eot_id"] == tokenizer.eot_id == size - 1
    assert meta["tokenizer"]["type"] == "bpe" and json.loads(meta["tokenizer"]["tokenizer_json"])["model"]["vocab"]
    tokens = split_tokens(one, "train")
    train = [tokenizer.decode(ids) for ids in np.split(tokens, np.flatnonzero(tokens == tokenizer.eot_id))]
    assert [t.replace("<|endoftext|>", "", 1) for t in train] == docs
    assert len(tokenizer.encode("zyzzyva")) == 7  # one byte a token: val's word taught it nothing
    assert len(tokenizer.encode(" little girl")) <= 3

    capped = run_script("prepare.py", *args, "--bpe_train_chars=20000", "--out_root=capped", cwd=tmp_path).stdout
    assert "of the train split (its first 20,000 (--bpe_train_chars))" in capped
    assert json.loads((tmp_path / "capped/docs/meta.json").read_text())["tokenizer"] != meta["tokenizer"]


def test_tokenizer_of_a_dataset_run_or_model(tmp_path, monkeypatch):
    """--tokenizer=<a prepared dataset, its meta.json, a training run, an exported model, a tokenizer.json>: new text
    (a fine-tuning set) is tokenized with exactly that tokenizer, a trained BPE or a char vocabulary; a character the
    vocabulary lacks is refused in one line with nothing left behind."""
    from checkpoint import save_checkpoint
    from hf import write_tokenizer
    from prepare import borrowed_tokenizer
    from tokenizer import tokenizer_from_meta
    write_jsonl(tmp_path / "docs.jsonl", stories(500))
    out = run_script("prepare.py", "base", "--source=docs.jsonl", "--tokenizer=char", cwd=tmp_path).stdout
    assert "note:" not in out
    # prepared again with another tokenizer: said, since models trained on the first can no longer read it
    out = run_script("prepare.py", "base", "--source=docs.jsonl", "--tokenizer=bpe:300", cwd=tmp_path).stdout
    assert "note: data/base held text tokenized with a " in out and "-character vocabulary with end-of-text, now a " \
        "300-token byte-level BPE: models trained on it cannot read this one" in out
    base = json.loads((tmp_path / "data/base/meta.json").read_text())
    import dataclasses

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=base["vocab_size"]))
    save_checkpoint(str(tmp_path / "run/ckpt.pt"), {"model": model.state_dict(), "meta": base,
                                                    "model_args": dataclasses.asdict(model.config)})
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf/config.json").write_text(json.dumps({"vocab_size": base["vocab_size"]}))
    write_tokenizer(base, str(tmp_path / "hf"), 64)
    new_docs = stories(50, seed=7)
    write_jsonl(tmp_path / "new.jsonl", new_docs)
    os.makedirs(tmp_path / "numbered")  # a run whose ckpt.pt is gone: its numbered checkpoints will do
    shutil.copy(tmp_path / "run/ckpt.pt", tmp_path / "numbered/ckpt_00000200.pt")
    os.makedirs(tmp_path / "tokenizer_only")  # what AutoTokenizer's save_pretrained writes: no config.json
    shutil.copy(tmp_path / "hf/tokenizer.json", tmp_path / "tokenizer_only/tokenizer.json")
    monkeypatch.chdir(tmp_path)
    for source in ["base", "data/base", "data/base/meta.json", "run", "run/ckpt.pt", "hf", "numbered",
                   "tokenizer_only", "hf/tokenizer.json"]:
        assert borrowed_tokenizer(source, "data").meta() == base["tokenizer"], source
    run_script("prepare.py", "new", "--source=new.jsonl", "--tokenizer=run", cwd=tmp_path)  # the whole command
    meta = json.loads((tmp_path / "data/new/meta.json").read_text())
    assert meta["tokenizer"] == base["tokenizer"] and meta["vocab_size"] == base["vocab_size"]
    tokenizer = tokenizer_from_meta(base)
    docs = [doc for split in ("val", "train")  # each split's documents, end-of-text between them
            for doc in tokenizer.decode(split_tokens(tmp_path / "data/new", split)).split("<|endoftext|>")]
    assert sorted(docs) == sorted(new_docs)

    (tmp_path / "a.txt").write_text("abc cab\n")
    (tmp_path / "b.txt").write_text("abcd\n" * 50 + "[x]\n")  # d in train, [x] in val: all named at once
    run_script("prepare.py", "abc", "--source=a.txt", "--tokenizer=char", cwd=tmp_path)
    proc = run_script("prepare.py", "abcd", "--source=b.txt", "--tokenizer=abc", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the source has characters outside the 5-character vocabulary of abc: '[]dx'" in proc.stderr
    assert not (tmp_path / "data/abcd").exists()
    for source, message in [("./nowhere", "tokenizer='./nowhere': no such file or folder"),
                            ("bsae", "; did you mean 'base'?"),  # a prepared dataset's name, mistyped
                            ("data", "data is neither a dataset (meta.json, or .bin token files), a run")]:
        proc = run_script("prepare.py", "other", "--source=b.txt", f"--tokenizer={source}", cwd=tmp_path,
                          check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_children_ignore_ctrl_c_from_their_start():
    """Workers and the BPE's child start with Ctrl-C ignored, inherited, not set by their first lines: one that was
    still importing when Ctrl-C came (a busy machine) printed a KeyboardInterrupt traceback after the run's line."""
    from prepare import Workers, in_child
    workers = Workers(2, (None, None))
    try:
        assert workers.pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN
    finally:
        workers.close()
    assert in_child("asking", "", signal.getsignal, signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)  # and this process has its handler back


def test_in_child_stops_at_once_and_passes_errors_back():
    """What a child process (the BPE's learning) raises is raised here; Ctrl-C (or SIGTERM, which prepare.py turns
    into the same) stops the wait and the child at once, and a child killed outright is one line."""
    import threading

    from configurator import UserError
    from prepare import in_child
    assert in_child("adding", "", sum, [1, 2, 3]) == 6
    with pytest.raises(ValueError, match="invalid literal"):
        in_child("parsing", "", int, "x")
    t0 = time.time()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        in_child("sleeping", "", time.sleep, 60)
    assert time.time() - t0 < 20
    with pytest.raises(UserError, match=r"the process exiting died \(exit code 3\); try again"):
        in_child("exiting", "try again", os._exit, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_in_child_ends_with_a_parent_killed_outright(tmp_path):
    """kill -9 of prepare.py gives it no time to stop its child: the kernel stops it (a trial's orphaned BPE learning
    went on at full CPU)."""
    (tmp_path / "waiting.py").write_text("import os, time\n\ndef wait(path):\n"
                                         "    open(path, 'w').write(str(os.getpid()))\n    time.sleep(120)\n")
    script = ("import sys; sys.path[:0] = sys.argv[1:3]; from prepare import in_child; from waiting import wait; "
              "in_child('waiting', '', wait, sys.argv[3])")
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", script, REPO, str(tmp_path), str(pid_file)])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:  # an ended child its parent (now init) has not reaped yet is gone too
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its parent's kill -9")


def test_lock_of_a_file_removed_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """A lock file opened just as its holder, leaving, removes it with the folder it made (nothing came of its run):
    locking that file would keep no one out, since a third process makes a new one. The lock is taken on the file at
    the path (trial H)."""
    import fcntl

    from lock import FolderLock
    real, calls = fcntl.flock, []

    def holder_leaves_first(file, flags):
        if not calls:  # the earlier holder's exit, between our open and our lock
            os.remove(tmp_path / "run/train.lock")
            os.rmdir(tmp_path / "run")
        calls.append(flags)
        return real(file, flags)
    monkeypatch.setattr(fcntl, "flock", holder_leaves_first)
    with FolderLock(str(tmp_path / "run"), "train.lock") as lock:
        assert lock.holder is None and len(calls) == 2
        assert os.path.samestat(os.fstat(lock.file.fileno()), os.stat(tmp_path / "run/train.lock"))
        (tmp_path / "run/ckpt.pt").write_text("")  # something came of this run: the folder stays
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "train.lock"]


def test_a_second_run_on_the_same_name_is_refused(tmp_path, shakespeare_path):
    """Two runs preparing one name would clear and fill the same unfinished/ folder: a dataset of both that looks
    finished. While one holds data/<name>/prepare.lock, another is refused in one line and changes nothing."""
    from lock import FolderLock
    from tokendata import Dataset
    run_script("prepare.py", "mine", f"--source={shakespeare_path}", "--tokenizer=char", cwd=tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/mine").iterdir() if p.suffix in (".bin", ".json")}
    with FolderLock(str(tmp_path / "data/mine"), "prepare.lock") as lock:  # as the first run holds it
        assert lock.holder is None
        proc = run_script("prepare.py", "mine", f"--source={shakespeare_path}", "--tokenizer=char", cwd=tmp_path,
                          check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"data/mine is being prepared by process {os.getpid()} on " in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/mine").iterdir() if p.suffix in (".bin", ".json")} \
        == before and not (tmp_path / "data/mine/unfinished").exists()
    # a first preparation still running: train.py and evaluate.py say to wait, not to run it again (it is refused)
    os.makedirs(tmp_path / "data/fresh/unfinished")
    with FolderLock(str(tmp_path / "data/fresh"), "prepare.lock"):
        from configurator import UserError
        with pytest.raises(UserError, match=rf"data/fresh is being prepared right now \(process {os.getpid()} on "):
            Dataset(str(tmp_path / "data/fresh"))
    with pytest.raises(UserError, match="is an unfinished preparation"):  # and once it is not running
        Dataset(str(tmp_path / "data/fresh"))
    # a shard that is not the one meta.json lists (copied over it): refused where train.py and evaluate.py read it
    from configurator import UserError
    from tokendata import write_tokens
    val = str(tmp_path / "data/mine/val_000000.bin")
    write_tokens(val, read_tokens(val)[:-7])
    with pytest.raises(UserError, match=r"val_000000.bin holds .* tokens where meta.json lists .*: not the file"):
        Dataset(str(tmp_path / "data/mine")).shards("val")


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory):
    """Text of 4 worker tasks (prepare.TASK_CHARS each), and what an uninterrupted run makes of it. A task's shards
    are written together when it comes back, so with one task the kill's window was the 40 ms of writing them all,
    which a busy CPU missed; from the first task back to the last it is about a second."""
    from prepare import TASK_CHARS
    folder = tmp_path_factory.mktemp("kill")
    docs = stories(20_000, seed=1)
    assert 3 * TASK_CHARS < sum(map(len, docs)) <= 4 * TASK_CHARS
    write_jsonl(folder / "docs.jsonl", docs)
    runs = {}
    for tokenizer in ("char", "bpe:2000"):  # what each resumed run must take from resume.json: a vocabulary, a BPE
        args = ["docs", f"--source={folder / 'docs.jsonl'}", f"--tokenizer={tokenizer}", "--shard_size=100000",
                "--num_proc=2"]
        run_script("prepare.py", *args[:-1], "--num_proc=1", f"--out_root=clean_{tokenizer}", cwd=folder)
        runs[tokenizer] = args, folder / f"clean_{tokenizer}"
    return runs


@pytest.mark.parametrize("sig, tokenizer", [(signal.SIGKILL, "bpe:2000"), (signal.SIGINT, "char"),
                                            (signal.SIGTERM, "bpe:2000")])
def test_resume_after_kill_gives_same_bytes(tmp_path, sig, tokenizer, kill_source):
    """Kill a run (the whole process group, as the OOM killer or Ctrl-C would; SIGTERM to the main process alone, as
    kill, timeout or Slurm would) once it has finished shards; running the same command again keeps those, redoes the
    rest, and writes exactly what an uninterrupted run writes. Ctrl-C and SIGTERM get one line saying so and the
    shell's code for Ctrl-C, 130: no traceback from the main process, nor one from each worker, no worker left."""
    args, clean = kill_source[tokenizer]

    stderr = open(tmp_path / "stderr.txt", "w")  # a file: a pipe nobody reads could fill and block the run
    # SIGINT as a terminal leaves it: a shell starts a background job (CI's tests, maybe) with SIGINT ignored, which
    # every process under it inherits, and then Python raises no KeyboardInterrupt: the run went on to the end
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state_path = tmp_path / "data/docs/unfinished/resume.json"
    deadline, seen = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state_path.read_text())["splits"]["train"]["shards"]:
                seen = True
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    ended = proc.poll() is not None
    if sig == signal.SIGTERM:
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    time.sleep(1)  # what orphaned workers would print, they print by now
    stderr.close()
    assert not (tmp_path / "data/docs/meta.json").exists(), ("the run finished before it could be killed (a "
                                                             f"finished shard seen: {seen}; ended first: {ended}; "
                                                             f"exit code {proc.returncode})")
    if sig != signal.SIGKILL:
        printed = (tmp_path / "stderr.txt").read_text()
        said = re.search(r"\ninterrupted: \d+ finished shard\(s\) kept in data/docs/unfinished; run the same command "
                         r"again to resume from there\n$", printed)
        assert proc.returncode == 130 and said and "Traceback" not in printed and "leaked" not in printed, printed
        ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
        alive = [line for line in ps if line.split()[:1] == [str(proc.pid)] and not line.split()[1].startswith("Z")]
        assert not alive, alive  # no worker outlives the run (zombies: already gone, waiting for init to reap them)
    # what a kill in the middle of writing a shard leaves (the kill above lands there only sometimes)
    (tmp_path / "data/docs/unfinished/train_000099.bin.tmp4242").write_bytes(b"half a shard")
    kept = json.loads(state_path.read_text())["splits"]["train"]["shards"]
    kept_mtimes = {s["file"]: os.path.getmtime(tmp_path / "data/docs/unfinished" / s["file"]) for s in kept}
    if tokenizer == "char":  # the tokens after the last shard, damaged in a copy: refused there, by their digest
        shutil.copytree(tmp_path / "data", tmp_path / "damaged/data")
        splits = json.loads(state_path.read_text())["splits"]
        # train's tokens past its last shard, or, where the kill came right at a shard's end, val's
        partial = splits["train"]["partial"] or splits["val"]["partial"]
        assert partial, splits
        damaged = tmp_path / "damaged/data/docs/unfinished" / partial
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 1  # the last token, 256 ids off
        damaged.write_bytes(data)
        again = run_script("prepare.py", *args, cwd=tmp_path / "damaged")
        assert f"{partial} is not what the interrupted run wrote: starting over" in again.stdout
        assert shard_bytes(tmp_path / "damaged/data/docs") == shard_bytes(clean / "docs")
        # a resume.json edited by hand: the same, not a KeyError that threw the finished shards away (a trial)
        from prepare import load_resume_state
        state = json.loads(state_path.read_text())
        assert load_resume_state(str(state_path.parent), state["fingerprint"]) is not None
        shutil.copy(state_path, tmp_path / "resume.json")
        state_path.write_text(json.dumps({k: v for k, v in state.items() if k != "splits"}))
        assert load_resume_state(str(state_path.parent), state["fingerprint"]) is None
        shutil.copy(tmp_path / "resume.json", state_path)

    resumed = run_script("prepare.py", *args, cwd=tmp_path)
    assert "resuming: " in resumed.stdout and "learned a" not in resumed.stdout  # its BPE, not learned again
    assert shard_bytes(tmp_path / "data/docs") == shard_bytes(clean / "docs")
    assert (tmp_path / "data/docs/meta.json").read_text() == (clean / "docs/meta.json").read_text()
    assert {f: os.path.getmtime(tmp_path / "data/docs" / f) for f in kept_mtimes} == kept_mtimes  # not rewritten
    assert not [p for p in os.listdir(tmp_path / "data/docs") if "resume" in p or ".tmp" in p or "unfinished" in p]


@pytest.mark.parametrize("earlier", [False, True])
def test_kill_while_the_dataset_moves_into_place(tmp_path, earlier):
    """A kill while the finished dataset's files move from unfinished/ into the folder (the old dataset's gone
    already): the same command finishes the move, tokenizing nothing again (a trial's rerun started over, hours for
    a big corpus), and the folder holds what an uninterrupted run writes."""
    (tmp_path / "text.txt").write_text(generated_text(60_000, seed=1))
    args = ["prepare.py", "mine", "--source=text.txt", "--tokenizer=char", "--shard_size=5000", "--val_fraction=0.2"]
    run_script(*args, "--out_root=clean", cwd=tmp_path)
    if earlier:  # a dataset there before, of other text, whose shards have the same names
        (tmp_path / "old.txt").write_text(generated_text(60_000, seed=2))
        run_script(*args[:2], "--source=old.txt", *args[3:], cwd=tmp_path)
    killed_at_replace(4, r"data/mine/[^/]+", *args, cwd=tmp_path)  # the 4th file into data/mine itself
    folder = tmp_path / "data/mine"
    assert not (folder / "meta.json").exists() and len(shard_bytes(folder)) >= 3  # moved in part: no dataset
    again = run_script(*args, cwd=tmp_path)
    assert "the dataset a killed run of this command had prepared, moved into place (nothing to tokenize again)" \
        in again.stdout and "tokenizer char" not in again.stdout, again.stdout
    assert shard_bytes(folder) == shard_bytes(tmp_path / "clean/mine") and len(shard_bytes(folder)) > 8
    assert (folder / "meta.json").read_text() == (tmp_path / "clean/mine/meta.json").read_text()
    assert sorted(os.listdir(folder)) == sorted(os.listdir(tmp_path / "clean/mine"))  # unfinished/ gone


def test_verify_names_damaged_shards(tmp_path):
    """--verify checks each shard against meta.json's checksums: a token flipped to another id of the vocabulary
    trained and evaluated silently (trial), and a copy cut short is named along with it."""
    (tmp_path / "text.txt").write_text(generated_text(60_000))
    args = ["mine", "--source=text.txt", "--tokenizer=char", "--shard_size=5000"]
    run_script("prepare.py", *args, cwd=tmp_path)
    ok = run_script("prepare.py", "mine", "--verify", cwd=tmp_path)
    assert re.search(r"data/mine: all \d+ shards \(60,\d{3} tokens\) are what prepare.py wrote\n$", ok.stdout), ok.stdout
    folder = tmp_path / "data/mine"
    with open(folder / "train_000002.bin", "r+b") as f:  # a token, one id up: still in the vocabulary
        f.seek(2000)
        token = f.read(2)
        f.seek(2000)
        f.write((int.from_bytes(token, "little") ^ 1).to_bytes(2, "little"))
    os.truncate(folder / "val_000000.bin", 3000)
    proc = run_script("prepare.py", "mine", "--verify", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and re.search(r"error: 2 of the \d+ shards in data/mine are missing or not what "
                                              r"prepare.py wrote: train_000002.bin, val_000000.bin; copy them again",
                                              proc.stderr), proc.stderr


def test_full_disk_is_one_line_naming_the_file(tmp_path, small_disk):
    """A disk that fills during a preparation: one line naming the file that could not be written (a trial's said
    'a file') and the script's own folder setting; the half-written file is not left to fill the disk."""
    (tmp_path / "text.txt").write_text(generated_text(400_000))
    proc = run_script("prepare.py", "mine", "--source=text.txt", "--tokenizer=char", "--shard_size=20000",
                      f"--out_root={small_disk}", cwd=tmp_path, check=False)
    said = re.search(rf"\nerror: {re.escape(str(small_disk))}/mine/unfinished/\S+: No space left on device; free some "
                     r"space, or choose a folder on another disk \(--out_root\)\n$", proc.stderr)
    assert proc.returncode == 2 and said, proc.stderr[-2000:]
    assert not [name for _, _, names in os.walk(small_disk) for name in names if ".tmp" in name]


@pytest.mark.parametrize("moving", [False, True])
def test_a_killed_run_of_other_settings_is_not_taken_up(tmp_path, moving):
    """What a killed preparation left (shards in unfinished/, or a dataset half moved into place) is taken up only by
    a run of the same settings: another --val_fraction starts over, and writes what an uninterrupted run of its
    own settings writes."""
    (tmp_path / "text.txt").write_text(generated_text(60_000, seed=1))
    args = ["prepare.py", "mine", "--source=text.txt", "--tokenizer=char", "--shard_size=5000", "--num_proc=1"]
    run_script(*args, "--val_fraction=0.3", "--out_root=clean", cwd=tmp_path)
    where = r"data/mine/[^/]+" if moving else r"data/mine/unfinished/train_\d+\.bin"
    killed_at_replace(3, where, *args, "--val_fraction=0.2", cwd=tmp_path)
    again = run_script(*args, "--val_fraction=0.3", cwd=tmp_path)
    assert "resume.json is from a preparation with other settings or source files: starting over" in again.stdout
    assert "moved into place" not in again.stdout
    assert shard_bytes(tmp_path / "data/mine") == shard_bytes(tmp_path / "clean/mine")


def test_uint32_vocabulary(tmp_path):
    """A character vocabulary past 65,535 ids gets uint32 shards (llm.c's version-7 header) and loses nothing."""
    points = [p for p in range(0x100, 0x100 + 70_500) if not 0xD800 <= p < 0xE000]
    rng = random.Random(0)
    text = "".join(map(chr, points)) + "".join(chr(rng.choice(points)) for _ in range(20_000))
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    run_script("prepare.py", "wide", "--source=wide.txt", "--tokenizer=char", "--num_proc=1", cwd=tmp_path)
    data = tmp_path / "data/wide"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == len(points) > 65_536 and meta["token_dtype"] == "uint32"
    assert list(np.fromfile(data / "train_000000.bin", dtype="<i4", count=2)) == [20240801, 7]
    chars = meta["tokenizer"]["chars"]
    tokens = np.concatenate([split_tokens(data, "train"), split_tokens(data, "val")])
    assert tokens.max() > 65_535 and "".join(chars[i] for i in tokens) == text


def test_overflowing_ids_refused():
    """An id that does not fit the shard's dtype stops the run; it is never wrapped around."""
    from configurator import UserError
    from prepare import encode_pieces

    class Wide:
        vocab_size, eot_id = 70_001, 70_000

        def encode_array(self, text):
            return np.array([ord(c) - ord("a") + 69_990 for c in text])

    tokens, lengths, _ = encode_pieces(Wide(), [("abc", False), ("d", True)], np.dtype("<u4"))
    assert tokens.tolist() == [69_990, 69_991, 69_992, 70_000, 69_993] and lengths == [3, 2]
    with pytest.raises(UserError, match="does not fit uint16"):
        encode_pieces(Wide(), [("abc", False)], np.dtype("<u2"))


def test_jsonl_parquet_and_glob_sources_agree(tmp_path):
    """The same documents as one .jsonl, as parquet (other text field), and as a glob of two .jsonl files give the
    same shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = stories(200, seed=2)
    write_jsonl(tmp_path / "all.jsonl", docs)
    pq.write_table(pa.table({"story": docs, "n": list(range(len(docs)))}), tmp_path / "all.parquet",
                   row_group_size=64)
    os.makedirs(tmp_path / "parts")
    write_jsonl(tmp_path / "parts/a.jsonl", docs[:120])
    write_jsonl(tmp_path / "parts/b.jsonl", docs[120:])
    common = ["--tokenizer=char", "--num_proc=1", "--val_fraction=0.1"]
    run_script("prepare.py", "a", "--source=all.jsonl", *common, cwd=tmp_path)
    run_script("prepare.py", "b", "--source=all.parquet", "--text_field=story", *common, cwd=tmp_path)
    run_script("prepare.py", "c", "--source=parts/*.jsonl", *common, cwd=tmp_path)
    # .json is JSON Lines too (datasets' to_json names its output so), in a folder as well
    os.makedirs(tmp_path / "json_parts")
    # with the byte-order mark Windows tools write first: not text, and once refused as not JSON
    (tmp_path / "json_parts/a.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "parts/a.jsonl").read_bytes())
    (tmp_path / "json_parts/b.jsonl").write_bytes((tmp_path / "parts/b.jsonl").read_bytes())
    (tmp_path / "all.json").write_bytes((tmp_path / "all.jsonl").read_bytes())
    run_script("prepare.py", "d", "--source=all.json", *common, cwd=tmp_path)
    run_script("prepare.py", "e", "--source=json_parts", *common, cwd=tmp_path)
    a = shard_bytes(tmp_path / "data/a")
    assert a == shard_bytes(tmp_path / "data/b") == shard_bytes(tmp_path / "data/c")
    assert a == shard_bytes(tmp_path / "data/d") == shard_bytes(tmp_path / "data/e")
    meta = json.loads((tmp_path / "data/c/meta.json").read_text())
    assert meta["source"]["num_files"] == 2 and sum(meta["source"]["documents"].values()) == len(docs)


def test_text_files_are_documents(tmp_path):
    """Each .txt file of a folder is a document: end-of-text between files, the last 10% of bytes are val. A file
    saved on Windows keeps its line endings (as evaluate.py and sample.py read files), and loses the byte-order mark
    some editors begin it with, which is not text."""
    os.makedirs(tmp_path / "books")
    texts = ["first book\r\nabc\r\n", "second book\n" * 20, "third\n" * 10]
    for i, t in enumerate(texts):
        name = f"books/{i}.txt" if i < 2 else "books/2.TXT"  # upper case is read too (it once was passed over)
        (tmp_path / name).write_bytes((b"\xef\xbb\xbf" if i == 0 else b"") + t.encode())
    (tmp_path / "books/notes.md").write_text("not read")  # passed over, with a note; hidden files without one
    (tmp_path / "books/.DS_Store").write_text("not read")
    os.makedirs(tmp_path / "books/.git")
    (tmp_path / "books/.git/HEAD.txt").write_text("not read")
    out = run_script("prepare.py", "books", "--source=books", "--tokenizer=char", "--num_proc=1", cwd=tmp_path).stdout
    assert "note: --source=books: 1 file passed over, not .txt/.jsonl/.json/.parquet: notes.md\n" in out, out
    data = tmp_path / "data/books"
    meta = json.loads((data / "meta.json").read_text())
    chars, eot = meta["tokenizer"]["chars"], meta["eot_id"]
    assert "\r" in chars and "\ufeff" not in chars
    decode = lambda ids: "".join(chars[i] if i != eot else "|" for i in ids)  # noqa: E731
    joined = "".join(texts)
    n = int((len(joined) + 3) * 0.9) - 3  # the cut is at 90% of the bytes, the mark's 3 included
    assert decode(split_tokens(data, "train")) == "|".join(texts)[:n + 2]  # two separators before the cut
    assert decode(split_tokens(data, "val")) == joined[n:]


def test_char_tinystories_with_own_splits(tmp_path):
    """TinyStories-style: a char vocabulary from a first pass over every split, val and test from their own files."""
    train, valid, test = stories(300, seed=3), stories(30, seed=4) + ["Zebra ü!"], stories(20, seed=5)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "valid.jsonl", valid)
    write_jsonl(tmp_path / "test.jsonl", test)
    run_script("prepare.py", "tinystories", "--tokenizer=char", "--source=train.jsonl", "--val_source=valid.jsonl",
               "--test_source=test.jsonl", "--num_proc=2", cwd=tmp_path)
    data = tmp_path / "data/tinystories"
    meta = json.loads((data / "meta.json").read_text())
    chars = "".join(sorted(set("".join(train + valid + test))))
    assert meta["tokenizer"] == {"type": "char", "chars": chars, "eot": True} and meta["eot_id"] == len(chars)
    for split, docs in (("train", train), ("val", valid), ("test", test)):
        ids = split_tokens(data, split)
        assert "".join(chars[i] if i < len(chars) else "\0" for i in ids) == "\0".join(docs)


def test_fineweb_rule_first_shard_is_val(tmp_path):
    """fineweb_edu (llm.c's rule): the first shard_size tokens of the stream are val, everything after is train."""
    docs = stories(100, seed=6)
    write_jsonl(tmp_path / "fw.jsonl", docs)
    run_script("prepare.py", "fineweb_edu", "--source=fw.jsonl", "--tokenizer=char", "--shard_size=1000",
               "--num_proc=1", cwd=tmp_path)
    data = tmp_path / "data/fineweb_edu"
    meta = json.loads((data / "meta.json").read_text())
    assert [s["tokens"] for s in meta["shards"]["val"]] == [1000]
    chars, eot = meta["tokenizer"]["chars"], meta["eot_id"]
    ids = np.concatenate([split_tokens(data, "val"), split_tokens(data, "train")])
    assert "".join(chars[i] if i != eot else "\0" for i in ids) == "\0".join(docs)


def test_hf_local_folder(tmp_path):
    """--hf takes anything datasets.load_dataset opens, a local folder of .jsonl splits too (offline): its train and
    validation splits become train and val, and meta.json records the dataset by the name given."""
    train, valid = stories(60, seed=7), stories(8, seed=8)
    os.makedirs(tmp_path / "local")
    write_jsonl(tmp_path / "local/train.jsonl", train)
    write_jsonl(tmp_path / "local/validation.jsonl", valid)
    run_script("prepare.py", "mine", "--hf=local", "--split=train,validation", "--tokenizer=char", "--num_proc=1",
               cwd=tmp_path)
    data = tmp_path / "data/mine"
    meta = json.loads((data / "meta.json").read_text())
    assert meta["source"]["hf"] == {"name": "local", "config": ""} and meta["source"]["url"] is None
    chars, eot = meta["tokenizer"]["chars"], meta["eot_id"]
    for split, docs in (("train", train), ("val", valid)):
        assert "".join(chars[i] if i != eot else "\0" for i in split_tokens(data, split)) == "\0".join(docs)


def test_hf_local_folder_changes_are_noticed_on_resume(tmp_path, monkeypatch):
    """A resumed --hf=<folder> run keeps the interrupted run's shards only while the folder's files are the same:
    they are part of the resume fingerprint, as --source's files are."""
    import prepare
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "local")
    write_jsonl(tmp_path / "local/train.jsonl", stories(20, seed=1))
    cfg = prepare.PrepareConfig(name="mine", hf="local", tokenizer="char")
    before = prepare.fingerprint(cfg, None, 0.0)
    assert prepare.fingerprint(cfg, None, 0.0) == before
    write_jsonl(tmp_path / "local/train.jsonl", stories(21, seed=1))
    assert prepare.fingerprint(cfg, None, 0.0) != before


def test_fingerprint_settings_are_those_of_earlier_versions(tmp_path):
    """A killed preparation resumes across an upgrade only if its fingerprint is the same: a setting that changes no
    token must not be in it (adding --verify changed every fingerprint, so a killed run started over: review). The
    settings below are those of every resume.json written so far: a new one that changes the tokens goes here too."""
    import prepare
    source = tmp_path / "a.txt"
    source.write_text("fine text\n" * 100)
    cfg = prepare.PrepareConfig(name="mine", source=str(source), tokenizer="char", num_proc=3)
    settings = prepare.fingerprint(cfg, None, 0.1)["settings"]
    assert sorted(settings) == sorted(["name", "source", "val_source", "test_source", "hf", "hf_config", "split",
                                       "text_field", "tokenizer", "bpe_train_chars", "val_fraction", "seed",
                                       "shard_size", "decode_errors", "out_root"])


def test_name_like_a_recipe_gets_a_note(tmp_path):
    """Any name goes with --source, but one a letter away from a recipe is pointed out, with the tokenizer used (GPT-2
    BPE, not the recipe's characters); the run goes on either way."""
    (tmp_path / "a.txt").write_text("fine text\n" * 100)
    typo = run_script("prepare.py", "shakespeare_chr", "--source=a.txt", "--num_proc=1", cwd=tmp_path, check=False)
    assert ("note: 'shakespeare_chr' is not a recipe but resembles 'shakespeare_char'; preparing 'shakespeare_chr' "
            "from your --source with the gpt2 tokenizer") in typo.stdout
    alone = run_script("prepare.py", "shakespeare_chr", cwd=tmp_path, check=False)  # no --source: refused, the same
    assert alone.returncode == 2 and "'shakespeare_chr' is not a recipe (did you mean 'shakespeare_char'? see " \
        "--list); for your own text give --source=PATH or --hf=owner/name" in alone.stderr
    other = run_script("prepare.py", "mynotes", "--source=a.txt", "--tokenizer=char", "--num_proc=1", cwd=tmp_path)
    assert "note:" not in other.stdout and (tmp_path / "data/mynotes/meta.json").exists()
    # the name among the options, where it was once "unexpected argument 'later'"
    run_script("prepare.py", "--tokenizer=char", "later", "--source=a.txt", "--num_proc=1", cwd=tmp_path)
    assert (tmp_path / "data/later/meta.json").exists()
    # argparse's spelling: the value is not taken for the name, and the answer is --key=value (a review)
    spaced = run_script("prepare.py", "--source", "a.txt", "mine", cwd=tmp_path, check=False)
    assert spaced.returncode == 2 and "unexpected argument 'a.txt': did you mean --source=a.txt?" in spaced.stderr


def test_saved_dataset_folder_points_to_hf(tmp_path):
    """A folder datasets' save_to_disk wrote is Arrow, not text: --source says what reads it instead, and that advice
    holds (--hf opens a saved DatasetDict)."""
    import datasets
    train, valid = stories(40, seed=9), stories(5, seed=10)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": valid})}).save_to_disk(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": train}).save_to_disk(tmp_path / "one")
    arrow = next(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".arrow")
    for source, message in (("saved", "--source=saved is a DatasetDict saved with save_to_disk; pass it as "
                                      "--hf=saved instead"),
                            ("saved/train", "saved/train is one split of a DatasetDict saved with save_to_disk; pass "
                                            "the whole of it as --hf=saved"),
                            ("one", "--source=one is a dataset saved with save_to_disk; write it out as JSON Lines"),
                            (f"one/{arrow}", "--source=one is a dataset saved with save_to_disk")):
        proc = run_script("prepare.py", "mine", f"--source={source}", "--tokenizer=char", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run_script("prepare.py", "mine", "--hf=saved", "--split=train,validation", "--tokenizer=char", "--num_proc=1",
               cwd=tmp_path)
    meta = json.loads((tmp_path / "data/mine/meta.json").read_text())
    assert meta["source"]["documents"] == {"train": len(train), "val": len(valid)}


def test_list_names_every_recipe(tmp_path):
    out = run_script("prepare.py", "--list", cwd=tmp_path).stdout
    for name in ("shakespeare_char", "openwebtext", "tinystories", "wikitext2", "wikitext103", "fineweb_edu"):
        assert any(line.startswith(name + " ") and len(line) > 40 for line in out.splitlines())


@pytest.mark.parametrize("case", ["missing", "empty", "undecodable", "no_field", "not_json", "parquet_column",
                                  "hf_offline", "val_fraction", "missing_val_source", "empty_test_source",
                                  "tokenizer_typo", "bpe_size", "json_array", "json_object", "gzip", "two_vals",
                                  "val_in_train"])
def test_bad_input(tmp_path, case):
    """One line that says what is wrong and what to do, exit code 2, no traceback, no meta.json, no empty folder."""
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 100 + b"caf\xe9\n")
    (tmp_path / "good.txt").write_bytes(b"fine text\n" * 100)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "nothing.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "junk.jsonl").write_text('{"text": "a"}\n  {"text": 1,, \n')  # columns count the indent
    (tmp_path / "array.json").write_text('[{"text": "a"}, {"text": "b"}]\n')
    (tmp_path / "object.json").write_text('{\n  "text": "a"\n}\n')
    (tmp_path / "good.txt.gz").write_bytes(gzip.compress(b"fine text\n" * 100))
    (tmp_path / "corpus").mkdir()
    for name in ("a.txt", "valid.txt"):
        (tmp_path / "corpus" / name).write_text("fine text\n" * 100)
    args, message = {
        "missing": (["--source=missing/*.txt"], "no such file"),
        "empty": (["--source=empty.txt", "--tokenizer=char"], "holds no text"),
        "undecodable": (["--source=bad.txt", "--tokenizer=char"],
                        "bad.txt: byte 1,003 (b'\\xe9\\n') is not UTF-8; convert the file to UTF-8, or pass "
                        "--decode_errors=replace"),
        "no_field": (["--source=rows.jsonl", "--tokenizer=char"],
                     "rows.jsonl line 2: no 'text' field (it has: 'body'); choose the field with --text_field"),
        "not_json": (["--source=junk.jsonl", "--tokenizer=char"],
                     "junk.jsonl line 2: not JSON (Expecting property name enclosed in double quotes, column 14); "
                     "each line must be one JSON object"),
        "parquet_column": (["--source=t.parquet", "--tokenizer=char"], "has no column 'text' (it has: story)"),
        "hf_offline": (["--hf=nobody/no_such_dataset", "--tokenizer=char"], "point --source at them"),
        "val_fraction": (["--source=bad.txt", "--val_fraction=1.5", "--shard_size=0"],
                         "shard_size=0 must be between 1 and 2,147,483,647"),
        "two_vals": (["--source=good.txt", "--val_source=good.txt", "--val_fraction=0.5", "--tokenizer=char"],
                     "--val_fraction carves val out of --source, and --val_source is val already: give one"),
        "missing_val_source": (["--source=good.txt", "--val_source=nope.txt", "--tokenizer=char"],
                               "--val_source=nope.txt: no such file"),
        "empty_test_source": (["--source=good.txt", "--test_source=nothing.txt", "--tokenizer=char"],
                              "the test split came out empty: --test_source=nothing.txt holds no text"),
        "json_array": (["--source=array.json", "--tokenizer=char"],
                       "array.json is one JSON document, not JSON Lines (one object per line); write one document "
                       "per line, e.g. jq -c '.[]' array.json > docs.jsonl for an array"),
        "json_object": (["--source=object.json", "--tokenizer=char"], "object.json is one JSON document, not JSON"),
        "gzip": (["--source=good.txt.gz", "--tokenizer=char"],
                 "good.txt.gz is gzip-compressed, not text; decompress it first (gunzip -k good.txt.gz) and point "
                 "--source at the result"),
        "tokenizer_typo": (["--source=good.txt", "--tokenizer=chars"],
                           "tokenizer='chars' is neither 'char' (one id per character), 'bpe:N' (an N-token BPE "
                           "trained on this text), a tiktoken encoding (gpt2, "),
        # a glob for train that takes in the val file: val would score text trained on (a trial's meta.json listed
        # valid.txt in both splits)
        "val_in_train": (["--source=corpus/*.txt", "--val_source=corpus/valid.txt", "--tokenizer=char"],
                         "corpus/valid.txt is read by both --source and --val_source: its text would be in both "
                         "splits, and the val loss would score text the model trained on; keep it out of --source "
                         "(put the val and test files in a folder of their own, or narrow the glob)"),
        "bpe_size": (["--source=good.txt", "--tokenizer=bpe:100k", "--bpe_train_chars=0"],
                     "tokenizer='bpe:100k': write a BPE's vocabulary size as bpe:N, e.g. bpe:8192"),
    }[case]
    if case == "parquet_column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"story": ["x"]}), tmp_path / "t.parquet")
    if case == "hf_offline":  # offline, the hub client retries for ~25 s before giving up; offline mode fails at once
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        proc = run_script("prepare.py", "mine", *args, "--num_proc=1", cwd=tmp_path, check=False)
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) > 20
    assert not (tmp_path / "data/mine/meta.json").exists()
    assert not (tmp_path / "data/mine").exists()  # nothing half-written, nothing that looks resumable
    if case == "val_fraction":  # every problem at once
        assert "val_fraction=1.5 must be more than 0 and less than 1" in proc.stderr
    if case == "tokenizer_typo":
        assert proc.stderr.rstrip().endswith("; did you mean 'char'?")
    if case == "bpe_size":
        assert "bpe_train_chars=0 must be 1 or more" in proc.stderr


def test_test_source_alone_keeps_carving_val(tmp_path, shakespeare_path):
    """--test_source adds a test split and changes nothing else: val is still the end of --source."""
    # lines of the source itself, so a char vocabulary (the characters of every split) stays the same with it
    test_text = "".join(open(shakespeare_path, encoding="utf-8").read().splitlines(keepends=True)[:3])
    (tmp_path / "test.txt").write_text(test_text, encoding="utf-8")
    for name, extra in (("plain", []), ("with_test", ["--test_source=test.txt"])):
        run_script("prepare.py", name, f"--source={shakespeare_path}", "--tokenizer=char", "--num_proc=1", *extra,
                   cwd=tmp_path)
    plain, with_test = shard_bytes(tmp_path / "data/plain"), shard_bytes(tmp_path / "data/with_test")
    assert {k: v for k, v in with_test.items() if not k.startswith("test_")} == plain
    meta = json.loads((tmp_path / "data/with_test/meta.json").read_text())
    chars = meta["tokenizer"]["chars"]
    assert "".join(chars[i] for i in split_tokens(tmp_path / "data/with_test", "test")) == test_text


FAILURES = ["typo", "no_bpe_files", "undecodable", "no_text", "empty_split", "bad_json_line"]


@pytest.mark.parametrize("failure", [f if f == "typo" else pytest.param(f, marks=needs_bpe) for f in FAILURES])
def test_failed_rerun_keeps_the_finished_dataset(tmp_path, shakespeare_path, failure):
    """A re-run that fails leaves the dataset already there complete, meta.json included: before it has a tokenizer and
    a readable source (a mistyped --source, BPE files missing offline), or on the content of the source, found while
    tokenizing (GPT-2 BPE reads the text once): an undecodable byte megabytes in, no text, a split that comes out
    empty, a bad JSON line after the first. The same run into a new folder leaves no folder behind."""
    tokenizer = "--tokenizer=char" if failure == "typo" else "--tokenizer=gpt2"
    (tmp_path / "no_cache").mkdir()
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 300_000 + b"caf\xe9\n")
    (tmp_path / "blank.txt").write_text(" \n\n  \n")
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n' * 50_000 + '{"text": \n')
    source, env = {"typo": ("shakespere.txt", None),
                   "no_bpe_files": (shakespeare_path, {"TIKTOKEN_CACHE_DIR": str(tmp_path / "no_cache")}),
                   "undecodable": ("bad.txt", None), "no_text": ("blank.txt", None),
                   "empty_split": ("one.txt", None), "bad_json_line": ("bad.jsonl", None)}[failure]
    failing = [f"--source={source}", tokenizer, "--num_proc=1", "--shard_size=100000"]
    proc = run_script("prepare.py", "fresh", *failing, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "data/fresh").exists()

    run_script("prepare.py", "mine", f"--source={shakespeare_path}", tokenizer, "--num_proc=1", cwd=tmp_path)
    dataset = lambda: {p.name: p.read_bytes() for p in (tmp_path / "data/mine").iterdir()  # noqa: E731
                       if p.name != "prepare.lock"}  # which names the last run
    before = dataset()
    proc = run_script("prepare.py", "mine", *failing, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert dataset() == before


def test_undecodable_bytes_replaced_on_request(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text\n" * 100 + b"caf\xe9\n")
    run_script("prepare.py", "bad", "--source=bad.txt", "--tokenizer=char", "--decode_errors=replace",
               "--num_proc=1", cwd=tmp_path)
    meta = json.loads((tmp_path / "data/bad/meta.json").read_text())
    assert "\ufffd" in meta["tokenizer"]["chars"]


HARD_STARTS = [" ", "  ", "\t", "", "", " =", " 12", "'s", " '", "\u00a0", " e\u0301t\u00e9", "\r\n", "\n", "_",
               "\u3000"]
HARD_WORDS = ["word", "The", "don't", "it'S", "42", "3.14", "!!", "\u00e9t\u00e9", "e\u0301", "\u4e2d\u6587", " ", "  ",
              "x_1", "1234567", "\u4e2d\u6587\u3002", "\u4e2d\uff0c\u6587", "\u3001", "a+b/c==",
              "\u0928\u092e\u0938\u094d\u0924\u0947", "Ⅻ½", "\u2019s", "HTTPServer", "\U0001f600", "\ue000",
              "\u0378", "\x1c", "\x85", "/n"]


def hard_text(n, seed=0):
    """Lines full of the cases where a cut could change tokens: leading spaces, tabs, blank lines, CRLF, digits,
    contractions, combining marks, CJK with its punctuation, base64-like runs, unassigned and private code points."""
    rng = random.Random(seed)
    return "".join(rng.choice(HARD_STARTS) + " ".join(rng.choice(HARD_WORDS) for _ in range(rng.randint(0, 6))) +
                   rng.choice(["\n", "\n", "\r\n", " \n", "\n\n", "\u3002\n", ""]) for _ in range(n))


def cut_everywhere(text):
    """text cut at every point safe_cut allows."""
    from prepare import safe_cut
    cuts, pos = [0], 0
    while (pos := safe_cut(text, pos + 1)) != -1:
        cuts.append(pos)
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]


def test_safe_cuts_keep_every_pretokenization(monkeypatch):
    """For the pre-tokenizer regex of every encoding tiktoken knows (read from tiktoken itself; no BPE files needed),
    the pre-tokens of the parts cut at every safe point are those of the whole text: BPE never merges across
    pre-tokens, so the tokens are the same too."""
    import regex
    import tiktoken
    import tiktoken.registry
    import tiktoken_ext.openai_public as openai_public
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *args, **kwargs: {})
    names = tiktoken.list_encoding_names()
    assert {"gpt2", "cl100k_base", "o200k_base"} <= set(names)
    text = hard_text(3000)
    parts = cut_everywhere(text)
    assert len(parts) > 3000
    for name in names:
        pattern = regex.compile(tiktoken.registry.ENCODING_CONSTRUCTORS[name]()["pat_str"])
        assert [t for part in parts for t in pattern.findall(part)] == pattern.findall(text), name


def test_safe_cuts_keep_trained_bpe_tokens():
    """The same for a BPE trained by prepare.py (GPT-4's pre-tokenizer, run by Hugging Face tokenizers), with a
    letter of Unicode 17 (U+10940) that the regex module knows and the tokenizer's Oniguruma may not: no cut after
    it."""
    from tokenizer import BPETokenizer
    new_letter = "x\U00010940.,;\U00010940y \U00010940\U00010940! "
    text = hard_text(3000) + new_letter * 20
    tokenizer = BPETokenizer.train([text], 1000, show_progress=False)
    parts = cut_everywhere(text)
    assert len(parts) > 3000
    assert [t for p in parts for t in tokenizer.encode(p)] == tokenizer.encode(text)
    assert cut_everywhere(new_letter) == ["x\U00010940.,;\U00010940y", " \U00010940\U00010940! "]  # after y only


def test_bpe_learns_from_long_words_in_parts(monkeypatch):
    """Runs of 1,000 letters or more (DNA, CJK without punctuation) reach tokenizers' learning cut, or it takes time
    in proportion to a word's length for each merge; text of ordinary words goes whole."""
    import regex

    import prepare
    from prepare import short_words
    from tokenizer import BPETokenizer
    text = "ACGT" * 1000 + ". \u4e2d\u6587" * 3 + "\u4e2d" * 2500 + " end"
    parts = list(short_words(text))
    assert "".join(parts) == text and len(parts) == 7
    assert max(len(w) for p in parts for w in regex.findall(r"[\p{L}\p{N}\p{M}]+", p)) == 1000
    ordinary = hard_text(300)
    assert list(short_words(ordinary)) == [ordinary]
    # and what learn_bpe hands the learning is cut so
    learned_from, train = [], BPETokenizer.train

    def recorded(texts, *args, **kwargs):
        learned_from.extend(texts)
        return train(learned_from, *args, **kwargs)

    monkeypatch.setattr(BPETokenizer, "train", recorded)
    prepare.learn_bpe(lambda: [("train", [text])], 300, 10**9)
    assert "".join(learned_from) == text
    assert max(len(w) for p in learned_from for w in regex.findall(r"[\p{L}\p{N}\p{M}]+", p)) == 1000


@needs_bpe
@pytest.mark.parametrize("encoding", ["gpt2", "cl100k_base"])
def test_safe_cuts_keep_bpe_tokens(encoding):
    """Cutting a text at every point safe_cut allows and encoding the parts apart gives the tokens of the whole."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding(encoding)
    except Exception:
        pytest.skip(f"{encoding} BPE files not available offline")
    text = hard_text(3000)
    parts = cut_everywhere(text)
    assert len(parts) > 3000
    assert [t for p in parts for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_pieces_without_whitespace():
    """Text with no whitespace after a letter (CJK lines ending in 。, one line of base64) is still cut into pieces of
    about the size asked for; one id per character is cut anywhere, at exactly that size."""
    import base64
    from prepare import any_cut, pieces_of, safe_cut
    cjk = "".join(chr(0x4e00 + i % 500) * (1 + i % 7) + "\u3002\n" for i in range(20_000))
    b64 = base64.b64encode(random.Random(0).randbytes(200_000)).decode()
    for text in (cjk, b64):
        segments = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]
        parts = list(pieces_of(segments, safe_cut, size=1000))
        assert "".join(parts) == text and len(parts) > len(text) // 1100
        assert max(map(len, parts)) < 1500  # base64 has a cut point every ~30 characters, on average
    parts = list(pieces_of([cjk[:12_345], cjk[12_345:]], any_cut, size=1000))
    assert "".join(parts) == cjk and set(map(len, parts[:-1])) == {1000}


def test_pieces_search_each_character_once():
    """A long stretch with no cut point (one 2M-character word arriving in 1,000 segments) is searched once, not from
    the piece's beginning again for every segment (which was quadratic: 1.2 s in pieces_of for 8M characters,
    59 s for 64M); the cut after it is still found."""
    from prepare import pieces_of, safe_cut
    searched = []

    def counting_cut(text, start):
        searched.append(len(text) - start)
        return safe_cut(text, start)

    segments = ["x" * 2000] * 1000 + [" and more" * 200]
    parts = list(pieces_of(segments, counting_cut, size=1000))
    assert parts[0] == "x" * 2_000_000 and "".join(parts) == "".join(segments)
    assert sum(searched) < 2 * len("".join(segments))


@needs_bpe
def test_cjk_and_base64_tokens_unchanged(tmp_path):
    """End to end, through the pieces the workers get: a file of CJK lines and one line of base64 (no whitespace
    after a letter anywhere) encodes to exactly tiktoken's tokens of the whole text."""
    import base64
    import tiktoken
    text = ("".join(chr(0x4e00 + i % 3000) * (1 + i % 9) + "\u3002\n" for i in range(60_000)) +
            base64.b64encode(random.Random(1).randbytes(400_000)).decode() + "\n")
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    run_script("prepare.py", "cjk", "--source=cjk.txt", "--num_proc=2", cwd=tmp_path)
    enc = tiktoken.get_encoding("gpt2")
    data = tmp_path / "data/cjk"
    meta = json.loads((data / "meta.json").read_text())
    n = len(text.encode("utf-8"))
    cut = len(text.encode("utf-8")[:int(n * 0.9)].decode("utf-8", "ignore"))  # the val cut, by bytes
    assert split_tokens(data, "train").tolist() == enc.encode_ordinary(text[:cut])
    assert split_tokens(data, "val").tolist() == enc.encode_ordinary(text[cut:])
    assert meta["source"]["characters"] == len(text)


def test_workers_pass_large_tasks_and_stop_midway():
    """Tasks far larger than a pipe (Workers hands them over as files) come back right and in order, and closing the
    workers with tasks still in flight (what Ctrl-C does) returns promptly and leaves no task file behind."""
    import threading
    from prepare import Workers, chars_of_task
    tasks = [[(chr(ord("a") + i) * (2 << 20), False)] for i in range(8)]  # 2M characters each
    workers = Workers(2, (None, None))
    results = workers.map(chars_of_task, iter(tasks))
    assert [next(results)[1] for _ in range(2)] == [{"a"}, {"b"}]
    closing = threading.Thread(target=workers.close)
    closing.start()
    closing.join(timeout=60)
    assert not closing.is_alive(), "Workers.close() hung with tasks in flight"
    assert not os.path.exists(workers.spool)


@pytest.mark.parametrize("progress", ["on", "off"])
def test_a_download_cut_short_is_not_kept(tmp_path, monkeypatch, progress):
    """A server that promises 100,000 bytes and closes after 10: the download is refused, with its byte counts, and
    leaves no file that a later run would take for the whole (read() just ends early; a trial found the 10 bytes
    kept as the dataset's input.txt). One that sends them all is kept, with tqdm's bars off too (TQDM_DISABLE=1, as
    CI and batch jobs set it: a disabled bar counts nothing, and a first version refused every download then)."""
    import http.server
    import threading

    from configurator import UserError
    from prepare import download

    if progress == "off":  # as TQDM_DISABLE=1 does, read by tqdm when it is imported
        import functools

        import prepare
        monkeypatch.setattr(prepare, "tqdm", functools.partial(prepare.tqdm, disable=True))

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789" * (10_000 if self.path == "/whole.txt" else 1))
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/input.txt"
        with pytest.raises(UserError, match=r"could not download .*\(the connection closed after 10 of 100,000 bytes; "
                                            r"run the command again\); offline, point --source at a local copy$"):
            download(url, str(tmp_path / "input.txt"))
        assert os.listdir(tmp_path) == []
        download(url.replace("input.txt", "whole.txt"), str(tmp_path / "input.txt"))
        assert (tmp_path / "input.txt").read_bytes() == b"0123456789" * 10_000 and os.listdir(tmp_path) == ["input.txt"]
    finally:
        server.shutdown()
        server.server_close()


def test_jsonl_lines_with_any_whitespace_around(tmp_path):
    """Python's whitespace around a line (a form feed, a no-break space), which JSON itself refuses, is stripped as it
    always was: a review caught a first version of the column fix refusing such files, which had prepared before."""
    from prepare import jsonl_documents
    (tmp_path / "docs.jsonl").write_text('\u00a0{"text": "a"}\x0c\n\t{"text": "b"}  \n', encoding="utf-8")
    assert list(jsonl_documents(str(tmp_path / "docs.jsonl"), "text", "strict")) == ["a", "b"]
