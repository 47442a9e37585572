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

import collections
import difflib
import glob
import json
import os
import pickle
import re
import weakref

import numpy as np

from configurator import UserError
from lock import held_by
from tokenizer import spec_problems

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# shard files held open at once, the least recently read closed first: a dataset of thousands of shards (FineWeb's
# 100B tokens in 100M-token shards make 1,000) must stay under the process's open-file limit (often 1,024; macOS 256)
OPEN_SHARDS = 64
# (magic, version) -> token dtype; the uint32 pair is llm.c's for vocabularies past 65,536 tokens (Llama 3)
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
                             "use a uint32 token file for vocabularies above 65,536 tokens")
    (magic, version), = [k for k, v in FORMATS.items() if v == dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(memoryview(np.ascontiguousarray(tokens.astype(dtype, copy=False))))  # no copy of a 100M-token shard
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk (a trial's error named no file, and left the half-written one to fill it)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, e.filename or path) from None


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


def identity(stat):
    """What tells a file from another put in its place: its size and modification time (prepare.py writes every
    shard anew). Not its inode, which FUSE mounts (sshfs, s3fs) and some CIFS mounts may renumber between opens."""
    return stat.st_size, stat.st_mtime_ns


class Shard:
    """One file of tokens: a headered token file or a headerless nanoGPT .bin. Reads go through a plain file handle
    so that resident memory stays flat over a long run (a memmap's touched pages count towards RSS).
    headered=True (a shard meta.json lists) refuses a file without a valid header, rather than reading its header as
    tokens; vocab_size, where known, is what BatchSampler checks every batch's ids against."""

    def __init__(self, path, headered=None, vocab_size=None):
        self.path, self.vocab_size = path, vocab_size
        if headered is None:
            with open(path, "rb") as f:
                headered = f.read(4) in (np.int32(m).tobytes() for m, _ in FORMATS)
        if headered:
            self.dtype, self.num_tokens, self.offset = read_header(path)
        else:  # nanoGPT: raw uint16, no header
            self.dtype, self.offset = np.dtype("<u2"), 0
            size = os.path.getsize(path)
            if size % 2:  # half a token at the end: a copy cut short, or no token file at all
                raise TokenFileError(f"{path} holds {size:,} bytes, an odd number: not whole uint16 tokens (a copy cut "
                                     "short?); copy or prepare it again")
            self.num_tokens = size // 2
        self._file, self._identity = None, identity(os.stat(path))

    def check_ids(self, start, tokens):
        """tokens (read from `start`), once none is outside the vocabulary; an embedding lookup would crash later."""
        if self.vocab_size is not None and len(tokens) and tokens.max() >= self.vocab_size:
            at = int(np.argmax(tokens >= self.vocab_size))
            raise TokenFileError(f"{self.path}: token {start + at:,} is id {int(tokens[at])}, outside the vocabulary "
                                 f"of {self.vocab_size} (the dataset's vocab_size); the file is damaged or was made "
                                 "with another tokenizer: prepare the dataset again")
        return tokens

    # id -> weak reference of each shard with a file open, least recently read first: weak, so that a shard no one
    # holds any more goes, and its file with it (a deleted file's space is freed; Windows can delete it)
    _open = collections.OrderedDict()

    def read(self, start, length):
        if self._file is None:
            if len(Shard._open) >= OPEN_SHARDS:
                _, oldest = Shard._open.popitem(last=False)
                oldest = oldest()
                if oldest is not None and oldest._file is not None:
                    oldest._file.close()
                    oldest._file = None
            try:
                self._file = open(self.path, "rb", buffering=0)
                same = identity(os.fstat(self._file.fileno())) == self._identity
            except FileNotFoundError:
                same = False
            if not same:  # prepare.py run again under the dataset's name: batches would mix two datasets
                if self._file is not None:
                    self._file.close()
                    self._file = None
                raise TokenFileError(f"{self.path} has changed since this run started reading it (the dataset "
                                     "prepared again?); its batches would mix two datasets: resume once the "
                                     "preparation is done")
        Shard._open[id(self)] = weakref.ref(self)
        Shard._open.move_to_end(id(self))
        self._file.seek(self.offset + start * self.dtype.itemsize)
        return np.frombuffer(self._file.read(length * self.dtype.itemsize), dtype=self.dtype)


def dataset_dir(dataset, data_root):
    """The folder a --dataset names: a name under --data_root, or else a folder as given (or its meta.json). The name
    comes first: an out_dir called like the dataset (`--dataset=tinystories --out_dir=tinystories`) must not be taken
    for it. A path that names nothing stays as given, for the message (not data/data/x)."""
    if os.path.basename(dataset) == "meta.json" and os.path.isfile(dataset):
        return os.path.dirname(dataset) or "."
    under_root = os.path.join(data_root, dataset)
    if os.path.isdir(under_root):
        return under_root
    return dataset if os.path.isdir(dataset) or os.sep in dataset.rstrip(os.sep) else under_root


def missing_dataset_hint(data_dir):
    """A prepared folder beside data_dir with a close name, or the prepare.py command that makes data_dir."""
    parent, name = os.path.split(os.path.normpath(data_dir))
    parent = parent or "."
    prepared = sorted(os.path.basename(os.path.dirname(m)) for m in glob.glob(os.path.join(parent, "*", "meta.json")))
    close = difflib.get_close_matches(name, prepared, n=1)
    if close:
        return f"did you mean {close[0]}? (prepared datasets there: {', '.join(prepared)})"
    from prepare import RECIPES  # here only: prepare.py imports this module
    root = "" if os.path.normpath(parent) == "data" else f" --out_root={parent}"  # prepare.py's default: data/
    # a relative data root that is not here: run from another folder than the one training ran in
    elsewhere = "" if os.path.isabs(parent) or os.path.isdir(parent) else \
        f" (there is no {parent}/ in {os.getcwd()}: to use datasets prepared elsewhere, give --data_root=<their " \
        "folder>)"
    if name in RECIPES:
        return f"prepare it first: python prepare.py {name}{root}{elsewhere}"
    return (f"{name!r} is not one of prepare.py's recipes (python prepare.py --list); prepare your own text with "
            f"python prepare.py {name} --source=PATH{root}{elsewhere}")


class Dataset:
    """A prepared dataset folder: its meta (tokenizer, vocab size, ...) and the shards of each split."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        if not os.path.isdir(data_dir):
            raise UserError(f"dataset folder {data_dir} does not exist; {missing_dataset_hint(data_dir)}")
        meta_json = os.path.join(data_dir, "meta.json")
        self.prepared = os.path.exists(meta_json)  # by prepare.py: every shard has a header
        if self.prepared:
            self.meta = read_meta(meta_json)
            self.splits = {split: [os.path.join(data_dir, s["file"]) for s in shards]
                           for split, shards in self.meta["shards"].items()}
        else:
            unfinished = sorted(n for n in os.listdir(data_dir) if re.fullmatch(PREPARE_FILES, n))
            busy = held_by(data_dir, "prepare.lock")
            if unfinished and busy:
                raise UserError(f"{data_dir} is being prepared right now ({busy}): wait for that prepare.py to "
                                "finish")
            if unfinished:
                raise UserError(f"{data_dir} is an unfinished preparation: it holds {unfinished[0]} but no meta.json, "
                                "which prepare.py writes last; run the prepare.py command that made it again (it "
                                "resumes where it stopped)")
            self.meta, self.splits = _nanogpt_layout(data_dir)

    def fingerprint(self, split):
        """What tells a split's tokens from those of another preparation under the same name: the sha256 of each
        shard meta.json lists (prepare.py's), or each file's size (nanoGPT's layout records no digest)."""
        if self.prepared:
            return [s.get("sha256") for s in self.meta["shards"].get(split, [])]
        return [os.path.getsize(p) for p in self.splits.get(split, [])]

    def shards(self, split):
        paths = self.splits.get(split)
        if not paths:
            raise UserError(f"{self.data_dir} has no {split!r} split (it has: {', '.join(self.splits) or 'none'})")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UserError(f"{missing[0]} is listed in meta.json but missing; prepare the dataset again")
        shards = [Shard(p, headered=self.prepared or None, vocab_size=self.meta["vocab_size"]) for p in paths]
        listed = [s.get("tokens") for s in self.meta["shards"][split]] if self.prepared else [None] * len(shards)
        for shard, tokens in zip(shards, listed):  # a header read each: a shard copied over another shows here
            if tokens is not None and shard.num_tokens != tokens:
                raise UserError(f"{shard.path} holds {shard.num_tokens:,} tokens where meta.json lists {tokens:,}: "
                                "not the file prepare.py wrote there; prepare the dataset again")
        return shards


UNFINISHED_DIR = "unfinished"  # where prepare.py writes a dataset until it is whole, then moves it up
PREPARE_FILES = r"(train|val|test)_\d{6}\.bin|resume\.json|resume-.*\.part|" + UNFINISHED_DIR  # only prepare.py's


def read_meta(path):
    """A dataset's meta.json, checked once here: a hand-edited or damaged file is one message, not a KeyError later
    (or a model trained on ids its tokenizer cannot decode)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); prepare the dataset again") from None
    problems = meta_problems(meta)
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)}; prepare the dataset again, or undo the edit")
    return meta


def meta_problems(meta):
    if not isinstance(meta, dict):
        return ["not a JSON object"]
    problems = []
    vocab_size = meta.get("vocab_size")
    if type(vocab_size) is not int or vocab_size < 1:
        problems.append(f"vocab_size {vocab_size!r} is not a positive whole number")
        vocab_size = None
    problems += spec_problems(meta.get("tokenizer"), vocab_size)
    eot_id = meta.get("eot_id")
    if eot_id is not None and (type(eot_id) is not int or not 0 <= eot_id < (vocab_size or eot_id + 1)):
        problems.append(f"eot_id {eot_id!r} is not an id of the vocabulary")
    shards = meta.get("shards")
    if not (isinstance(shards, dict) and all(isinstance(files, list) and all(
            isinstance(s, dict) and isinstance(s.get("file"), str) for s in files) for files in shards.values())):
        problems.append('"shards" is not a map from each split to a list of {"file": ...} entries')
    return problems


def _nanogpt_layout(data_dir):
    """meta and splits of a folder without meta.json: nanoGPT's train.bin / val.bin (headerless uint16) with an
    optional meta.pkl, or llm.c's and modded-nanogpt's headered shards (fineweb_train_000001.bin, ...)."""
    splits = {}
    for split in ("train", "val"):
        # nanoGPT's one file, where it is there: a train_backup.bin beside it is not part of the split
        exact = os.path.join(data_dir, f"{split}.bin")
        paths = [exact] if os.path.isfile(exact) else sorted(glob.glob(os.path.join(data_dir, f"*{split}*.bin")))
        if paths:
            splits[split] = paths
    if not splits and glob.glob(os.path.join(data_dir, "ckpt*.pt")):
        raise UserError(f"{data_dir} is a training run's folder, not a dataset: give --dataset a prepared dataset "
                        "(its name under data/, or its folder)")
    if not splits:
        raise UserError(f"{data_dir} holds no prepared data (no meta.json, no train.bin/val.bin); "
                        f"run: python prepare.py {os.path.basename(os.path.normpath(data_dir))}")
    # nanoGPT's BPE datasets (openwebtext, shakespeare) and llm.c's GPT-2 shards carry no meta: GPT-2 BPE
    meta = nanogpt_char_meta(data_dir) or dict(GPT2_META)
    meta["source"] = {"layout": "nanoGPT", "folder": data_dir}
    return meta, splits


GPT2_META = {"tokenizer": {"type": "tiktoken", "encoding": "gpt2"}, "vocab_size": 50257, "eot_id": 50256}


def nanogpt_char_meta(data_dir):
    """The meta of nanoGPT's char-level meta.pkl in data_dir ({'vocab_size', 'itos', 'stoi'}); None without one."""
    pkl = os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(pkl):
        return None
    try:
        with open(pkl, "rb") as f:
            old = pickle.load(f)
        pieces, vocab_size = [old["itos"][i] for i in range(len(old["itos"]))], int(old["vocab_size"])
        long = [p for p in pieces if not isinstance(p, str) or len(p) != 1]
    except Exception as e:  # truncated, another pickle, a dict without nanoGPT's keys: pickle raises many kinds
        raise UserError(f"{pkl} is not nanoGPT's char vocabulary (a dict with itos, stoi and vocab_size: "
                        f"{type(e).__name__}: {e}); prepare the dataset again (nanoGPT's prepare.py, or ours)") \
            from None
    if long:  # a vocabulary of words, say: no tokenizer here reads or writes its text, so nothing trained on it could
        raise UserError(f"{pkl} maps ids to {len(long):,} pieces of more than one character ({long[0]!r}, ...), not "
                        "nanoGPT's char vocabulary: no tokenizer of this toolkit writes such text; prepare the "
                        "text with prepare.py (--tokenizer=char, gpt2 or bpe:N)")
    return {"tokenizer": {"type": "char", "chars": "".join(pieces), "eot": False}, "vocab_size": vocab_size,
            "eot_id": None}


def read_windows(shards, cumulative, picks, length, stride=1):
    """
    (x, y) int64 arrays: windows of `length` tokens as inputs and the targets one position later, their ids checked
    against the vocabulary. picks number them over all shards, `cumulative` counting each shard's (np.cumsum); pick
    number i of a shard starts at token i x stride.
    """
    shard_idx = np.searchsorted(cumulative, picks, side="right")
    offsets = (picks - np.concatenate(([0], cumulative[:-1]))[shard_idx]) * stride
    rows = np.stack([shards[s].read(int(o), length) for s, o in zip(shard_idx, offsets)])
    vocab_size = shards[0].vocab_size
    if vocab_size is not None and rows.max() >= vocab_size:  # one max over the batch: microseconds
        for row, s, o in zip(rows, shard_idx, offsets):
            shards[s].check_ids(int(o), row)
    rows = rows.astype(np.int64)
    return rows[:, :-1], rows[:, 1:]


def too_short(shards, block_size):
    longest = max(s.num_tokens for s in shards)
    return UserError(f"block_size={block_size} needs shards of more than {block_size} tokens, but the longest "
                     f"({shards[0].path} ...) has {longest}; lower block_size or add data")


class BatchSampler:
    """
    Random (x, y) batches of `batch_size` windows of `block_size + 1` tokens from a list of shards. Every valid
    window start in every shard is equally likely, so shards are drawn in proportion to their size (nanoGPT's way:
    with replacement, so over one split's worth of tokens about a third of it is never drawn and a quarter twice or
    more; EpochSampler goes through it once). All randomness comes from one numpy Generator whose state is saved in
    checkpoints, so a resumed run draws the same batches.
    Under DDP every rank draws the same global batch of batch_size x world_size windows from the same seed and reads
    only its own slice: ranks see different data, and the data of a step does not depend on how many processes share
    it (2 ranks x 1 micro-step read exactly what 1 rank x 2 micro-steps reads).
    """

    def __init__(self, shards, block_size, batch_size, seed, rank=0, world_size=1):
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        starts = [max(s.num_tokens - block_size, 0) for s in shards]
        if sum(starts) == 0:
            raise too_short(shards, block_size)
        self.cum_starts = np.cumsum(starts)
        self.rng = np.random.default_rng(seed)

    def next_batch(self):
        """Two int64 arrays of shape (batch_size, block_size): inputs and the targets one position later."""
        picks = self.rng.integers(0, self.cum_starts[-1], size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return read_windows(self.shards, self.cum_starts, picks, self.block_size + 1)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


class EpochSampler:
    """
    BatchSampler's interface, but in epochs: each shard is cut into consecutive windows of block_size + 1 tokens that
    overlap by one (window i starts at token i x block_size), so that in every epoch each token but a shard's first
    and its last few (fewer than block_size) is predicted exactly once, as llm.c and build-nanogpt train. The
    windows come in an order shuffled anew for each epoch from (seed, epoch), and a batch that reaches the end of an
    epoch is completed from the next. The same global batch on every rank, each reading its slice, as BatchSampler.
    The state is the epoch and how many of its windows have been used, so a resumed run goes on where it stopped.
    """

    def __init__(self, shards, block_size, batch_size, seed, rank=0, world_size=1):
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.cum_windows = np.cumsum([max(s.num_tokens - 1, 0) // block_size for s in shards])
        self.windows = int(self.cum_windows[-1])
        if self.windows == 0:
            raise too_short(shards, block_size)
        self.seed = [int(v) for v in np.atleast_1d(seed)]
        self.epoch, self.position, self._order = 0, 0, (None, None)

    def order(self, epoch):
        """The window indices of an epoch, in the order it uses them (kept for the epoch in progress): int32 where
        they fit, so 100B tokens in windows of 1024 take 390 MB of each process's memory, not 780."""
        if self._order[0] != epoch:
            indices = np.arange(self.windows, dtype=np.int32 if self.windows < 2**31 else np.int64)
            self._order = (epoch, np.random.default_rng([*self.seed, epoch]).permutation(indices))
        return self._order[1]

    def next_batch(self):
        picks = []
        need = self.batch_size * self.world_size
        while need:
            take = min(need, self.windows - self.position)
            picks.append(self.order(self.epoch)[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.windows:
                self.epoch, self.position = self.epoch + 1, 0
        picks = np.concatenate(picks)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return read_windows(self.shards, self.cum_windows, picks, self.block_size + 1, stride=self.block_size)

    @staticmethod
    def epochs_done(state):
        """How far the sampler of `state` has gone through the data, in epochs (1.5: half way through the second)."""
        return state["epoch"] + state["position"] / state["windows"]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "windows": self.windows}

    def load_state_dict(self, state):
        """Resumed in the same epoch at the same window. With a dataset of another size (a resume may change the
        folder) the epoch's order is another one, so it goes on at the same fraction of the epoch."""
        self.epoch = state["epoch"]
        self.position = min(round(state["position"] * self.windows / state["windows"]), self.windows - 1)


class OneBatchSampler(BatchSampler):
    """
    BatchSampler's first batch, every time: the check that a model, its loss and its optimizer can learn at all,
    since together they should drive the loss on one batch close to zero (Karpathy's "overfit one batch", llm.c's
    overfit_single_batch). Under DDP each rank has its slice of that one global batch.
    """

    def __init__(self, shards, block_size, batch_size, seed, rank=0, world_size=1):
        super().__init__(shards, block_size, batch_size, seed, rank, world_size)
        self.batch = super().next_batch()

    def next_batch(self):
        return tuple(a.copy() for a in self.batch)  # the consumer's to keep


SAMPLERS = {"random": BatchSampler, "epochs": EpochSampler, "one_batch": OneBatchSampler}


def first_tokens(shards, count):
    """The first `count` tokens of a split (all of a shorter one), across its shards in order, ids checked."""
    parts, left = [], count
    for shard in shards:
        take = min(left, shard.num_tokens)
        if take <= 0:
            break
        parts.append(shard.check_ids(0, shard.read(0, take)))
        left -= take
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def windows(n_tokens, window, stride):
    """
    The strided windows over n_tokens tokens, as (begin, end, scored): inputs tokens[begin:end] predict
    tokens[begin+1:end+1], of which the last `scored` count. Every token but the first is scored exactly once.
    """
    plan, next_target, begin = [], 1, 0
    while next_target < n_tokens:
        end = min(begin + window, n_tokens - 1)
        plan.append((begin, end, end + 1 - next_target))
        next_target = end + 1
        begin += stride
    return plan


def window_batch(tokens, chunk, rows, length):
    """
    (x, y) int64 arrays (rows, length) for a chunk of windows (see `windows`): each window's inputs from the left,
    its scored targets in place; every other target is -1 (not scored), as is every row past the chunk.
    """
    x = np.zeros((rows, length), dtype=np.int64)
    y = np.full((rows, length), -1, dtype=np.int64)
    for row, (begin, end, scored) in enumerate(chunk):
        x[row, :end - begin] = tokens[begin:end]
        y[row, end - begin - scored:end - begin] = tokens[end + 1 - scored:end + 1]
    return x, y
