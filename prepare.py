"""
Turn a text corpus into token shards that train.py reads:

    python prepare.py shakespeare_char                  tiny Shakespeare, one id per character
    python prepare.py shakespeare                       tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare.py mytext --source="notes/*.txt" --tokenizer=char

Writes data/<name>/train_000000.bin ..., val_000000.bin ... (the llm.c token-file format, see tokendata.py) and
meta.json, which is written last: a folder without meta.json is an unfinished preparation.
"""

import glob
import json
import os
import time
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

import configurator
from configurator import UserError
from tokendata import token_dtype, write_tokens
from tokenizer import CharTokenizer, TiktokenTokenizer

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

# name -> (one-line description, default tokenizer, URL of the canonical source)
RECIPES = {
    "shakespeare_char": ("tiny Shakespeare (1.1 MB), character-level", "char", TINY_SHAKESPEARE_URL),
    "shakespeare": ("tiny Shakespeare (1.1 MB), GPT-2 BPE", "gpt2", TINY_SHAKESPEARE_URL),
}


@dataclass
class PrepareConfig:
    name: str = ""  # the dataset: a recipe (see --list) or any name for your own --source
    source: str = ""  # a .txt file, a folder of them or a glob; empty: the recipe's canonical download
    tokenizer: str = ""  # 'char' or a tiktoken encoding such as 'gpt2'; empty: the recipe's default (gpt2 otherwise)
    val_fraction: float = 0.1  # the last part of the text becomes the val split
    shard_size: int = 100_000_000  # tokens per shard file
    out_root: str = "data"  # datasets land in out_root/<name>/
    list: bool = False  # print the recipes and exit


def validate(cfg):
    problems = []
    if not cfg.list and not cfg.name:
        problems.append("name a dataset: python prepare.py shakespeare_char (see --list)")
    if not cfg.list and cfg.name and cfg.name not in RECIPES and not cfg.source:
        problems.append(f"{cfg.name!r} is not a recipe (see --list); for your own text give --source=PATH")
    if not 0.0 < cfg.val_fraction < 1.0:
        problems.append(f"val_fraction={cfg.val_fraction} must be between 0 and 1")
    if cfg.shard_size < 1:
        problems.append(f"shard_size={cfg.shard_size} must be at least 1")
    return problems


def download(url, path):
    """Fetch url to path (atomically); a clear error offline."""
    print(f"downloading {url}")
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e}); offline, point --source at a local copy") from None
    os.replace(tmp, path)


def source_files(source):
    """The text files a --source names: one file, every .txt under a folder, or a glob; sorted for determinism."""
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.txt"), recursive=True))
    elif os.path.isfile(source):
        files = [source]
    else:
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"--source={source}: no such file, or no .txt files there")
    return files


def read_text(files):
    texts = []
    for path in tqdm(files, desc="read", unit="file", disable=len(files) < 2):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                            "convert it to UTF-8 first") from None
    text = "\n\n".join(texts)  # files are joined with a blank line: they are separate documents
    if not text.strip():
        raise UserError(f"the source ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''}) holds no text")
    return text


def chunks(text, size=1 << 20):
    """Pieces of about `size` characters, cut just after a newline that a non-space character follows: BPE never
    merges across such a point, so encoding piece by piece gives exactly the tokens of encoding the whole."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.find("\n", end)
            while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
                cut = text.find("\n", cut + 1)
            end = len(text) if cut == -1 else cut + 1
        yield text[start:end]
        start = end


def encode(tokenizer, text, desc):
    ids = []
    with tqdm(total=len(text), unit="char", unit_scale=True, desc=f"encode {desc}") as bar:
        for piece in chunks(text):
            ids.extend(tokenizer.encode(piece))
            bar.update(len(piece))
    return ids


def write_split(out_dir, split, ids, shard_size, dtype):
    shards = []
    for i, start in enumerate(range(0, max(len(ids), 1), shard_size)):
        name = f"{split}_{i:06d}.bin"
        piece = ids[start:start + shard_size]
        write_tokens(os.path.join(out_dir, name), piece, dtype)
        shards.append({"file": name, "tokens": len(piece)})
    return shards


def main(cfg, sources):
    if cfg.list:
        for name, (description, _, _) in RECIPES.items():
            print(f"{name:20s} {description}")
        return
    t0 = time.time()
    out_dir = os.path.join(cfg.out_root, cfg.name)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is unfinished until the new meta.json is written
    _, default_tokenizer, url = RECIPES.get(cfg.name, ("", "gpt2", None))
    source = cfg.source
    if not source:
        source = os.path.join(out_dir, "input.txt")
        if not os.path.exists(source):
            download(url, source)
    files = source_files(source)
    text = read_text(files)

    n_train = int(len(text) * (1 - cfg.val_fraction))
    splits = {"train": text[:n_train], "val": text[n_train:]}
    tokenizer_name = cfg.tokenizer or default_tokenizer
    tokenizer = CharTokenizer.from_text(text) if tokenizer_name == "char" else TiktokenTokenizer(tokenizer_name)
    dtype = token_dtype(tokenizer.vocab_size)

    shard_meta = {}
    for split, split_text in splits.items():
        ids = encode(tokenizer, split_text, split)
        shard_meta[split] = write_split(out_dir, split, ids, cfg.shard_size, dtype)
        print(f"{split}: {len(ids):,} tokens in {len(shard_meta[split])} shard(s)")
    meta = {
        "tokenizer": tokenizer.meta(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "token_dtype": dtype.name,
        "shards": shard_meta,
        "source": {"recipe": cfg.name if cfg.name in RECIPES else None, "url": None if cfg.source else url,
                   "files": [os.path.abspath(f) for f in files[:100]], "num_files": len(files),
                   "characters": len(text)},
    }
    tmp = meta_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(tmp, meta_path)
    print(f"vocab size {tokenizer.vocab_size}; wrote {out_dir} in {time.time() - t0:.1f} s")


def parse_args(argv):
    """`prepare.py NAME --key=value`: the dataset name may come first, as a bare word."""
    if argv and not argv[0].startswith("-"):
        argv = [f"--name={argv[0]}"] + argv[1:]
    return argv


if __name__ == "__main__":
    import sys
    configurator.run(main, PrepareConfig, validate, argv=parse_args(sys.argv[1:]))
