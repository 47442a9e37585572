"""
Tokenizers shared by prepare.py, train.py, sample.py and evaluate.py, and their description in meta.json.

Two kinds: character level (the vocabulary is the sorted set of characters of the corpus) and tiktoken encodings
(GPT-2 BPE by default). `tokenizer_from_meta` rebuilds exactly the tokenizer a dataset or checkpoint was made with.
"""

import numpy as np

from configurator import UserError


class CharTokenizer:
    """One id per character, in sorted order; an optional end-of-text id one past the last character."""

    def __init__(self, chars, eot=False):
        self.chars = "".join(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("char vocabulary has repeated characters")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.eot_id = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + (1 if eot else 0)
        self._table = None  # code point -> id, built on first encode_array

    @classmethod
    def from_text(cls, text, eot=False):
        return cls(sorted(set(text)), eot=eot)

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            unknown = sorted({ch for ch in text if ch not in self.stoi})
            raise UserError(f"text has characters outside this model's {len(self.chars)}-character vocabulary: "
                            f"{''.join(unknown)!r}; use only characters the training data contained") from e

    def encode_array(self, text):
        """encode() as a numpy array, through a code-point lookup table: ~50x faster, what prepare.py uses."""
        if self._table is None:
            self._table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
            self._table[[ord(ch) for ch in self.chars]] = np.arange(len(self.chars))
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = self._table[np.minimum(points, len(self._table) - 1)]
        if len(points) and (points.max() >= len(self._table) or ids.min() < 0):
            self.encode(text)  # raises, naming the unknown characters
        return ids

    def decode(self, ids):
        # the end-of-text id (and padded vocab ids a model should never produce) decode to nothing
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if i < n)

    def meta(self):
        return {"type": "char", "chars": self.chars, "eot": self.eot_id is not None}


class TiktokenTokenizer:
    """A tiktoken encoding (GPT-2 BPE: "gpt2"); special tokens in the text are encoded as ordinary text."""

    def __init__(self, encoding="gpt2"):
        import tiktoken  # imported here so char-level users never need its BPE files
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except ValueError as e:
            raise UserError(f"unknown tiktoken encoding {encoding!r}: {e}") from None
        except Exception as e:  # first use downloads the BPE files; offline this fails deep inside requests
            raise UserError(f"could not load the {encoding!r} BPE files ({type(e).__name__}); tiktoken downloads "
                            "them on first use, so go online once or point TIKTOKEN_CACHE_DIR at a folder "
                            "holding them") from None
        self.encoding = encoding
        self.eot_id = self.enc.eot_token
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_array(self, text):
        """encode() as a numpy array: tiktoken's own numpy encoder where it has one (no list of Python ints)."""
        if hasattr(self.enc, "encode_to_numpy"):  # tiktoken >= 0.8; with nothing allowed, the same as encode_ordinary
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(np.int64)
        return np.array(self.enc.encode_ordinary(text), dtype=np.int64)

    def encode_batch(self, texts, num_threads=1):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])

    def meta(self):
        return {"type": "tiktoken", "encoding": self.encoding}


def tokenizer_from_meta(meta):
    """The tokenizer described by meta["tokenizer"] (meta.json of a dataset, or a checkpoint's copy of it)."""
    spec = meta.get("tokenizer") or {}
    if spec.get("type") == "char":
        return CharTokenizer(spec["chars"], eot=spec.get("eot", False))
    if spec.get("type") == "tiktoken":
        return TiktokenTokenizer(spec.get("encoding", "gpt2"))
    raise UserError(f"unknown tokenizer description {spec!r} in meta")


def make_tokenizer(name, text=None):
    """A tokenizer by name, as in prepare.py's --tokenizer: 'char' (needs the text for its vocabulary) or a tiktoken encoding."""
    if name == "char":
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)
