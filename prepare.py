"""
Turn a text corpus into token shards that train.py reads:

    python prepare.py shakespeare_char                  tiny Shakespeare, one id per character
    python prepare.py openwebtext                       OpenWebText, GPT-2 BPE (nanoGPT's GPT-2 reproduction)
    python prepare.py tinystories --tokenizer=char      TinyStories, one id per character (+ end-of-text)
    python prepare.py mytext --source="notes/*.txt" --tokenizer=char
    python prepare.py tinystories --tokenizer=bpe:4096  TinyStories, a 4,096-token BPE trained on its own text
    python prepare.py mine --source=my.txt --tokenizer=out-tinystories   tokenized as that run's model reads
    python prepare.py --list                            every recipe

Writes data/<name>/train_000000.bin ..., val_000000.bin ... (the llm.c token-file format, see tokendata.py) and
meta.json. They are written into data/<name>/unfinished/ and moved up, meta.json last, once all are written: a dataset
already in data/<name> stays whole and usable until then, whatever stops the new preparation.

How it scales (issue 3): documents are streamed, never held whole; worker processes (--num_proc) tokenize pieces of
about a megabyte in order, so the shards are byte-identical whatever the number of workers; each shard is filled to
exactly --shard_size tokens and written whole under a temporary name, then renamed. After every finished shard,
resume.json records how far the stream got, so a killed run picks up from there when run again with the same command.
"""

import contextlib
import ctypes
import difflib
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.request
from collections import deque
from itertools import chain
from dataclasses import asdict, dataclass

import numpy as np
import regex
from tqdm import tqdm

import configurator
from configurator import UserError
from lock import FolderLock
from tokendata import (UNFINISHED_DIR, Dataset, TokenFileError, read_header, read_meta, read_tokens, token_dtype,
                       write_tokens)
from tokenizer import (BPETokenizer, CharTokenizer, bpe_json_problems, bpe_vocab_size, describe, make_tokenizer,
                       tokenizer_from_meta)

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
PIECE_CHARS = 1 << 18  # documents longer than this are cut into pieces of about this size (see safe_cut)
TASK_CHARS = 1 << 20  # characters sent to a worker at once: large enough that inter-process traffic is noise
STATE_VERSION = 2  # of resume.json; a different version is never resumed from


@dataclass(frozen=True)
class Recipe:
    description: str
    tokenizer: str  # the default --tokenizer
    url: str = ""  # a plain-text download: one document
    hf: str = ""  # or a Hugging Face dataset, streamed
    hf_config: str = ""
    # (dataset split, what becomes of it): 'train', 'val', 'test'; 'random': train, with a random val_fraction of its
    # documents (seeded) set aside as val; 'first_shard': llm.c's fineweb rule, the first shard_size tokens are val
    splits: tuple = ()
    val_fraction: float = 0.1
    join_rows: bool = False  # the rows of a split are the lines of one text (wikitext), not separate documents


WIKITEXT = (("train", "train"), ("validation", "val"), ("test", "test"))
RECIPES = {
    "shakespeare_char": Recipe("tiny Shakespeare (1.1 MB), character-level", "char", url=TINY_SHAKESPEARE_URL),
    "shakespeare": Recipe("tiny Shakespeare (1.1 MB), GPT-2 BPE", "gpt2", url=TINY_SHAKESPEARE_URL),
    "openwebtext": Recipe("OpenWebText (8M web pages, 9B GPT-2 tokens), nanoGPT's GPT-2 reproduction corpus; "
                          "0.05% of pages as val", "gpt2", hf="Skylion007/openwebtext",
                          splits=(("train", "random"),), val_fraction=0.0005),
    "tinystories": Recipe("TinyStories (2.1M short stories, 0.5B GPT-2 tokens); its own validation split; "
                          "--tokenizer=char works too", "gpt2", hf="roneneldan/TinyStories",
                          splits=(("train", "train"), ("validation", "val"))),
    "wikitext2": Recipe("WikiText-2 raw (2M words of Wikipedia); its validation and test splits kept apart",
                        "gpt2", hf="Salesforce/wikitext", hf_config="wikitext-2-raw-v1", splits=WIKITEXT,
                        join_rows=True),
    "wikitext103": Recipe("WikiText-103 raw (103M words of Wikipedia); its validation and test splits kept apart",
                          "gpt2", hf="Salesforce/wikitext", hf_config="wikitext-103-raw-v1", splits=WIKITEXT,
                          join_rows=True),
    "fineweb_edu": Recipe("FineWeb-Edu, a sample (--hf_config, default sample-10BT), streamed; shard 0 is val "
                          "(llm.c's rule)", "gpt2", hf="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT",
                          splits=(("train", "first_shard"),)),
}
HF_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}


@dataclass
class PrepareConfig:
    name: str = ""  # the dataset: a recipe (see --list) or any name for your own --source or --hf
    source: str = ""  # local .txt / .jsonl / .parquet: a file, a folder or a glob; empty: the recipe's download
    val_source: str = ""  # local files that are the val split; empty: val is carved out of source
    test_source: str = ""  # local files that are a test split (optional)
    hf: str = ""  # any Hugging Face dataset by name (owner/name), streamed
    hf_config: str = ""  # its configuration, e.g. sample-100BT for fineweb_edu; empty: the recipe's
    split: str = "train"  # with --hf: the dataset's splits to read, comma-separated (validation/test kept apart)
    text_field: str = "text"  # the field holding the text in .jsonl, .parquet and Hugging Face rows
    tokenizer: str = ""  # char, bpe:N (learned here), gpt2 (any tiktoken name), or a dataset/run/model's; '': recipe's
    bpe_train_chars: int = 1_000_000_000  # a BPE learns from at most this many characters of the train split
    val_fraction: float | None = None  # share of the text that becomes val when no val split is given; None: recipe's
    seed: int = 2357  # picks the random val documents (nanoGPT's seed for openwebtext)
    shard_size: int = 100_000_000  # tokens per shard file
    num_proc: int = 0  # tokenizer worker processes; 0: one per CPU core
    decode_errors: str = "strict"  # undecodable bytes: 'strict' stops with the file and offset, 'replace' uses U+FFFD
    out_root: str = "data"  # datasets land in out_root/<name>/
    list: bool = False  # print the recipes and exit
    verify: bool = False  # check the prepared dataset <name> against the checksums in its meta.json and exit (after a copy to another machine, say): damaged or missing shards are named


def validate(cfg):
    problems = []
    if cfg.list:
        return problems
    if cfg.verify:
        return [] if cfg.name else ["name the dataset to verify: python prepare.py NAME --verify"]
    if not cfg.name:
        problems.append("name the dataset: a recipe (python prepare.py shakespeare_char; see --list), or a name of "
                        "your own for your text: python prepare.py mytext --source=PATH")
    elif cfg.name not in RECIPES and not cfg.source and not cfg.hf:
        close = difflib.get_close_matches(cfg.name, RECIPES, n=1)
        problems.append(f"{cfg.name!r} is not a recipe ({f'did you mean {close[0]!r}? ' if close else ''}see --list)"
                        "; for your own text give --source=PATH or --hf=owner/name")
    if cfg.source and cfg.hf:
        problems.append("give --source (local files) or --hf (a Hugging Face dataset), not both")
    if (cfg.val_source or cfg.test_source) and not cfg.source:
        problems.append("--val_source and --test_source go with --source")
    if cfg.split != "train" and not cfg.hf:
        problems.append("--split goes with --hf; for local files use --val_source / --test_source")
    if cfg.val_fraction is not None and not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"val_fraction={cfg.val_fraction} must be more than 0 and less than 1 (a split of its own: "
                        "--val_source)")
    elif cfg.val_fraction is not None and cfg.val_source:
        problems.append("--val_fraction carves val out of --source, and --val_source is val already: give one")
    if not 1 <= cfg.shard_size < 2**31:  # the header counts a shard's tokens in an int32
        problems.append(f"shard_size={cfg.shard_size} must be between 1 and {2**31 - 1:,} (a token file's limit)")
    if cfg.num_proc < 0:
        problems.append(f"num_proc={cfg.num_proc} must be 0 (all cores) or more")
    if cfg.decode_errors not in ("strict", "replace"):
        problems.append(f"decode_errors={cfg.decode_errors!r} must be 'strict' or 'replace'")
    try:
        trained_bpe = bpe_vocab_size(cfg.tokenizer) is not None
    except ValueError as e:
        problems.append(f"tokenizer={cfg.tokenizer!r}: {e}")
        trained_bpe = True
    if cfg.tokenizer and cfg.tokenizer != "char" and not trained_bpe:
        known = ["char", "bpe"] + tiktoken_names()
        unknown = cfg.tokenizer not in known and not borrowed_path(cfg.tokenizer, cfg.out_root)
        if unknown and (os.sep in cfg.tokenizer or cfg.tokenizer.startswith(".")):
            problems.append(f"tokenizer={cfg.tokenizer!r}: no such file or folder (a dataset, run or model to take "
                            "the tokenizer of)")
        elif unknown:
            prepared = [os.path.basename(os.path.dirname(m)) for m in glob.glob(os.path.join(cfg.out_root, "*",
                                                                                              "meta.json"))]
            close = difflib.get_close_matches(cfg.tokenizer, known + sorted(prepared), n=1)
            problems.append(f"tokenizer={cfg.tokenizer!r} is neither 'char' (one id per character), 'bpe:N' (an "
                            f"N-token BPE trained on this text), a tiktoken encoding ({', '.join(known[2:])}) nor "
                            "a dataset, run or model folder to take the tokenizer of"
                            f"{f'; did you mean {close[0]!r}?' if close else ''}")
    if cfg.bpe_train_chars < 1:
        problems.append(f"bpe_train_chars={cfg.bpe_train_chars} must be 1 or more")
    elif cfg.bpe_train_chars != PrepareConfig.bpe_train_chars and not trained_bpe:
        problems.append(f"bpe_train_chars goes with --tokenizer=bpe:N (a BPE learned here), not {cfg.tokenizer!r}")
    return problems


def tiktoken_names():
    import tiktoken  # the names only: no BPE files are read
    return tiktoken.list_encoding_names()


def borrowed_path(name, out_root):
    """What a --tokenizer that names no tokenizer points at, if anything: a dataset under out_root, else a path."""
    for path in (os.path.join(out_root, name), name):
        if os.path.exists(path):
            return path
    return None


def borrowed_tokenizer(name, out_root):
    """
    The tokenizer of what --tokenizer=NAME points at, so new text (a fine-tuning set) is tokenized exactly as a model
    reads: a prepared dataset (a name under out_root, a folder, or its meta.json), a training run (its folder, with
    ckpt.pt or numbered checkpoints only, or a .pt checkpoint), a Hugging Face GPT-2 folder (its config.json and
    tokenizer files), or a byte-level BPE's tokenizer.json alone (or a folder holding one, as save_pretrained
    writes a tokenizer).
    """
    from checkpoint import checkpoint_meta, is_checkpoint, load_checkpoint, step_checkpoints  # torch: this only
    path = borrowed_path(name, out_root)
    numbered = step_checkpoints(path)
    if not is_checkpoint(path) and numbered:
        path = numbered[-1][1]  # the newest: every checkpoint of a run holds its tokenizer
    tokenizer_json = path if os.path.basename(path) == "tokenizer.json" else os.path.join(path, "tokenizer.json")
    if is_checkpoint(path):
        meta = checkpoint_meta(load_checkpoint(path), path)
    elif os.path.basename(path) == "meta.json":
        meta = read_meta(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        from hf import hf_tokenizer_meta
        meta = hf_tokenizer_meta(path)
    elif os.path.isfile(os.path.join(path, "meta.json")) or glob.glob(os.path.join(path, "*.bin")):
        meta = Dataset(path).meta  # prepare.py's, or nanoGPT's train.bin (and meta.pkl), or llm.c's shards
    elif os.path.isfile(tokenizer_json):
        with open(tokenizer_json, encoding="utf-8") as f:
            text = f.read()
        problems = bpe_json_problems(text)
        if '"WordLevel"' in text and os.path.isfile(os.path.join(os.path.dirname(tokenizer_json), "config.json")):
            problems = ["a character vocabulary, as export.py writes one: give its folder, which says its size"]
        if problems:
            raise UserError(f"--tokenizer={name}: {tokenizer_json}: {problems[0]}")
        return BPETokenizer(text)
    else:
        raise UserError(f"--tokenizer={name}: {path} is neither a dataset (meta.json, or .bin token files), a run "
                        "(ckpt.pt, or a .pt file) nor a Hugging Face model folder (config.json and tokenizer files)")
    return tokenizer_from_meta(meta)


# ----------------------------------------------------------------------------------------------------------------
# Reading: every source becomes a stream of documents, each an iterable of text segments, tagged with its split.

def download(url, path, offline_hint="offline, point --source at a local copy"):
    """Fetch url to path (atomically); a clear error offline, ending with what to do then."""
    print(f"downloading {url}")
    tmp = f"{path}.tmp{os.getpid()}"  # several ranks may fetch the same file at once: each into its own
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            got = f.tell()  # not the bar's count: a disabled tqdm (TQDM_DISABLE=1) counts nothing
            if total is not None and got != total:  # the connection closed early: read() just ends
                raise OSError(f"the connection closed after {got:,} of {total:,} bytes; run the command again")
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); {offline_hint}") from None
    os.replace(tmp, path)


SOURCE_EXTENSIONS = ("txt", "jsonl", "json", "parquet")  # what a folder given as a source is read for


def source_files(source, flag="--source"):
    """The files a --source (or the `flag` given) names: one file, the .txt/.jsonl/.json/.parquet files under a
    folder, or a glob; sorted. Compressed files and datasets' save_to_disk folders are refused with what to do."""
    if os.path.isdir(source):
        refuse_saved_dataset(source, flag)
        files = [f for f in folder_files(source) if readable_name(f)]
    elif os.path.isfile(source):
        files = [source]
    else:
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"{flag}={source}: no such file, or no .txt/.jsonl/.json/.parquet files there")
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        if ext in COMPRESSED:
            raise UserError(f"{path} is {COMPRESSED[ext][0]}-compressed, not text; decompress it first "
                            f"({COMPRESSED[ext][1]} {path}) and point {flag} at the result")
        if ext == ".arrow":
            refuse_saved_dataset(os.path.dirname(path) or ".", flag)
            raise UserError(f"{path} is an Arrow file, not text; write its rows out as JSON Lines and pass those")
    return files


COMPRESSED = {".gz": ("gzip", "gunzip -k"), ".bz2": ("bzip2", "bunzip2 -k"), ".xz": ("xz", "unxz -k"),
              ".zst": ("zstd", "unzstd"), ".zip": ("zip", "unzip")}


def refuse_saved_dataset(folder, flag):
    """A folder written by datasets' save_to_disk is Arrow files and JSON metadata, not documents: say what reads it
    (load_dataset, behind --hf, opens a saved DatasetDict but refuses a single saved split)."""
    parent = os.path.dirname(os.path.normpath(folder))
    if os.path.exists(os.path.join(folder, "dataset_dict.json")):
        raise UserError(f"{flag}={folder} is a DatasetDict saved with save_to_disk; pass it as --hf={folder} instead")
    if os.path.exists(os.path.join(folder, "state.json")):
        if os.path.exists(os.path.join(parent or ".", "dataset_dict.json")):
            raise UserError(f"{folder} is one split of a DatasetDict saved with save_to_disk; pass the whole of it "
                            f"as --hf={parent} (with --split to choose splits) instead")
        raise UserError(f"{flag}={folder} is a dataset saved with save_to_disk; write it out as JSON Lines with "
                        "Dataset.to_json('x.jsonl') and pass --source=x.jsonl instead")


def folder_files(folder):
    """Every file under a folder, sorted; hidden ones (a name starting with '.', or inside such a folder) left out."""
    files = []
    for root, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    return sorted(files)


def readable_name(path):
    """Whether a folder source is read for this file: .txt, .jsonl, .json or .parquet, in any case (B.TXT too)."""
    return os.path.splitext(path)[1].lower().lstrip(".") in SOURCE_EXTENSIONS


def passed_over(source):
    """The files under a source folder that it is not read for (another extension), relative to it."""
    if not os.path.isdir(source):
        return []
    return [os.path.relpath(f, source) for f in folder_files(source) if not readable_name(f)]


def all_source_files(cfg):
    """The files of --source, --val_source and --test_source, in that order; one named by two of them is refused (a
    folder or glob for train that takes in the val file too: val would score text the model trained on)."""
    files, split_of = [], {}
    for flag in ("source", "val_source", "test_source"):
        for f in source_files(getattr(cfg, flag), f"--{flag}") if getattr(cfg, flag) else []:
            files.append(f)
            other = split_of.setdefault(os.path.realpath(f), flag)
            if other != flag:
                raise UserError(f"{f} is read by both --{other} and --{flag}: its text would be in both splits, and "
                                "the val loss would score text the model trained on; keep it out of --" + other +
                                " (put the val and test files in a folder of their own, or narrow the glob)")
    return files


def file_kind(path):
    """'jsonl' (.jsonl, and .json: what datasets' to_json writes), 'parquet' or 'text' (anything else, e.g. .txt or
    wikitext's .raw) by the file's name."""
    ext = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "text")


def decode(data, path, offset, errors):
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {offset + e.start:,} ({data[e.start:e.start + 4]!r}) is not UTF-8; convert "
                        "the file to UTF-8, or pass --decode_errors=replace") from None


def text_blocks(path, start, end, errors, block=1 << 20):
    """The text of bytes [start, end) of a file, decoded a block at a time; each block ends before the last character
    that starts in it, so no character is ever cut in two."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, carry = start, b""
        while pos < end:
            data = carry + f.read(min(block, end - pos))
            offset = pos - len(carry)
            pos = offset + len(data)
            cut = len(data)
            if pos < end:  # keep the last character (maybe incomplete) for the next block
                for i in range(len(data) - 1, max(len(data) - 5, -1), -1):
                    if data[i] & 0xC0 != 0x80:
                        cut = i
                        break
            carry = data[cut:]
            yield decode(data[:cut], path, offset, errors)
        if carry:
            yield decode(carry, path, pos - len(carry), errors)


def char_start(path, pos):
    """pos, moved forward past UTF-8 continuation bytes to where a character starts."""
    with open(path, "rb") as f:
        f.seek(pos)
        for b in f.read(4):
            if b & 0xC0 != 0x80:
                break
            pos += 1
    return pos


BOM = "\ufeff".encode("utf-8")


def text_documents(files, split, val_fraction, errors):
    """
    Plain-text files, each one document. With val_fraction, nanoGPT's split: the first (1 - val_fraction) of the
    bytes of all files together are train, the rest val; the file where the cut falls becomes two documents.
    (nanoGPT cuts by characters; for ASCII text, tiny Shakespeare included, that is the same place.)
    """
    total = sum(os.path.getsize(f) for f in files)
    boundary = int(total * (1 - val_fraction)) if val_fraction else total
    pos = 0
    for path in files:
        size = os.path.getsize(path)
        with open(path, "rb") as f:  # the byte-order mark some Windows editors begin a file with is not text
            first = len(BOM) if f.read(len(BOM)) == BOM else 0
        cut = min(max(boundary - pos, first), size)
        if first < cut < size:
            cut = char_start(path, cut)
        if cut > first:
            yield split, text_blocks(path, first, cut, errors)
        if cut < size:
            yield "val", text_blocks(path, cut, size, errors)
        pos += size


def jsonl_documents(path, field, errors):
    """The text fields of a JSON Lines file; a file that is one JSON document instead (an array, or an object over
    several lines) is refused at its first line, with what to do."""
    one_document = (f"{path} is one JSON document, not JSON Lines (one object per line); write one document per "
                    f"line, e.g. jq -c '.[]' {path} > docs.jsonl for an array")
    with open(path, "rb") as f:
        offset, first = 0, True
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, path, offset, errors)
            if lineno == 1:
                line = line.removeprefix(BOM.decode())  # the byte-order mark some Windows tools begin with
            offset += len(raw)
            indent = len(line) - len(line.lstrip())  # an error's column counts it, as an editor does
            line = line.strip()  # Python's whitespace, more than JSON's (a form feed, a no-break space)
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if first and line[0] in "[{":  # the opening line of a document spread over many
                    raise UserError(one_document) from None
                raise UserError(f"{path} line {lineno}: not JSON ({e.msg}, column {indent + e.colno}); each line "
                                "must be one JSON object") from None
            if first and isinstance(row, list):
                raise UserError(one_document)
            first = False
            yield text_of(row, field, f"{path} line {lineno}")


def parquet_documents(path, field):
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a broken file are of several types
        raise UserError(f"{path}: cannot read as parquet ({e})") from None
    if field not in parquet.schema_arrow.names:
        raise UserError(f"{path} has no column {field!r} (it has: {', '.join(parquet.schema_arrow.names)}); "
                        "choose one with --text_field")
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: column {field!r} holds {type(text).__name__}, not text")
            yield text or ""


def text_of(row, field, where):
    if not isinstance(row, dict) or field not in row:
        fields = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{where}: no {field!r} field (it has: {fields}); choose the field with --text_field")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: field {field!r} holds {type(text).__name__}, not text")
    return text or ""


def local_documents(files, split, cfg):
    """Documents of local files of any kind: a text file is one document, a .jsonl line or parquet row is one."""
    for path in files:
        kind = file_kind(path)
        if kind == "text":
            yield from text_documents([path], split, None, cfg.decode_errors)
        else:
            rows = jsonl_documents(path, cfg.text_field, cfg.decode_errors) if kind == "jsonl" else \
                parquet_documents(path, cfg.text_field)
            yield from ((split, (text,)) for text in rows if text)


class ReadInterrupted(UserError):
    """A streamed source broke off midway (the network): unlike the source's content, nothing needs to change before
    the same command, run again, resumes."""


def hf_documents(name, config, hf_split, split, field, join_rows):
    """A Hugging Face dataset split, streamed (nothing but the current rows in memory, no full download first)."""
    where = f"Hugging Face dataset {name}{f' ({config})' if config else ''}, split {hf_split!r}"
    try:
        import datasets
        rows = iter(datasets.load_dataset(name, config or None, split=hf_split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # offline this is any of several connection or hub errors
        reason = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"could not load {where} ({type(e).__name__}: {reason}); offline? download its files where "
                        "you are online and point --source at them") from None
    if first is None:
        return

    def texts():
        yield text_of(first, field, where)
        try:
            for i, row in enumerate(rows, 1):
                yield text_of(row, field, f"{where}, row {i}")
        except UserError:
            raise
        except Exception as e:
            raise ReadInterrupted(f"reading {where} failed ({type(e).__name__}: {e}); run the same command again to "
                            "resume from the last finished shard") from None

    if join_rows:  # wikitext: each row is one line of the text, newline included
        yield split, texts()
    else:
        yield from ((split, (text,)) for text in texts() if text)


def assign_random_val(documents, val_fraction, seed):
    """Documents tagged 'random' go to val with probability val_fraction (seeded: the same ones every run), and the
    very first of them always, so val is never empty; the rest to train."""
    rng = np.random.default_rng(seed)
    first = True
    for split, segments in documents:
        if split == "random":
            split = "val" if first or rng.random() < val_fraction else "train"
            first = False
        yield split, segments


def documents(cfg, recipe, val_fraction):
    """(split, segments) for every document of the dataset, in a fixed order. split is 'train', 'val', 'test' or
    'first_shard' (the fineweb rule: the first shard_size tokens go to val)."""
    if cfg.source:
        files = source_files(cfg.source)
        rule = source_rule(cfg, recipe, files)
        if rule == "text":
            docs = text_documents(files, "train", val_fraction, cfg.decode_errors)
        else:
            docs = local_documents(files, rule, cfg)
        for split, more in (("val", cfg.val_source), ("test", cfg.test_source)):
            if more:
                docs = chain(docs, local_documents(source_files(more, f"--{split}_source"), split, cfg))
    else:
        if cfg.hf:
            hf_splits = [s.strip() for s in cfg.split.split(",") if s.strip()]
            targets = [HF_SPLIT_NAMES.get(s, "train") for s in hf_splits]
            if "val" not in targets:
                targets = ["random" if t == "train" else t for t in targets]
            name, config, join_rows = cfg.hf, cfg.hf_config, False
            pairs = list(zip(hf_splits, targets))
        else:
            name, config, join_rows = recipe.hf, cfg.hf_config or recipe.hf_config, recipe.join_rows
            pairs = list(recipe.splits)
        docs = (doc for hf_split, split in pairs
                for doc in hf_documents(name, config, hf_split, split, cfg.text_field, join_rows))
    return assign_random_val(docs, val_fraction, cfg.seed)


def source_rule(cfg, recipe, files):
    """What becomes of --source's documents: 'train' when val has files of its own, 'text' for plain text (its last
    val_fraction is val), else one stream of documents under the recipe's rule for that (openwebtext, fineweb_edu)
    or a random val."""
    if cfg.val_source:
        return "train"
    if all(file_kind(f) == "text" for f in files):
        return "text"
    return recipe.splits[0][1] if recipe and len(recipe.splits) == 1 else "random"


def started(iterator):
    """The iterator with its first item already fetched, so that an unreachable or empty source fails here, before
    any worker starts."""
    iterator = iter(iterator)
    first = next(iterator, None)
    return iterator if first is None else chain([first], iterator)


# after a letter or digit, before anything but a letter, digit, combining mark or apostrophe (or an unassigned code
# point, which a newer Unicode table than this regex module's may know as a letter)
SAFE_CUT = regex.compile(r"(?<=[\p{L}\p{N}])[^\p{L}\p{N}\p{M}\p{Cn}']")


def safe_cut(text, start):
    r"""
    The first index at or after `start` where SAFE_CUT allows a cut, or -1. Encoding the text on both sides of such a
    cut apart gives exactly the tokens of encoding it whole, for every tiktoken encoding (GPT-2's, r50k/p50k, cl100k,
    o200k): in each pre-tokenizer regex no alternative matches a letter or digit together with such a character after
    it (runs of letters end there, and o200k's extend them only by marks and 's-style suffixes; runs of digits end
    there), so a pre-token always ends at the cut; the regex scans on from there without looking back; its lookaheads
    ($, (?!\S)) only follow whitespace, so the text before the cut, which ends in a letter or digit, matches as before;
    and BPE never merges across pre-tokens. Punctuation counts, so CJK text (中文。), minified code and base64 are cut
    too. Cutting after whitespace would not be safe: at the very end of a text, trailing whitespace is one pre-token
    ('a\n\nb' encodes as [a, \n, \n, b], 'a\n\n' as [a, \n\n]). The same holds for prepare.py's trained BPE, whose
    pre-tokenizer is cl100k's. The letter or digit before the cut must be one in Python's own Unicode table too: the
    tokenizer's regex engine (Rust's in tiktoken, Oniguruma in tokenizers) may know an older Unicode than the regex
    module, where a letter added since is no letter yet, and the cut would fall inside a pre-token.
    """
    while (match := SAFE_CUT.search(text, start)) is not None:
        if unicodedata.category(text[match.start() - 1])[0] in "LN":
            return match.start()
        start = match.start() + 1
    return -1


def any_cut(text, start):
    """Every index is a cut point for one id per character."""
    return start


def pieces_of(segments, find_cut, size=PIECE_CHARS):
    """One document's text in pieces of about `size` characters, cut at the first point find_cut allows past that
    (text with none, such as one enormous word, stays whole). Each character is searched once, so a long stretch
    without a cut point costs linear time, not a new search from the piece's beginning for every segment."""
    buf, start = "", size  # the next cut is searched for from buf[start:]: what is before is too close or searched
    for text in segments:
        buf += text
        begin = 0  # of the piece in buf
        while len(buf) - begin > size:
            cut = find_cut(buf, start)
            if cut == -1:  # none yet; only what the next segment adds can hold it
                start = len(buf)
                break
            yield buf[begin:cut]
            begin, start = cut, cut + size
        buf, start = buf[begin:], start - begin
    if buf:
        yield buf


def pieces(docs, find_cut):
    """(split, text, starts_a_document) for every piece of every document."""
    for split, segments in docs:
        for i, text in enumerate(pieces_of(segments, find_cut)):
            yield split, text, i == 0


def in_tasks(items):
    """(text, flag) items grouped into lists of about TASK_CHARS characters: what one worker gets at once."""
    task, size = [], 0
    for text, flag in items:
        task.append((text, flag))
        size += len(text)
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing, in worker processes. Each worker builds its tokenizer once, in init_worker.

_worker = {}  # this process's tokenizer and token dtype


def init_worker(tokenizer_meta, dtype):
    _worker["tokenizer"] = tokenizer_from_meta({"tokenizer": tokenizer_meta}) if tokenizer_meta else None
    _worker["dtype"] = np.dtype(dtype) if dtype else None


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes started inside ignore Ctrl-C from their first instruction on: a spawned process inherits an ignored
    signal, and Python then sets no KeyboardInterrupt handler. Ctrl-C reaches the whole process group, and this
    process stops its children; a child's own KeyboardInterrupt, raised while it was still importing (a slow start on
    a busy machine), printed a traceback after the run's one line."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def init_pool_worker(*init_args):  # started ignoring Ctrl-C (children_ignore_sigint)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a trained BPE encodes one piece at a time: no thread pool
    init_worker(*init_args)


def encode_pieces(tokenizer, task, dtype):
    """
    The tokens of a task's pieces, concatenated, with the end-of-text id in front of each piece marked for it;
    returns (tokens, tokens per piece, bytes of text). An id that does not fit `dtype` is an error, never wrapped.
    """
    arrays, lengths, nbytes = [], [], 0
    for text, eot_before in task:
        ids = tokenizer.encode_array(text)
        if eot_before:
            if tokenizer.eot_id is None:
                raise UserError("the source holds several documents, but the tokenizer has no end-of-text id to put "
                                "between them (a char vocabulary made from a single text); give the text as one "
                                ".txt file")
            ids = np.concatenate([np.array([tokenizer.eot_id], dtype=ids.dtype), ids])
        arrays.append(ids)
        lengths.append(len(ids))
        nbytes += len(text.encode("utf-8"))
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    limit = np.iinfo(dtype).max
    if tokens.size and int(tokens.max()) > limit:
        raise UserError(f"token id {int(tokens.max())} does not fit {dtype.name} (max {limit}); the tokenizer "
                        f"produced an id outside its {tokenizer.vocab_size}-token vocabulary")
    return tokens.astype(dtype), lengths, nbytes


def encode_task(task):
    return encode_pieces(_worker["tokenizer"], task, _worker["dtype"])


def run_spooled(fn, path):
    """In a worker: fn of the task pickled at path, which is removed once read (see Workers)."""
    with open(path, "rb") as f:
        task = pickle.load(f)
    os.remove(path)
    return fn(task)


def chars_of_task(task):
    chars = set()
    for text, _ in task:
        chars.update(text)
    return chars


def num_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """
    fn over tasks in `num_proc` processes, results in task order, at most a few tasks in flight (memory stays bounded
    however long the stream). num_proc=1 runs in this process. Processes are spawned, not forked, on every platform,
    so Linux runs exercise what macOS and Windows do.

    A task reaches its worker as a file in a temporary folder, not down the pool's pipe. Pool.terminate() (on Ctrl-C,
    SIGTERM or an error) joins the thread that writes tasks into that pipe, and CPython drains the pipe for it only
    while there is something to read: a task of a megabyte that the thread began to write just then filled the pipe,
    and with the workers gone the process hung for ever (2 of 13 runs of the kill test's text interrupted by hand).
    """

    def __init__(self, num_proc, init_args):
        self.num_proc = num_proc
        if num_proc == 1:
            init_worker(*init_args)
            self.pool = None
        else:
            self.spool = tempfile.mkdtemp(prefix="prepare-tasks-")
            with children_ignore_sigint():
                self.pool = multiprocessing.get_context("spawn").Pool(num_proc, init_pool_worker, init_args)

    def map(self, fn, tasks):
        if self.pool is None:
            yield from ((task, fn(task)) for task in tasks)
            return
        in_flight = deque()
        for i, task in enumerate(tasks):
            path = os.path.join(self.spool, f"{i}.pkl")
            with open(path, "wb") as f:
                pickle.dump(task, f, protocol=pickle.HIGHEST_PROTOCOL)
            in_flight.append((task, self.pool.apply_async(run_spooled, (fn, path))))
            if len(in_flight) > 2 * self.num_proc:
                task, result = in_flight.popleft()
                yield task, result.get()
        while in_flight:
            task, result = in_flight.popleft()
            yield task, result.get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            shutil.rmtree(self.spool, ignore_errors=True)


def char_vocabulary(docs, num_proc):
    """Character vocabulary, found in a first pass in num_proc processes: the union of each task's characters,
    sorted (so the ids do not depend on the workers). Documents get an end-of-text id when some split holds more than
    one."""
    counts, chars = {}, set()

    def texts():
        for split, text, new_doc in pieces(docs, any_cut):
            counts[split] = counts.get(split, 0) + new_doc
            yield text, False

    workers = Workers(num_proc, (None, None))
    try:
        with tqdm(desc="vocabulary", unit="char", unit_scale=True) as bar:
            for task, found in workers.map(chars_of_task, in_tasks(texts())):
                chars |= found
                bar.update(sum(len(text) for text, _ in task))
    finally:
        workers.close()
    if not "".join(sorted(chars)).strip():
        return None
    return CharTokenizer(sorted(chars), eot=max(counts.values(), default=0) > 1)


def in_child(what, advice, fn, *args):
    """
    fn(*args) in a spawned process, its result or exception brought back. For native code that holds this process
    for minutes: tokenizers' BPE learning reads its text from a thread of its own while the main thread waits in Rust,
    where Ctrl-C and SIGTERM would wait for it to end; here they stop the child at once. Its memory (the word counts of
    a gigabyte of text: gigabytes) goes back when it ends.
    """
    sys.stdout.flush()  # what this process printed first comes first
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=run_child, args=(sender, fn, args, os.getpid()), daemon=True)
    with children_ignore_sigint():
        child.start()
    sender.close()
    try:
        ok, value = receiver.recv()
    except EOFError:  # it died without a word: killed (the OOM killer, say)
        child.join()
        raise UserError(f"the process {what} died (exit code {child.exitcode}); {advice}") from None
    except BaseException:  # Ctrl-C or SIGTERM here: it stops now too
        child.terminate()
        child.join()
        raise
    child.join()
    if not ok:
        raise value
    return value


def end_with_parent(parent_pid):
    """Have the kernel end this process when its parent dies, also by kill -9, which leaves the parent no time to end
    it: a BPE learning on for minutes, orphaned, at full CPU (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):  # a libc without prctl
        return
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def run_child(sender, fn, args, parent_pid):  # started ignoring Ctrl-C (children_ignore_sigint): the parent ends it
    end_with_parent(parent_pid)
    # tqdm's default lock holds a multiprocessing semaphore, which a child ended from outside would leave for the
    # resource tracker to report ("leaked semaphore objects") after the run's one line; a thread lock is enough here
    tqdm.set_lock(threading.RLock())
    try:
        result = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 (raised again in the parent)
        result = (False, e)
    try:
        sender.send(result)
    except Exception as e:  # an exception that does not pickle: its words at least
        sender.send((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]}" if not result[0] else
                                         f"the result could not be passed back ({e})")))


def document_stream(cfg, recipe, val_fraction):
    """The dataset's documents, their source asked for the first one already (see started)."""
    return started(documents(cfg, recipe, val_fraction))


def train_bpe(docs, vocab_size, max_chars):
    """A BPETokenizer learned in a child process (see in_child) from docs(), or None when it holds no text to learn
    from."""
    tokenizer_json = in_child("learning the BPE", "if it ran out of memory, a smaller --bpe_train_chars needs less",
                              learn_bpe, docs, vocab_size, max_chars)
    return BPETokenizer(tokenizer_json) if tokenizer_json else None


LONG_WORD = regex.compile(r"[\p{L}\p{N}\p{M}]{1000}")


def short_words(text):
    """text in parts that cut every run of 1,000 letters, digits or marks (DNA, CJK without punctuation): learning
    from a word takes time in proportion to its length for every merge (a 1,000-token BPE learned from twelve
    250,000-letter DNA documents in 80 s). The merges across a cut are lost, which at that length changes nothing."""
    start = 0
    for match in LONG_WORD.finditer(text):
        yield text[start:match.end()]
        start = match.end()
    yield text[start:]


def learn_bpe(docs, vocab_size, max_chars):
    """The tokenizer.json of a byte-level BPE learned from the first max_chars characters of the train split of
    docs(), in pieces cut where no word is split; None when it has no text. With llm.c's fineweb rule (val is the
    first shard's tokens, known only once tokenized) it learns from the whole stream, val included, as GPT-2's BPE
    did from its WebText."""
    read = {"chars": 0}

    def texts():
        with tqdm(desc="bpe words", unit="char", unit_scale=True) as bar:  # tokenizers counts words as it reads
            for split, text, _ in pieces(docs(), safe_cut):
                if split in ("train", "first_shard"):
                    text = text[:max_chars - read["chars"]]
                    yield from short_words(text)
                    read["chars"] += len(text)
                    bar.update(len(text))
                    if read["chars"] == max_chars:
                        break
        if read["chars"]:
            print(f"learning up to {vocab_size - 257:,} merges from {read['chars']:,} characters")

    t0 = time.time()
    tokenizer = BPETokenizer.train(texts(), vocab_size, show_progress=False)  # its bars would tangle with tqdm's
    if read["chars"] == 0:
        return None
    cap = f"its first {max_chars:,} (--bpe_train_chars)" if read["chars"] == max_chars else "all of it"
    print(f"learned a {tokenizer.vocab_size:,}-token BPE from {read['chars']:,} characters of the train split "
          f"({cap}) in {time.time() - t0:.1f} s")
    if tokenizer.vocab_size < vocab_size:
        text = "the characters read hold" if read["chars"] == max_chars else "this text holds"
        print(f"note: {vocab_size:,} tokens asked for, but {text} pairs for {tokenizer.vocab_size:,} only")
    return tokenizer.json


# ----------------------------------------------------------------------------------------------------------------
# Writing: shards of exactly shard_size tokens, each written whole; resume.json after each one.

class ShardWriter:
    """The shards of one split: tokens fill a buffer of shard_size, written out (atomically) each time it is full."""

    def __init__(self, out_dir, split, shard_size, dtype, shards=(), partial=None):
        self.out_dir, self.split, self.shard_size, self.dtype = out_dir, split, shard_size, dtype
        self.shards = list(shards)  # finished: {"file", "tokens", "sha256"}
        self.buf = np.empty(shard_size, dtype=dtype)  # pages are only touched (resident) as tokens arrive
        self.n = 0
        if partial is not None:
            self.buf[:len(partial)] = partial
            self.n = len(partial)

    @property
    def num_tokens(self):
        return sum(s["tokens"] for s in self.shards) + self.n

    def append(self, tokens):
        while len(tokens):
            take = min(len(tokens), self.shard_size - self.n)
            self.buf[self.n:self.n + take] = tokens[:take]
            self.n += take
            tokens = tokens[take:]
            if self.n == self.shard_size:
                self._write()

    def close(self):
        """Write the last, partly filled shard (or one empty shard for a split that got no tokens)."""
        if self.n or not self.shards:
            self._write()

    def write_as(self, name):
        """The tokens not yet in a shard, written to `name` in out_dir: its entry, with their count and digest."""
        tokens = self.buf[:self.n]
        write_tokens(os.path.join(self.out_dir, name), tokens, self.dtype)
        return {"file": name, "tokens": self.n, "sha256": hashlib.sha256(tokens).hexdigest()}

    def _write(self):
        self.shards.append(self.write_as(f"{self.split}_{len(self.shards):06d}.bin"))
        self.n = 0


def shard_intact(folder, shard, dtype):
    """Whether a shard a previous run finished is in `folder`, exactly what it wrote (header, size and checksum)."""
    path = os.path.join(folder, shard["file"])
    try:
        file_dtype, count, offset = read_header(path)
    except TokenFileError:
        return False
    if file_dtype != dtype or count != shard["tokens"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest() == shard["sha256"]


def fingerprint(cfg, recipe, val_fraction):
    """What a resumed run must share with the interrupted one: every setting that changes the tokens, and the size
    and modification time of each local source file, those of an --hf folder included."""
    # not the settings that change no token: a new one left out changes every fingerprint, and runs killed before an
    # upgrade start over (verify did: review)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "list", "verify")}
    local = all_source_files(cfg)
    if cfg.hf and os.path.isdir(cfg.hf):  # a local copy of a Hub dataset (its hidden cache folders aside)
        local += sorted(f for f in glob.glob(os.path.join(cfg.hf, "**", "*"), recursive=True) if os.path.isfile(f))
    files = [[os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in local]
    return {"version": STATE_VERSION, "settings": settings, "val_fraction": val_fraction, "files": files,
            "recipe": asdict(recipe) if recipe else None}


def same_preparation(state, fp):
    """Whether a resume.json's state is of the preparation whose fingerprint is fp (compared as JSON keeps it)."""
    return state.get("fingerprint") == json.loads(json.dumps(fp))


def load_resume_state(work_dir, expected_fingerprint):
    """The state a killed run left, if it belongs to this same preparation and its finished shards are intact;
    else None (and the reason printed)."""
    path = os.path.join(work_dir, "resume.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError):
        print(f"{path} is unreadable: starting over")
        return None
    if not same_preparation(state, expected_fingerprint):
        print(f"{path} is from a preparation with other settings or source files: starting over")
        return None
    try:
        dtype = np.dtype(state["token_dtype"])
        for split in state["splits"].values():
            for shard in split["shards"]:
                if not shard_intact(work_dir, shard, dtype):
                    print(f"{shard['file']} is not the shard the interrupted run wrote: starting over")
                    return None
            if split["partial"] and not os.path.exists(os.path.join(work_dir, split["partial"])):
                print(f"{split['partial']} is missing: starting over")
                return None
            if "partial_sha256" in split and split["partial"] and not shard_intact(
                    work_dir, {"file": split["partial"], "tokens": split["partial_tokens"],
                               "sha256": split["partial_sha256"]}, dtype):
                print(f"{split['partial']} is not what the interrupted run wrote: starting over")
                return None
    except (KeyError, TypeError, AttributeError):  # edited by hand, or a file of another kind
        print(f"{path} lacks what a resume needs: starting over")
        return None
    return state


def save_resume_state(work_dir, fp, tokenizer, dtype, next_piece, writers):
    """resume.json: the stream position after the last finished shard, with every split's finished shards and its
    tokens not yet in a shard (in a side file, named by position, so the json and its files change together)."""
    old = set(glob.glob(os.path.join(work_dir, "resume-*.part")))
    splits = {}
    for split, w in writers.items():
        partial, check = None, {}
        if w.n:
            partial = f"resume-{split}-{next_piece}.part"
            written = w.write_as(partial)
            check = {"partial_tokens": written["tokens"], "partial_sha256": written["sha256"]}
        splits[split] = {"shards": w.shards, "partial": partial, **check}
    state = {"fingerprint": fp, "tokenizer": tokenizer.meta(), "token_dtype": dtype.name, "next_piece": next_piece,
             "splits": splits}
    write_json(os.path.join(work_dir, "resume.json"), state)
    for path in old - {os.path.join(work_dir, s["partial"]) for s in splits.values() if s["partial"]}:
        os.remove(path)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


HALF_WRITTEN = r".*\.tmp\d*"  # a file a killed run was writing under its temporary name
OUTPUTS = r"(train|val|test)_\d{6}\.bin|meta\.json|resume\.json|resume-.*\.part|" + HALF_WRITTEN


def clear_outputs(folder, pattern=OUTPUTS, keep=()):
    """Remove the files whose names match pattern, but those in `keep`: by default what earlier preparations wrote
    here (shards, meta.json, resume state); downloads stay."""
    for name in os.listdir(folder):
        if re.fullmatch(pattern, name) and name not in keep:
            os.remove(os.path.join(folder, name))


def finished_shards(work_dir):
    """How many shards the resume.json in work_dir lists: what a run of the same command would keep."""
    try:
        with open(os.path.join(work_dir, "resume.json"), encoding="utf-8") as f:
            return sum(len(split["shards"]) for split in json.load(f)["splits"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # asked on a failed run's way out: never raise
        return 0


def discard(work_dir):
    """Remove an unfinished preparation's folder (what is not ours in it stays, and so does the folder then)."""
    if os.path.isdir(work_dir):
        clear_outputs(work_dir)
        if not os.listdir(work_dir):
            os.rmdir(work_dir)


def publish(work_dir, out_dir, meta):
    """Move the finished dataset from work_dir into out_dir, over the one there. The old meta.json goes first and the
    new one comes last, so a folder with a meta.json always holds the dataset it describes: a kill in between leaves
    shards without one, which train.py refuses, and the same command finishes the move (moved_in_part). A shard no
    longer in work_dir is one such a killed move put into out_dir already, as moved_in_part has checked."""
    shards = sorted(s["file"] for split in meta["shards"].values() for s in split)
    moved = {name for name in shards if not os.path.exists(os.path.join(work_dir, name))}
    clear_outputs(out_dir, r"meta\.json")
    clear_outputs(out_dir, keep=moved)  # the old dataset's shards, and any resume state an older prepare.py left here
    for name in shards:
        if name not in moved:
            os.replace(os.path.join(work_dir, name), os.path.join(out_dir, name))
    os.replace(os.path.join(work_dir, "meta.json"), os.path.join(out_dir, "meta.json"))
    discard(work_dir)


def moved_in_part(work_dir, out_dir, fp):
    """The meta of the dataset a killed run of this same preparation (fp, as its resume.json has it) had finished and
    was moving into out_dir, if each of its shards is intact in one folder or the other; else None. (A trial's kill
    in that moment cost the whole tokenization, done again.)"""
    try:
        with open(os.path.join(work_dir, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        with open(os.path.join(work_dir, "resume.json"), encoding="utf-8") as f:
            if not same_preparation(json.load(f), fp):
                return None
        dtype = np.dtype(meta["token_dtype"])
        shards = [s for split in meta["shards"].values() for s in split]
        intact = all(shard_intact(work_dir, s, dtype) or shard_intact(out_dir, s, dtype) for s in shards)
        return meta if intact else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none there, or not what this run writes
        return None


# ----------------------------------------------------------------------------------------------------------------

def start_or_resume(cfg, work_dir, fp, tokenizer_name, docs, num_proc):
    """(tokenizer, writers, index of the first piece still to tokenize, the stream of documents): from the resume.json
    in work_dir when a killed run of this same preparation left one, else from scratch (a char vocabulary takes a
    first pass over the text). A killed run's work is cleared only once the tokenizer is made and the source has
    answered: missing BPE files or an unreachable source leave it to resume. A BPE to train is learned in a first pass
    too, and kept in resume.json."""
    state = load_resume_state(work_dir, fp)
    if state is None:
        if tokenizer_name == "char":
            tokenizer = char_vocabulary(docs(), num_proc)
            if tokenizer is None:
                raise UserError(f"the source ({cfg.source or cfg.hf or cfg.name}) holds no text")
        elif bpe_vocab_size(tokenizer_name) is not None:
            tokenizer = train_bpe(docs, bpe_vocab_size(tokenizer_name), cfg.bpe_train_chars)
            if tokenizer is None:
                raise UserError(f"the train split of {cfg.source or cfg.hf or cfg.name} holds no text to learn a "
                                "BPE from")
        elif tokenizer_name in tiktoken_names():
            tokenizer = make_tokenizer(tokenizer_name)
        else:
            tokenizer = borrowed_tokenizer(tokenizer_name, cfg.out_root)
            if isinstance(tokenizer, CharTokenizer):  # every character it lacks, at once, not a piece's at a time
                found = char_vocabulary(docs(), num_proc)
                missing = "".join(sorted(set(found.chars if found else "") - set(tokenizer.chars)))
                if missing:
                    raise UserError(f"the source has characters outside the {len(tokenizer.chars)}-character "
                                    f"vocabulary of {tokenizer_name}: {missing!r}; a model of that vocabulary cannot "
                                    "read them: remove or replace them first")
        stream = docs()
        os.makedirs(work_dir, exist_ok=True)
        clear_outputs(work_dir)
        dtype = token_dtype(tokenizer.vocab_size)
        return tokenizer, {s: ShardWriter(work_dir, s, cfg.shard_size, dtype) for s in ("train", "val")}, 0, stream
    stream = docs()
    # the killed run's shard in progress is written again, whole; a meta.json is the end of a run killed just after
    # writing it, and is written again too
    clear_outputs(work_dir, HALF_WRITTEN + r"|meta\.json")
    tokenizer = tokenizer_from_meta(state)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {}
    for split, s in state["splits"].items():
        partial = read_tokens(os.path.join(work_dir, s["partial"])) if s["partial"] else None
        writers[split] = ShardWriter(work_dir, split, cfg.shard_size, dtype, s["shards"], partial)
    if state["next_piece"]:
        print(f"resuming: {sum(len(w.shards) for w in writers.values())} finished shard(s) kept and verified, "
              f"tokenizing again from piece {state['next_piece']:,} of the stream")
    return tokenizer, writers, state["next_piece"], stream


def tokenize_into_shards(stream, skip, tokenizer, writers, save, cfg, num_proc, total_bytes):
    """
    Tokenize the pieces of the stream after the first `skip` in worker processes and append their tokens, in stream
    order, to the writer of their split; `save(next_piece)` after each finished shard. An end-of-text token goes in
    front of every document but the first of its split. Returns counts for meta.json and the summary.
    """
    docs_per_split, stats = {}, {"characters": 0, "text": False, "bytes": 0, "tokens": 0}
    order = deque()  # (piece index, split) of the pieces sent to workers, in order

    find_cut = any_cut if isinstance(tokenizer, CharTokenizer) else safe_cut

    def texts():
        for index, (split, text, new_doc) in enumerate(pieces(stream, find_cut)):
            eot_before = new_doc and docs_per_split.get(split, 0) > 0
            docs_per_split[split] = docs_per_split.get(split, 0) + new_doc
            stats["characters"] += len(text)
            stats["text"] = stats["text"] or not text.isspace()
            if index < skip:  # done before the interruption; read again only to count documents
                continue
            order.append((index, split))
            yield text, eot_before

    def append(split, tokens):
        if split == "first_shard":  # llm.c's fineweb rule: the first shard_size tokens are val, the rest train
            take = max(0, min(len(tokens), cfg.shard_size - writers["val"].num_tokens))
            writers["val"].append(tokens[:take])
            split, tokens = "train", tokens[take:]
        if split not in writers:
            writers[split] = ShardWriter(writers["train"].out_dir, split, cfg.shard_size, writers["train"].dtype)
        writers[split].append(tokens)

    workers = Workers(num_proc, (tokenizer.meta(), writers["train"].dtype.name))
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize") as bar:
            for _, (tokens, lengths, nbytes) in workers.map(encode_task, in_tasks(texts())):
                start = 0
                for length in lengths:
                    index, split = order.popleft()
                    finished = sum(len(w.shards) for w in writers.values())
                    append(split, tokens[start:start + length])
                    start += length
                    if sum(len(w.shards) for w in writers.values()) > finished:
                        save(index + 1)
                stats["bytes"] += nbytes
                stats["tokens"] += len(tokens)
                bar.update(nbytes)
                bar.set_postfix(docs=f"{sum(docs_per_split.values()):,}", tokens=f"{stats['tokens']:,}",
                                refresh=False)
    finally:
        workers.close()
    return docs_per_split, stats


def main(cfg, sources):
    if cfg.list:
        for name, recipe in RECIPES.items():
            print(f"{name:18s} {recipe.description}")
        return
    if cfg.verify:
        verify(os.path.join(cfg.out_root, cfg.name))
        return
    t0 = time.time()
    recipe = RECIPES.get(cfg.name) if not cfg.hf else None
    val_fraction = cfg.val_fraction if cfg.val_fraction is not None else (recipe.val_fraction if recipe else 0.1)
    tokenizer_name = cfg.tokenizer or (recipe.tokenizer if recipe else "gpt2")
    num_proc = cfg.num_proc or num_cores()
    close = [] if cfg.name in RECIPES else difflib.get_close_matches(cfg.name, RECIPES, n=1)
    if close:  # any name is fine for one's own text, but a mistyped recipe would quietly get other tokens
        print(f"note: {cfg.name!r} is not a recipe but resembles {close[0]!r}; preparing {cfg.name!r} from your "
              f"{'--hf' if cfg.hf else '--source'} with the {tokenizer_name} tokenizer")
    out_dir = os.path.join(cfg.out_root, cfg.name)
    work_dir = os.path.join(out_dir, UNFINISHED_DIR)  # the new dataset, until it is whole: the old one stays usable
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    # two runs of one name would clear and fill the same unfinished/ folder: a dataset of both, checksums failing
    with FolderLock(out_dir, "prepare.lock") as lock:  # a folder it made goes if nothing came of the run
        if lock.holder:
            raise UserError(f"{out_dir} is being prepared by {lock.holder}; wait for it to finish, or give this "
                            "dataset another name")
        try:
            prepare(cfg, recipe, out_dir, work_dir, val_fraction, tokenizer_name, num_proc, t0)
        except BaseException as e:
            kept = finished_shards(work_dir)
            if not kept:  # nothing a re-run could keep: no folder that looks resumable
                discard(work_dir)
            if isinstance(e, KeyboardInterrupt):
                advice = (f"{kept} finished shard(s) kept in {work_dir}; run the same command again to resume from "
                          "there" if kept else "no shard was finished yet; run the same command again to start over")
                raise KeyboardInterrupt(advice) from None
            raise


def verify(out_dir):
    """Check each shard of the dataset in out_dir against what its meta.json records (header, size, sha256): a copy
    to another machine cut short or damaged, a byte flipped on disk. Nothing else reads the checksums: a flipped token
    still in the vocabulary trains and evaluates silently (trial). UserError naming the damaged shards."""
    data = Dataset(out_dir)
    if not data.prepared:
        raise UserError(f"{out_dir} has no meta.json (nanoGPT's layout?): no checksums to verify its files against")
    dtype = token_dtype(data.meta["vocab_size"])
    shards = [s for split in data.meta["shards"].values() for s in split]
    if not all(isinstance(s.get("sha256"), str) and isinstance(s.get("tokens"), int) for s in shards):
        raise UserError(f"{out_dir}/meta.json records no checksum for some shards (the first prepare.py wrote none): "
                        "prepare the dataset again to have them")
    damaged = [s["file"] for s in tqdm(shards, desc="verify", unit="shard") if not shard_intact(out_dir, s, dtype)]
    if damaged:
        raise UserError(f"{len(damaged)} of the {len(shards)} shards in {out_dir} are missing or not what prepare.py "
                        f"wrote: {', '.join(damaged[:5])}{', ...' if len(damaged) > 5 else ''}; copy them again, or "
                        "prepare the dataset again")
    tokens = sum(s["tokens"] for s in shards)
    print(f"{out_dir}: all {len(shards)} shards ({tokens:,} tokens) are what prepare.py wrote")


def stop_on_sigterm(signum, frame):
    """kill, timeout and Slurm send SIGTERM, often to this process alone: stop as Ctrl-C does (workers stopped,
    one line, resumable), not with this process gone and each orphaned worker printing a broken pipe's traceback."""
    raise KeyboardInterrupt


def prepare(cfg, recipe, out_dir, work_dir, val_fraction, tokenizer_name, num_proc, t0):
    user_source = bool(cfg.source)
    if not cfg.source and recipe and recipe.url:
        cfg.source = os.path.join(out_dir, "input.txt")
        if not os.path.exists(cfg.source):
            download(recipe.url, cfg.source)
    local_files = all_source_files(cfg)
    for flag in ("source", "val_source", "test_source"):
        skipped = passed_over(getattr(cfg, flag)) if user_source or flag != "source" else []
        if skipped:
            print(f"note: --{flag}={getattr(cfg, flag)}: {len(skipped)} file{'s' * (len(skipped) > 1)} passed over, "
                  f"not {'/'.join('.' + e for e in SOURCE_EXTENSIONS)}: {', '.join(skipped[:5])}"
                  f"{', ...' if len(skipped) > 5 else ''}")
    docs = functools.partial(document_stream, cfg, recipe, val_fraction)  # read twice for a char vocabulary or BPE

    fp = fingerprint(cfg, recipe, val_fraction)
    meta = moved_in_part(work_dir, out_dir, fp)
    if meta is not None:
        publish(work_dir, out_dir, meta)
        print(f"wrote {out_dir}: the dataset a killed run of this command had prepared, moved into place (nothing to "
              "tokenize again)")
        return
    tokenizer, writers, skip, stream = start_or_resume(cfg, work_dir, fp, tokenizer_name, docs, num_proc)
    dtype = writers["train"].dtype
    save = lambda next_piece: save_resume_state(work_dir, fp, tokenizer, dtype, next_piece, writers)  # noqa: E731
    save(skip)
    print(f"tokenizer {tokenizer_name} (vocab {tokenizer.vocab_size}, {dtype.name} tokens), {num_proc} process(es), "
          f"shards of {cfg.shard_size:,} tokens")
    t_tokenize = time.time()
    all_text = local_files and all(file_kind(f) == "text" for f in local_files)  # else file sizes are not text sizes
    total_bytes = sum(map(os.path.getsize, local_files)) if all_text and not skip else None
    try:
        docs_per_split, stats = tokenize_into_shards(stream, skip, tokenizer, writers, save, cfg, num_proc,
                                                     total_bytes)
        if not stats["text"]:
            raise UserError(f"the source ({cfg.source or cfg.hf or cfg.name}) holds no text")
        for split in ("train", "val") + (("test",) if cfg.test_source else ()):
            if split not in writers or writers[split].num_tokens == 0:
                raise UserError(f"the {split} split came out empty: "
                                f"{empty_split_advice(split, cfg, recipe, val_fraction)}")
    except UserError as e:
        # the source or the settings must change before this can succeed, and then the run starts over: the shards
        # written so far are no use to anyone
        if not isinstance(e, ReadInterrupted):
            discard(work_dir)
        raise
    t_tokenize = time.time() - t_tokenize
    for w in writers.values():
        w.close()
    meta = {
        "tokenizer": tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "token_dtype": dtype.name,
        "shards": {split: w.shards for split, w in writers.items()},
        "source": {"recipe": cfg.name if recipe else None,
                   "url": (recipe.url or None) if recipe and not user_source else None,  # --hf runs have no recipe
                   "hf": None if local_files else {"name": cfg.hf or recipe.hf,
                                                   "config": cfg.hf_config or (recipe.hf_config if recipe else "")},
                   "files": [os.path.abspath(f) for f in local_files[:100]], "num_files": len(local_files),
                   "characters": stats["characters"], "documents": docs_per_split},
        "prepare": {"val_fraction": None if cfg.val_source else val_fraction, "seed": cfg.seed,  # val given: unused
                    "shard_size": cfg.shard_size},
    }
    write_json(os.path.join(work_dir, "meta.json"), meta)
    try:  # the dataset this one replaces: models trained on it read its tokenizer
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            before = json.load(f)["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    publish(work_dir, out_dir, meta)
    if before is not None and before != meta["tokenizer"]:
        print(f"note: {out_dir} held text tokenized with {describe(before)}, now {describe(meta['tokenizer'])}: models "
              "trained on it cannot read this one (train.py and evaluate.py refuse them, with how to prepare text "
              "for them)")

    for split, w in writers.items():
        print(f"{split}: {w.num_tokens:,} token{'s' * (w.num_tokens != 1)} in {len(w.shards)} "
              f"shard{'s' * (len(w.shards) != 1)}")
    rate = stats["bytes"] / 1e6 / max(t_tokenize, 1e-9)
    print(f"vocab size {tokenizer.vocab_size}; wrote {out_dir} in {time.time() - t0:.1f} s "
          f"(tokenizing: {stats['bytes'] / 1e6:,.1f} MB in {t_tokenize:.1f} s, {rate:.2f} MB/s, "
          f"{stats['tokens'] / max(t_tokenize, 1e-9) / 1e6:.2f}M tokens/s)")


def empty_split_advice(split, cfg, recipe, val_fraction):
    """What to change when a split comes out empty, by how that split was made."""
    own = {"val": cfg.val_source, "test": cfg.test_source}.get(split)
    if own:
        return f"--{split}_source={own} holds no text"
    if split == "train" and cfg.val_source:
        return f"--source={cfg.source} holds no text"
    if cfg.source:
        rule = source_rule(cfg, recipe, source_files(cfg.source))
    else:  # a Hub recipe: what becomes of its train split
        rule = recipe and dict(recipe.splits).get("train")
    if rule == "first_shard":
        return (f"the first --shard_size={cfg.shard_size:,} tokens go to val ({cfg.name}'s rule) and the source has "
                "no more; lower --shard_size, or give the val split its own files with --val_source")
    if split == "val":
        return f"raise --val_fraction (now {val_fraction}), or give the val split its own files with --val_source"
    if rule == "text":
        return f"the text is too short to split; give more text or lower --val_fraction (now {val_fraction})"
    return ("the first document always goes to val and the source has no other; give more documents, or the val "
            "split its own files with --val_source")


def parse_args(argv):
    """`prepare.py NAME --key=value`: the dataset name as a bare word, first or among the options (the first bare
    word that is not a config file, nor the value of a `--key value` written as argparse takes it, which the
    configurator answers with --key=value)."""
    takes_value = {f"--{key}" for key in configurator.value_keys(PrepareConfig)}
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and not arg.endswith(".py") and (i == 0 or argv[i - 1] not in takes_value):
            return argv[:i] + [f"--name={arg}"] + argv[i + 1:]
    return argv


if __name__ == "__main__":
    configurator.run(main, PrepareConfig, validate, argv=parse_args(sys.argv[1:]))
