"""
Token files on disk, the datasets made of them, and the random batches train.py draws from them.

The token-file format is llm.c's (also read by modded-nanogpt), so shards move between the projects unchanged:
a header of 256 little-endian int32 (1024 bytes), then the tokens.
    header[0] magic    20240520 for uint16 tokens (version 1), 20240801 for uint32 tokens (version 7)
    header[1] version
    header[2] number of tokens that follow
A prepared dataset is a folder data/<name>/ with train_000000.bin ..., val_000000.bin ... and meta.json
(tokenizer, vocab_size, eot_id, shard token counts, source). nanoGPT's layout (headerless uint16 train.bin / val.bin,
optional meta.pkl) is read too.
"""

import glob
import json
import os
import pickle

import numpy as np

from configurator import UserError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype; the uint32 pair is llm.c's for vocabularies past 65,535 (Llama 3)
FORMATS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}


class TokenFileError(UserError):
    pass


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_tokens(path, tokens, dtype=np.dtype("<u2")):
    """
    Write a token file whole-or-not-at-all: to a temporary name in the same folder, fsync'ed, then renamed, so a
    killed run never leaves a file that looks complete. Ids that do not fit `dtype` are an error, never wrapped.
    """
    dtype = np.dtype(dtype)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise TokenFileError(f"{path}: token id {int(tokens.max())} does not fit {dtype.name}; "
                             "use a uint32 token file for vocabularies above 65,535")
    (magic, version), = [k for k, v in FORMATS.items() if v == dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(memoryview(np.ascontiguousarray(tokens.astype(dtype, copy=False))))  # no copy of a 100M-token shard
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path):
    """(dtype, number of tokens, byte offset of the first token) of a token file, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise TokenFileError(f"{path}: cannot read token file: {e.strerror}") from None
    if len(raw) < HEADER_BYTES:
        raise TokenFileError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header; the file is "
                             "truncated or not a token file: prepare the dataset again")
    magic, version, count = (int(x) for x in np.frombuffer(raw, dtype="<i4", count=3))
    if (magic, version) not in FORMATS:
        raise TokenFileError(f"{path}: header magic {magic} / version {version} is not a token file "
                             "(expected 20240520/1 for uint16 or 20240801/7 for uint32): prepare the dataset again")
    dtype = FORMATS[magic, version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise TokenFileError(f"{path}: header says {count:,} tokens ({expected:,} bytes) but the file has "
                             f"{size:,} bytes; it is truncated or corrupt: prepare the dataset again")
    return dtype, count, HEADER_BYTES


def read_tokens(path):
    """All tokens of a token file, memory-mapped read-only."""
    dtype, count, offset = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class Shard:
    """One file of tokens: a headered token file or a headerless nanoGPT .bin. Reads go through a plain file handle
    so that resident memory stays flat over a long run (a memmap's touched pages count towards RSS)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            headered = f.read(4) in (np.int32(m).tobytes() for m, _ in FORMATS)
        if headered:
            self.dtype, self.num_tokens, self.offset = read_header(path)
        else:  # nanoGPT: raw uint16, no header
            self.dtype, self.offset = np.dtype("<u2"), 0
            self.num_tokens = os.path.getsize(path) // 2
        self._file = None

    def read(self, start, length):
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        self._file.seek(self.offset + start * self.dtype.itemsize)
        return np.frombuffer(self._file.read(length * self.dtype.itemsize), dtype=self.dtype)

    def __getstate__(self):  # picklable for data-loader workers: the file handle is reopened on first read
        return {**self.__dict__, "_file": None}


class Dataset:
    """A prepared dataset folder: its meta (tokenizer, vocab size, ...) and the shards of each split."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        if not os.path.isdir(data_dir):
            name = os.path.basename(os.path.normpath(data_dir))
            raise UserError(f"dataset folder {data_dir} does not exist; prepare it first: python prepare.py {name}")
        meta_json = os.path.join(data_dir, "meta.json")
        if os.path.exists(meta_json):
            with open(meta_json, encoding="utf-8") as f:
                self.meta = json.load(f)
            self.splits = {split: [os.path.join(data_dir, s["file"]) for s in shards]
                           for split, shards in self.meta["shards"].items()}
        else:
            self.meta, self.splits = _nanogpt_layout(data_dir)

    def shards(self, split):
        paths = self.splits.get(split)
        if not paths:
            raise UserError(f"{self.data_dir} has no {split!r} split (it has: {', '.join(self.splits) or 'none'})")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UserError(f"{missing[0]} is listed in meta.json but missing; prepare the dataset again")
        return [Shard(p) for p in paths]


def _nanogpt_layout(data_dir):
    """meta and splits of a folder without meta.json: nanoGPT's train.bin / val.bin (headerless uint16) with an
    optional meta.pkl, or llm.c's and modded-nanogpt's headered shards (fineweb_train_000001.bin, ...)."""
    splits = {}
    for split in ("train", "val"):
        paths = sorted(glob.glob(os.path.join(data_dir, f"*{split}*.bin")))
        if paths:
            splits[split] = paths
    if not splits:
        raise UserError(f"{data_dir} holds no prepared data (no meta.json, no train.bin/val.bin); "
                        f"run: python prepare.py {os.path.basename(os.path.normpath(data_dir))}")
    pkl = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(pkl):  # nanoGPT's char-level meta: {'vocab_size', 'itos', 'stoi'}
        with open(pkl, "rb") as f:
            old = pickle.load(f)
        chars = "".join(old["itos"][i] for i in range(len(old["itos"])))
        meta = {"tokenizer": {"type": "char", "chars": chars, "eot": False},
                "vocab_size": old["vocab_size"], "eot_id": None}
    else:  # nanoGPT's BPE datasets (openwebtext, shakespeare) and llm.c's GPT-2 shards carry no meta: GPT-2 BPE
        meta = {"tokenizer": {"type": "tiktoken", "encoding": "gpt2"}, "vocab_size": 50257, "eot_id": 50256}
    meta["source"] = {"layout": "nanoGPT", "folder": data_dir}
    return meta, splits


class BatchSampler:
    """
    Random (x, y) batches of `batch_size` windows of `block_size + 1` tokens from a list of shards. Every valid
    window start in every shard is equally likely, so shards are drawn in proportion to their size. All randomness
    comes from one numpy Generator whose state is saved in checkpoints, so a resumed run draws the same batches.
    Under DDP every rank draws the same global batch of batch_size x world_size windows from the same seed and reads
    only its own slice: ranks see different data, and the data of a step does not depend on how many processes share
    it (2 ranks x 1 micro-step read exactly what 1 rank x 2 micro-steps reads).
    """

    def __init__(self, shards, block_size, batch_size, seed, rank=0, world_size=1):
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        starts = [max(s.num_tokens - block_size, 0) for s in shards]
        if sum(starts) == 0:
            longest = max(s.num_tokens for s in shards)
            raise UserError(f"block_size={block_size} needs shards of more than {block_size} tokens, but the longest "
                            f"({shards[0].path} ...) has {longest}; lower block_size or add data")
        self.cum_starts = np.cumsum(starts)
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        """Two int64 arrays of shape (batch_size, block_size): inputs and the targets one position later."""
        picks = self.rng.integers(0, self.cum_starts[-1], size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        shard_idx = np.searchsorted(self.cum_starts, picks, side="right")
        offsets = picks - np.concatenate(([0], self.cum_starts[:-1]))[shard_idx]
        rows = np.stack([self.shards[s].read(int(o), self.block_size + 1) for s, o in zip(shard_idx, offsets)])
        rows = rows.astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
