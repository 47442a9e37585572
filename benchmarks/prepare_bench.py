"""
prepare.py throughput and memory at scale (issue 3), side by side with tiktoken's own batch encoder:

    python benchmarks/prepare_bench.py                      # 300 MB corpus; GPT-2 BPE on its first 100 MB
    python benchmarks/prepare_bench.py --mb=50 --bpe_mb=20  # a quick look
    python bench.py prepare --mb=50 --bpe_mb=20             # the same, as a bench.py subcommand

Builds a .jsonl corpus of generated documents (words drawn with tiny Shakespeare's word frequencies when
../shared/data/tinyshakespeare.txt is there, else from a small word list), then times, each in a fresh process:
prepare.py with --num_proc=1 and with every core, for GPT-2 BPE and for the char tokenizer, and tiktoken's
encode_ordinary_batch on the same document texts with 1 thread and with every core, and as a ceiling the same
encoding split over 1 and every-core independent processes (no inter-process traffic). MB are megabytes (1e6) of UTF-8
document text; prepare.py is timed end to end (start-up, reading and JSON parsing, a char vocabulary pass, writing
shards), tiktoken on its encode call alone. Peak RSS is sampled every 0.1 s over the process and all its children.
"""

import argparse
import collections
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GPT_SHARED_DIR", os.path.join(REPO, "..", "shared"))

TIKTOKEN_BATCH = """
import json, sys, time, tiktoken
path, mb, threads, repo = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
from benchmarks.prepare_bench import load_docs
docs, size = load_docs(path, mb)
enc = tiktoken.get_encoding("gpt2")
t0 = time.time()
tokens = sum(len(ids) for i in range(0, len(docs), 1000)
             for ids in enc.encode_ordinary_batch(docs[i:i + 1000], num_threads=threads))
print(json.dumps({"seconds": time.time() - t0, "bytes": size, "tokens": tokens}))
"""


def load_docs(path, mb):
    docs, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            size += len(docs[-1].encode())
            if size >= mb * 1e6:
                break
    return docs, size


def ceiling_worker(path, mb, rank, world, barrier, results):
    import tiktoken
    docs = load_docs(path, mb)[0][rank::world]
    try:
        enc = tiktoken.get_encoding("gpt2")
    finally:
        barrier.wait()  # a worker that failed still releases the others; its missing result ends the wait below
    t0 = time.time()
    for doc in docs:
        enc.encode_ordinary(doc)
    results.put((t0, time.time()))


def machine_ceiling(path, mb, world):
    """Seconds for `world` independent processes to encode a share of the documents each, loading untimed: no
    inter-process traffic at all, so the best any --num_proc=world can do on this machine."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=ceiling_worker, args=(path, mb, r, world, barrier, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        times = [results.get(timeout=600) for _ in procs]
    except Exception:
        raise SystemExit("a ceiling worker failed (are the GPT-2 BPE files in TIKTOKEN_CACHE_DIR?)") from None
    for p in procs:
        p.join()
    return max(t for _, t in times) - min(t for t, _ in times)


def word_pool():
    """Words (punctuation attached, as in running text) and how often each occurs."""
    path = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(path):
        counts = collections.Counter(open(path, encoding="utf-8").read().split())
    else:
        counts = collections.Counter(("the of and to my thou thee love night day sweet death fair heart light moon "
                                      "stars sword blood name rose kiss what is in that shall not be with have this "
                                      "for you but lord, me. sir? king! café naïve").split())
    words, freq = zip(*counts.items())
    return np.array(words, dtype=object), np.array(freq, dtype=np.float64) / sum(freq)


def build_corpus(path, mb, seed=0):
    """A .jsonl of documents of 200 to 6,000 words in lines of 5 to 20 words, mb megabytes of text in all."""
    rng = np.random.default_rng(seed)
    words, p = word_pool()
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            n = int(rng.integers(200, 6000))
            drawn = words[rng.choice(len(words), size=n, p=p)].tolist()
            breaks = np.cumsum(rng.integers(5, 21, size=n // 5 + 1))
            lines = [" ".join(drawn[a:b]) for a, b in zip(np.r_[0, breaks[:-1]], breaks) if a < n]
            text = "\n".join(lines)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            size += len(text.encode())
    return size


def tree_rss_mb(root):
    """Resident memory of a process and all its descendants, in MB (Linux /proc)."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    tree, frontier = {root}, [root]
    while frontier:
        children = [p for p, pp in parents.items() if pp in frontier and p not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 1e6


def run(cmd, cwd):
    """(wall seconds, peak tree RSS in MB, stdout) of a command."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.communicate()[0]
    seconds = time.time() - t0
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-2000:]}")
    return seconds, peak[0], out


def first_mb(src, dst, mb):
    """The first documents of src holding mb megabytes of text, as dst; returns their text bytes."""
    size = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(line)
            size += len(json.loads(line)["text"].encode())
            if size >= mb * 1e6:
                break
    return size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300, help="corpus size (char tokenizer runs on all of it)")
    parser.add_argument("--bpe_mb", type=float, default=100, help="GPT-2 BPE runs on the first this many MB")
    parser.add_argument("--workdir", default="", help="where the corpus and outputs go, kept afterwards (default: a "
                        "temp folder, removed at the end)")
    run_bench(parser.parse_args())


def run_bench(args):
    """The whole benchmark, for args with mb, bpe_mb and workdir (this script's flags, or bench.py prepare's keys)."""
    if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):  # GPT-2 BPE files offline, for every process below
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.abspath(os.path.join(SHARED, "tiktoken_cache")))
    cores = len(os.sched_getaffinity(0))
    if args.workdir and os.path.exists(args.workdir) and (not os.path.isdir(args.workdir) or os.listdir(args.workdir)):
        sys.exit(f"error: --workdir={args.workdir} is a file or a folder with files in it; give a new folder (the "
                 "benchmark writes its corpus and datasets there)")
    # absolute: prepare.py runs in it, and is given its files by path
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="prepare_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        bench(args, cores, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)  # the corpus and shards: about 1.5 GB at the defaults


def bench(args, cores, work):
    corpus, bpe_corpus = os.path.join(work, "corpus.jsonl"), os.path.join(work, "corpus_bpe.jsonl")
    t0 = time.time()
    char_bytes = build_corpus(corpus, args.mb)
    bpe_bytes = first_mb(corpus, bpe_corpus, args.bpe_mb)
    print(f"corpus: {char_bytes / 1e6:.0f} MB of text ({bpe_bytes / 1e6:.0f} MB for BPE) in {work}, built in "
          f"{time.time() - t0:.0f} s; {cores} cores", flush=True)

    rows = []
    for tokenizer, path, size in (("gpt2", bpe_corpus, bpe_bytes), ("char", corpus, char_bytes)):
        for num_proc in (1, cores):
            seconds, rss, out = run([sys.executable, os.path.join(REPO, "prepare.py"), f"bench_{tokenizer}",
                                     f"--source={path}", f"--tokenizer={tokenizer}", f"--num_proc={num_proc}",
                                     "--out_root=out"], cwd=work)
            tokens = sum(int(n.replace(",", "")) for n in re.findall(r": ([\d,]+) tokens in", out))
            rows.append((f"prepare.py --tokenizer={tokenizer} --num_proc={num_proc}", size, seconds, tokens, rss))
            print(f"{rows[-1][0]}: {size / 1e6 / seconds:.2f} MB/s, peak RSS {rss:.0f} MB", flush=True)
        if tokenizer == "gpt2":
            for threads in (1, cores):
                _, rss, out = run([sys.executable, "-c", TIKTOKEN_BATCH, path, str(args.bpe_mb), str(threads), REPO],
                                  cwd=work)
                result = json.loads(out)
                rows.append((f"tiktoken encode_ordinary_batch, {threads} thread(s)", result["bytes"],
                             result["seconds"], result["tokens"], rss))
                print(f"{rows[-1][0]}: {result['bytes'] / 1e6 / result['seconds']:.2f} MB/s", flush=True)
            for world in (1, cores):
                seconds = machine_ceiling(path, args.bpe_mb, world)
                rows.append((f"ceiling: tiktoken in {world} independent process(es), no IPC", size, seconds, 0, 0))
                print(f"{rows[-1][0]}: {size / 1e6 / seconds:.2f} MB/s", flush=True)

    print("\n| run | MB | seconds | MB/s | tokens | peak RSS (MB, all processes) |\n|---|---|---|---|---|---|")
    for name, size, seconds, tokens, rss in rows:
        print(f"| {name} | {size / 1e6:.0f} | {seconds:.1f} | {size / 1e6 / seconds:.2f} | "
              f"{f'{tokens:,}' if tokens else '-'} | {f'{rss:.0f}' if rss else '-'} |")


if __name__ == "__main__":
    main()
